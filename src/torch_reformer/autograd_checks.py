"""A check shared by the library's hand-written ``torch.autograd.Function`` backward passes."""

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
