"""Position-wise functions computed in chunks along the sequence, in forward and in backward.

Legend: B batch, L sequence length, d width, C chunk length.

``chunked_recompute(fn, hidden, params, chunk_size)`` runs ``fn`` chunk by chunk without
autograd and keeps only its inputs; the backward recomputes and back-propagates one chunk at
a time, replaying the forward's RNG state (dropout masks) and autocast state. So a wide
intermediate (the feed-forward's (B, L, F)) never exists whole. ``backward_by_chunks`` is that
backward, also used by the reversible engine's one-pass rebuild; ``ChunkGradients`` holds the
leaves it recomputes with and the gradients it gathers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from ..autograd_checks import refuse_create_graph


def _capture_rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    device_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), device_state


def _restore_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    cpu_state, device_state = state
    torch.set_rng_state(cpu_state)
    if device_state is not None:
        torch.cuda.set_rng_state(device_state, device)


def _apply_chunks(fn: Callable[..., Tensor], hidden: Tensor, params: Sequence[Tensor], chunk_size: int) -> Tensor:
    """``fn`` over ``hidden`` in chunks of ``chunk_size`` along dim -2, into one preallocated output."""
    length = hidden.shape[-2]
    first = fn(hidden[..., :chunk_size, :], *params)  # (B, C, d_out)
    output = first.new_empty(hidden.shape[:-2] + (length, first.shape[-1]))  # (B, L, d_out)
    output[..., :chunk_size, :] = first
    for start in range(chunk_size, length, chunk_size):
        output[..., start : start + chunk_size, :] = fn(hidden[..., start : start + chunk_size, :], *params)
    return output


class _ChunkedRecompute(torch.autograd.Function):
    """Forward: ``fn`` chunk by chunk without autograd, saving only the inputs (and the RNG state).
    Backward: ``backward`` (``backward_by_chunks`` for ``fn`` or a function with its signature)
    under the forward's RNG and autocast state: per chunk, recompute what the gradient needs,
    back-propagate that chunk and accumulate parameter gradients."""

    @staticmethod
    def forward(ctx, fn, backward, chunk_size, preserve_rng_state, hidden, *params):
        ctx.backward_by_chunks, ctx.chunk_size = backward, chunk_size
        ctx.rng_state = _capture_rng_state(hidden.device) if preserve_rng_state else None
        device_type = hidden.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.save_for_backward(hidden, *params)
        return _apply_chunks(fn, hidden, params, chunk_size)

    @staticmethod
    def backward(ctx, grad_output):
        refuse_create_graph("the chunked feed-forward (chunk_size > 0)", "chunk_size=0 computes it with plain autograd")
        hidden, *params = ctx.saved_tensors
        device_type, autocast_enabled, autocast_dtype = ctx.autocast
        forked_devices = [hidden.device] if hidden.device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked_devices, enabled=ctx.rng_state is not None):
            if ctx.rng_state is not None:
                _restore_rng_state(hidden.device, ctx.rng_state)
            with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled):
                grad_hidden, grad_params = ctx.backward_by_chunks(
                    hidden, params, grad_output, ctx.chunk_size,
                    needs_hidden=ctx.needs_input_grad[4], needs_params=ctx.needs_input_grad[5:],
                )
        return (None, None, None, None, grad_hidden, *grad_params)


class ChunkGradients:
    """The leaves a chunked backward recomputes with, and the gradients it gathers chunk by chunk.

    ``hidden`` (…, L, d) is cut along dim -2; ``params`` become detached leaves that require
    grad where ``needs_params`` says. ``backward(chunk, outputs, grads)`` back-propagates one
    chunk's recomputed outputs; ``result()`` returns (gradient of ``hidden`` or None, gradients
    of ``params``, None where not needed).
    """

    def __init__(self, hidden: Tensor, params: Sequence[Tensor], needs_hidden: bool, needs_params: Sequence[bool]):
        self.hidden, self.needs_hidden = hidden, needs_hidden
        self.leaves = [param.detach().requires_grad_(need) for param, need in zip(params, needs_params)]
        self.trainable = [leaf for leaf in self.leaves if leaf.requires_grad]
        self.grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        self.grad_trainable: list[Tensor | None] = [None] * len(self.trainable)

    def chunk_input(self, chunk: slice) -> Tensor:
        """The chunk of ``hidden`` as a leaf, (…, C, d)."""
        return self.hidden[..., chunk, :].detach().requires_grad_(self.needs_hidden)

    def backward(self, chunk: slice, hidden_chunk: Tensor, outputs: Tensor, grad_outputs: Tensor) -> None:
        inputs = ([hidden_chunk] if self.needs_hidden else []) + self.trainable
        if not inputs:
            return
        grads = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
        if self.needs_hidden:
            self.grad_hidden[..., chunk, :] = 0 if grads[0] is None else grads[0]
            grads = grads[1:]
        self.grad_trainable = [add_grads(total, grad) for total, grad in zip(self.grad_trainable, grads)]

    def result(self) -> tuple[Tensor | None, list[Tensor | None]]:
        grads_by_trainable = iter(self.grad_trainable)
        return self.grad_hidden, [next(grads_by_trainable) if leaf.requires_grad else None for leaf in self.leaves]


def backward_by_chunks(
    fn: Callable[..., Tensor],
    hidden: Tensor,
    params: Sequence[Tensor],
    grad_output: Tensor,
    chunk_size: int,
    needs_hidden: bool,
    needs_params: Sequence[bool],
    subtract_from: Tensor | None = None,
) -> tuple[Tensor | None, list[Tensor | None]]:
    """Gradients of ``fn(hidden, *params)`` against ``grad_output``, one chunk along dim -2 at a time.

    Each chunk is recomputed with autograd (under the caller's RNG and autocast state: chunks run
    in order, so random draws repeat those of a forward that ran them in the same order),
    back-propagated and dropped. With ``subtract_from`` (shaped like the output), each chunk's
    output is also subtracted from it in place: the reversible engine rebuilds the other stream
    of an additive coupling this way without a second pass or a whole-length output.
    Returns (gradient of ``hidden`` or None, gradients of ``params``, None where not needed).
    """
    chunk_size = chunk_size if chunk_size > 0 else max(hidden.shape[-2], 1)
    gradients = ChunkGradients(hidden, params, needs_hidden, needs_params)
    for start in range(0, hidden.shape[-2], chunk_size):
        chunk = slice(start, start + chunk_size)
        hidden_chunk = gradients.chunk_input(chunk)  # (B, C, d)
        with torch.enable_grad():
            output_chunk = fn(hidden_chunk, *gradients.leaves)  # (B, C, d_out)
        if subtract_from is not None:
            with torch.no_grad():
                subtract_from[..., chunk, :].sub_(output_chunk)
        gradients.backward(chunk, hidden_chunk, output_chunk, grad_output[..., chunk, :])
    return gradients.result()


def add_grads(total: Tensor | None, grad: Tensor | None) -> Tensor | None:
    if grad is None:
        return total
    return grad if total is None else total + grad


def chunked_recompute(
    fn: Callable[..., Tensor],
    hidden: Tensor,
    params: Sequence[Tensor],
    chunk_size: int,
    preserve_rng_state: bool = True,
    backward: Callable[..., tuple[Tensor | None, list[Tensor | None]]] | None = None,
) -> Tensor:
    """``fn(hidden, *params)`` for a position-wise ``fn``, computed in chunks along dim -2.

    hidden: (..., L, d) -> (..., L, d_out). With ``chunk_size > 0`` and ``L > chunk_size``,
    only one chunk's intermediates exist at a time, in forward and in backward (each chunk is
    recomputed in backward; ``preserve_rng_state`` replays its random draws, e.g. dropout).
    ``params`` are the tensors ``fn`` differentiates with respect to (e.g. weights).
    ``backward`` replaces ``backward_by_chunks`` for ``fn`` (same signature without ``fn``) when
    a function knows a cheaper way to its gradients.
    """
    length = hidden.shape[-2]
    if chunk_size <= 0 or length <= chunk_size:
        return fn(hidden, *params)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in params))
    if not needs_grad:
        return _apply_chunks(fn, hidden, params, chunk_size)
    backward = partial(backward_by_chunks, fn) if backward is None else backward
    return _ChunkedRecompute.apply(fn, backward, chunk_size, preserve_rng_state, hidden, *params)
