"""Full (exact) multi-head self-attention through ``scaled_dot_product_attention``.

Legend: B batch, H heads, L length, D head dim.

The baseline against which LSH and local attention are measured, and the right choice for
short sequences. PyTorch picks its flash / memory-efficient kernels where it can, so without a
padding mask no L x L tensor is built. With a padding mask, padded keys are hidden; a query
that would see no key at all (a padding position before the first real token, or a row that
is all padding) attends to itself instead of producing NaN. Causal attention with a padding
mask needs a (B, 1, L, L) boolean mask.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torch_reformer.attention.chunking import check_attention_inputs, check_layer_sizes, merge_heads, split_heads


def visibility_mask(key_mask: Tensor | None, length: int, causal: bool) -> Tensor | None:
    """Boolean mask for SDPA, True where a query may see a key; None when nothing is hidden
    (or when only the causal rule applies, which SDPA handles itself).

    Non-causal: (B, 1, 1, L). Causal with padding: (B, 1, L, L).
    """
    if key_mask is None:
        return None
    if not causal:
        all_padding = ~key_mask.any(dim=-1, keepdim=True)  # (B, 1): such rows see every key
        return (key_mask | all_padding)[:, None, None, :]
    positions = torch.arange(length, device=key_mask.device)
    earlier = positions[None, :] <= positions[:, None]  # (L, L)
    own_position = torch.eye(length, dtype=torch.bool, device=key_mask.device)
    padded_query = ~key_mask[:, :, None]  # (B, L, 1)
    return ((earlier & key_mask[:, None, :]) | (own_position & padded_query))[:, None]  # (B, 1, L, L)


def full_attention(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    *,
    causal: bool = False,
    key_mask: Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """softmax(q k^T / sqrt(D)) v over all positions, (B, H, L, D) -> (B, H, L, D)."""
    mask = visibility_mask(key_mask, queries.shape[2], causal)
    return nn.functional.scaled_dot_product_attention(
        queries, keys, values,
        attn_mask=mask,
        dropout_p=dropout if training else 0.0,
        is_causal=causal and mask is None,
    )


class FullSelfAttention(nn.Module):
    """Multi-head full self-attention, (B, L, hidden_size) -> (B, L, hidden_size)."""

    def __init__(self, hidden_size: int, num_heads: int, head_size: int = 64, causal: bool = False, dropout: float = 0.0):
        super().__init__()
        check_layer_sizes(hidden_size, num_heads, head_size, dropout)
        self.hidden_size, self.num_heads, self.head_size = hidden_size, num_heads, head_size
        self.causal, self.dropout = bool(causal), float(dropout)
        self.query = nn.Linear(hidden_size, num_heads * head_size, bias=False)
        self.key = nn.Linear(hidden_size, num_heads * head_size, bias=False)
        self.value = nn.Linear(hidden_size, num_heads * head_size, bias=False)
        self.output = nn.Linear(num_heads * head_size, hidden_size, bias=False)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_size={self.head_size}, causal={self.causal}"

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        key_mask = check_attention_inputs(hidden_states, attention_mask, self.hidden_size)
        queries = split_heads(self.query(hidden_states), self.num_heads)  # (B, H, L, D)
        keys = split_heads(self.key(hidden_states), self.num_heads)
        values = split_heads(self.value(hidden_states), self.num_heads)
        out = full_attention(
            queries, keys, values,
            causal=self.causal, key_mask=key_mask, dropout=self.dropout, training=self.training,
        )
        return self.output(merge_heads(out))
