"""Scratch state a block keeps from its forward call for its recomputation.

The reversible engine (``reversible.py``) and ``torch.utils.checkpoint``-style recomputation re-run
a block in the backward pass. A block, or any module nested inside it, may store small tensors in
the forward call (LSH attention stores its bucket ids) and read them back when it is re-run:
``saved_state(owner)`` returns the same dict in both calls, ``is_recomputing()`` says which call it is.

This module sits below the layers and the engine, so attention layers use it without importing the
engine. The engine activates a state around each block call with ``activated(state, recomputing)``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class BlockCallState:
    """Scratch dicts of one block call, one per owner, plus whether the call is a rerun."""

    __slots__ = ("by_owner", "recomputing", "calls", "owner_calls")

    def __init__(self) -> None:
        self.by_owner: dict[int, tuple[object, dict]] = {}  # id(owner) -> (owner, scratch)
        self.recomputing = False
        self.calls = 0
        self.owner_calls: dict[int, int] = {}  # id(owner) -> calls of next_call_index in the current pass

    def scratch_for(self, owner: object) -> dict:
        entry = self.by_owner.get(id(owner))
        if entry is None:
            # The owner is kept in the entry so its id cannot be reused while the state lives.
            entry = (owner, {})
            self.by_owner[id(owner)] = entry
        return entry[1]


_thread_local = threading.local()


def _active_states() -> list[BlockCallState]:
    states = getattr(_thread_local, "states", None)
    if states is None:
        states = _thread_local.states = []
    return states


@contextlib.contextmanager
def activated(state: BlockCallState, recomputing: bool) -> Iterator[None]:
    states = _active_states()
    state.recomputing = recomputing
    state.owner_calls = {}
    states.append(state)
    try:
        yield
    finally:
        states.pop()


def saved_state(owner: object) -> dict | None:
    """A scratch dict private to ``owner`` for the current block call, or None.

    During the engine's forward a block (or any module nested inside it) may store
    tensors in the dict; during the backward recomputation of the same block call the
    same dict, with those entries, is returned. It is freed when that block's backward
    step is done. There is one dict per owner per block call: a module called several
    times inside one block shares it and keys its entries by ``next_call_index``. Store small things
    (bucket ids, seeds): a stored activation stays alive until the backward pass.

    Returns None when not inside an engine block call that will be recomputed
    (``memory_mode="autograd"``, inference under ``torch.no_grad``, or outside the
    engine), so callers simply compute normally.
    """
    states = getattr(_thread_local, "states", None)
    if not states:
        return None
    return states[-1].scratch_for(owner)


def is_recomputing() -> bool:
    """True while the engine re-runs a block in the backward pass."""
    states = getattr(_thread_local, "states", None)
    return bool(states) and states[-1].recomputing


def next_call_index(owner: object) -> int:
    """0 on ``owner``'s first call in the current pass of the current block call, then 1, 2, ...

    The forward call and its recomputation call a block's modules in the same order, so the n-th
    call of the rerun is the n-th call of the forward: a module called several times inside one
    block keys its ``saved_state`` entries by this index. Returns 0 outside an engine block call.
    """
    states = getattr(_thread_local, "states", None)
    if not states:
        return 0
    calls = states[-1].owner_calls
    index = calls.get(id(owner), 0)
    calls[id(owner)] = index + 1
    return index
