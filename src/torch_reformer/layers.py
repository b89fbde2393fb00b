"""The Reformer's non-attention building blocks, each a pure function plus a thin module.

Legend: B batch, L sequence length, d model width (``hidden_size``), F feed-forward width
(``feed_forward_size``), V vocabulary, N = B * L rows, C chunk length.

- Position embeddings. ``AxialPositionalEmbedding`` factorises positions into an N-D grid
  ``(n1, ..., nk)`` with one small table per axis (widths ``d1 + ... + dk = d``): position
  ``p`` reads the row-major coordinates of ``p`` and concatenates the per-axis rows. It
  gathers per axis, so memory is O(L * d) even for a 1M-position grid, and it works for any
  length up to the product and any ``position_ids`` (decoding offsets), in training and eval.
  ``LearnedPositionalEmbedding`` is the ordinary (max_positions, d) table.
- ``ChunkedFeedForward``: LayerNorm -> Linear(d, F) -> dropout -> activation -> Linear(F, d)
  -> dropout (dropout before the activation, as in HF). With ``chunk_size > 0`` the (B, L, F)
  intermediate never exists whole, in forward or backward: ``chunked_recompute`` runs the
  chunks without autograd, keeps only the input, and in backward recomputes and
  back-propagates one chunk at a time, replaying the forward's dropout masks (the recompute
  stops at the activation: the last Linear's gradients need its input, not its output). Inside the
  reversible engine's backward, ``rebuild_and_backward`` does the rebuild and the gradient in
  the same pass over the chunks: each chunk runs once in backward instead of twice.
- ``lm_head_loss``: the LM head (Linear(2H, V) + bias) fused with mean cross-entropy. With
  ``chunk_size > 0`` it never holds (N, V) logits: the gradients with respect to hidden,
  weight and bias are computed chunk by chunk during the forward pass and only scaled in
  backward. The softmax is always computed in at least fp32.
- ``get_activation`` maps HF activation names to functions.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autograd_checks import computes_as_built, refuse_create_graph
from .config import ACTIVATION_NAMES

# ---------------------------------------------------------------------------- activations


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: Tensor) -> Tensor:
    # HF's "gelu_new", "gelu_fast" and "gelu_pytorch_tanh" are all this tanh approximation.
    return F.gelu(x, approximate="tanh")


def _identity(x: Tensor) -> Tensor:
    return x


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "mish": F.mish,
    "leaky_relu": F.leaky_relu,
    "linear": _identity,
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    """The elementwise activation HF calls ``name`` (see ``config.ACTIVATION_NAMES``)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: choose one of {ACTIVATION_NAMES}")
    return _ACTIVATIONS[name]


# ---------------------------------------------------------------------------- position embeddings


def check_positions(position_ids: Tensor, capacity: int, capacity_text: str, fix: str) -> Tensor:
    """``position_ids`` as int64 (int32 kept); raise unless it is an integer tensor with values in ``[0, capacity)``.

    ``capacity_text`` names the capacity in the error (e.g. "prod((64, 64))=4096"), ``fix`` says what to change.
    The range check reads two numbers back from the device; it is skipped while
    ``torch.compile`` traces, where a data-dependent branch would split the graph.
    """
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise TypeError(f"position_ids must be an integer tensor, got dtype {position_ids.dtype}")
    if position_ids.dtype not in (torch.int32, torch.int64):
        position_ids = position_ids.long()  # small integer types would overflow in index arithmetic
    if position_ids.numel() == 0 or torch.compiler.is_compiling():
        return position_ids
    low, high = (value.item() for value in torch.aminmax(position_ids))
    if low < 0:
        raise ValueError(f"position_ids must be >= 0, got {low}")
    if high >= capacity:
        raise ValueError(f"sequence length {high + 1} exceeds the {capacity_text}: {fix}")
    return position_ids


def unravel_positions(position_ids: Tensor, axial_pos_shape: Sequence[int]) -> list[Tensor]:
    """Row-major grid coordinates of each position: one tensor per axis, shaped like the input."""
    coordinates = []
    stride = math.prod(axial_pos_shape)
    for axis_size in axial_pos_shape:
        stride //= axis_size
        coordinates.append(torch.div(position_ids, stride, rounding_mode="floor") % axis_size)
    return coordinates


