"""LSH self-attention with shared queries and keys (Reformer, Kitaev et al. 2020).

Legend: B batch, H heads, G = B * H, L length (a multiple of C inside ``lsh_attention``),
R hash rounds, N = R * L / C chunks per group, C chunk length, W window length, D head dim.

One projection gives ``qk`` (B, H, L, D), used as queries as is and as keys after RMS
normalisation scaled by 1/sqrt(D); another gives values. Per round, positions are hashed
into buckets, sorted by bucket, the R sorted rounds are laid end to end and cut into chunks,
and each chunk attends to its window (itself plus neighbours, wrapping). A query never
attends to its own position unless nothing else is visible, causal models hide keys whose
original position is later, padded keys are hidden. Outputs go back to original order and
the rounds are merged by their log-sum-exp. Memory and time are O(R * L * W * D): no L x L
tensor exists, except in the exact path for sequences that fit in one chunk (at most C x C).

The numbers match Hugging Face's ``LSHSelfAttention`` for the same weights and rotations.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torch_reformer.attention.chunking import (
    WindowLayout,
    check_attention_inputs,
    check_chunking,
    check_layer_sizes,
    from_windows,
    merge_heads,
    merge_rounds,
    sort_by_bucket,
    split_heads,
    to_windows,
    window_attention,
    window_key_ranks,
    window_layout,
)
from torch_reformer.attention.hashing import (
    assign_padding_bucket,
    auto_num_buckets,
    bucket_factors,
    draw_rotations,
    hash_vectors,
    rotation_width,
)

try:
    from torch_reformer.reversible import saved_state
except ImportError:  # the reversible engine is not part of this checkout: nothing to store buckets in

    def saved_state(owner):
        return None


def _attend_in_layout(
    qk: Tensor, values: Tensor, layout: WindowLayout, key_mask: Tensor | None, causal: bool, dropout: float,
    training: bool,
) -> Tensor:
    """Shared-QK attention of (B, H, L, D) inputs arranged by ``layout``; merges rounds."""
    # (B, L, H, D) rows: a free view of projections split by ``split_heads``.
    queries = to_windows(qk.transpose(1, 2), layout)  # (T', C, D)
    window_values = to_windows(values.transpose(1, 2), layout)  # (T', C, D)
    out, logsumexp = window_attention(
        queries, None, window_values, layout.positions, window_key_ranks(layout, key_mask),
        before=layout.before, after=layout.after, causal=causal, self_mask=True,
        dropout=dropout, training=training,
    )  # (T', C, D), (T', C)
    per_round = from_windows(out, layout)  # (B, L, H, R, D)
    if layout.shape[3] == 1:
        return per_round.squeeze(3).transpose(1, 2)
    round_logsumexp = from_windows(logsumexp.unsqueeze(-1), layout).squeeze(-1)  # (B, L, H, R)
    return merge_rounds(per_round, round_logsumexp).transpose(1, 2)  # (B, H, L, D)


def shared_qk_attention(
    qk: Tensor,
    values: Tensor,
    *,
    key_mask: Tensor | None = None,
    causal: bool = False,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Exact shared-QK attention over all positions, (B, H, L, D) -> (B, H, L, D).

    Same key normalisation, masks and self mask as the hashed path; used when L fits in one
    chunk (it builds an L x L score matrix).
    """
    batch, heads, length, _ = qk.shape
    identity = torch.arange(length, device=qk.device).expand(batch, heads, 1, length)  # (B, H, 1, L)
    layout = window_layout(identity, length, 0, 0)
    return _attend_in_layout(qk, values, layout, key_mask, causal, dropout, training)


