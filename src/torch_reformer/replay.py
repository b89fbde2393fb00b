"""Replaying a block call in the reversible engine's backward pass exactly as the forward ran it.

Before each block call the engine records a ``CallRecord``: the RNG states (CPU, and the CUDA
device's for CUDA tensors), a ``BlockCallState`` for what the block saves for its rebuild (LSH
bucket ids) and a ``ModulesState`` snapshot of what else the rebuild depends on (train/eval
flags, forward hooks, the parameters' identity, values and ``requires_grad``), and a
``BufferSnapshot`` keeps the pre-call values of the buffers the call changed. ``replaying``
re-enters that state for the rebuild: it refuses a rebuild whose modules changed, replays the
RNG and autocast state, lets the rebuild read and update scratch copies of the buffers holding
what the forward read (so BatchNorm statistics are updated once per step, by the forward, and
spectral norm's power iteration starts where it started) and puts the global RNG back afterwards.
``InputFingerprint`` measures how far a whole chain's rebuild drifted from its real input.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules import module as module_globals

from .autograd_checks import refuse_in_backward, run_eagerly, version_of
from .block_state import BlockCallState, activated


def autocast_states(device_type: str) -> tuple[tuple[str, bool, torch.dtype], ...]:
    """(device type, enabled, dtype) for the tensors' device type and for the CPU."""
    device_types = dict.fromkeys((device_type, "cpu"))
    return tuple(
        (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) for kind in device_types
    )


class CallRecord:
    """What a forward block call needs to be replayed exactly. ``modules_state`` and
    ``buffers_before`` are taken once the call is done (see ``ModulesState`` and ``BufferSnapshot``)."""

    __slots__ = ("cpu_rng", "device_rng", "state", "modules_state", "buffers_before")

    def __init__(self, device: torch.device) -> None:
        self.cpu_rng = torch.get_rng_state()
        self.device_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.state = BlockCallState()
        self.modules_state: ModulesState | None = None
        self.buffers_before: dict[tuple[int, str], torch.Tensor] = {}


def _forward_hook_keys(submodules: Sequence[nn.Module]) -> tuple:
    """The handles of every forward hook a call of these modules runs, global ones included."""
    shared = (tuple(module_globals._global_forward_pre_hooks), tuple(module_globals._global_forward_hooks))
    return shared + tuple((tuple(sub._forward_pre_hooks), tuple(sub._forward_hooks)) for sub in submodules)


def _parameter_states(submodules: Sequence[nn.Module]) -> tuple[tuple[int, int | None, bool], ...]:
    """(identity, in-place version, requires_grad) of every parameter the modules hold (a lazy
    module's parameters count once they are initialised)."""
    return tuple(
        (id(param), version_of(param), param.requires_grad)
        for sub in submodules for param in sub._parameters.values()
        if param is not None and not isinstance(param, nn.parameter.UninitializedParameter)
    )


class ModulesState:
    """What a block's rebuild depends on besides its inputs: its modules' train/eval flags, forward
    hooks and parameters (identity, in-place version, ``requires_grad``).

    It is taken when the block's forward call is done, so what a block does to itself while it runs
    (a constraint applied to a weight in place, a lazy module's initialisation) is part of its
    forward, and taken again after every rebuild, which does the same. A rebuild re-runs the
    modules as they are at backward time; if they changed in between, it would compute something
    else and the gradients would be wrong without a word, so ``refuse_changes`` raises instead.
    (Plain autograd catches the in-place case itself; the engine must check for it because it
    saves no activations.) The snapshots run eagerly under torch.compile: traced, they would
    guard on every parameter's shape and version and recompile for each.
    """

    __slots__ = ("modes", "hooks", "params")

    @run_eagerly
    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.record(modules)

    @run_eagerly
    def record(self, modules: Sequence[nn.Module]) -> None:
        """Take the modules' state as it is now."""
        submodules = _submodules(modules)
        self.modes = tuple(sub.training for sub in submodules)
        self.hooks = _forward_hook_keys(submodules)
        self.params = _parameter_states(submodules)

    @run_eagerly
    def refuse_changes(self, modules: Sequence[nn.Module]) -> None:
        """Raise, saying what changed and what to do, unless the modules are as last recorded."""
        submodules = _submodules(modules)
        if tuple(sub.training for sub in submodules) != self.modes:
            refuse_in_backward(
                "a block was switched between train and eval mode after the forward pass and before backward; its "
                "rebuild would compute something else (dropout): call backward before model.train()/eval(), or use "
                "memory_mode='autograd' to mix train- and eval-mode forward passes in one loss"
            )
        if _forward_hook_keys(submodules) != self.hooks:
            refuse_in_backward(
                "forward hooks of a block were added or removed after the forward pass and before backward; its "
                "rebuild would run other hooks: change hooks before the forward pass or after backward, or use "
                "memory_mode='autograd'"
            )
        params = _parameter_states(submodules)
        if [state[0] for state in params] != [state[0] for state in self.params]:
            refuse_in_backward(
                "a block's parameters were swapped between the forward pass and backward (parameters passed for the "
                "forward pass only, as torch.func.functional_call does, or a parameter reassigned); its rebuild "
                "would use other tensors: use memory_mode='autograd' for that"
            )
        if [state[1] for state in params] != [state[1] for state in self.params]:
            refuse_in_backward(
                "a parameter of a block was changed in place after the forward pass and before backward (an "
                "optimizer step, weight clipping, an average update); its rebuild would use the new values: call "
                "backward first"
            )
        if [state[2] for state in params] != [state[2] for state in self.params]:
            refuse_in_backward(
                "requires_grad of a block's parameter changed after the forward pass and before backward; the "
                "forward pass decided which gradients to compute: set requires_grad before the forward pass"
            )


