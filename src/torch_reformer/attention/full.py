"""Full (exact) multi-head self-attention through ``scaled_dot_product_attention``.

Legend: B batch, H heads, L length, D head dim.

The baseline against which LSH and local attention are measured, and the right choice for
short sequences. PyTorch picks its flash / memory-efficient kernels where it can, so without a
padding mask no L x L tensor is built. With a padding mask, padded keys are hidden. A query
that would see no key at all gets a finite output instead of NaN: in causal attention a padding
position before the first real token attends to itself; a row that is all padding attends to
every position. Causal attention with a padding mask needs a (B, 1, L, L) boolean mask.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torch_reformer.attention.cache import AttentionCache
from torch_reformer.attention.checks import (
    check_attention_inputs,
    check_causal_for_decoding,
    check_decode_inputs,
    check_layer_sizes,
)
from torch_reformer.attention.chunking import merge_heads, split_heads
from torch_reformer.attention.projection import project


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
    sees_nothing = (key_mask.cumsum(dim=-1) == 0)[:, :, None]  # (B, L, 1): no real token up to here
    return ((earlier & key_mask[:, None, :]) | (own_position & sees_nothing))[:, None]  # (B, 1, L, L)


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


def full_decode_attention(query: Tensor, cache: AttentionCache) -> Tensor:
    """Causal attention of the newest cached position over all cached ones, (B, H, 1, D) -> (B, H, 1, D)."""
    length = cache.length
    visible = cache.key_mask[:, :length].clone()  # (B, t+1)
    visible[:, -1] |= ~visible.any(dim=-1)  # nothing to see: attend to itself, as in the forward pass
    return nn.functional.scaled_dot_product_attention(
        query, cache.keys[:, :, :length], cache.values[:, :, :length], attn_mask=visible[:, None, None, :]
    )


class FullSelfAttention(nn.Module):
    """Multi-head full self-attention, (B, L, hidden_size) -> (B, L, hidden_size).

    Causal layers also decode incrementally: ``init_cache``, ``prefill``, ``decode_step``.
    """

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

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, *, input_norm: nn.LayerNorm | None = None
    ) -> Tensor:
        """Attention over (B, L, hidden) inputs.

        ``input_norm`` (a LayerNorm) is applied to ``hidden_states`` first, inside the projections, so
        its output is recomputed in backward instead of kept (``projection.project``).
        """
        key_mask = check_attention_inputs(hidden_states, attention_mask, self.hidden_size)
        out = full_attention(
            *self._project(hidden_states, input_norm),
            causal=self.causal, key_mask=key_mask, dropout=self.dropout, training=self.training,
        )
        return self.output(merge_heads(out))

    def _project(self, hidden_states: Tensor, input_norm: nn.LayerNorm | None = None) -> tuple[Tensor, Tensor, Tensor]:
        projected = project(hidden_states, (self.query, self.key, self.value), input_norm)
        return tuple(split_heads(x, self.num_heads) for x in projected)

    def init_cache(self, batch_size: int, max_length: int, *, device=None, dtype=None) -> AttentionCache:
        """An empty decoding cache (past keys and values) for ``max_length`` positions."""
        check_causal_for_decoding(self.causal)
        device = self.query.weight.device if device is None else device
        dtype = self.query.weight.dtype if dtype is None else dtype
        return AttentionCache(batch_size, max_length, self.num_heads, self.head_size, device=device, dtype=dtype)

    def prefill(
        self, hidden_states: Tensor, cache: AttentionCache, attention_mask: Tensor | None = None, *,
        padded_length: int | None = None,
    ) -> Tensor:
        """``forward`` over a prompt (B, n, hidden), storing its keys and values.

        ``padded_length`` is accepted for a uniform interface; padding does not change full attention.
        """
        key_mask = check_attention_inputs(hidden_states, attention_mask, self.hidden_size)
        cache.check_batch(hidden_states.shape[0])
        queries, keys, values = self._project(hidden_states)  # (B, H, n, D)
        out = full_attention(queries, keys, values, causal=True, key_mask=key_mask)
        real = torch.ones_like(keys[:, 0, :, 0], dtype=torch.bool) if key_mask is None else key_mask
        cache.append(keys, values, real)
        return self.output(merge_heads(out))

    def decode_step(
        self, hidden_new: Tensor, cache: AttentionCache, attention_mask_new: Tensor | None = None, *,
        padded_length: int | None = None,
    ) -> Tensor:
        """Output (B, 1, hidden) for one new position appended to ``cache``."""
        key_mask = check_decode_inputs(hidden_new, attention_mask_new, self.hidden_size)
        cache.check_batch(hidden_new.shape[0])
        queries, keys, values = self._project(hidden_new)  # (B, H, 1, D)
        cache.append(keys, values, key_mask)
        return self.output(merge_heads(full_decode_attention(queries, cache)))
