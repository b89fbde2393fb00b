"""Checks shared by the library's hand-written ``torch.autograd.Function`` passes and the engine."""

from __future__ import annotations

import torch


def refuse_create_graph(what: str) -> None:
    """Raise when called from a backward that runs with ``create_graph=True``.

    Autograd turns grad mode on inside backward exactly when the caller asked for a graph of the
    gradients (double backward, gradient penalties). The chunked, fused and reversible Functions
    form their gradients by hand or by recomputation, so their backward is not differentiable:
    rather than return first-order gradients whose second derivatives would silently be wrong,
    they refuse.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{what} has no second derivative: backward with create_graph=True (double backward, gradient "
            "penalties) is not supported here; use memory_mode='autograd' and chunk sizes of 0 for that"
        )


def version_of(tensor: object) -> int | None:
    """``tensor._version``, the counter of its in-place changes; None for what has none: a non-tensor,
    or a tensor made under ``torch.inference_mode`` (nothing can run backward through those, so
    there is nothing to guard)."""
    if not isinstance(tensor, torch.Tensor) or tensor.is_inference():
        return None
    return tensor._version


def changed_in_place(tensor: object, version: int | None) -> bool:
    """Whether ``tensor`` was changed in place since ``version_of`` returned ``version``."""
    return version is not None and tensor._version != version