def axial_position_embedding(position_ids: Tensor, axis_tables: Sequence[Tensor]) -> Tensor:
    """Concatenated per-axis rows for each position.

    position_ids: any shape, e.g. (B, L) or (L,), values in [0, n1 * ... * nk).
    axis_tables: k tables, table k of shape (n_k, d_k).
    Returns position_ids.shape + (d1 + ... + dk,).
    """
    coordinates = unravel_positions(position_ids, [table.shape[0] for table in axis_tables])
    rows = [F.embedding(coordinate, table) for coordinate, table in zip(coordinates, axis_tables)]  # (..., d_k) each
    return torch.cat(rows, dim=-1)  # (..., d)


class AxialPositionalEmbedding(nn.Module):
    """Axial position embeddings over the grid ``axial_pos_shape`` (any number of axes).

    ``self.weights[k]`` has HF's layout: shape (1, .., n_k, .., 1, d_k) with n_k at position k,
    e.g. (n1, 1, d1) and (1, n2, d2) in 2-D, so HF weights copy over unchanged.
    ``forward(position_ids)``: (B, L) or (L,) integers -> (B, L, d) or (L, d).
    """

    def __init__(self, axial_pos_shape: Sequence[int], axial_pos_embds_dim: Sequence[int], init_std: float = 1.0):
        super().__init__()
        for name, sizes in (("axial_pos_shape", axial_pos_shape), ("axial_pos_embds_dim", axial_pos_embds_dim)):
            if any(isinstance(size, bool) or not isinstance(size, numbers.Integral) for size in sizes):
                raise TypeError(f"{name} must hold integers, got {tuple(sizes)!r}")
        self.axial_pos_shape = tuple(int(size) for size in axial_pos_shape)
        self.axial_pos_embds_dim = tuple(int(dim) for dim in axial_pos_embds_dim)
        if not self.axial_pos_shape or len(self.axial_pos_shape) != len(self.axial_pos_embds_dim):
            raise ValueError(
                f"axial_pos_shape {self.axial_pos_shape} and axial_pos_embds_dim {self.axial_pos_embds_dim} "
                "must be non-empty and of equal length (one embedding width per axis)"
            )
        if min(self.axial_pos_shape + self.axial_pos_embds_dim) < 1:
            raise ValueError("axial_pos_shape and axial_pos_embds_dim must hold positive integers")
        self.init_std = init_std
        self.capacity = math.prod(self.axial_pos_shape)
        self.weights = nn.ParameterList()
        for axis, (size, dim) in enumerate(zip(self.axial_pos_shape, self.axial_pos_embds_dim)):
            shape = [1] * len(self.axial_pos_shape) + [dim]
            shape[axis] = size
            self.weights.append(nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight in self.weights:
            nn.init.normal_(weight, std=self.init_std)

    def forward(self, position_ids: Tensor) -> Tensor:
        position_ids = check_positions(
            position_ids,
            self.capacity,
            f"axial positional embedding's capacity prod({self.axial_pos_shape})={self.capacity}",
            "increase axial_pos_shape",
        )
        tables = [weight.reshape(size, -1) for weight, size in zip(self.weights, self.axial_pos_shape)]  # (n_k, d_k)
        return axial_position_embedding(position_ids, tables)

    def extra_repr(self) -> str:
        return f"axial_pos_shape={self.axial_pos_shape}, axial_pos_embds_dim={self.axial_pos_embds_dim}"


class LearnedPositionalEmbedding(nn.Module):
    """One learned vector per position, HF layout ``embedding.weight`` of shape (max_positions, dim).

    ``forward(position_ids)``: (B, L) or (L,) integers -> (B, L, dim) or (L, dim).
    """

    def __init__(self, max_positions: int, dim: int, init_std: float = 0.02):
        super().__init__()
        if max_positions < 1 or dim < 1:
            raise ValueError(f"max_positions ({max_positions}) and dim ({dim}) must be positive")
        self.init_std = init_std
        self.embedding = nn.Embedding(max_positions, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embedding.weight, std=self.init_std)

    def forward(self, position_ids: Tensor) -> Tensor:
        capacity = self.embedding.num_embeddings
        position_ids = check_positions(
            position_ids,
            capacity,
            f"learned positional embedding's capacity max_position_embeddings={capacity}",
            "increase max_position_embeddings",
        )
        return self.embedding(position_ids)


# ---------------------------------------------------------------------------- chunked recomputation


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
        refuse_create_graph("the chunked feed-forward (chunk_size > 0)")
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


class _ChunkGradients:
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
        self.grad_trainable = [_add_grads(total, grad) for total, grad in zip(self.grad_trainable, grads)]

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
    gradients = _ChunkGradients(hidden, params, needs_hidden, needs_params)
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


def _add_grads(total: Tensor | None, grad: Tensor | None) -> Tensor | None:
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


# ---------------------------------------------------------------------------- feed-forward


def feed_forward(
    hidden: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    dense_weight: Tensor,
    dense_bias: Tensor,
    output_weight: Tensor,
    output_bias: Tensor,
    *,
    activation: Callable[[Tensor], Tensor],
    dropout: float,
    layer_norm_eps: float,
) -> Tensor:
    """LayerNorm -> Linear(d, F) -> dropout -> activation -> Linear(F, d) -> dropout.

    hidden: (..., d) -> (..., d). ``dropout`` is the probability actually applied (0 in eval).
    """
    inner = _feed_forward_inner(hidden, norm_weight, norm_bias, dense_weight, dense_bias, activation=activation,
                                dropout=dropout, layer_norm_eps=layer_norm_eps)  # (..., F)
    output = F.linear(inner, output_weight, output_bias)  # (..., d)
    return F.dropout(output, dropout, training=dropout > 0)


def _feed_forward_inner(hidden, norm_weight, norm_bias, dense_weight, dense_bias, *, activation, dropout,
                        layer_norm_eps) -> Tensor:
    """The part of ``feed_forward`` before its last Linear, (..., d) -> (..., F)."""
    normed = F.layer_norm(hidden, hidden.shape[-1:], norm_weight, norm_bias, layer_norm_eps)  # (..., d)
    inner = F.linear(normed, dense_weight, dense_bias)  # (..., F)
    return activation(F.dropout(inner, dropout, training=dropout > 0))


def feed_forward_backward_by_chunks(
    hidden: Tensor,
    params: Sequence[Tensor],
    grad_output: Tensor,
    chunk_size: int,
    needs_hidden: bool,
    needs_params: Sequence[bool],
    *,
    activation: Callable[[Tensor], Tensor],
    dropout: float,
    layer_norm_eps: float,
) -> tuple[Tensor | None, list[Tensor | None]]:
    """``backward_by_chunks`` for ``feed_forward``, without recomputing the last Linear's output.

    The gradients need the last Linear's input (the activations), not its output. So each chunk
    recomputes LayerNorm -> Linear -> dropout -> activation with autograd, forms the last
    Linear's gradients by hand (dW = dY^T a, db = sum dY, da = dY W) and back-propagates da
    through the rest: five of the six matmuls the generic recompute runs per chunk. The output
    dropout's mask is drawn by the same call on the same shape at the same point of the random
    sequence as in forward (after the inner dropout's), so with the RNG state replayed it is
    forward's mask. Matmuls run in the activations' dtype (the autocast dtype under autocast);
    gradients come back in the parameters' dtypes.
    """
    output_weight, output_bias = params[4], params[5]
    chunk_size = chunk_size if chunk_size > 0 else max(hidden.shape[-2], 1)
    gradients = _ChunkGradients(hidden, params[:4], needs_hidden, needs_params[:4])
    grad_output_weight = grad_output_bias = None
    for start in range(0, hidden.shape[-2], chunk_size):
        chunk = slice(start, start + chunk_size)
        hidden_chunk = gradients.chunk_input(chunk)  # (B, C, d)
        with torch.enable_grad():
            inner = _feed_forward_inner(hidden_chunk, *gradients.leaves, activation=activation, dropout=dropout,
                                        layer_norm_eps=layer_norm_eps)  # (B, C, F)
        grad_chunk = grad_output[..., chunk, :].to(inner.dtype)  # (B, C, d)
        if dropout > 0:
            grad_chunk = grad_chunk * F.dropout(torch.ones_like(grad_chunk), dropout, training=True)
        rows_grad = grad_chunk.reshape(-1, grad_chunk.shape[-1])  # (B*C, d)
        if needs_params[4]:
            chunk_grad = (rows_grad.T @ inner.detach().reshape(-1, inner.shape[-1])).to(output_weight.dtype)  # (d, F)
            grad_output_weight = _add_grads(grad_output_weight, chunk_grad)
        if needs_params[5]:
            grad_output_bias = _add_grads(grad_output_bias, rows_grad.sum(dim=0).to(output_bias.dtype))
        if needs_hidden or gradients.trainable:
            gradients.backward(chunk, hidden_chunk, inner, grad_chunk @ output_weight.to(inner.dtype))  # da: (B, C, F)
    grad_hidden, grad_params = gradients.result()
    return grad_hidden, grad_params + [grad_output_weight, grad_output_bias]


class ChunkedFeedForward(nn.Module):
    """The Reformer feed-forward block, chunked along the sequence when ``chunk_size > 0``.

    Submodules ``layer_norm`` (LayerNorm(d)), ``dense`` (Linear(d, F)), ``output`` (Linear(F, d)).
    HF's names for the same weights are ``layer_norm.*``, ``dense.dense.*`` and ``output.dense.*``.
    ``forward(hidden (B, L, d), **ignored) -> (B, L, d)``; keyword arguments (such as the
    ``attention_mask`` the reversible engine hands every block) are accepted and ignored.
    """

    def __init__(
        self,
        hidden_size: int,
        feed_forward_size: int,
        hidden_act: str = "relu",
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-12,
        chunk_size: int = 0,
    ):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
            raise ValueError(f"chunk_size must be an int >= 0 (0 = unchunked), got {chunk_size!r}")
        self.activation = get_activation(hidden_act)
        self.hidden_act = hidden_act
        self.dropout = dropout
        self.chunk_size = chunk_size
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dense = nn.Linear(hidden_size, feed_forward_size)
        self.output = nn.Linear(feed_forward_size, hidden_size)

    def _function_and_params(self) -> tuple[Callable[..., Tensor], tuple[Tensor, ...]]:
        dropout = self.dropout if self.training else 0.0
        fn = partial(feed_forward, activation=self.activation, dropout=dropout, layer_norm_eps=self.layer_norm.eps)
        params = (
            self.layer_norm.weight, self.layer_norm.bias,
            self.dense.weight, self.dense.bias,
            self.output.weight, self.output.bias,
        )
        return fn, params

    def fused_paths_apply(self) -> bool:
        """Whether the chunked paths may use the submodules' weights directly: none of them was
        replaced (an adapter, a quantised layer) or carries hooks."""
        return (computes_as_built(self.layer_norm, nn.LayerNorm) and computes_as_built(self.dense, nn.Linear)
                and computes_as_built(self.output, nn.Linear))

    def forward(self, hidden: Tensor, **ignored_kwargs) -> Tensor:
        width = self.layer_norm.normalized_shape[0]
        if hidden.shape[-1] != width:
            raise ValueError(f"the feed-forward takes inputs of width {width} (hidden_size) in the last axis, got "
                             f"shape {tuple(hidden.shape)}")
        if not self.fused_paths_apply():  # call what replaced or hooks the submodules, unchunked
            dropout = self.dropout if self.training else 0.0
            inner = self.dense(self.layer_norm(hidden))  # (..., F)
            inner = self.activation(F.dropout(inner, dropout, training=dropout > 0))
            return F.dropout(self.output(inner), dropout, training=dropout > 0)
        fn, params = self._function_and_params()
        preserve_rng_state = self.training and self.dropout > 0
        backward = partial(feed_forward_backward_by_chunks, **fn.keywords)
        return chunked_recompute(fn, hidden, params, self.chunk_size, preserve_rng_state=preserve_rng_state,
                                 backward=backward)

    def one_pass_matches_forward(self) -> bool:
        """Whether ``rebuild_and_backward`` computes this module's forward: not when a subclass
        overrides ``forward`` (the engine then rebuilds the block by calling it)."""
        return type(self).forward is ChunkedFeedForward.forward and self.fused_paths_apply()

    def rebuild_and_backward(
        self,
        inputs: Sequence[Tensor],
        grad_output: Tensor,
        wanted: Sequence[object],
        subtract_from: Tensor,
        **ignored_kwargs,
    ) -> list[Tensor | None]:
        """One pass of the reversible engine's backward through this block (its one-pass hook).

        Re-runs the block on ``inputs`` (one tensor, (B, L, d)) chunk by chunk, subtracts each
        chunk's output from ``subtract_from`` in place (rebuilding the other stream of the
        additive coupling) and back-propagates that chunk's ``grad_output`` at once. The
        generic path runs every chunk twice here (a rebuild without autograd, then a recompute
        inside the chunked backward); running it once saves a fifth of the block's matmul work
        in a training step. The caller replays the forward's RNG and autocast state, so dropout
        masks repeat. Returns the gradients of ``wanted`` (tensors among the input and this
        block's parameters), None for those that need none.
        """
        if len(inputs) != 1:
            raise TypeError(f"{type(self).__name__} takes one input tensor, got {len(inputs)}")
        (hidden,) = inputs
        fn, params = self._function_and_params()
        wanted_ids = {id(item) for item in wanted if isinstance(item, Tensor) and item.requires_grad}
        grad_hidden, grad_params = backward_by_chunks(
            fn, hidden, params, grad_output, self.chunk_size,
            needs_hidden=id(hidden) in wanted_ids,
            needs_params=[id(param) in wanted_ids for param in params],
            subtract_from=subtract_from,
        )
        found = {id(hidden): grad_hidden, **{id(param): grad for param, grad in zip(params, grad_params)}}
        return [found.get(id(item)) if isinstance(item, Tensor) else None for item in wanted]

    def extra_repr(self) -> str:
        return f"hidden_act={self.hidden_act!r}, dropout={self.dropout}, chunk_size={self.chunk_size}"


# ---------------------------------------------------------------------------- LM head and loss


def _check_loss_inputs(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk_size: int) -> None:
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden's shape without its last axis "
            f"{tuple(hidden.shape[:-1])}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (vocab, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
        raise ValueError(f"chunk_size must be an int >= 0 (0 = unchunked), got {chunk_size!r}")


def check_class_labels(labels: Tensor, num_classes: int, ignore_index: int = -100) -> None:
    """Integer labels in [0, ``num_classes``) or equal to ``ignore_index``; a clear error otherwise.

    The value check reads the tensor, so it is skipped under torch.compile.
    """
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if torch.compiler.is_compiling():
        return
    kept = labels[labels != ignore_index]
    if kept.numel() and not (0 <= kept.min().item() and kept.max().item() < num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}, "
            f"got values in [{kept.min().item()}, {kept.max().item()}]"
        )


