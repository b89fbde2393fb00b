"""LSH self-attention with shared queries and keys (Reformer, Kitaev et al. 2020).

Legend: B batch, H heads, G = B * H, L length (a multiple of C inside ``lsh_attention``),
R hash rounds, N = R * L / C chunks per group, C chunk length, W window length, D head dim.

One projection gives ``qk`` (B, H, L, D), used as queries as is and as keys after RMS
normalisation scaled by 1/sqrt(D); another gives values. Per round, positions are hashed
into buckets, sorted by bucket, the R sorted rounds are laid end to end and cut into chunks,
and each chunk attends to its window (itself plus neighbours, wrapping). A query never
attends to its own position unless nothing else is visible, causal models hide keys whose
original position is later, padded keys are hidden. Outputs go back to original order and
the rounds are merged by their log-sum-exp. Time is O(R * L * W * D); the memory kept for
backward is O(L * H * (D + R)) (see ``sliced``): no L x L tensor exists, except in the exact
path for sequences that fit in one chunk (at most C x C).

The numbers match Hugging Face's ``LSHSelfAttention`` for the same weights and rotations.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from torch_reformer.attention.cache import AttentionCache
from torch_reformer.attention.checks import (
    check_attention_inputs,
    check_causal_for_decoding,
    check_chunking,
    check_decode_inputs,
    check_decode_padding,
    check_layer_sizes,
)
from torch_reformer.attention.chunking import (
    ChunkLayout,
    accumulation_dtype,
    chunk_layout,
    mask_values,
    merge_heads,
    merge_rounds,
    neighbour_offsets,
    normalize_keys,
    pad_sequence,
    sort_by_bucket,
    split_heads,
)
from torch_reformer.attention.hashing import (
    assign_padding_bucket,
    auto_num_buckets,
    bucket_factors,
    check_hash_seed,
    draw_rotations,
    hash_vectors,
    is_integer,
    rotation_width,
    total_buckets,
)
from torch_reformer.attention.projection import project
from torch_reformer.attention.sliced import chunked_attention
from torch_reformer.autograd_checks import refuse_in_backward
from torch_reformer.block_state import is_recomputing, next_call_index, saved_state


_thread_hashing = threading.local()  # .by_layer: {id(layer): (layer, num_buckets, rotations)}


@contextlib.contextmanager
def hashing_fixed_in_this_thread(settings: dict[LSHSelfAttention, tuple]) -> Iterator[None]:
    """Within the block and in the calling thread only, each layer of ``settings`` hashes with the
    given ``(num_buckets, rotations)`` instead of its attributes (generation fixes hashing this way,
    so other threads running the same model are unaffected)."""
    previous = getattr(_thread_hashing, "by_layer", {})
    _thread_hashing.by_layer = {**previous, **{id(layer): (layer, *fixed) for layer, fixed in settings.items()}}
    try:
        yield
    finally:
        _thread_hashing.by_layer = previous


def fixed_hashing_settings(
    layers, length: int, *, device: torch.device, dtype: torch.dtype, generator: torch.Generator | None = None
) -> dict:
    """``hashing_fixed_in_this_thread`` settings for ``layers`` at a (padded) ``length``: each layer's
    bucket count for that length, and its rotations from its ``hash_seed`` when it has one (the
    numbers a forward pass would draw), else from ``generator`` (the global RNG when None)."""
    settings = {}
    for layer in layers:
        num_buckets = layer.bucket_spec(length)
        if layer.hash_seed is not None:
            rotations = layer.draw_rotations(length, device=device, dtype=dtype)
        else:
            shape = (layer.num_heads, layer.head_size, layer.num_hashes, rotation_width(num_buckets))
            rotations = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        settings[layer] = (num_buckets, rotations)  # rotations (H, D, R, F)
    return settings


def _thread_fixed(layer: LSHSelfAttention) -> tuple | None:
    """(num_buckets, rotations) fixed for ``layer`` in this thread, or None."""
    entry = getattr(_thread_hashing, "by_layer", {}).get(id(layer))
    return None if entry is None else entry[1:]


def _attend_in_layout(
    qk: Tensor, values: Tensor, layout: ChunkLayout, key_mask: Tensor | None, causal: bool, dropout: float,
    training: bool,
) -> Tensor:
    """Shared-QK attention of (B, H, L, D) inputs arranged by ``layout``; merges rounds."""
    return chunked_attention(
        qk, None, values, layout, key_mask, causal=causal, self_mask=True, dropout=dropout, training=training
    )


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
    layout = chunk_layout(identity, length, 0, 0)
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
    layout = chunk_layout(sorted_positions, chunk_length, num_chunks_before, num_chunks_after)
    return _attend_in_layout(qk, values, layout, key_mask, causal, dropout, training)


def lsh_decode_attention(
    query: Tensor,
    cache: AttentionCache,
    *,
    padded_length: int,
    chunk_length: int,
    num_chunks_before: int = 1,
    num_chunks_after: int = 0,
) -> Tensor:
    """Causal LSH attention of the newest cached position, (B, H, 1, D) -> (B, H, 1, D).

    ``cache`` holds qk vectors (as keys), values, bucket ids and the padding mask of positions
    0..t, the query being position t. The result equals row t of a causal forward pass over
    the prefix padded to ``padded_length``: the bucket ids of the prefix (padding in the extra
    bucket) are sorted per round, the query's chunk and its neighbours are located in the rounds
    laid end to end, and the query attends to exactly those slots. Work is O(R * t) integers for
    the sort plus O(R * W * D) for the attention.
    """
    check_decode_padding(padded_length, chunk_length, cache.length)
    batch, heads, _, head_size = query.shape
    length = cache.length
    newest = length - 1
    qk, values = cache.keys[:, :, :length], cache.values[:, :, :length]  # (B, H, t+1, D)
    if padded_length <= chunk_length:
        key_positions = torch.arange(length, device=query.device).expand(batch, heads, 1, length)  # (B, H, 1, t+1)
    else:
        key_positions = _decode_window(cache, padded_length, chunk_length, num_chunks_before, num_chunks_after)
    rounds, window = key_positions.shape[2], key_positions.shape[3]
    real = key_positions <= newest  # slots of later (padding) positions are hidden
    index = key_positions.clamp(max=newest).view(batch, heads, rounds * window)  # (B, H, R*W)
    real &= torch.gather(cache.key_mask[:, :length], 1, index.flatten(1)).view_as(real)
    gather_index = index[..., None].expand(batch, heads, rounds * window, head_size)
    dtype = accumulation_dtype(query.dtype)  # as the forward pass: half inputs attend in float32
    keys = normalize_keys(torch.gather(qk, 2, gather_index).to(dtype)).view(batch, heads, rounds, window, head_size)
    window_values = torch.gather(values, 2, gather_index).to(dtype).view(batch, heads, rounds, window, head_size)
    mask_value, self_mask_value = mask_values(dtype)
    with torch.autocast(query.device.type, enabled=False):  # the forward pass runs without autocast too
        scores = torch.einsum("bhd,bhrwd->bhrw", query[:, :, 0].to(dtype), keys)  # (B, H, R, W)
        scores = scores.masked_fill(~real, mask_value).masked_fill(key_positions == newest, self_mask_value)
        return _merge_decoded_rounds(scores, window_values, dtype == query.dtype).unsqueeze(2).to(query.dtype)


def _merge_decoded_rounds(scores: Tensor, window_values: Tensor, reference_rounding: bool) -> Tensor:
    """Softmax of masked ``scores`` (B, H, R, W) over ``window_values`` (B, H, R, W, D), rounds merged:
    (B, H, D). Rounded as the forward pass rounds (``sliced._softmax_``): like Trax and HF for
    float32 and float64 inputs."""
    logsumexp = torch.logsumexp(scores, dim=-1)  # (B, H, R)
    probs = torch.exp(scores - logsumexp[..., None]) if reference_rounding else torch.softmax(scores, dim=-1)
    out = torch.einsum("bhrw,bhrwd->bhrd", probs, window_values)  # (B, H, R, D)
    return merge_rounds(out, logsumexp, reference_rounding=reference_rounding)


def _decode_window(cache: AttentionCache, padded_length: int, chunk_length: int, before: int, after: int) -> Tensor:
    """Original positions of the slots the newest position attends to, (B, H, R, W); values >= t+1 are padding."""
    length = cache.length
    bucket_ids = cache.bucket_ids[..., :length]  # (B, H, R, t+1)
    batch, heads, rounds, _ = bucket_ids.shape
    padding_bucket = total_buckets(cache.num_buckets)
    padded = nn.functional.pad(bucket_ids, (0, padded_length - length), value=padding_bucket)  # (B, H, R, P)
    sorted_positions = sort_by_bucket(padded)  # (B, H, R, P)
    rank = (sorted_positions == length - 1).int().argmax(dim=-1)  # (B, H, R): slot of the query in its round
    round_start = torch.arange(rounds, device=padded.device) * padded_length
    chunk = (round_start + rank) // chunk_length  # (B, H, R)
    num_chunks = rounds * padded_length // chunk_length
    offsets = torch.tensor(neighbour_offsets(before, after, num_chunks), device=padded.device)
    window_chunks = (chunk[..., None] + offsets) % num_chunks  # (B, H, R, J)
    slots = window_chunks[..., None] * chunk_length + torch.arange(chunk_length, device=padded.device)  # (B,H,R,J,C)
    flat_sorted = sorted_positions.view(batch, heads, rounds * padded_length)
    return torch.gather(flat_sorted, 2, slots.flatten(2)).view(batch, heads, rounds, slots.shape[3] * chunk_length)


class LSHSelfAttention(nn.Module):
    """Multi-head LSH self-attention, (B, L, hidden_size) -> (B, L, hidden_size).

    ``num_hashes`` and ``num_buckets`` are plain attributes and may be changed between calls;
    ``num_buckets=None`` picks the count from each call's (padded) length, factorised above a limit
    taken from ``max_position_embeddings`` (the model's position range, as in HF; by default the
    call's length, see ``hashing.auto_num_buckets``). Rotations come from
    the ``rotations`` argument, else hashing fixed for the calling thread
    (``hashing_fixed_in_this_thread``, which generation uses), else the ``fixed_rotations``
    attribute, else ``hash_seed`` through a private generator, else the global RNG.
    Inside the reversible engine the bucket ids of a forward call are stored and reused by its
    recomputation. Causal layers also decode incrementally: ``init_cache``, ``prefill``,
    ``decode_step``.

    Causal layers never read a later token's key or value, but the bucket sort covers the whole
    sequence, so where later tokens hash decides which earlier keys share a query's chunk: an
    earlier output can change when a later token does (as in Trax and Hugging Face).
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
        max_position_embeddings: int | None = None,
    ):
        super().__init__()
        check_layer_sizes(hidden_size, num_heads, head_size, dropout)
        check_chunking(chunk_length, num_chunks_before, num_chunks_after)
        _check_hashing(num_hashes, num_buckets, max_position_embeddings)
        hash_seed = check_hash_seed(hash_seed)
        self.hidden_size, self.num_heads, self.head_size = hidden_size, num_heads, head_size
        self.num_hashes = num_hashes
        self.num_buckets = int(num_buckets) if is_integer(num_buckets) else num_buckets
        self.max_position_embeddings = max_position_embeddings
        self.chunk_length = chunk_length
        self.num_chunks_before, self.num_chunks_after = num_chunks_before, num_chunks_after
        self.causal, self.dropout, self.hash_seed = bool(causal), float(dropout), hash_seed
        self.fixed_rotations: Tensor | None = None
        self.query_key = nn.Linear(hidden_size, num_heads * head_size, bias=False)
        self.value = nn.Linear(hidden_size, num_heads * head_size, bias=False)
        self.output = nn.Linear(num_heads * head_size, hidden_size, bias=False)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_size={self.head_size}, num_hashes={self.num_hashes}, "
            f"num_buckets={self.num_buckets}, chunk_length={self.chunk_length}, causal={self.causal}"
        )

    def padded_length(self, length: int) -> int:
        """The length this layer computes on: ``length`` if it fits one chunk, else the next chunk multiple.
        Every call goes through here, so the chunking attributes are checked here: they may have been
        set since construction."""
        check_chunking(self.chunk_length, self.num_chunks_before, self.num_chunks_after)
        return length if length <= self.chunk_length else -(-length // self.chunk_length) * self.chunk_length

    def bucket_spec(self, length: int) -> int | list[int]:
        """The bucket count used for a (padded) sequence of ``length``."""
        fixed = _thread_fixed(self)
        if fixed is not None:
            return fixed[0]
        if self.num_buckets is None:
            _check_hashing(self.num_hashes, None, self.max_position_embeddings)
            return auto_num_buckets(length, self.chunk_length, self.max_position_embeddings)
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

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, *, rotations: Tensor | None = None,
        input_norm: nn.LayerNorm | None = None,
    ) -> Tensor:
        """Attention over (B, L, hidden) inputs; ``rotations`` (H, D, R, F) override the layer's hashing.

        ``input_norm`` (a LayerNorm) is applied to ``hidden_states`` first, inside the projections, so
        its output is recomputed in backward instead of kept (``projection.project``).
        """
        key_mask = check_attention_inputs(hidden_states, attention_mask, self.hidden_size)
        _check_hashing(self.num_hashes, self.num_buckets)
        length = hidden_states.shape[1]
        hidden_states, key_mask = pad_sequence(hidden_states, key_mask, self.padded_length(length))
        qk, values = self._project(hidden_states, input_norm)  # (B, H, L_padded, D) each
        bucket_ids = None
        if qk.shape[2] > self.chunk_length:
            bucket_ids = self._bucket_ids(qk, key_mask, self._rotations(rotations), self.bucket_spec(qk.shape[2]))
        out = self._attend(qk, values, key_mask, bucket_ids)
        return self.output(merge_heads(out[:, :, :length]))

    def _project(self, hidden_states: Tensor, input_norm: nn.LayerNorm | None = None) -> tuple[Tensor, Tensor]:
        qk, values = project(hidden_states, (self.query_key, self.value), input_norm)
        return split_heads(qk, self.num_heads), split_heads(values, self.num_heads)  # (B, H, L, D) each

    def _attend(self, qk: Tensor, values: Tensor, key_mask: Tensor | None, bucket_ids: Tensor | None) -> Tensor:
        """The exact path without bucket ids (one chunk), else hashed chunked attention; (B, H, L, D)."""
        settings = dict(causal=self.causal, key_mask=key_mask, dropout=self.dropout, training=self.training)
        if bucket_ids is None:
            return shared_qk_attention(qk, values, **settings)
        return lsh_attention(
            qk, values, bucket_ids, chunk_length=self.chunk_length,
            num_chunks_before=self.num_chunks_before, num_chunks_after=self.num_chunks_after, **settings,
        )

    def _rotations(self, rotations: Tensor | None) -> Tensor | None:
        if rotations is None:
            fixed = _thread_fixed(self)
            rotations = self.fixed_rotations if fixed is None else fixed[1]
        if rotations is not None and (rotations.dim() != 4 or rotations.shape[2] != self.num_hashes):
            raise ValueError(
                f"rotations have shape {tuple(rotations.shape)}; expected (num_heads, head_size, num_hashes, "
                f"sum(num_buckets)/2) with num_hashes={self.num_hashes}"
            )
        return rotations

    def _bucket_ids(self, qk: Tensor, key_mask: Tensor | None, rotations: Tensor | None, num_buckets) -> Tensor:
        """Hash ``qk`` (B, H, L, D), or reuse the ids stored by this call's first run in the engine."""
        signature = (self.num_hashes, bucket_factors(num_buckets), tuple(qk.shape[:3]))
        state = saved_state(self)
        key = ("bucket_ids", next_call_index(self))  # a layer called twice in one block keeps two sets
        stored = None if state is None else state.get(key)
        reuse = stored is not None and stored[0] == signature
        if stored is not None and not reuse and is_recomputing():
            refuse_in_backward(
                f"LSH layer settings changed between the forward pass and its rebuild in backward (hashes, buckets "
                f"or length: {stored[0]} then {signature}); call backward before changing num_hashes or num_buckets"
            )
        dtype = qk.dtype if qk.dtype in (torch.float32, torch.float64) else torch.float32
        if reuse:
            if stored[2]:  # the first run drew from the global RNG: so does the rerun, so that every later
                self.draw_rotations(qk.shape[2], device=qk.device, dtype=dtype)  # draw (dropout) lines up
            return stored[1]
        global_draw = rotations is None and self.hash_seed is None
        if rotations is None:
            rotations = self.draw_rotations(qk.shape[2], device=qk.device, dtype=dtype)
        bucket_ids = assign_padding_bucket(hash_vectors(qk, rotations, num_buckets), key_mask, num_buckets)
        if state is not None:
            state[key] = (signature, bucket_ids, global_draw)
        return bucket_ids

    def init_cache(
        self, batch_size: int, max_length: int, *, device=None, dtype=None, rotations: Tensor | None = None
    ) -> AttentionCache:
        """An empty decoding cache for ``max_length`` positions, with hashing fixed for its lifetime.

        The bucket count is ``num_buckets``, or the automatic one for the padded ``max_length``;
        rotations are ``rotations``, else ``fixed_rotations``, else drawn once (``hash_seed`` or
        the global RNG).
        """
        check_causal_for_decoding(self.causal)
        _check_hashing(self.num_hashes, self.num_buckets)
        device = self.query_key.weight.device if device is None else device
        dtype = self.query_key.weight.dtype if dtype is None else dtype
        longest = self.padded_length(max_length)
        rotations = self._rotations(rotations)
        if rotations is None:
            rotations = self.draw_rotations(
                longest, device=device, dtype=dtype if dtype in (torch.float32, torch.float64) else torch.float32
            )
        return AttentionCache(
            batch_size, max_length, self.num_heads, self.head_size, device=device, dtype=dtype,
            num_hashes=self.num_hashes, rotations=rotations, num_buckets=self.bucket_spec(longest),
        )

    def prefill(
        self, hidden_states: Tensor, cache: AttentionCache, attention_mask: Tensor | None = None, *,
        padded_length: int | None = None,
    ) -> Tensor:
        """Attend over a prompt (B, n, hidden) as ``forward`` does and store it in ``cache``.

        ``padded_length`` is the length the sequence is padded to (a model pads to a multiple
        of all its chunk lengths); by default this layer's own ``padded_length(n)``.
        """
        key_mask = check_attention_inputs(hidden_states, attention_mask, self.hidden_size)
        cache.check_batch(hidden_states.shape[0])
        length = hidden_states.shape[1]
        padded_length = self.padded_length(length) if padded_length is None else padded_length
        hidden_states, padded_mask = pad_sequence(hidden_states, key_mask, padded_length)
        qk, values = self._project(hidden_states)  # (B, H, P, D)
        bucket_ids = assign_padding_bucket(
            hash_vectors(qk, cache.rotations, cache.num_buckets), padded_mask, cache.num_buckets
        )  # (B, H, R, P)
        out = self._attend(qk, values, padded_mask, bucket_ids if padded_length > self.chunk_length else None)
        real = torch.ones_like(qk[:, 0, :length, 0], dtype=torch.bool) if key_mask is None else key_mask
        cache.append(qk[:, :, :length], values[:, :, :length], real, bucket_ids[..., :length])
        return self.output(merge_heads(out[:, :, :length]))

    def decode_step(
        self, hidden_new: Tensor, cache: AttentionCache, attention_mask_new: Tensor | None = None, *,
        padded_length: int | None = None,
    ) -> Tensor:
        """Output (B, 1, hidden) for one new position appended to ``cache``; hashes only that position.

        Equals the last row of ``forward`` over all positions so far padded to ``padded_length``
        (by default this layer's own padding), with the cache's rotations and bucket count.
        """
        key_mask = check_decode_inputs(hidden_new, attention_mask_new, self.hidden_size)
        cache.check_batch(hidden_new.shape[0])
        padded_length = self.padded_length(cache.length + 1) if padded_length is None else padded_length
        check_decode_padding(padded_length, self.chunk_length, cache.length + 1)  # before the cache changes
        qk, values = self._project(hidden_new)  # (B, H, 1, D)
        bucket_ids = assign_padding_bucket(hash_vectors(qk, cache.rotations, cache.num_buckets), key_mask, cache.num_buckets)
        cache.append(qk, values, key_mask, bucket_ids)
        out = lsh_decode_attention(
            qk, cache, padded_length=padded_length, chunk_length=self.chunk_length,
            num_chunks_before=self.num_chunks_before, num_chunks_after=self.num_chunks_after,
        )
        return self.output(merge_heads(out))


def _check_hashing(num_hashes: int, num_buckets, max_position_embeddings: int | None = None) -> None:
    if isinstance(num_hashes, bool) or not isinstance(num_hashes, int) or num_hashes < 1:
        raise ValueError(f"num_hashes must be a positive int, got {num_hashes!r}")
    if num_buckets is not None:
        bucket_factors(num_buckets)
    if max_position_embeddings is not None and (
        isinstance(max_position_embeddings, bool) or not isinstance(max_position_embeddings, int)
        or max_position_embeddings < 1
    ):
        raise ValueError(
            f"max_position_embeddings must be a positive int (the model's position range) or None, got "
            f"{max_position_embeddings!r}"
        )
