"""Checks shared by the library's hand-written ``torch.autograd.Function`` passes and the engine."""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch
from torch.nn.modules import module as module_globals


Fn = TypeVar("Fn", bound=Callable)


def run_eagerly(fn: Fn) -> Fn:
    """``fn``, run outside torch.compile's graphs as ``torch.compiler.disable(fn)`` runs it, but
    without importing ``torch._dynamo`` where nothing is compiled: that import takes seconds and
    about 70 MB, which every program importing the library would pay at start-up."""
    disabled: list[Callable] = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if not disabled:  # torch.compile imported torch._dynamo already
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return call  # type: ignore[return-value]


# What refusals of double backward in the attention layers say instead.
ATTENTION_ONCE_ONLY = "the Reformer's attention layers are differentiable once only, in every memory mode"

# Appended to errors raised inside a backward pass: autograd may already have added other
# gradients of the same pass (the head's, the kept layers') to ``.grad``.
PARTIAL_BACKWARD_NOTE = (" (this backward pass may already have added some gradients to .grad: zero them before running "
                         "it again)")


def refuse_in_backward(message: str) -> None:
    """Raise ``message`` from inside a backward pass, with ``PARTIAL_BACKWARD_NOTE``."""
    raise RuntimeError(message + PARTIAL_BACKWARD_NOTE)


def refuse_create_graph(what: str, instead: str = "") -> None:
    """Raise when called from a backward that runs with ``create_graph=True``.

    Autograd turns grad mode on inside backward exactly when the caller asked for a graph of the
    gradients (double backward, gradient penalties). The chunked, fused and reversible Functions
    form their gradients by hand or by recomputation, so their backward is not differentiable:
    rather than return first-order gradients whose second derivatives would silently be wrong,
    they refuse. ``instead`` says what computes the same thing twice-differentiably, if anything.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{what} has no second derivative: backward with create_graph=True (double backward, gradient "
            f"penalties) is not supported{'; ' + instead if instead else ''}"
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


def has_module_hooks(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own or global ones) besides its forward."""
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    shared = (module_globals._global_forward_hooks, module_globals._global_forward_pre_hooks,
              module_globals._global_backward_hooks, module_globals._global_backward_pre_hooks)
    return any(own) or any(shared)


def computes_as_built(module: torch.nn.Module | None, built_as: type) -> bool:
    """Whether a fused path may use ``module``'s weights instead of calling it: it is still exactly
    a ``built_as`` (not replaced by an adapter, a quantised layer or a subclass) and has no hooks.
    Otherwise the caller must call the module, so what was put in its place takes part."""
    return type(module) is built_as and not has_module_hooks(module)
