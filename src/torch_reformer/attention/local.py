"""Local (chunked) self-attention.

Legend: B batch, H heads, G = B * H, L length, N = L / C chunks, C chunk length,
W = (before + 1 + after) * C window length, D head dim.

Separate q, k, v projections; keys are scaled by 1/sqrt(D). The sequence is cut into chunks
of C positions and every chunk attends to itself and ``num_chunks_before`` / ``num_chunks_after``
neighbouring chunks. Neighbours wrap around, as in Trax and Hugging Face: the first chunk also
looks back at the last one (in causal models those keys are later positions and are masked).
Causal and padding masks use the finite constants of ``chunking.MASK_VALUES``; there is no
self mask. A sequence that fits in one chunk gets plain attention over all positions.
Memory is O(L * W): the scores never exceed (G, N, C, W).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from torch_reformer.attention.chunking import (
    check_attention_inputs,
    check_chunking,
    check_layer_sizes,
    from_windows,
    merge_heads,
    split_heads,
    to_windows,
    window_attention,
    window_key_ranks,
    window_layout,
)


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
    identity = torch.arange(length, device=queries.device).expand(batch, heads, 1, length)  # (B, H, 1, L)
    layout = window_layout(identity, chunk_length, num_chunks_before, num_chunks_after)
    out, _ = window_attention(
        to_windows(queries.transpose(1, 2), layout),  # (T', C, D)
        to_windows((keys / math.sqrt(head_size)).transpose(1, 2), layout),
        to_windows(values.transpose(1, 2), layout),
        layout.positions, window_key_ranks(layout, key_mask),
        before=layout.before, after=layout.after, causal=causal, self_mask=False,
        dropout=dropout, training=training,
    )
    return from_windows(out, layout).squeeze(3).transpose(1, 2)  # (B, H, L, D)


class LocalSelfAttention(nn.Module):
    """Multi-head local self-attention, (B, L, hidden_size) -> (B, L, hidden_size).

    Any length works: the sequence is padded internally to a multiple of ``chunk_length``
    (padded keys are masked) and the output is sliced back.
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

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        key_mask = check_attention_inputs(hidden_states, attention_mask, self.hidden_size)
        length = hidden_states.shape[1]
        padding = -length % self.chunk_length if length > self.chunk_length else 0
        if padding:
            hidden_states = nn.functional.pad(hidden_states, (0, 0, 0, padding))  # (B, L_padded, hidden)
            if key_mask is None:
                key_mask = torch.ones(hidden_states.shape[0], length, dtype=torch.bool, device=hidden_states.device)
            key_mask = nn.functional.pad(key_mask, (0, padding), value=False)
        queries = split_heads(self.query(hidden_states), self.num_heads)  # (B, H, L, D)
        keys = split_heads(self.key(hidden_states), self.num_heads)
        values = split_heads(self.value(hidden_states), self.num_heads)
        out = local_attention(
            queries, keys, values,
            chunk_length=self.chunk_length, num_chunks_before=self.num_chunks_before,
            num_chunks_after=self.num_chunks_after, causal=self.causal, key_mask=key_mask,
            dropout=self.dropout, training=self.training,
        )
        return self.output(merge_heads(out[:, :, :length]))
