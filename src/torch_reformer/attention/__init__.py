"""Attention layers of the Reformer: LSH (shared-QK, hashed), local (chunked) and full (SDPA).

Modules map (batch, length, hidden_size) -> (batch, length, hidden_size); the pure functions
below them work on per-head tensors (batch, heads, length, head_size).
"""

from torch_reformer.attention.chunking import (
    MASK_VALUES,
    chunk_layout,
    mask_values,
    merge_rounds,
    normalize_keys,
    sort_by_bucket,
)
from torch_reformer.attention.full import FullSelfAttention, full_attention
from torch_reformer.attention.hashing import (
    assign_padding_bucket,
    auto_num_buckets,
    bucket_factors,
    draw_rotations,
    hash_vectors,
    rotation_width,
    total_buckets,
)
from torch_reformer.attention.local import LocalSelfAttention, local_attention
from torch_reformer.attention.lsh import LSHSelfAttention, lsh_attention, shared_qk_attention
from torch_reformer.attention.sliced import chunked_attention

__all__ = [
    "MASK_VALUES",
    "FullSelfAttention",
    "LSHSelfAttention",
    "LocalSelfAttention",
    "assign_padding_bucket",
    "auto_num_buckets",
    "bucket_factors",
    "chunk_layout",
    "chunked_attention",
    "draw_rotations",
    "full_attention",
    "hash_vectors",
    "local_attention",
    "lsh_attention",
    "mask_values",
    "merge_rounds",
    "normalize_keys",
    "rotation_width",
    "shared_qk_attention",
    "sort_by_bucket",
    "total_buckets",
]
