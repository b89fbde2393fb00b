"""The per-layer cache of past keys and values for causal incremental decoding.

Shapes: B batch, H heads, M cached positions, D head size, R hash rounds.
"""

from __future__ import annotations

import torch
from torch import Tensor


class AttentionCache:
    """Keys, values and padding mask of past positions for causal incremental decoding.

    ``keys``/``values`` (B, H, M, D) and ``key_mask`` (B, M) have room for M = ``max_length``
    positions; ``length`` are filled. LSH layers also keep ``bucket_ids`` (B, H, R, M) and the
    hashing fixed for the whole generation (``rotations``, ``num_buckets``).
    """

    def __init__(self, batch_size: int, max_length: int, num_heads: int, head_size: int, *, device=None,
                 dtype=None, num_hashes: int | None = None, rotations: Tensor | None = None, num_buckets=None):
        shape = (batch_size, num_heads, max_length, head_size)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.bucket_ids = None
        if num_hashes is not None:
            self.bucket_ids = torch.zeros(batch_size, num_heads, num_hashes, max_length, dtype=torch.long, device=device)
        self.rotations, self.num_buckets = rotations, num_buckets
        self.length = 0

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    def check_batch(self, batch_size: int) -> None:
        """Raise unless inputs of ``batch_size`` rows fit this cache."""
        if batch_size != self.batch_size:
            raise ValueError(
                f"the cache holds {self.batch_size} batch rows but the inputs have {batch_size}: create the cache "
                f"for this batch (init_cache({batch_size}, max_length)), or pick its rows with cache.reorder(rows)"
            )

    def append(self, keys: Tensor, values: Tensor, key_mask: Tensor, bucket_ids: Tensor | None = None) -> None:
        """Store n new positions: keys/values (B, H, n, D), key_mask (B, n), bucket_ids (B, H, R, n)."""
        self.check_batch(keys.shape[0])
        start, stop = self.length, self.length + keys.shape[2]
        if stop > self.max_length:
            raise ValueError(
                f"the cache holds {self.max_length} positions and {start} are used; cannot add {keys.shape[2]} "
                "more: create it with a larger max_length"
            )
        self.keys[:, :, start:stop] = keys
        self.values[:, :, start:stop] = values
        self.key_mask[:, start:stop] = key_mask
        if self.bucket_ids is not None:
            self.bucket_ids[..., start:stop] = bucket_ids
        self.length = stop

    def reorder(self, rows: Tensor) -> None:
        """Keep, duplicate or permute batch rows: row i becomes old row ``rows[i]`` (beam search)."""
        self.keys, self.values = self.keys.index_select(0, rows), self.values.index_select(0, rows)
        self.key_mask = self.key_mask.index_select(0, rows)
        if self.bucket_ids is not None:
            self.bucket_ids = self.bucket_ids.index_select(0, rows)
