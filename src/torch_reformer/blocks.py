"""The pieces a Reformer is built from: the embeddings and one reversible layer.

A layer is an attention block ``f`` (LayerNorm -> LSH, local or full attention -> output
projection -> dropout) and a feed-forward block ``g`` (the chunked feed-forward); the reversible
engine couples them as ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``. Shapes: B batch, L sequence
length, H ``hidden_size``.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention.full import FullSelfAttention
from .attention.local import LocalSelfAttention
from .attention.lsh import LSHSelfAttention
from .config import ReformerConfig
from .layers import AxialPositionalEmbedding, ChunkedFeedForward, LearnedPositionalEmbedding


def _make_attention(config: ReformerConfig, kind: str) -> nn.Module:
    common = dict(
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        head_size=config.attention_head_size,
        causal=config.is_decoder,
    )
    if kind == "lsh":
        return LSHSelfAttention(
            **common,
            num_hashes=config.num_hashes,
            num_buckets=config.num_buckets,
            chunk_length=config.lsh_attn_chunk_length,
            num_chunks_before=config.lsh_num_chunks_before,
            num_chunks_after=config.lsh_num_chunks_after,
            dropout=config.lsh_attention_probs_dropout_prob,
            hash_seed=config.hash_seed,
        )
    if kind == "local":
        return LocalSelfAttention(
            **common,
            chunk_length=config.local_attn_chunk_length,
            num_chunks_before=config.local_num_chunks_before,
            num_chunks_after=config.local_num_chunks_after,
            dropout=config.local_attention_probs_dropout_prob,
        )
    # "full" has no probability dropout of its own in HF's config: it shares the local one.
    return FullSelfAttention(**common, dropout=config.local_attention_probs_dropout_prob)


class AttentionBlock(nn.Module):
    """The reversible ``f``: ``Dropout(W_o · Attn(LayerNorm(x)))``, (B, L, H) -> (B, L, H)."""

    def __init__(self, config: ReformerConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attention = _make_attention(config, kind)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # The layer norm runs inside the attention's projections, which recompute it in backward.
        return self.dropout(self.self_attention(hidden_states, attention_mask=attention_mask, input_norm=self.layer_norm))


class FeedForwardBlock(ChunkedFeedForward):
    """The reversible ``g``: the chunked feed-forward (its forward ignores the attention mask the
    engine hands every block)."""


class ReformerLayer(nn.Module):
    """One reversible layer: an attention block (f) and a feed-forward block (g).

    Like ``nn.ModuleList``, the layer is a container: the engine calls its two blocks, never the
    layer as a whole, so forward hooks belong on ``attention`` or ``feed_forward`` (a hook on the
    layer itself never runs).
    """

    def __init__(self, config: ReformerConfig, kind: str):
        super().__init__()
        self.attention = AttentionBlock(config, kind)
        self.feed_forward = FeedForwardBlock(
            hidden_size=config.hidden_size,
            feed_forward_size=config.feed_forward_size,
            hidden_act=config.hidden_act,
            dropout=config.hidden_dropout_prob,
            layer_norm_eps=config.layer_norm_eps,
            chunk_size=config.chunk_size_feed_forward,
        )


class ReformerEmbeddings(nn.Module):
    """``dropout(word_emb(ids)) + pos_emb(position_ids)``: (B, L) ids -> (B, L, H)."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        kind = config.position_embedding_type
        if kind == "axial":
            self.position_embeddings = AxialPositionalEmbedding(
                config.axial_pos_shape, config.axial_pos_embds_dim, init_std=config.axial_norm_std
            )
        elif kind == "learned":
            self.position_embeddings = LearnedPositionalEmbedding(config.max_position_embeddings, config.hidden_size)
        else:
            self.position_embeddings = None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        embeddings = self.dropout(self.word_embeddings(input_ids))
        if self.position_embeddings is not None:
            embeddings = embeddings + self.position_embeddings(position_ids)
        return embeddings
