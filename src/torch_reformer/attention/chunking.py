"""Sorting, chunking, look-adjacent windows and the per-chunk softmax shared by LSH and local attention.

Legend: B batch, H heads, G = B * H groups, L length, R hash rounds, C chunk length,
N = R * L / C chunks per group, N' = N + before + after, T' = G * N' (all chunks in the
window layout), J = before + 1 + after neighbour blocks, D head dim, E feature width.

LSH attention sorts each round's positions by bucket, lays the R sorted rounds end to end
(R * L slots per group), cuts them into chunks of C and lets every chunk attend to itself and
its neighbours. Local attention is the same with the identity order. Neighbours wrap around:
the first chunk looks back at the last one (for LSH, the first chunk of round r looks back at
the end of round r - 1), as in Trax and Hugging Face.

The window layout. Each group's N chunks are stored with copies of the wrapped neighbours
around them: ``before`` chunks copied from the end in front, ``after`` chunks copied from the
start behind, N' chunks per group, all groups end to end: (T', C, E). In this layout the
neighbour at offset o of any real chunk is simply the chunk o places further, so the scores
against neighbour o are ONE batched matmul between two contiguous slices of the same tensor:
no (…, W, D) window copies of keys and values, and no Python loop over chunks, rounds or
heads. Chunks in between (the copies, seen as queries) produce outputs nobody reads.

Masks replace scores by finite constants (never -inf, so a row whose keys are all masked stays
finite). ``MASK_VALUES`` holds them in one place:
- ``mask``: keys a query may not see (padding, or after the query in causal models);
- ``self_mask``: shared-QK attention to the query's own position; it sits far above ``mask``
  so a token with no other valid key attends to itself.

Every permutation is an autograd Function whose backward is again a row gather by the
inverse permutation (no scatter over the sequence).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

# dtype -> (mask value, self-mask value). bfloat16 has float32's range, so it keeps float32's
# constants; float16 tops out near 6.5e4.
MASK_VALUES = {
    torch.float64: (-1e9, -1e5),
    torch.float32: (-1e9, -1e5),
    torch.bfloat16: (-1e9, -1e5),
    torch.float16: (-1e4, -1e3),
}


def mask_values(dtype: torch.dtype) -> tuple[float, float]:
    """(mask value, self-mask value) for scores of ``dtype``."""
    if dtype not in MASK_VALUES:
        raise TypeError(f"attention scores of dtype {dtype} are not supported; use one of {list(MASK_VALUES)}")
    return MASK_VALUES[dtype]


def sort_by_bucket(bucket_ids: Tensor) -> Tensor:
    """Positions of every round in stable bucket order, (…, R, L) -> (…, R, L).

    Sorting each round separately and laying the rounds end to end gives the same order as one
    sort by (round, bucket, position), which is what HF/Trax compute with round offsets.
    """
    return torch.sort(bucket_ids, dim=-1, stable=True).indices


class WindowLayout(NamedTuple):
    """Index tables that move rows between sequence order and the window layout.

    Sequence-order tensors are (B, L, H, E) ("rows", the natural layout of a projection
    (B, L, H * E)); every row has one slot per round.
    ``positions`` (T', C): original position of every slot (wrap copies included).
    ``gather_rows`` (T'*C,): row of the (B*L*H, E) input that fills each slot.
    ``undo_rows`` (B*L*H*R,): slot holding each (batch, position, head, round).
    ``slot_rows`` (T'*C,): (batch, position, head, round) index of each slot (used by backward).
    ``copy_slots`` (G*(before+after)*C,): the slots that hold wrap copies.
    """

    positions: Tensor
    gather_rows: Tensor
    undo_rows: Tensor
    slot_rows: Tensor
    copy_slots: Tensor
    shape: tuple[int, int, int, int]  # (B, L, H, R)
    chunk_length: int
    before: int
    after: int


def window_layout(sorted_positions: Tensor, chunk_length: int, before: int, after: int) -> WindowLayout:
    """Window layout for ``sorted_positions`` (B, H, R, L); R * L must be a multiple of C."""
    batch, heads, rounds, length = sorted_positions.shape
    groups, device = batch * heads, sorted_positions.device
    num_chunks = rounds * length // chunk_length
    layout_chunks = num_chunks + before + after
    with torch.no_grad():
        source_chunk = torch.arange(-before, num_chunks + after, device=device) % num_chunks  # (N',)
        batch_index = torch.arange(batch, device=device).view(batch, 1, 1, 1)
        head_index = torch.arange(heads, device=device).view(1, heads, 1, 1)
        round_index = torch.arange(rounds, device=device).view(1, 1, rounds, 1)

        def to_layout(per_slot: Tensor) -> Tensor:  # (B, H, R, L) in sorted order -> (G, N', C)
            return per_slot.reshape(groups, num_chunks, chunk_length).index_select(1, source_chunk)

        positions = to_layout(sorted_positions)
        gather_rows = to_layout((batch_index * length + sorted_positions) * heads + head_index)
        slot_rows = to_layout(((batch_index * length + sorted_positions) * heads + head_index) * rounds + round_index)

        slot_in_round = torch.empty_like(sorted_positions).scatter_(
            -1, sorted_positions, torch.arange(length, device=device).expand_as(sorted_positions)
        )  # (B, H, R, L)
        group_start = (batch_index * heads + head_index) * layout_chunks * chunk_length
        undo_rows = group_start + before * chunk_length + round_index * length + slot_in_round  # (B, H, R, L)

        is_copy = torch.ones(layout_chunks, dtype=torch.bool, device=device)
        is_copy[before : before + num_chunks] = False
        copy_chunks = torch.arange(groups, device=device)[:, None] * layout_chunks + is_copy.nonzero().view(1, -1)
        copy_slots = (copy_chunks.view(-1, 1) * chunk_length + torch.arange(chunk_length, device=device)).view(-1)
    return WindowLayout(
        positions=positions.reshape(groups * layout_chunks, chunk_length),
        gather_rows=gather_rows.reshape(-1),
        undo_rows=undo_rows.permute(0, 3, 1, 2).reshape(-1),
        slot_rows=slot_rows.reshape(-1),
        copy_slots=copy_slots,
        shape=(batch, length, heads, rounds),
        chunk_length=chunk_length, before=before, after=after,
    )


class _ToWindows(torch.autograd.Function):
    """(B, L, H, E) rows -> (T', C, E) window layout; backward sums every slot's gradient into its row."""

    @staticmethod
    def forward(ctx, rows: Tensor, layout: WindowLayout) -> Tensor:
        ctx.layout = layout
        width = rows.shape[-1]
        return rows.reshape(-1, width).index_select(0, layout.gather_rows).view(-1, layout.chunk_length, width)

    @staticmethod
    def backward(ctx, grad: Tensor):
        layout = ctx.layout
        batch, length, heads, rounds = layout.shape
        grad_slots = grad.reshape(-1, grad.shape[-1])
        # Sum of the R slots holding each row: a gather and sum in one kernel, no (…, R, E) temporary.
        grad_rows = nn.functional.embedding_bag(layout.undo_rows.view(-1, rounds), grad_slots, mode="sum")
        if layout.copy_slots.numel():
            # Wrap copies are few (G * (before + after) chunks). index_put_ rather than index_add_,
            # whose CPU kernel walks the whole destination.
            copy_rows = layout.slot_rows.index_select(0, layout.copy_slots).div_(rounds, rounding_mode="floor")
            grad_rows.index_put_((copy_rows,), grad_slots.index_select(0, layout.copy_slots), accumulate=True)
        return grad_rows.view(batch, length, heads, -1), None


class _FromWindows(torch.autograd.Function):
    """(T', C, E) window layout -> (B, L, H, E) rows, rounds merged by softmax of their log-sum-exp.

    Forward is one weighted gather-and-sum (``embedding_bag``); backward gathers the row gradient
    back to every slot and scales it by the slot's round weight.
    """

    @staticmethod
    def forward(ctx, slots: Tensor, logsumexp: Tensor | None, layout: WindowLayout) -> Tensor:
        batch, length, heads, rounds = layout.shape
        width = slots.shape[-1]
        slots = slots.reshape(-1, width)
        bags = layout.undo_rows.view(-1, rounds)  # (B*L*H, R): the slot of every round of every row
        weights = None
        if rounds > 1:
            weights = torch.softmax(logsumexp.reshape(-1)[bags], dim=-1)  # (B*L*H, R)
            rows = nn.functional.embedding_bag(bags, slots, mode="sum", per_sample_weights=weights)
        else:
            rows = slots.index_select(0, layout.undo_rows)
        ctx.layout = layout
        ctx.save_for_backward(slots, weights)
        return rows.view(batch, length, heads, width)

    @staticmethod
    def backward(ctx, grad: Tensor):
        layout = ctx.layout
        slots, weights = ctx.saved_tensors
        rounds = layout.shape[3]
        width = grad.shape[-1]
        slot_rows = layout.slot_rows if rounds == 1 else layout.slot_rows.div(rounds, rounding_mode="floor")
        grad_slots = grad.reshape(-1, width).index_select(0, slot_rows)  # (T'*C, E)
        grad_logsumexp = None
        if rounds > 1:
            # d out / d w_r = slot_r; weights are a softmax of the rounds' log-sum-exp.
            grad_weights = torch.einsum("se,se->s", grad_slots, slots)  # per slot
            grad_weights = grad_weights[layout.undo_rows].view(-1, rounds)  # (B*L*H, R)
            grad_lse_rows = weights * (grad_weights - (weights * grad_weights).sum(-1, keepdim=True))
            grad_logsumexp = grad_lse_rows.view(-1)[layout.slot_rows].view(-1, layout.chunk_length)
            grad_slots.mul_(weights.view(-1)[layout.slot_rows].unsqueeze(-1))
        grad_slots[layout.copy_slots] = 0  # wrap copies are never read as outputs
        if grad_logsumexp is not None:
            grad_logsumexp.view(-1)[layout.copy_slots] = 0
        return grad_slots.view(-1, layout.chunk_length, width), grad_logsumexp, None


def to_windows(rows: Tensor, layout: WindowLayout) -> Tensor:
    """Rows (B, L, H, E) placed in the window layout, (T', C, E)."""
    return _ToWindows.apply(rows, layout)


def from_windows(slots: Tensor, layout: WindowLayout, logsumexp: Tensor | None = None) -> Tensor:
    """Window-layout slots (T', C, E) read back in original order, (B, L, H, E).

    With several rounds, each row is the softmax(``logsumexp``)-weighted sum of its rounds'
    slots (``logsumexp`` (T', C) as returned by ``window_attention``); see ``merge_rounds``.
    """
    if layout.shape[3] > 1 and logsumexp is None:
        raise ValueError("from_windows needs the log-sum-exp of every slot to merge several rounds")
    return _FromWindows.apply(slots, logsumexp, layout)


def window_key_ranks(layout: WindowLayout, key_mask: Tensor | None) -> Tensor | None:
    """Per slot: its position if the token is real, L (beyond every position) if padding; (T', C).

    ``key_mask`` is (B, L), True for real tokens. None without padding.
    """
    if key_mask is None:
        return None
    batch, length, heads, _ = layout.shape
    positions = layout.positions.view(batch, -1)  # (B, H*N'*C): groups of one batch row are adjacent
    real = torch.gather(key_mask, 1, positions)
    return torch.where(real, positions, length).view_as(layout.positions)


def _inverse_rms(qk: Tensor, epsilon: float) -> Tensor:
    """rsqrt(mean(x^2) + eps) over the last axis, (…, D) -> (…, 1), without an x^2 temporary."""
    return torch.rsqrt(torch.linalg.vector_norm(qk, dim=-1, keepdim=True).square() / qk.shape[-1] + epsilon)


def normalize_keys(qk: Tensor, epsilon: float = 1e-6) -> Tensor:
    """Keys from shared qk vectors (…, D): x / sqrt(mean(x^2) + eps) / sqrt(D)."""
    return qk * (_inverse_rms(qk, epsilon) / qk.shape[-1] ** 0.5)


def _normalize_keys_backward(qk: Tensor, grad_keys: Tensor, epsilon: float = 1e-6) -> Tensor:
    """Gradient of ``normalize_keys`` at ``qk`` for ``grad_keys``: (r/√D)(g - x r² mean(g·x))."""
    inverse_rms = _inverse_rms(qk, epsilon)
    projection = torch.einsum("...d,...d->...", grad_keys, qk).unsqueeze(-1)  # (…, 1), no (…, D) temporary
    projection.mul_(inverse_rms.square()).div_(qk.shape[-1])
    return grad_keys.sub_(qk * projection).mul_(inverse_rms.div_(qk.shape[-1] ** 0.5))


class WindowSpec(NamedTuple):
    """Static settings of ``window_attention``."""

    before: int
    after: int
    causal: bool
    self_mask: bool
    dropout: float


def _fill_block_masks(scores: Tensor, positions: Tensor, key_ranks: Tensor | None, offset: int, spec: WindowSpec):
    """Mask the scores (T'', C, C) of neighbour block ``offset`` in place."""
    mask_value, self_mask_value = mask_values(scores.dtype)
    total = positions.shape[0]
    query_positions = positions[spec.before : total - spec.after]  # (T'', C)
    key_positions = positions[spec.before + offset : total - spec.after + offset]  # (T'', C)
    key_ranks = None if key_ranks is None else key_ranks[spec.before + offset : total - spec.after + offset]
    if spec.causal:
        ranks = key_positions if key_ranks is None else key_ranks
        scores.masked_fill_(ranks[:, None, :] > query_positions[:, :, None], mask_value)
    elif key_ranks is not None:
        scores.masked_fill_((key_ranks > key_positions)[:, None, :], mask_value)
    if spec.self_mask:
        scores.masked_fill_(query_positions[:, :, None] == key_positions[:, None, :], self_mask_value)


# exp is clamped from below at this value: a weight e^-87 ~ 1.6e-38 is nothing next to the row
# maximum's weight 1, and exp's vectorised kernels fall to a path ~10x slower for inputs whose
# result would underflow, which every masked score (-1e9 - max) is.
EXP_FLOOR = -87.0


def _softmax_over_blocks_(scores: Tensor) -> tuple[Tensor, Tensor]:
    """In-place softmax over the (J, C) keys of every query row of (J, T'', C, C).

    Returns the row maximum and the log-sum-exp, each (T'', C).
    """
    row_max = scores[0].amax(dim=-1)
    for block in scores[1:]:
        torch.maximum(row_max, block.amax(dim=-1), out=row_max)
    scores.sub_(row_max[None, :, :, None]).clamp_(min=EXP_FLOOR).exp_()
    row_sum = scores.sum(dim=(0, 3))
    scores.div_(row_sum[None, :, :, None])
    return row_max, row_max + row_sum.log_()


def _accumulate_products(out: Tensor, blocks: Tensor, right: Tensor, spec: WindowSpec) -> None:
    """out[mid] = Σ_o blocks[o] @ right[mid + o] over the queried range mid; other rows get zeros."""
    total = right.shape[0]
    target = out[spec.before : total - spec.after]
    for index, offset in enumerate(range(-spec.before, spec.after + 1)):
        operand = right[spec.before + offset : total - spec.after + offset]
        if index == 0:
            torch.bmm(blocks[index], operand, out=target)
        else:
            target.baddbmm_(blocks[index], operand)
    out[: spec.before] = 0
    out[total - spec.after :] = 0


def _transposed_products(blocks: Tensor, left: Tensor, spec: WindowSpec) -> Tensor:
    """out[mid + o] = Σ_o blocks[o]^T @ left[mid] (gradients of keys and values), (T', C, D).

    The first offset's range [0, T' - before - after) is written directly and only the rows it
    misses are zeroed, instead of zero-filling the whole result.
    """
    total = left.shape[0]
    queried = left[spec.before : total - spec.after]
    out = torch.empty_like(left)
    for index, offset in enumerate(range(-spec.before, spec.after + 1)):
        target = out[spec.before + offset : total - spec.after + offset]
        if index == 0:
            torch.bmm(blocks[index].transpose(1, 2), queried, out=target)
            out[total - spec.after - spec.before :] = 0
        else:
            target.baddbmm_(blocks[index].transpose(1, 2), queried)
    return out


class _WindowAttention(torch.autograd.Function):
    """Softmax attention of every chunk over its J neighbour blocks, in the window layout."""

    @staticmethod
    def forward(ctx, queries, keys, values, positions, key_ranks, spec: WindowSpec, training: bool):
        shared = keys is None
        keys = normalize_keys(queries) if shared else keys
        total, chunk, _ = queries.shape
        inner = total - spec.before - spec.after
        blocks = spec.before + 1 + spec.after
        scores = queries.new_empty(blocks, inner, chunk, chunk)  # (J, T'', C, C)
        for index, offset in enumerate(range(-spec.before, spec.after + 1)):
            key_block = keys[spec.before + offset : total - spec.after + offset]
            torch.bmm(queries[spec.before : total - spec.after], key_block.transpose(1, 2), out=scores[index])
            _fill_block_masks(scores[index], positions, key_ranks, offset, spec)
        row_max, inner_logsumexp = _softmax_over_blocks_(scores)
        logsumexp = queries.new_zeros(total, chunk)
        logsumexp[spec.before : total - spec.after] = inner_logsumexp
        # Rows that see no key (their maximum is a mask constant) are constants: no gradient.
        mask_value, self_mask_value = mask_values(scores.dtype)
        degenerate = row_max <= (self_mask_value if spec.self_mask else mask_value)  # (T'', C)
        probs, keep = scores, None
        if training and spec.dropout > 0:
            keep = torch.rand_like(scores) >= spec.dropout
            probs = scores * keep / (1 - spec.dropout)
        out = queries.new_empty(queries.shape)
        _accumulate_products(out, probs, values, spec)
        ctx.spec, ctx.shared = spec, shared
        ctx.save_for_backward(queries, keys, values, scores, keep, out, degenerate)
        return out, logsumexp

    @staticmethod
    def backward(ctx, grad_out, grad_logsumexp):
        queries, keys, values, probs, keep, out, degenerate = ctx.saved_tensors
        spec = ctx.spec
        total = queries.shape[0]
        mid = slice(spec.before, total - spec.after)
        grad_out = grad_out.contiguous()
        # Σ_k p_k dP_k = dO · O (FlashAttention's identity), also with dropout.
        shift = (grad_out[mid] * out[mid]).sum(dim=-1)  # (T'', C)
        if grad_logsumexp is not None:
            shift -= grad_logsumexp[mid]
        grad_probs = torch.empty_like(probs)  # (J, T'', C, C)
        for index, offset in enumerate(range(-spec.before, spec.after + 1)):
            torch.bmm(grad_out[mid], values[spec.before + offset : total - spec.after + offset].transpose(1, 2),
                      out=grad_probs[index])
        dropped = probs
        if keep is not None:
            grad_probs.mul_(keep).div_(1 - spec.dropout)
            dropped = probs * keep / (1 - spec.dropout)
        grad_values = _transposed_products(dropped, grad_out, spec)
        grad_scores = grad_probs.sub_(shift[None, :, :, None]).mul_(probs)
        # Masked scores are constants. In a row that sees some key their probabilities are at most
        # e^-87 (EXP_FLOOR), so their gradient is negligible; a row that sees no key gets none.
        grad_scores.masked_fill_(degenerate[None, :, :, None], 0)
        grad_queries = torch.empty_like(queries)
        _accumulate_products(grad_queries, grad_scores, keys, spec)
        grad_keys = _transposed_products(grad_scores, queries, spec)
        if ctx.shared:
            return grad_queries.add_(_normalize_keys_backward(queries, grad_keys)), None, grad_values, None, None, None, None
        return grad_queries, grad_keys, grad_values, None, None, None, None


def window_attention(
    queries: Tensor,
    keys: Tensor | None,
    values: Tensor,
    positions: Tensor,
    key_ranks: Tensor | None,
    *,
    before: int,
    after: int,
    causal: bool,
    self_mask: bool,
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[Tensor, Tensor]:
    """Chunked softmax attention in the window layout.

    queries, values (T', C, D); keys (T', C, D), or None for shared-QK attention (keys are then
    ``normalize_keys(queries)``); positions and key_ranks (T', C) from ``WindowLayout`` and
    ``window_key_ranks``. Returns outputs (T', C, D) and the log-sum-exp of each query's scores
    (T', C); the rows of wrap copies mean nothing (``from_windows`` never reads them).
    """
    spec = WindowSpec(before, after, causal, self_mask, float(dropout))
    return _WindowAttention.apply(
        queries.contiguous(), None if keys is None else keys.contiguous(), values.contiguous(),
        positions, key_ranks, spec, training,
    )


def merge_rounds(outputs: Tensor, logsumexp: Tensor) -> Tensor:
    """Combine R hash rounds, (…, R, D) and (…, R) -> (…, D).

    Each round's output is weighted by softmax over rounds of its log-sum-exp: a round whose
    chunk held more of the query's attention mass counts more (Reformer paper, appendix A).
    """
    if outputs.shape[-2] == 1:
        return outputs.squeeze(-2)
    weights = torch.softmax(logsumexp, dim=-1)  # (…, R)
    return torch.einsum("...rd,...r->...d", outputs, weights)


def split_heads(projected: Tensor, num_heads: int) -> Tensor:
    """(B, L, H*D) -> (B, H, L, D)."""
    batch, length, width = projected.shape
    return projected.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(per_head: Tensor) -> Tensor:
    """(B, H, L, D) -> (B, L, H*D)."""
    batch, heads, length, head_size = per_head.shape
    return per_head.transpose(1, 2).reshape(batch, length, heads * head_size)


def check_attention_inputs(hidden_states: Tensor, attention_mask: Tensor | None, hidden_size: int) -> Tensor | None:
    """Validate (B, L, hidden) inputs and a (B, L) mask; returns the mask as bool (True = real token)."""
    if not isinstance(hidden_states, Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden_states has shape {tuple(hidden_states.shape)}; expected (batch, length, {hidden_size}) "
            f"for this layer's hidden_size={hidden_size}"
        )
    if hidden_states.shape[1] == 0:
        raise ValueError("hidden_states has length 0; attention needs at least one position")
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor of shape (batch, length), got {type(attention_mask)}")
    if tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, length) = "
            f"{tuple(hidden_states.shape[:2])} with 1/True for real tokens and 0/False for padding"
        )
    return attention_mask.to(device=hidden_states.device, dtype=torch.bool)


def check_layer_sizes(hidden_size: int, num_heads: int, head_size: int, dropout: float) -> None:
    """Constructor checks common to the attention modules."""
    for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("head_size", head_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def check_chunking(chunk_length: int, num_chunks_before: int, num_chunks_after: int) -> None:
    """Constructor checks for chunked (LSH and local) attention."""
    if isinstance(chunk_length, bool) or not isinstance(chunk_length, int) or chunk_length < 1:
        raise ValueError(f"chunk_length must be a positive int, got {chunk_length!r}")
    for name, value in (("num_chunks_before", num_chunks_before), ("num_chunks_after", num_chunks_after)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def pad_sequence(hidden_states: Tensor, key_mask: Tensor | None, padded_length: int):
    """Zero-pad (B, L, E) inputs to ``padded_length`` and mark the new positions as padding."""
    batch, length, _ = hidden_states.shape
    if padded_length == length:
        return hidden_states, key_mask
    if padded_length < length:
        raise ValueError(f"padded_length={padded_length} is shorter than the sequence ({length} positions)")
    if key_mask is None:
        key_mask = torch.ones(batch, length, dtype=torch.bool, device=hidden_states.device)
    padding = padded_length - length
    return nn.functional.pad(hidden_states, (0, 0, 0, padding)), nn.functional.pad(key_mask, (0, padding), value=False)


class AttentionCache:
    """Keys, values and padding mask of past positions for causal incremental decoding.

    ``keys``/``values`` (B, H, M, D) and ``key_mask`` (B, M) have room for M = ``max_length``
    positions; ``length`` are filled. LSH layers also keep ``bucket_ids`` (B, H, R, M) and the
    hashing fixed for the whole generation (``rotations``, ``num_buckets``).
    """

    def __init__(self, batch_size: int, max_length: int, num_heads: int, head_size: int, *, device=None,
                 dtype=None, num_hashes: int | None = None, rotations: Tensor | None = None, num_buckets=None):
        shape = (batch_size, num_heads, max_length, head_size)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.bucket_ids = None
        if num_hashes is not None:
            self.bucket_ids = torch.zeros(batch_size, num_heads, num_hashes, max_length, dtype=torch.long, device=device)
        self.rotations, self.num_buckets = rotations, num_buckets
        self.length = 0

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]

    def append(self, keys: Tensor, values: Tensor, key_mask: Tensor, bucket_ids: Tensor | None = None) -> None:
        """Store n new positions: keys/values (B, H, n, D), key_mask (B, n), bucket_ids (B, H, R, n)."""
        start, stop = self.length, self.length + keys.shape[2]
        if stop > self.max_length:
            raise ValueError(
                f"the cache holds {self.max_length} positions and {start} are used; cannot add {keys.shape[2]} "
                "more: create it with a larger max_length"
            )
        self.keys[:, :, start:stop] = keys
        self.values[:, :, start:stop] = values
        self.key_mask[:, start:stop] = key_mask
        if self.bucket_ids is not None:
            self.bucket_ids[..., start:stop] = bucket_ids
        self.length = stop

    def reorder(self, rows: Tensor) -> None:
        """Keep, duplicate or permute batch rows: row i becomes old row ``rows[i]`` (beam search)."""
        self.keys, self.values = self.keys.index_select(0, rows), self.values.index_select(0, rows)
        self.key_mask = self.key_mask.index_select(0, rows)
        if self.bucket_ids is not None:
            self.bucket_ids = self.bucket_ids.index_select(0, rows)


def check_decode_inputs(hidden_new: Tensor, attention_mask_new: Tensor | None, hidden_size: int) -> Tensor:
    """Validate a (B, 1, hidden) step and return its (B, 1) bool mask (True = real token)."""
    key_mask = check_attention_inputs(hidden_new, attention_mask_new, hidden_size)
    if hidden_new.shape[1] != 1:
        raise ValueError(f"decode_step takes one new position, shape (batch, 1, {hidden_size}); got {tuple(hidden_new.shape)}")
    if key_mask is None:
        return torch.ones(hidden_new.shape[0], 1, dtype=torch.bool, device=hidden_new.device)
    return key_mask


def check_causal_for_decoding(causal: bool) -> None:
    if not causal:
        raise ValueError("incremental decoding needs a causal layer (causal=True): later tokens would change earlier outputs")
