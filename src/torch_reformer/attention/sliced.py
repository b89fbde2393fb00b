"""The sliced chunk-attention core: softmax attention of every chunk over its neighbour chunks.

Legend: B batch, H heads, G = B * H groups, L length, R hash rounds, C chunk length,
N = R * L / C chunks per group, J = before + 1 + after neighbour chunks, S chunks per slice,
D head dim. "Rows": the B * L * H vectors of a (B, L, H * D) projection seen as (B*L*H, D).

The order of the slots and their chunks comes from a ``chunking.ChunkLayout`` (bucket order for
LSH attention, the identity for local attention); masks use ``chunking.MASK_VALUES``.

Memory. The core never builds the sorted sequence, the scores of all chunks, or one output per
round. It walks the query chunks in slices of a few hundred, gathers each slice's queries and
its neighbours' keys and values straight from the rows, and writes the slice's outputs back to
rows, merging the rounds on the fly by their log-sum-exp (a running maximum and sum per row,
as FlashAttention merges key blocks). Backward recomputes each slice's scores from the saved
inputs and the per-slot log-sum-exp and scatters the gradients into rows. Between forward and
backward it keeps only its inputs, the output rows and one float per slot: O(L * H * (D + R))
for an LSH layer with R rounds, where holding the sorted copies and the scores would take
O(L * H * R * (D + J * C)). Attention dropout draws its mask per slice from a generator seeded
once per call (the seed comes from the global RNG), so backward rebuilds the masks of forward.

Precision. Half-precision inputs (bfloat16, float16) are widened to float32 slice by slice:
scores, softmax, log-sum-exp, round weights and the output and gradient accumulators are
float32, and results are returned in the input dtype (as fused attention kernels do). float32 and
float64 inputs are computed in their own dtype, and their probabilities and round weights are
rounded as Trax and Hugging Face round them (``_softmax_``, ``_round_normaliser``), which decides
the output of a token that sees only itself (its log-sum-exps sit at the self-mask value).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch
from torch import Tensor

from ..autograd_checks import ATTENTION_ONCE_ONLY, changed_in_place, refuse_create_graph, version_of
from .chunking import (
    ChunkLayout,
    _normalize_keys_backward,
    accumulation_dtype,
    mask_values,
    neighbour_offsets,
    normalize_keys,
    slot_key_ranks,
)

# exp is clamped from below at this value: a weight e^-87 ~ 1.6e-38 is nothing next to the row
# maximum's weight 1, and exp's vectorised kernels fall to a path ~10x slower for inputs whose
# result would underflow, which every masked score (-1e9 - max) is.
EXP_FLOOR = -87.0

# Score elements per slice (S * C * J * C), by device type. Backward holds about four tensors of
# this size at once. On CPU, 2^19 (8 MiB in float32) is small next to the rows of a long sequence
# and large enough that the per-slice Python work is noise (at 16K tokens, 2^18 to 2^21 ran within
# 5 % of each other). Accelerators get larger slices, so each kernel launch carries more work.
SLICE_SCORES = {"cpu": 1 << 19}
SLICE_SCORES_ACCELERATOR = 1 << 23


class AttentionSpec(NamedTuple):
    """Static settings of ``chunked_attention``."""

    shared_qk: bool  # keys are normalize_keys(queries)
    causal: bool
    self_mask: bool
    key_scale: float
    dropout: float
    chunks_per_slice: int
    position_dtype: torch.dtype  # float dtype that holds every position exactly (masks are built in it)
    compute_dtype: torch.dtype  # scores, softmax statistics and accumulators: float32 for half inputs
    reference_rounding: bool  # probabilities and round weights rounded as Trax/HF do (``_softmax_``)


class _Slice(NamedTuple):
    """Index tables of S query chunks (one round) and their J neighbour chunks."""

    query_rows: Tensor  # (S*C,)
    query_slots: Tensor  # (S*C,)
    key_rows: Tensor  # (S*J*C,)
    query_positions: Tensor  # (S, C)
    key_positions: Tensor  # (S, J*C)
    key_ranks: Tensor | None  # (S, J*C)


def _slices(layout: ChunkLayout, key_ranks: Tensor | None, chunks_per_slice: int) -> Iterator[_Slice]:
    """The query chunks in slices, round after round, so a slice never holds two slots of one row."""
    batch, length, heads, rounds = layout.shape
    if batch * heads == 0:  # an empty batch has no chunks
        return
    chunk, per_group = layout.chunk_length, layout.chunks_per_group
    per_round = length // chunk
    device = layout.slot_rows.device
    group_start = torch.arange(batch * heads, device=device)[:, None] * per_group  # (G, 1)
    offsets = torch.tensor(neighbour_offsets(layout.before, layout.after, per_group), device=device)  # (J,)
    in_chunk = torch.arange(chunk, device=device)
    for round_index in range(rounds):
        chunks = (group_start + round_index * per_round + torch.arange(per_round, device=device)).view(-1)
        for query_chunks in chunks.split(chunks_per_slice):
            start = query_chunks - query_chunks % per_group  # (S,) first chunk of each chunk's group
            neighbours = start[:, None] + (query_chunks[:, None] - start[:, None] + offsets) % per_group  # (S, J)
            query_slots = (query_chunks[:, None] * chunk + in_chunk).view(-1)
            key_slots = (neighbours[..., None] * chunk + in_chunk).view(-1)
            count = query_chunks.shape[0]
            yield _Slice(
                query_rows=layout.slot_rows[query_slots], query_slots=query_slots,
                key_rows=layout.slot_rows[key_slots],
                query_positions=layout.positions[query_slots].view(count, chunk),
                key_positions=layout.positions[key_slots].view(count, -1),
                key_ranks=None if key_ranks is None else key_ranks[key_slots].view(count, -1),
            )


def save_with_output(ctx, tensors: tuple, out: Tensor) -> None:
    """``ctx.save_for_backward(*tensors)`` and keep ``out`` for the start of backward only.

    Attention backward needs its output just once, for the per-query dot products dO · O, before
    its loop over slices. Saved the ordinary way it would stay alive through the whole loop; kept
    as a detached alias, backward can drop it first (``saved_and_output`` hands it over once; a
    second backward through the same graph gets None and recomputes it). The alias shares the
    output's version counter, so an in-place change before backward is refused. While
    ``torch.compile`` traces, the output is saved the ordinary way: traced graphs do not keep the
    alias's version semantics, and the compiler plans the memory of its graphs itself.
    """
    ctx.output_saved = torch.compiler.is_compiling()
    if ctx.output_saved:
        ctx.save_for_backward(*tensors, out)
    else:
        ctx.save_for_backward(*tensors)
        ctx.out, ctx.out_version = out.detach(), version_of(out)


def saved_and_output(ctx) -> tuple[tuple, Tensor | None]:
    """The tensors given to ``save_with_output`` and the output (None once it has been handed over)."""
    saved = ctx.saved_tensors
    if ctx.output_saved:
        return saved[:-1], saved[-1]
    out, ctx.out = ctx.out, None
    if out is not None and changed_in_place(out, ctx.out_version):
        raise RuntimeError("the output of attention was modified in place before backward; clone it before "
                           "changing it")
    return saved, out


def _slice_scores(queries: Tensor, keys: Tensor, part: _Slice, spec: AttentionSpec):
    """Masked scores (S, C, J*C) of a slice, with its queries, raw and used keys, all in the compute dtype.

    Half inputs are gathered and widened to float32 before the products: in float16 q · k overflows
    beyond 65504 and bfloat16 scores carry 3 significant digits, which softmax turns into errors
    growing with the logits.
    """
    width, dtype = queries.shape[-1], spec.compute_dtype
    chunk = part.query_positions.shape[1]
    slice_queries = queries.index_select(0, part.query_rows).view(-1, chunk, width).to(dtype)  # (S, C, D)
    raw_keys = keys.index_select(0, part.key_rows).view(slice_queries.shape[0], -1, width).to(dtype)  # (S, J*C, D)
    slice_keys = normalize_keys(raw_keys) if spec.shared_qk else raw_keys
    scores = torch.bmm(slice_queries, slice_keys.transpose(1, 2))  # (S, C, J*C)
    if spec.key_scale != 1.0:
        scores.mul_(spec.key_scale)
    _mask_scores_(scores, part, spec)
    return scores, slice_queries, raw_keys, slice_keys


def _mask_scores_(scores: Tensor, part: _Slice, spec: AttentionSpec) -> None:
    """Set the slice's masked scores (S, C, J*C) to their constants in place: keys the query may not
    see (padding; later positions when causal) to the mask value, then its own position to the
    self-mask value.

    The masks are 0/1 tensors built by subtracting positions in ``spec.position_dtype`` and applied
    as ``scores * (1 - m) + m * value``: exact (the positions are whole numbers held exactly, and
    x * 1 + 0 = x), and on CPU about twice as fast as comparisons and ``masked_fill_`` on boolean
    masks, which are not vectorised. Scores are float32 or float64 (``_slice_scores`` widens half
    inputs), so they do not overflow to inf, where inf * 0 would be NaN.
    """
    mask_value, self_mask_value = mask_values(scores.dtype)
    query_positions, key_positions, ranks = part.query_positions, part.key_positions, part.key_ranks
    dtype = spec.position_dtype
    if spec.causal:  # hidden: key rank (its position, or L for padding) after the query's position
        ranks = key_positions if ranks is None else ranks
        hidden = (ranks[:, None, :].to(dtype) - query_positions[:, :, None].to(dtype)).clamp_(0, 1)  # (S, C, J*C)
        _fill_where_(scores, hidden, mask_value)
    elif ranks is not None:  # hidden: padding keys, whose rank L exceeds their position
        _fill_where_(scores, (ranks - key_positions).to(dtype).clamp_(0, 1)[:, None, :], mask_value)  # (S, 1, J*C)
    if spec.self_mask:
        distance = (key_positions[:, None, :].to(dtype) - query_positions[:, :, None].to(dtype)).abs_()
        _fill_where_(scores, distance.clamp_(max=1).neg_().add_(1), self_mask_value)  # 1 at the query's own position


def _fill_where_(scores: Tensor, hit: Tensor, value: float) -> None:
    """``scores[hit == 1] = value`` in place for a 0/1 float ``hit`` broadcastable to ``scores``
    (``hit`` is overwritten)."""
    scores.mul_(1 - hit).add_(hit.mul_(value))


def _position_dtype(length: int) -> torch.dtype:
    """A float dtype holding every position up to ``length`` (the padding rank) exactly."""
    return torch.float32 if length < 2**24 else torch.float64


def _exp_shifted_(scores: Tensor) -> Tensor:
    """scores <- exp(max(scores - row max, EXP_FLOOR)) in place; returns the row maximum (S, C)."""
    row_max = scores.amax(dim=-1)
    scores.sub_(row_max[..., None]).clamp_(min=EXP_FLOOR).exp_()
    return row_max


def _softmax_(scores: Tensor, spec: AttentionSpec) -> tuple[Tensor, Tensor]:
    """scores (S, C, J*C) <- their softmax over the last axis in place; returns each row's maximum
    and log-sum-exp (S, C).

    With ``spec.reference_rounding`` (float32 and float64 inputs) probabilities are exp(s - lse)
    with the lse rounded to the scores' dtype, as Trax and HF compute them, so the numbers match
    theirs: the lse of a row that sees only its own position sits near the self-mask value (-1e5,
    spacing 0.008 in float32) and such a row sums to 1 within 0.4 %. A row that sees no key at all
    has its lse near the mask value (-1e9, spacing 64), where exp(max - lse) could be off by e^32:
    it is divided by its sum (every key then weighs the same). Without reference rounding (half
    inputs, which have no reference to match and whose own rounding is finer than 0.4 % in float16)
    every row is divided by its sum.
    """
    row_max = _exp_shifted_(scores)
    row_sum = scores.sum(dim=-1)
    logsumexp = row_sum.log().add_(row_max)
    if not spec.reference_rounding:
        scores.div_(row_sum[..., None])
        return row_max, logsumexp
    sees_a_key = row_max > mask_values(scores.dtype)[0]
    scores.mul_(torch.where(sees_a_key, (row_max - logsumexp).exp_(), row_sum.reciprocal_())[..., None])
    return row_max, logsumexp


def _dropout_keep(shape, seed: int, index: int, spec: AttentionSpec, device: torch.device) -> Tensor:
    """The keep mask of slice ``index`` in the compute dtype, scaled by 1 / (1 - p); the same on every
    call with ``seed``."""
    generator = torch.Generator(device=device).manual_seed(seed + index)
    keep = torch.rand(shape, generator=generator, device=device, dtype=spec.compute_dtype) >= spec.dropout
    return keep.to(spec.compute_dtype).div_(1 - spec.dropout)


def _is_degenerate(row_max: Tensor, spec: AttentionSpec) -> Tensor:
    """Rows that see no key: their maximum is a mask constant; they are constants without gradient."""
    mask_value, self_mask_value = mask_values(row_max.dtype)
    return row_max <= (self_mask_value if spec.self_mask else mask_value)


def _attend_slices(queries, keys, values, layout: ChunkLayout, key_ranks, spec: AttentionSpec, seed):
    """Forward of ``_ChunkedAttention`` on rows: returns the output rows (rows, D) in the dtype of
    ``values``, and in the compute dtype the log-sum-exp of every slot (G*R*L,) and, with several
    rounds, the rows' ``_round_normaliser`` (None with one round). Outputs are accumulated in the
    compute dtype."""
    rows, width = values.shape
    keys = queries if keys is None else keys
    rounds, dtype = layout.shape[3], spec.compute_dtype
    out = values.new_zeros(rows, width, dtype=dtype)
    slot_logsumexp = queries.new_empty(layout.slot_rows.shape[0], dtype=dtype)
    row_max = row_sum = None
    if rounds > 1:
        row_max = queries.new_full((rows,), float("-inf"), dtype=dtype)
        row_sum = queries.new_zeros(rows, dtype=dtype)
    for index, part in enumerate(_slices(layout, key_ranks, spec.chunks_per_slice)):
        scores, _, _, _ = _slice_scores(queries, keys, part, spec)
        logsumexp = _softmax_(scores, spec)[1].view(-1)  # (S*C,)
        slot_logsumexp[part.query_slots] = logsumexp
        if seed is not None:
            scores.mul_(_dropout_keep(scores.shape, seed, index, spec, scores.device))
        slice_values = values.index_select(0, part.key_rows).view(scores.shape[0], -1, width).to(dtype)
        slice_out = torch.bmm(scores, slice_values).view(-1, width)  # (S*C, D)
        if rounds == 1:
            out.index_copy_(0, part.query_rows, slice_out)
            continue
        # Rows are unique within a slice (one round), so gather-update-scatter is exact.
        old_max = row_max.index_select(0, part.query_rows)
        new_max = torch.maximum(old_max, logsumexp)
        old_weight, new_weight = (old_max - new_max).exp_(), (logsumexp - new_max).exp_()
        merged = out.index_select(0, part.query_rows).mul_(old_weight[:, None]).add_(slice_out * new_weight[:, None])
        out.index_copy_(0, part.query_rows, merged)
        merged_sum = row_sum.index_select(0, part.query_rows).mul_(old_weight).add_(new_weight)
        row_sum.index_copy_(0, part.query_rows, merged_sum)
        row_max.index_copy_(0, part.query_rows, new_max)
    if rounds == 1:
        return out.to(values.dtype), slot_logsumexp, None
    shift, scale = _round_normaliser(row_max, row_sum, spec)  # out holds sum_r exp(lse_r - max) o_r
    out.mul_((row_max.sub_(shift).exp_() if scale is None else scale)[:, None])
    return out.to(values.dtype), slot_logsumexp, (shift, scale)


def _round_normaliser(row_max: Tensor, row_sum: Tensor, spec: AttentionSpec) -> tuple[Tensor, Tensor | None]:
    """Per row (shift, scale), (rows,) each, such that round r weighs exp(lse_r - shift) * scale.

    With reference rounding the shift is the row's log-sum-exp over its rounds rounded to the
    compute dtype and there is no scale, as Trax and HF weigh rounds (see ``merge_rounds``);
    otherwise the shift is the largest lse and the scale 1 / sum_r exp(lse_r - max), so the
    weights sum to 1 exactly. ``row_sum`` holds sum_r exp(lse_r - max).
    """
    if spec.reference_rounding:
        return row_sum.log().add_(row_max), None
    return row_max, row_sum.reciprocal()


def _round_weights(logsumexp: Tensor, normaliser: tuple[Tensor, Tensor | None], query_rows: Tensor) -> Tensor:
    """Each slot's weight in its row's merge of rounds, (S, C), as forward weighed it."""
    shift, scale = (None if x is None else x.index_select(0, query_rows).view(logsumexp.shape) for x in normaliser)
    weight = (logsumexp - shift).exp_()
    return weight if scale is None else weight.mul_(scale)


def _slice_backward(queries, keys, values, part: _Slice, spec: AttentionSpec, slice_grad, shift, keep):
    """Gradients of one slice from its recomputed probabilities.

    ``slice_grad`` (S, C, D) is the gradient of the slots' outputs, ``shift`` (S, C) the
    per-slot term subtracted from dP, ``keep`` the slice's scaled dropout mask or None, all in
    the compute dtype. Returns the rows' gradient contributions in the compute dtype: queries
    (S*C, D), keys and values (S*J*C, D) (keys already through the normalisation for shared keys).
    """
    width = values.shape[1]
    keys_in = queries if spec.shared_qk else keys
    scores, slice_queries, raw_keys, slice_keys = _slice_scores(queries, keys_in, part, spec)
    slice_max = _softmax_(scores, spec)[0]  # the probabilities of forward, recomputed by the same operations
    probs = scores  # (S, C, J*C)
    slice_values = values.index_select(0, part.key_rows).view(probs.shape[0], -1, width).to(spec.compute_dtype)
    grad_probs = torch.bmm(slice_grad, slice_values.transpose(1, 2))  # (S, C, J*C)
    dropped = probs
    if keep is not None:
        grad_probs.mul_(keep)
        dropped = probs * keep
    grad_values = torch.bmm(dropped.transpose(1, 2), slice_grad).view(-1, width)
    del dropped
    grad_scores = grad_probs.sub_(shift[..., None]).mul_(probs)
    grad_scores.masked_fill_(_is_degenerate(slice_max, spec)[..., None], 0)
    if spec.key_scale != 1.0:
        grad_scores.mul_(spec.key_scale)
    grad_queries = torch.bmm(grad_scores, slice_keys).view(-1, width)
    grad_keys = torch.bmm(grad_scores.transpose(1, 2), slice_queries)  # (S, J*C, D)
    if spec.shared_qk:
        grad_keys = _normalize_keys_backward(raw_keys, grad_keys)
    return grad_queries, grad_keys.view(-1, width), grad_values


class _ChunkedAttention(torch.autograd.Function):
    """Softmax attention of every chunk over its neighbours, slice by slice, rows in and rows out."""

    @staticmethod
    def forward(ctx, queries, keys, values, layout: ChunkLayout, key_ranks, spec: AttentionSpec, seed):
        # Autocast would run the products in half precision again: the core picks its own (module docstring).
        with torch.autocast(queries.device.type, enabled=False):
            out, slot_logsumexp, normaliser = _attend_slices(queries, keys, values, layout, key_ranks, spec, seed)
        ctx.layout, ctx.spec, ctx.seed = layout, spec, seed
        round_shift, round_scale = (None, None) if normaliser is None else normaliser
        save_with_output(ctx, (queries, keys, values, slot_logsumexp, round_shift, round_scale, key_ranks), out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _ChunkedAttention._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        refuse_create_graph("chunked LSH/local attention", ATTENTION_ONCE_ONLY)
        (queries, keys, values, slot_logsumexp, round_shift, round_scale, key_ranks), out = saved_and_output(ctx)
        layout, spec, seed = ctx.layout, ctx.spec, ctx.seed
        if out is None:  # backward already ran once on this graph (retain_graph=True)
            out = _attend_slices(queries, keys, values, layout, key_ranks, spec, seed)[0]
        width, dtype = values.shape[1], spec.compute_dtype
        grad_out = grad_out.contiguous()
        # Σ_k p_k dP_k = dO · O (FlashAttention's identity). With several rounds a slot's output
        # gradient is w_r g and its log-sum-exp gets w_r (g · o_r - g · y); both terms together
        # leave a shift of w_r (g · y) per slot.
        grad_dot_out = torch.einsum("nd,nd->n", grad_out.to(dtype), out.to(dtype))  # (rows,)
        del out
        # Accumulated in the compute dtype: a key collects contributions from several chunks and rounds.
        grad_queries = torch.zeros_like(queries, dtype=dtype)
        grad_keys = None if spec.shared_qk else torch.zeros_like(keys, dtype=dtype)
        grad_values = torch.zeros_like(values, dtype=dtype)
        for index, part in enumerate(_slices(layout, key_ranks, spec.chunks_per_slice)):
            count, chunk = part.query_positions.shape
            slice_grad = grad_out.index_select(0, part.query_rows).view(count, chunk, width).to(dtype)
            shift = grad_dot_out.index_select(0, part.query_rows).view(count, chunk)
            if round_shift is not None:  # several rounds: each slot's share of its row's merged output
                logsumexp = slot_logsumexp.index_select(0, part.query_slots).view(count, chunk)
                round_weight = _round_weights(logsumexp, (round_shift, round_scale), part.query_rows)
                slice_grad = slice_grad * round_weight[..., None]
                shift = shift * round_weight
            keep = None if seed is None else _dropout_keep((count, chunk, part.key_rows.shape[0] // count), seed,
                                                           index, spec, queries.device)
            grad_q, grad_k, grad_v = _slice_backward(queries, keys, values, part, spec, slice_grad, shift, keep)
            # index_add_ accumulates repeated rows (a key serves several chunks) like
            # index_put_(accumulate=True), and is faster on CPU.
            grad_values.index_add_(0, part.key_rows, grad_v)
            grad_queries.index_add_(0, part.query_rows, grad_q)
            (grad_queries if spec.shared_qk else grad_keys).index_add_(0, part.key_rows, grad_k)
        return (grad_queries.to(queries.dtype), None if grad_keys is None else grad_keys.to(keys.dtype),
                grad_values.to(values.dtype), None, None, None, None)


def chunked_attention(
    queries: Tensor,
    keys: Tensor | None,
    values: Tensor,
    layout: ChunkLayout,
    key_mask: Tensor | None = None,
    *,
    causal: bool,
    self_mask: bool,
    key_scale: float = 1.0,
    dropout: float = 0.0,
    training: bool = False,
    chunks_per_slice: int | None = None,
) -> Tensor:
    """Chunked softmax attention in the order of ``layout``, (B, H, L, D) -> (B, H, L, D).

    ``keys`` None means shared-QK attention: keys are ``normalize_keys(queries)`` and
    ``self_mask`` should be True. Scores are ``key_scale * q · k``. ``key_mask`` (B, L) is True
    for real tokens. With several rounds each position's output is the softmax-of-log-sum-exp
    weighted sum of its rounds' outputs (Reformer paper, appendix A; ``merge_rounds``).
    ``chunks_per_slice`` sets how many query chunks are computed at once (default: about
    ``SLICE_SCORES`` scores for the device); it changes memory and speed, not the result (dropout
    masks aside).
    """
    batch, length, heads, _ = layout.shape
    if chunks_per_slice is None:
        window = (layout.before + 1 + layout.after) * layout.chunk_length
        budget = SLICE_SCORES.get(queries.device.type, SLICE_SCORES_ACCELERATOR)
        chunks_per_slice = max(1, budget // (layout.chunk_length * window))
    spec = AttentionSpec(keys is None, bool(causal), bool(self_mask), float(key_scale), float(dropout),
                         int(chunks_per_slice), _position_dtype(length), accumulation_dtype(queries.dtype),
                         accumulation_dtype(queries.dtype) == queries.dtype)
    seed = None
    if training and dropout > 0:
        seed = int(torch.randint(0, 2**62, (1,)).item())

    def rows(per_head: Tensor) -> Tensor:  # (B, H, L, D) -> (B*L*H, D), free for split_heads views
        return per_head.transpose(1, 2).reshape(batch * length * heads, per_head.shape[-1])

    out = _ChunkedAttention.apply(
        rows(queries), None if keys is None else rows(keys), rows(values), layout,
        slot_key_ranks(layout, key_mask), spec, seed,
    )
    return out.view(batch, length, heads, values.shape[-1]).transpose(1, 2)
