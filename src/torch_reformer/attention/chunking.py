"""Sorting, chunking, key normalisation and mask constants shared by LSH and local attention.

Legend: B batch, H heads, G = B * H groups, L length, R hash rounds, C chunk length,
N = R * L / C chunks per group, J = before + 1 + after neighbour chunks, D head dim.
"Rows": the B * L * H vectors of a (B, L, H * D) projection seen as (B*L*H, D).

LSH attention sorts each round's positions by bucket, lays the R sorted rounds end to end
(R * L slots per group), cuts them into chunks of C and lets every chunk attend to itself and
its neighbours. Local attention is the same with the identity order and one round. Neighbours
wrap around: the first chunk looks back at the last one (for LSH, the first chunk of round r
looks back at the end of round r - 1), as in Trax and Hugging Face. A window that reaches as far
as the number of chunks or farther does not wrap again: those offsets give the chunk itself, as
the look-adjacent concatenation of Trax and HF does (``neighbour_offsets``). The attention itself
is computed by the sliced core in ``sliced``.

Masks replace scores by finite constants (never -inf, so a row whose keys are all masked stays
finite). ``MASK_VALUES`` holds them in one place:
- ``mask``: keys a query may not see (padding, or after the query in causal models);
- ``self_mask``: shared-QK attention to the query's own position; it sits far above ``mask``
  so a token with no other valid key attends to itself.
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


def neighbour_offsets(before: int, after: int, num_chunks: int) -> list[int]:
    """Offsets of the J = before + 1 + after chunks that a chunk attends to, among ``num_chunks``
    chunks that wrap around (chunk t sees chunks (t + offset) mod ``num_chunks``).

    Trax and HF build the window of offset i by concatenating x[i:] and x[:i] along the chunks;
    Python slicing clamps, so an offset whose magnitude reaches the number of chunks gives the
    chunk itself (offset 0), not the offset modulo the count. Below that it is plain wrapping.
    """
    return [offset if abs(offset) < num_chunks else 0 for offset in range(-before, after + 1)]


class ChunkLayout(NamedTuple):
    """The sorted, chunked sequence as index tables into the rows.

    Slots are numbered group by group (group = (batch, head)), the R sorted rounds of a group
    end to end: slot ``(g * R + r) * L + i`` is the i-th position of round r of group g, and
    chunk t holds slots ``t * C`` to ``t * C + C - 1``.
    ``slot_rows`` (G*R*L,): row of the (B*L*H, D) inputs that fills each slot.
    ``positions`` (G*R*L,): original position of each slot.
    """

    slot_rows: Tensor
    positions: Tensor
    shape: tuple[int, int, int, int]  # (B, L, H, R)
    chunk_length: int
    before: int
    after: int

    @property
    def chunks_per_group(self) -> int:
        return self.shape[3] * self.shape[1] // self.chunk_length


def chunk_layout(sorted_positions: Tensor, chunk_length: int, before: int, after: int) -> ChunkLayout:
    """Layout of ``sorted_positions`` (B, H, R, L) cut into chunks of ``chunk_length``, which must divide L."""
    batch, heads, rounds, length = sorted_positions.shape
    if length % chunk_length:
        raise ValueError(f"chunk_length={chunk_length} must divide the sequence length {length}")
    with torch.no_grad():
        batch_index = torch.arange(batch, device=sorted_positions.device).view(batch, 1, 1, 1)
        head_index = torch.arange(heads, device=sorted_positions.device).view(1, heads, 1, 1)
        slot_rows = (batch_index * length + sorted_positions) * heads + head_index
    return ChunkLayout(
        slot_rows=slot_rows.reshape(-1), positions=sorted_positions.reshape(-1),
        shape=(batch, length, heads, rounds), chunk_length=chunk_length, before=before, after=after,
    )


def slot_key_ranks(layout: ChunkLayout, key_mask: Tensor | None) -> Tensor | None:
    """Per slot: its position if the token is real, L (beyond every position) if padding; (G*R*L,).

    ``key_mask`` is (B, L), True for real tokens. None without padding.
    """
    if key_mask is None:
        return None
    batch, length, heads, rounds = layout.shape
    positions = layout.positions.view(batch, heads * rounds * length)  # the groups of one batch row are adjacent
    real = torch.gather(key_mask, 1, positions)
    return torch.where(real, positions, length).view(-1)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that reductions, attention scores and softmax statistics of ``dtype`` inputs are
    computed in: float32 for half types (their products overflow or round too coarsely), else ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


def _inverse_rms(qk: Tensor, epsilon: float) -> Tensor:
    """rsqrt(mean(x^2) + eps) over the last axis, (…, D) -> (…, 1), without an x^2 temporary.

    Computed in float32 for half inputs (float64 stays float64): in float16 the squared norm
    overflows once |x| > 256 and a zero row's rsqrt(eps)^2 = 1e6 is inf.
    """
    norm = torch.linalg.vector_norm(qk, dim=-1, keepdim=True, dtype=accumulation_dtype(qk.dtype))
    return torch.rsqrt(norm.square() / qk.shape[-1] + epsilon)


def normalize_keys(qk: Tensor, epsilon: float = 1e-6) -> Tensor:
    """Keys from shared qk vectors (…, D): x / sqrt(mean(x^2) + eps) / sqrt(D), in the dtype of ``qk``."""
    return (qk * (_inverse_rms(qk, epsilon) / qk.shape[-1] ** 0.5)).to(qk.dtype)


def _normalize_keys_backward(qk: Tensor, grad_keys: Tensor, epsilon: float = 1e-6) -> Tensor:
    """Gradient of ``normalize_keys`` at ``qk`` for ``grad_keys``: (r/√D)(g - x r² mean(g·x)).

    The dot products and r² are taken in float32 for half inputs; the result has the dtype of
    ``grad_keys`` (which it may overwrite).
    """
    inverse_rms = _inverse_rms(qk, epsilon)  # (…, 1)
    dtype = inverse_rms.dtype
    projection = torch.einsum("...d,...d->...", grad_keys.to(dtype), qk.to(dtype)).unsqueeze(-1)  # (…, 1)
    projection.mul_(inverse_rms.square()).div_(qk.shape[-1])
    scale = inverse_rms.div_(qk.shape[-1] ** 0.5)
    if grad_keys.dtype != dtype:  # half: one float32 pass, then back
        return ((grad_keys.to(dtype) - qk.to(dtype) * projection) * scale).to(grad_keys.dtype)
    return grad_keys.sub_(qk * projection).mul_(scale)  # in place: no (…, D) temporary beyond qk * projection


def merge_rounds(outputs: Tensor, logsumexp: Tensor, *, reference_rounding: bool = True) -> Tensor:
    """Combine R hash rounds, (…, R, D) and (…, R) -> (…, D).

    Each round's output is weighted by softmax over rounds of its log-sum-exp: a round whose
    chunk held more of the query's attention mass counts more (Reformer paper, appendix A).
    With ``reference_rounding`` the weights are computed as Trax and Hugging Face compute them,
    exp(lse_r - logsumexp(lse)), so the numbers match theirs: a token that sees only itself in
    every round has lse_r at the self-mask value (-1e5), where float32 rounds logsumexp(lse) to a
    spacing of 0.008, and its weights sum to 1 within 0.4 % (in float64 within 1e-11). Without
    it they are ``torch.softmax`` and sum to 1 to rounding.
    """
    if outputs.shape[-2] == 1:
        return outputs.squeeze(-2)
    if reference_rounding:
        weights = torch.exp(logsumexp - torch.logsumexp(logsumexp, dim=-1, keepdim=True))  # (…, R)
    else:
        weights = torch.softmax(logsumexp, dim=-1)
    return torch.einsum("...rd,...r->...d", outputs, weights)


def split_heads(projected: Tensor, num_heads: int) -> Tensor:
    """(B, L, H*D) -> (B, H, L, D)."""
    batch, length, width = projected.shape
    return projected.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(per_head: Tensor) -> Tensor:
    """(B, H, L, D) -> (B, L, H*D)."""
    batch, heads, length, head_size = per_head.shape
    return per_head.transpose(1, 2).reshape(batch, length, heads * head_size)


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
