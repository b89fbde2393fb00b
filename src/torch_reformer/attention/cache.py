"""The per-layer cache of past keys and values for causal incremental decoding.

Shapes: B batch, H heads, M stored positions, D head size, R hash rounds.
"""

from __future__ import annotations

import torch
from torch import Tensor


class AttentionCache:
    """Keys, values and padding mask of past positions for causal incremental decoding.

    Up to ``max_length`` positions can be appended; ``length`` have been. ``keys``/``values``
    (B, H, M, D) and ``key_mask`` (B, M) store M = ``capacity`` of them: all (M = ``max_length``),
    or with ``window`` only the latest ``window`` positions, in a ring (position p in slot
    p mod M; ``slots`` maps positions to slots), for layers that never look farther back. LSH
    layers also keep ``bucket_ids`` (B, H, R, M) and the hashing fixed for the whole generation
    (``rotations``, ``num_buckets``).
    """

    def __init__(self, batch_size: int, max_length: int, num_heads: int, head_size: int, *, device=None,
                 dtype=None, num_hashes: int | None = None, rotations: Tensor | None = None, num_buckets=None,
                 window: int | None = None):
        self.max_length = max_length
        capacity = max_length if window is None else min(window, max_length)
        shape = (batch_size, num_heads, capacity, head_size)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.bucket_ids = None
        if num_hashes is not None:
            self.bucket_ids = torch.zeros(batch_size, num_heads, num_hashes, capacity, dtype=torch.long, device=device)
        self.rotations, self.num_buckets = rotations, num_buckets
        self.length = 0

    @property
    def capacity(self) -> int:
        """How many positions are stored: ``max_length``, or the window of a ring cache."""
        return self.keys.shape[2]

    def slots(self, positions: Tensor) -> Tensor:
        """Where ``positions`` (any shape) are stored; only the latest ``capacity`` positions are."""
        return positions % self.capacity

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
        kept = min(stop - start, self.capacity)  # a ring keeps the latest positions only
        slots = self.slots(torch.arange(stop - kept, stop, device=self.keys.device))  # (kept,)
        self.keys[:, :, slots] = keys[:, :, keys.shape[2] - kept :]
        self.values[:, :, slots] = values[:, :, values.shape[2] - kept :]
        self.key_mask[:, slots] = key_mask[:, key_mask.shape[1] - kept :]
        if self.bucket_ids is not None:
            self.bucket_ids[..., slots] = bucket_ids[..., bucket_ids.shape[-1] - kept :]
        self.length = stop

    def reorder(self, rows: Tensor) -> None:
        """Keep, duplicate or permute batch rows: row i becomes old row ``rows[i]`` (beam search)."""
        self.keys, self.values = self.keys.index_select(0, rows), self.values.index_select(0, rows)
        self.key_mask = self.key_mask.index_select(0, rows)
        if self.bucket_ids is not None:
            self.bucket_ids = self.bucket_ids.index_select(0, rows)
