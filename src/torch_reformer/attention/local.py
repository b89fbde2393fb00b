"""Local (chunked) self-attention.

Legend: B batch, H heads, G = B * H, L length, N = L / C chunks, C chunk length,
W = (before + 1 + after) * C window length, D head dim.

Separate q, k, v projections; keys are scaled by 1/sqrt(D). The sequence is cut into chunks
of C positions and every chunk attends to itself and ``num_chunks_before`` / ``num_chunks_after``
neighbouring chunks. Neighbours wrap around, as in Trax and Hugging Face: the first chunk also
looks back at the last one (in causal models those keys are later positions and are masked).
Causal and padding masks use the finite constants of ``chunking.MASK_VALUES``; there is no
self mask. A sequence that fits in one chunk gets plain attention over all positions.
Memory kept for backward is O(L * H * D): no (L, W) score tensor exists.

Two implementations compute the same thing: on CPU without padding or attention dropout, the
banded path (``banded``: neighbour chunks are whole blocks, so it copies windows and runs PyTorch's
fused attention kernel: at 16K tokens its forward ran in about half the time and forward plus
backward in about two thirds); otherwise the sliced core of ``sliced``, which
also serves LSH attention. Tests hold them to each other and to a dense reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from torch_reformer.attention.banded import banded_attention, banded_attention_applies
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
    accumulation_dtype,
    chunk_layout,
    mask_values,
    merge_heads,
    neighbour_offsets,
    pad_sequence,
    split_heads,
)
from torch_reformer.attention.projection import project
from torch_reformer.attention.sliced import chunked_attention


def local_attention(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    *,
    chunk_length: int,
    num_chunks_before: int = 1,
    num_chunks_after: int = 0,
    causal: bool = False,
    key_mask: Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Chunked attention, (B, H, L, D) -> (B, H, L, D).

    L must be a multiple of ``chunk_length`` or at most one chunk; ``key_mask`` (B, L) is True
    for real tokens. Keys are scaled by 1/sqrt(D) here.
    """
    batch, heads, length, head_size = queries.shape
    if length <= chunk_length:
        chunk_length, num_chunks_before, num_chunks_after = length, 0, 0
    elif length % chunk_length:
        raise ValueError(f"local_attention needs a length that is a multiple of chunk_length={chunk_length}, got {length}")
    if banded_attention_applies(queries, key_mask, dropout, training):
        return banded_attention(
            queries, keys, values, chunk_length=chunk_length, num_chunks_before=num_chunks_before,
            num_chunks_after=num_chunks_after, causal=causal, scale=1 / math.sqrt(head_size),
        )
    identity = torch.arange(length, device=queries.device).expand(batch, heads, 1, length)  # (B, H, 1, L)
    layout = chunk_layout(identity, chunk_length, num_chunks_before, num_chunks_after)
    return chunked_attention(
        queries, keys, values, layout, key_mask, causal=causal, self_mask=False,
        key_scale=1 / math.sqrt(head_size), dropout=dropout, training=training,
    )


def local_decode_attention(
    query: Tensor,
    cache: AttentionCache,
    *,
    padded_length: int,
    chunk_length: int,
    num_chunks_before: int = 1,
    num_chunks_after: int = 0,
) -> Tensor:
    """Causal local attention of the newest cached position t, (B, H, 1, D) -> (B, H, 1, D).

    ``cache`` holds keys, values and the padding mask of positions 0..t (or of the latest ones,
    ``init_cache``). Equals row t of a causal forward pass over the sequence padded to
    ``padded_length``: the query attends to the chunks around its own (wrapping as the forward
    pass does, so with ``num_chunks_after`` > 0 the last chunks also see the first ones).
    """
    check_decode_padding(padded_length, chunk_length, cache.length)
    _check_cache_window(cache, chunk_length, num_chunks_before, num_chunks_after)
    newest = cache.length - 1
    key_positions = _decode_window(newest, padded_length, chunk_length, num_chunks_before, num_chunks_after,
                                   query.device)  # (W,)
    index = cache.slots(key_positions.clamp(max=newest))  # (W,); later positions are padding and get masked
    real = (key_positions <= newest) & cache.key_mask[:, index]  # (B, W)
    dtype = accumulation_dtype(query.dtype)  # as the forward pass: half inputs attend in float32 (no autocast)
    with torch.autocast(query.device.type, enabled=False):
        scores = torch.matmul(query.to(dtype), cache.keys[:, :, index].to(dtype).transpose(-1, -2))  # (B, H, 1, W)
        scores = scores.mul_(1 / math.sqrt(query.shape[-1])).masked_fill(~real[:, None, None, :], mask_values(dtype)[0])
        out = torch.matmul(torch.softmax(scores, dim=-1), cache.values[:, :, index].to(dtype))  # (B, H, 1, D)
    return out.to(query.dtype)