def _submodules(modules: Sequence[nn.Module]) -> list[nn.Module]:
    return [sub for module in modules for sub in module.modules()]


class BufferSnapshot:
    """The modules' buffers as they are before a forward call; ``changed()`` afterwards keeps the
    values of those the call updated (in place or by rebinding).

    A rebuild must read what the forward read. Most buffers that a forward updates are never read
    by it in training (BatchNorm's statistics), but some are: spectral norm's power-iteration
    vector, a call counter, an EMA codebook. Their pre-call values are kept until the rebuild.
    """

    @run_eagerly
    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.before = [
            (owner, name, buffer, version_of(buffer), buffer.clone())
            for module in modules for owner in module.modules()
            for name, buffer in owner._buffers.items() if buffer is not None
        ]

    @run_eagerly
    def changed(self) -> dict[tuple[int, str], torch.Tensor]:
        """(id(owner), name) -> the value before the call, for each buffer the call changed."""
        kept = {
            (id(owner), name): copy
            for owner, name, buffer, version, copy in self.before
            if owner._buffers.get(name) is not buffer or version_of(buffer) != version
        }
        self.before = []
        return kept


@contextlib.contextmanager
def scratch_buffers(
    modules: Sequence[nn.Module], buffers_before: dict[tuple[int, str], torch.Tensor] | None = None
) -> Iterator[None]:
    """Let a rerun read and update copies of the modules' buffers, then put the originals back.

    Each copy holds the value the forward call read: ``buffers_before``'s for the buffers that call
    changed, the current value for the others. The originals are rebound rather than copied into,
    so the rerun's graph (which may have saved a buffer, as BatchNorm does) stays valid and the
    statistics are updated once per step, by the forward.
    """
    buffers_before = buffers_before or {}
    originals = []
    for module in modules:
        for owner in module.modules():
            for name, buffer in owner._buffers.items():
                if buffer is not None:
                    originals.append((owner, name, buffer))
                    owner._buffers[name] = buffers_before.get((id(owner), name), buffer).clone()
    try:
        yield
    finally:
        for owner, name, buffer in originals:
            owner._buffers[name] = buffer


@contextlib.contextmanager
def replaying(
    record: CallRecord,
    device: torch.device,
    autocast_states: tuple[tuple[str, bool, torch.dtype], ...],
    modules: Sequence[nn.Module],
) -> Iterator[None]:
    """Re-enter a forward call's RNG, autocast and scratch state; undo their side effects after."""
    record.modules_state.refuse_changes(modules)
    outer_cpu_rng = torch.get_rng_state()
    outer_device_rng = torch.cuda.get_rng_state(device) if record.device_rng is not None else None
    torch.set_rng_state(record.cpu_rng)
    if record.device_rng is not None:
        torch.cuda.set_rng_state(record.device_rng, device)
    try:
        with contextlib.ExitStack() as contexts:
            for device_type, enabled, dtype in autocast_states:
                contexts.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            contexts.enter_context(torch.enable_grad())
            contexts.enter_context(scratch_buffers(modules, record.buffers_before))
            contexts.enter_context(activated(record.state, recomputing=True))
            yield
    finally:
        # Put the global generators back where the caller's code left them.
        torch.set_rng_state(outer_cpu_rng)
        if outer_device_rng is not None:
            torch.cuda.set_rng_state(outer_device_rng, device)
    record.modules_state.record(modules)  # the rebuild ran the block's hooks again, as its forward did