def lsh_attention(
    qk: Tensor,
    values: Tensor,
    bucket_ids: Tensor,
    *,
    chunk_length: int,
    num_chunks_before: int = 1,
    num_chunks_after: int = 0,
    causal: bool = False,
    key_mask: Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Chunked shared-QK attention in bucket-sorted order, (B, H, L, D) -> (B, H, L, D).

    ``bucket_ids`` (B, H, R, L) may include the padding bucket; ``key_mask`` (B, L) is True
    for real tokens. L must be a multiple of ``chunk_length``.
    """
    batch, heads, length, _ = qk.shape
    if length % chunk_length:
        raise ValueError(f"lsh_attention needs a length that is a multiple of chunk_length={chunk_length}, got {length}")
    sorted_positions = sort_by_bucket(bucket_ids)  # (B, H, R, L)
    layout = window_layout(sorted_positions, chunk_length, num_chunks_before, num_chunks_after)
    return _attend_in_layout(qk, values, layout, key_mask, causal, dropout, training)


class LSHSelfAttention(nn.Module):
    """Multi-head LSH self-attention, (B, L, hidden_size) -> (B, L, hidden_size).

    ``num_hashes`` and ``num_buckets`` are plain attributes and may be changed between calls.
    ``num_buckets=None`` picks the count from each call's (padded) length. Rotations come from
    the ``rotations`` argument, else from ``hash_seed`` through a private generator, else from
    the global torch RNG.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_size: int = 64,
        num_hashes: int = 1,
        num_buckets: int | list[int] | None = None,
        chunk_length: int = 64,
        num_chunks_before: int = 1,
        num_chunks_after: int = 0,
        causal: bool = False,
        dropout: float = 0.0,
        hash_seed: int | None = None,
    ):
        super().__init__()
        check_layer_sizes(hidden_size, num_heads, head_size, dropout)
        check_chunking(chunk_length, num_chunks_before, num_chunks_after)
        _check_hashing(num_hashes, num_buckets)
        if hash_seed is not None and (isinstance(hash_seed, bool) or not isinstance(hash_seed, int)):
            raise TypeError(f"hash_seed must be an int or None, got {hash_seed!r}")
        self.hidden_size, self.num_heads, self.head_size = hidden_size, num_heads, head_size
        self.num_hashes, self.num_buckets = num_hashes, num_buckets
        self.chunk_length = chunk_length
        self.num_chunks_before, self.num_chunks_after = num_chunks_before, num_chunks_after
        self.causal, self.dropout, self.hash_seed = bool(causal), float(dropout), hash_seed
        self.query_key = nn.Linear(hidden_size, num_heads * head_size, bias=False)
        self.value = nn.Linear(hidden_size, num_heads * head_size, bias=False)
        self.output = nn.Linear(num_heads * head_size, hidden_size, bias=False)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_size={self.head_size}, num_hashes={self.num_hashes}, "
            f"num_buckets={self.num_buckets}, chunk_length={self.chunk_length}, causal={self.causal}"
        )

    def bucket_spec(self, length: int) -> int | list[int]:
        """The bucket count used for a (padded) sequence of ``length``."""
        if self.num_buckets is None:
            return auto_num_buckets(length, self.chunk_length)
        return self.num_buckets

    def draw_rotations(
        self, length: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Rotations (H, D, num_hashes, F) for a (padded) ``length``, as a forward pass would draw them.

        A forward pass draws them in the dtype of its activations when that is float32 or float64
        (as Hugging Face does, so a seed gives the same rotations) and in float32 for half types.
        """
        return draw_rotations(
            self.num_heads, self.head_size, self.num_hashes, self.bucket_spec(length),
            seed=self.hash_seed, device=device, dtype=dtype,
        )

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *, rotations=None) -> Tensor:
        key_mask = check_attention_inputs(hidden_states, attention_mask, self.hidden_size)
        _check_hashing(self.num_hashes, self.num_buckets)
        length = hidden_states.shape[1]
        qk = split_heads(self.query_key(hidden_states), self.num_heads)  # (B, H, L, D)
        values = split_heads(self.value(hidden_states), self.num_heads)  # (B, H, L, D)
        dropout = dict(dropout=self.dropout, training=self.training)
        if length <= self.chunk_length:
            out = shared_qk_attention(qk, values, key_mask=key_mask, causal=self.causal, **dropout)
            return self.output(merge_heads(out))
        qk, values, key_mask = _pad_to_chunks(qk, values, key_mask, self.chunk_length)
        bucket_ids = self._bucket_ids(qk, key_mask, rotations)  # (B, H, R, L_padded)
        out = lsh_attention(
            qk, values, bucket_ids,
            chunk_length=self.chunk_length, num_chunks_before=self.num_chunks_before,
            num_chunks_after=self.num_chunks_after, causal=self.causal, key_mask=key_mask, **dropout,
        )
        return self.output(merge_heads(out[:, :, :length]))

    def _bucket_ids(self, qk: Tensor, key_mask: Tensor | None, rotations: Tensor | None) -> Tensor:
        """Hash ``qk`` (B, H, L, D), or reuse the ids stored by this call's first run in the engine."""
        num_buckets = self.bucket_spec(qk.shape[2])
        signature = (self.num_hashes, bucket_factors(num_buckets), tuple(qk.shape[:3]))
        state = saved_state(self)
        if state is not None and state.get("bucket_signature") == signature:
            return state["bucket_ids"]
        if rotations is None:
            dtype = qk.dtype if qk.dtype in (torch.float32, torch.float64) else torch.float32
            rotations = self.draw_rotations(qk.shape[2], device=qk.device, dtype=dtype)
        elif rotations.dim() != 4 or rotations.shape[2] != self.num_hashes:
            raise ValueError(
                f"rotations have shape {tuple(rotations.shape)}; expected (num_heads, head_size, num_hashes, "
                f"sum(num_buckets)/2) = {(self.num_heads, self.head_size, self.num_hashes, rotation_width(num_buckets))}"
            )
        bucket_ids = assign_padding_bucket(hash_vectors(qk, rotations, num_buckets), key_mask, num_buckets)
        if state is not None:
            state["bucket_signature"], state["bucket_ids"] = signature, bucket_ids
        return bucket_ids


def _check_hashing(num_hashes: int, num_buckets) -> None:
    if isinstance(num_hashes, bool) or not isinstance(num_hashes, int) or num_hashes < 1:
        raise ValueError(f"num_hashes must be a positive int, got {num_hashes!r}")
    if num_buckets is not None:
        bucket_factors(num_buckets)


def _pad_to_chunks(qk: Tensor, values: Tensor, key_mask: Tensor | None, chunk_length: int):
    """Zero-pad (B, H, L, D) tensors to a multiple of the chunk length and mark the padding in the mask."""
    length = qk.shape[2]
    padding = -length % chunk_length
    if padding == 0:
        return qk, values, key_mask
    if key_mask is None:
        key_mask = torch.ones(qk.shape[0], length, dtype=torch.bool, device=qk.device)
    key_mask = nn.functional.pad(key_mask, (0, padding), value=False)  # (B, L_padded)
    qk = nn.functional.pad(qk, (0, 0, 0, padding))
    values = nn.functional.pad(values, (0, 0, 0, padding))
    return qk, values, key_mask
