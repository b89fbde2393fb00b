"""The Reformer's non-attention building blocks, each a pure function plus a thin module.

- ``positions``: ``AxialPositionalEmbedding`` (any number of axes, any length up to their
  product, any ``position_ids``) and ``LearnedPositionalEmbedding``.
- ``chunked``: ``chunked_recompute`` / ``backward_by_chunks``, position-wise functions run in
  chunks along the sequence in forward and backward.
- ``chunked_feed_forward``: ``ChunkedFeedForward``, whose (B, L, F) intermediate never exists whole.
- ``lm_head``: ``LMHead`` and ``lm_head_loss``, the LM head fused with cross-entropy so the
  loss never needs (N, V) logits.
- ``activations``: ``get_activation`` maps HF activation names to functions.
"""

from .activations import get_activation
from .chunked import backward_by_chunks, chunked_recompute
from .chunked_feed_forward import ChunkedFeedForward, feed_forward, feed_forward_backward_by_chunks
from .lm_head import LMHead, check_class_labels, lm_head_loss, mean_token_cross_entropy
from .positions import (
    AxialPositionalEmbedding,
    LearnedPositionalEmbedding,
    axial_position_embedding,
    check_positions,
    unravel_positions,
)

__all__ = [
    "AxialPositionalEmbedding",
    "ChunkedFeedForward",
    "LMHead",
    "LearnedPositionalEmbedding",
    "axial_position_embedding",
    "backward_by_chunks",
    "check_class_labels",
    "check_positions",
    "chunked_recompute",
    "feed_forward",
    "feed_forward_backward_by_chunks",
    "get_activation",
    "lm_head_loss",
    "mean_token_cross_entropy",
    "unravel_positions",
]
