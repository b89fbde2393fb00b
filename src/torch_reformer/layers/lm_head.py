"""The LM head fused with mean cross-entropy, and label checks shared by the model heads.

Legend: d model width, V vocabulary, N rows (B * L tokens), C chunk of rows.

``lm_head_loss``: the LM head (Linear(d, V) + bias) fused with mean cross-entropy. With
``chunk_size > 0`` it never holds (N, V) logits: the gradients with respect to hidden, weight
and bias are computed chunk by chunk during the forward pass and only scaled in backward. The
softmax is always computed in at least fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..autograd_checks import computes_as_built, refuse_create_graph


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
        refuse_create_graph("the chunked LM-head loss (chunk_size > 0)", "a loss computed from the logits is")
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