# Relative error of a rebuilt chain input above which the engine warns. fp32 rebuilds of ordinary
# models stay near 1e-6; a bf16 stream carries a relative error of about 4e-3 by itself.
REBUILD_TOLERANCE = 3e-2
# The same for the worst single row (token), measured against the root-mean-square row: drift
# confined to a few rows is diluted in the whole-tensor error. In bf16 rebuilds of ordinary models
# the worst of 4K rows stays near 1e-2 (the largest of many rows runs 3-7x the whole-tensor error).
ROW_REBUILD_TOLERANCE = 1e-1


class InputFingerprint:
    """Four random projections of each floating chain input along its last axis: enough to measure,
    at the end of the backward pass, how far the rebuilt inputs drifted from the real ones, at a
    quarter of a row's width in memory per row (4 values for a (…, d) row, whatever d is).

    The rebuild's rounding errors compound from layer to layer, and more so when the streams are
    large next to what the blocks add (x = y - f cancels), in bf16/fp16, or with a coupling whose
    inverse amplifies error (MomentumNet's division by a small beta). The gradients are then those
    of a slightly different network; ``warn_if_drifted`` says so instead of staying silent.
    """

    WIDTH = 4

    def __init__(self, items: Sequence[object]) -> None:
        self.projections = [self._project(item) for item in items]

    @classmethod
    def _project(cls, item: object) -> torch.Tensor | None:
        if not (isinstance(item, torch.Tensor) and item.is_floating_point() and item.dim() > 0 and item.numel()):
            return None
        width = item.shape[-1]
        dtype = torch.float64 if item.dtype == torch.float64 else torch.float32
        # Fixed pseudo-random directions in [-0.5, 0.5) from a hash of the index: no generator (the
        # global RNG is untouched, and torch.compile traces it without a graph break).
        index = torch.arange(width * cls.WIDTH, device=item.device, dtype=dtype).reshape(width, cls.WIDTH)
        directions = torch.frac(torch.sin(index * 12.9898 + 78.233) * 43758.5453) - 0.5
        with torch.no_grad():
            return item.detach().reshape(-1, width).to(dtype) @ directions  # (rows, 4)

    def relative_errors(self, items: Sequence[object]) -> tuple[float, float]:
        """(whole, worst row): ‖P(rebuilt) − P(original)‖ / ‖P(original)‖ over all floating items
        together, and the largest row's ‖ΔP‖ over the root-mean-square row's ‖P‖, all in float64.
        Both are inf when the rebuild is not finite and 0 when there is nothing to compare against
        (an all-zero or non-finite original)."""
        drift = scale = worst_row = 0.0
        rows = 0
        for original, item in zip(self.projections, items):
            if original is None:
                continue
            original = original.double()
            row_drift = (self._project(item).double() - original).square().sum(dim=-1)  # (rows,)
            drift += float(row_drift.sum())
            worst_row = max(worst_row, float(row_drift.max()))
            scale += float(original.square().sum())
            rows += original.shape[0]
        if not math.isfinite(scale) or scale == 0:
            return 0.0, 0.0
        if not math.isfinite(drift):
            return math.inf, math.inf
        return math.sqrt(drift / scale), math.sqrt(worst_row * rows / scale)

    @run_eagerly
    def warn_if_drifted(self, items: Sequence[object]) -> None:
        whole, worst_row = self.relative_errors(items)
        if whole > REBUILD_TOLERANCE or worst_row > ROW_REBUILD_TOLERANCE:
            warnings.warn(
                f"the reversible backward pass rebuilt its input with a relative error of {whole:.1g} "
                f"(tolerance {REBUILD_TOLERANCE:g}), {worst_row:.1g} in its worst row (tolerance "
                f"{ROW_REBUILD_TOLERANCE:g}), so the gradients are approximate. Rounding errors grow "
                "through the rebuilt layers when the residual streams are large next to what the blocks add, "
                "in bf16/fp16, or with a coupling whose inverse amplifies them (a small MomentumNet beta): "
                "train in float32 streams, use memory_mode='checkpoint', or keep more layers out of the "
                "rebuild (kept_graph_layers, autograd_tail)",
                RuntimeWarning, stacklevel=2,
            )