def _fused_cross_entropy(
    rows: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    chunk_size: int,
    ignore_index: int,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Mean cross-entropy of ``rows @ weight.T + bias`` and its gradients, ``chunk_size`` rows at a time.

    rows (N, D), weight (V, D), bias (V,), targets (N,). Returns the loss and the gradients of
    that loss with respect to rows (N, D), weight (V, D) and bias (V,) (None where not needed).
    Gradients accumulate in the softmax precision (at least fp32).
    """
    compute_dtype = torch.promote_types(rows.dtype, torch.float32)
    device_type = rows.device.type
    # The matmuls run in the autocast dtype when autocast is on; cast the weights once, not per chunk.
    matmul_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else rows.dtype
    matmul_weight = weight.to(matmul_dtype)  # (V, D)
    matmul_bias = None if bias is None else bias.to(matmul_dtype)  # (V,)
    valid = targets != ignore_index  # (N,)
    scale = 1.0 / valid.sum().clamp(min=1).to(compute_dtype)  # all ignored -> loss 0, zero gradients
    total = rows.new_zeros((), dtype=compute_dtype)
    needs_rows, needs_weight, needs_bias = needs_grad
    grad_rows = torch.empty_like(rows) if needs_rows else None
    grad_weight = torch.zeros(weight.shape, dtype=compute_dtype, device=weight.device) if needs_weight else None
    grad_bias = torch.zeros(weight.shape[:1], dtype=compute_dtype, device=weight.device) if needs_bias else None
    with torch.autocast(device_type, enabled=False):
        for start in range(0, rows.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            row_chunk, chunk_valid = rows[chunk].to(matmul_dtype), valid[chunk]  # (C, D), (C,)
            safe_targets = targets[chunk].masked_fill(~chunk_valid, 0)[:, None]  # (C, 1)
            logits = F.linear(row_chunk, matmul_weight, matmul_bias)  # (C, V)
            log_probs = logits.to(compute_dtype).log_softmax(dim=-1)  # (C, V)
            total -= (log_probs.gather(1, safe_targets).squeeze(1) * chunk_valid).sum()
            if not any(needs_grad):
                continue
            grad_logits = log_probs.exp_()  # (C, V) softmax
            grad_logits.scatter_add_(1, safe_targets, grad_logits.new_full(safe_targets.shape, -1.0))
            grad_logits *= chunk_valid[:, None] * scale  # d loss / d logits
            matmul_grad = grad_logits.to(matmul_dtype)  # (C, V)
            if needs_rows:
                grad_rows[chunk] = matmul_grad @ matmul_weight  # (C, D)
            if needs_weight:
                grad_weight += (matmul_grad.T @ row_chunk).to(compute_dtype)  # (V, D)
            if needs_bias:
                grad_bias += grad_logits.sum(dim=0)  # (V,)
    return total * scale, grad_rows, grad_weight, grad_bias


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Loss and all gradients computed in forward, chunk by chunk; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, ignore_index):
        rows = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
        needs_grad = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        loss, grad_rows, grad_weight, grad_bias = _fused_cross_entropy(
            rows, weight, bias, labels.reshape(-1), chunk_size, ignore_index, needs_grad
        )
        ctx.hidden_shape, ctx.dtypes = hidden.shape, (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(*(grad for grad in (grad_rows, grad_weight, grad_bias) if grad is not None))
        ctx.has_grad = tuple(grad is not None for grad in (grad_rows, grad_weight, grad_bias))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_create_graph("the chunked LM-head loss (chunk_size > 0)")
        saved = iter(ctx.saved_tensors)
        grads = []
        for has_grad, dtype in zip(ctx.has_grad, ctx.dtypes):
            grads.append((next(saved) * grad_loss).to(dtype) if has_grad else None)
        if grads[0] is not None:
            grads[0] = grads[0].reshape(ctx.hidden_shape)
        return (*grads, None, None, None)


def mean_token_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross-entropy of logits (..., V) against labels (...), averaged over the labels that are not
    ``ignore_index`` (0, not NaN, when none is scored); the softmax runs in at least float32."""
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    summed = F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index, reduction="sum")
    return summed / (labels != ignore_index).sum().clamp(min=1)