def _decode_window(newest: int, padded_length: int, chunk_length: int, before: int, after: int, device) -> Tensor:
    """Positions (W,) that position ``newest`` attends to in a sequence padded to ``padded_length``;
    those after ``newest`` are padding."""
    if padded_length <= chunk_length:
        return torch.arange(newest + 1, device=device)  # (t+1,)
    num_chunks = padded_length // chunk_length
    offsets = torch.tensor(neighbour_offsets(before, after, num_chunks), device=device)
    window_chunks = (newest // chunk_length + offsets) % num_chunks  # (J,)
    return (window_chunks[:, None] * chunk_length + torch.arange(chunk_length, device=device)).view(-1)


def _look_back(chunk_length: int, num_chunks_before: int, num_chunks_after: int) -> int | None:
    """How many of the latest positions a causal decode step can see: None for all of them.

    Without look-ahead a query in chunk c sees chunks c - before .. c and later chunks reached by
    wrapping around, which are future positions and hidden; with look-ahead the last chunks wrap
    around to the first ones, so every position may be needed.
    """
    return None if num_chunks_after else (num_chunks_before + 1) * chunk_length


def _check_cache_window(cache: AttentionCache, chunk_length: int, before: int, after: int) -> None:
    """Raise if ``cache`` keeps fewer of the latest positions than a window of these settings needs."""
    needed = _look_back(chunk_length, before, after)
    if cache.capacity < cache.max_length and (needed is None or needed > cache.capacity):
        raise ValueError(
            f"the cache keeps the latest {cache.capacity} positions, but chunk_length={chunk_length}, "
            f"num_chunks_before={before} and num_chunks_after={after} need "
            f"{'all of them' if needed is None else needed}: create the cache with init_cache after changing these"
        )


class LocalSelfAttention(nn.Module):
    """Multi-head local self-attention, (B, L, hidden_size) -> (B, L, hidden_size).

    Any length works: the sequence is padded internally to a multiple of ``chunk_length``
    (padded keys are masked) and the output is sliced back. Causal layers also decode
    incrementally: ``init_cache``, ``prefill``, ``decode_step``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_size: int = 64,
        chunk_length: int = 64,
        num_chunks_before: int = 1,
        num_chunks_after: int = 0,
        causal: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_layer_sizes(hidden_size, num_heads, head_size, dropout)
        check_chunking(chunk_length, num_chunks_before, num_chunks_after)
        self.hidden_size, self.num_heads, self.head_size = hidden_size, num_heads, head_size
        self.chunk_length = chunk_length
        self.num_chunks_before, self.num_chunks_after = num_chunks_before, num_chunks_after
        self.causal, self.dropout = bool(causal), float(dropout)
        self.query = nn.Linear(hidden_size, num_heads * head_size, bias=False)
        self.key = nn.Linear(hidden_size, num_heads * head_size, bias=False)
        self.value = nn.Linear(hidden_size, num_heads * head_size, bias=False)
        self.output = nn.Linear(num_heads * head_size, hidden_size, bias=False)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_size={self.head_size}, chunk_length={self.chunk_length}, "
            f"num_chunks_before={self.num_chunks_before}, num_chunks_after={self.num_chunks_after}, "
            f"causal={self.causal}"
        )

    def padded_length(self, length: int) -> int:
        """The length this layer computes on: ``length`` if it fits one chunk, else the next chunk multiple.
        Every call goes through here, so the chunking attributes are checked here: they may have been
        set since construction."""
        check_chunking(self.chunk_length, self.num_chunks_before, self.num_chunks_after)
        return length if length <= self.chunk_length else -(-length // self.chunk_length) * self.chunk_length

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, *, input_norm: nn.LayerNorm | None = None
    ) -> Tensor:
        """Attention over (B, L, hidden) inputs.

        ``input_norm`` (a LayerNorm) is applied to ``hidden_states`` first, inside the projections, so
        its output is recomputed in backward instead of kept (``projection.project``).
        """
        key_mask = check_attention_inputs(hidden_states, attention_mask, self.hidden_size)
        length = hidden_states.shape[1]
        hidden_states, key_mask = pad_sequence(hidden_states, key_mask, self.padded_length(length))
        out = self._attend(*self._project(hidden_states, input_norm), key_mask)
        return self.output(merge_heads(out[:, :, :length]))

    def _project(self, hidden_states: Tensor, input_norm: nn.LayerNorm | None = None) -> tuple[Tensor, Tensor, Tensor]:
        projected = project(hidden_states, (self.query, self.key, self.value), input_norm)
        return tuple(split_heads(x, self.num_heads) for x in projected)

    def _attend(self, queries: Tensor, keys: Tensor, values: Tensor, key_mask: Tensor | None) -> Tensor:
        return local_attention(
            queries, keys, values,
            chunk_length=self.chunk_length, num_chunks_before=self.num_chunks_before,
            num_chunks_after=self.num_chunks_after, causal=self.causal, key_mask=key_mask,
            dropout=self.dropout, training=self.training,
        )

    def init_cache(self, batch_size: int, max_length: int, *, device=None, dtype=None) -> AttentionCache:
        """An empty decoding cache for ``max_length`` positions.

        Without look-ahead (``num_chunks_after`` = 0, as in causal language models) it keeps only
        the window a step can see, the latest (``num_chunks_before`` + 1) * ``chunk_length``
        positions, in a ring. With look-ahead the last chunks wrap around to the first ones, so it
        keeps every past key and value.
        """
        check_causal_for_decoding(self.causal)
        device = self.query.weight.device if device is None else device
        dtype = self.query.weight.dtype if dtype is None else dtype
        return AttentionCache(
            batch_size, max_length, self.num_heads, self.head_size, device=device, dtype=dtype,
            window=_look_back(self.chunk_length, self.num_chunks_before, self.num_chunks_after),
        )

    def prefill(
        self, hidden_states: Tensor, cache: AttentionCache, attention_mask: Tensor | None = None, *,
        padded_length: int | None = None,
    ) -> Tensor:
        """Attend over a prompt (B, n, hidden) as ``forward`` does and store its keys and values."""
        key_mask = check_attention_inputs(hidden_states, attention_mask, self.hidden_size)
        cache.check_batch(hidden_states.shape[0])
        _check_cache_window(cache, self.chunk_length, self.num_chunks_before, self.num_chunks_after)
        length = hidden_states.shape[1]
        padded_length = self.padded_length(length) if padded_length is None else padded_length
        hidden_states, padded_mask = pad_sequence(hidden_states, key_mask, padded_length)
        queries, keys, values = self._project(hidden_states)  # (B, H, P, D)
        out = self._attend(queries, keys, values, padded_mask)
        real = torch.ones_like(keys[:, 0, :length, 0], dtype=torch.bool) if key_mask is None else key_mask
        cache.append(keys[:, :, :length], values[:, :, :length], real)
        return self.output(merge_heads(out[:, :, :length]))

    def decode_step(
        self, hidden_new: Tensor, cache: AttentionCache, attention_mask_new: Tensor | None = None, *,
        padded_length: int | None = None,
    ) -> Tensor:
        """Output (B, 1, hidden) for one new position appended to ``cache``.

        Equals the last row of ``forward`` over all positions so far padded to ``padded_length``
        (by default this layer's own padding).
        """
        key_mask = check_decode_inputs(hidden_new, attention_mask_new, self.hidden_size)
        cache.check_batch(hidden_new.shape[0])
        padded_length = self.padded_length(cache.length + 1) if padded_length is None else padded_length
        check_decode_padding(padded_length, self.chunk_length, cache.length + 1)  # before the cache changes
        _check_cache_window(cache, self.chunk_length, self.num_chunks_before, self.num_chunks_after)
        queries, keys, values = self._project(hidden_new)  # (B, H, 1, D)
        cache.append(keys, values, key_mask)
        out = local_decode_attention(
            queries, cache, padded_length=padded_length, chunk_length=self.chunk_length,
            num_chunks_before=self.num_chunks_before, num_chunks_after=self.num_chunks_after,
        )
        return self.output(merge_heads(out))
