"""Bias-free projections of a layer-normalised input that do not keep the normalised input.

``project(hidden, linears, input_norm)`` returns ``[linear(input_norm(hidden)) for linear in linears]``.
Computed by autograd, every projection would save ``input_norm(hidden)`` (B, L, E) for its weight
gradient, one more sequence-long tensor alive through the backward of the attention layer, which
is where a long sequence's training step peaks. Here backward recomputes the normalisation from
``hidden`` instead (the caller keeps ``hidden`` anyway: it is the residual stream), so the
projections cost their outputs only. Autocast is replayed in backward so mixed precision gives
the gradients autograd would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..autograd_checks import ATTENTION_ONCE_ONLY, computes_as_built, refuse_create_graph


class _NormalizedProjections(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, norm_weight, norm_bias, epsilon, *weights):
        device_type = hidden.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.epsilon = epsilon
        ctx.set_materialize_grads(False)  # an unused projection's gradient stays None: no zero matmul
        ctx.save_for_backward(hidden, norm_weight, norm_bias, *weights)
        normed = F.layer_norm(hidden, hidden.shape[-1:], norm_weight, norm_bias, epsilon)  # (B, L, E)
        return tuple(F.linear(normed, weight) for weight in weights)

    @staticmethod
    def backward(ctx, *grad_outputs):
        refuse_create_graph("the fused attention projection", ATTENTION_ONCE_ONLY)
        hidden, norm_weight, norm_bias, *weights = ctx.saved_tensors
        device_type, autocast_enabled, autocast_dtype = ctx.autocast
        needs = ctx.needs_input_grad
        with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled):
            leaves = [t.detach().requires_grad_(need) for t, need in zip((hidden, norm_weight, norm_bias), needs[:3])]
            normed = F.layer_norm(leaves[0], hidden.shape[-1:], leaves[1], leaves[2], ctx.epsilon)
            flat_normed = normed.detach().reshape(-1, normed.shape[-1])  # (B*L, E)
            grad_normed, grad_weights = None, []
            for weight, grad, need in zip(weights, grad_outputs, needs[4:]):
                if grad is None:
                    grad_weights.append(None)
                    continue
                flat_grad = grad.reshape(-1, grad.shape[-1])  # (B*L, out)
                grad_weights.append((flat_grad.t() @ flat_normed).to(weight.dtype) if need else None)
                contribution = grad @ weight.to(grad.dtype)  # (B, L, E)
                grad_normed = contribution if grad_normed is None else grad_normed.add_(contribution)
            grad_norm_inputs = [None, None, None]
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            if grad_normed is not None and wanted:
                found = iter(torch.autograd.grad(normed, wanted, grad_normed.to(normed.dtype)))
                grad_norm_inputs = [next(found) if leaf.requires_grad else None for leaf in leaves]
        return (*grad_norm_inputs, None, *grad_weights)


def project(hidden: Tensor, linears: Sequence[nn.Linear], input_norm: nn.LayerNorm | None = None) -> list[Tensor]:
    """``[linear(input_norm(hidden)) for linear in linears]``, (B, L, E) -> [(B, L, out_i)].

    With ``input_norm`` (an ``nn.LayerNorm`` over the last axis, with affine weights) and bias-free
    ``linears``, the normalised input is recomputed in backward rather than kept. Modules that were
    replaced (adapters, quantised layers) or carry hooks are called as they are instead.
    """
    fusable = (
        computes_as_built(input_norm, nn.LayerNorm) and input_norm.weight is not None
        and input_norm.bias is not None and len(input_norm.normalized_shape) == 1
        and all(computes_as_built(linear, nn.Linear) and linear.bias is None for linear in linears)
    )
    if not fusable:
        normed = hidden if input_norm is None else input_norm(hidden)
        return [linear(normed) for linear in linears]
    return list(_NormalizedProjections.apply(
        hidden, input_norm.weight, input_norm.bias, input_norm.eps, *(linear.weight for linear in linears)
    ))
