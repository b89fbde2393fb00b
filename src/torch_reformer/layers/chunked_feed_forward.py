"""The Reformer feed-forward block, chunked along the sequence.

Legend: B batch, L sequence length, d model width (``hidden_size``), F feed-forward width
(``feed_forward_size``), C chunk length.

``ChunkedFeedForward``: LayerNorm -> Linear(d, F) -> dropout -> activation -> Linear(F, d) ->
dropout (dropout before the activation, as in HF). With ``chunk_size > 0`` the (B, L, F)
intermediate never exists whole, in forward or backward (``chunked_recompute``); the backward's
recompute stops at the activation, since the last Linear's gradients need its input, not its
output. Inside the reversible engine's backward, ``rebuild_and_backward`` does the rebuild and
the gradient in the same pass over the chunks: each chunk runs once in backward instead of twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..autograd_checks import computes_as_built
from .activations import get_activation
from .chunked import ChunkGradients, add_grads, backward_by_chunks, chunked_recompute


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
    gradients = ChunkGradients(hidden, params[:4], needs_hidden, needs_params[:4])
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
            grad_output_weight = add_grads(grad_output_weight, chunk_grad)
        if needs_params[5]:
            grad_output_bias = add_grads(grad_output_bias, rows_grad.sum(dim=0).to(output_bias.dtype))
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