def lm_head_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    chunk_size: int = 0,
    ignore_index: int = -100,
) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``labels``.

    hidden (B, L, D), weight (V, D), bias (V,) or None, labels (B, L) already aligned with hidden
    (the caller shifts for causal LM). Positions labelled ``ignore_index`` are left out of the
    mean; when every label is ignored the loss is 0 with zero gradients (not NaN), so a batch of
    padding cannot poison training. The softmax runs in at least fp32 (also under bf16
    autocast); the returned loss has that precision.
    With ``chunk_size > 0`` the (B * L, V) logits are never materialised: rows are processed
    ``chunk_size`` at a time and the gradients are formed during the forward pass.
    """
    _check_loss_inputs(hidden, weight, bias, labels, chunk_size)
    check_class_labels(labels, weight.shape[0], ignore_index)
    if chunk_size == 0:
        return mean_token_cross_entropy(F.linear(hidden, weight, bias), labels, ignore_index)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return _FusedLinearCrossEntropy.apply(hidden, weight, bias, labels, chunk_size, ignore_index)
    rows = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    return _fused_cross_entropy(rows, weight, bias, labels.reshape(-1), chunk_size, ignore_index, (False,) * 3)[0]


class LMHead(nn.Module):
    """Linear(in_features, vocab_size) as HF lays it out: ``decoder.weight`` (V, in) and a separate ``bias`` (V,).

    ``forward(hidden (..., in)) -> logits (..., V)`` applies the bias (recent HF versions
    drop it, a defect not reproduced here). ``loss(hidden, labels, chunk_size)`` is
    ``lm_head_loss`` with these weights.
    """

    def __init__(self, in_features: int, vocab_size: int):
        super().__init__()
        self.decoder = nn.Linear(in_features, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: Tensor) -> Tensor:
        if not computes_as_built(self.decoder, nn.Linear):  # an adapter, a quantised layer or hooks
            return self.decoder(hidden) + self.bias
        return F.linear(hidden, self.decoder.weight, self.bias)

    def loss(self, hidden: Tensor, labels: Tensor, chunk_size: int = 0, ignore_index: int = -100) -> Tensor:
        if not computes_as_built(self.decoder, nn.Linear):  # the fused loss would bypass the replacement
            check_class_labels(labels, self.bias.shape[0], ignore_index)
            return mean_token_cross_entropy(self(hidden), labels, ignore_index)
        return lm_head_loss(hidden, self.decoder.weight, self.bias, labels, chunk_size, ignore_index)
