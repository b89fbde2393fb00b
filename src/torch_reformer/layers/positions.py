"""Position embeddings: axial (factorised over an N-D grid) and learned absolute.

``AxialPositionalEmbedding`` factorises positions into a grid ``(n1, ..., nk)`` with one small
table per axis (widths ``d1 + ... + dk = d``): position ``p`` reads the row-major coordinates of
``p`` and concatenates the per-axis rows. It gathers per axis, so memory is O(L * d) even for a
1M-position grid, and it works for any length up to the product and any ``position_ids``
(decoding offsets), in training and eval. ``LearnedPositionalEmbedding`` is the ordinary
(max_positions, d) table. Both raise a clear error for positions beyond their capacity.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def check_positions(position_ids: Tensor, capacity: int, capacity_text: str, fix: str) -> Tensor:
    """``position_ids`` as int64 (int32 kept); raise unless it is an integer tensor with values in ``[0, capacity)``.

    ``capacity_text`` names the capacity in the error (e.g. "prod((64, 64))=4096"), ``fix`` says what to change.
    The range check reads two numbers back from the device; it is skipped while
    ``torch.compile`` traces, where a data-dependent branch would split the graph.
    """
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise TypeError(f"position_ids must be an integer tensor, got dtype {position_ids.dtype}")
    if position_ids.dtype not in (torch.int32, torch.int64):
        position_ids = position_ids.long()  # small integer types would overflow in index arithmetic
    if position_ids.numel() == 0 or torch.compiler.is_compiling():
        return position_ids
    low, high = (value.item() for value in torch.aminmax(position_ids))
    if low < 0:
        raise ValueError(f"position_ids must be >= 0, got {low}")
    if high >= capacity:
        raise ValueError(f"sequence length {high + 1} exceeds the {capacity_text}: {fix}")
    return position_ids


def unravel_positions(position_ids: Tensor, axial_pos_shape: Sequence[int]) -> list[Tensor]:
    """Row-major grid coordinates of each position: one tensor per axis, shaped like the input."""
    coordinates = []
    stride = math.prod(axial_pos_shape)
    for axis_size in axial_pos_shape:
        stride //= axis_size
        coordinates.append(torch.div(position_ids, stride, rounding_mode="floor") % axis_size)
    return coordinates


def axial_position_embedding(position_ids: Tensor, axis_tables: Sequence[Tensor]) -> Tensor:
    """Concatenated per-axis rows for each position.

    position_ids: any shape, e.g. (B, L) or (L,), values in [0, n1 * ... * nk).
    axis_tables: k tables, table k of shape (n_k, d_k).
    Returns position_ids.shape + (d1 + ... + dk,).
    """
    coordinates = unravel_positions(position_ids, [table.shape[0] for table in axis_tables])
    rows = [F.embedding(coordinate, table) for coordinate, table in zip(coordinates, axis_tables)]  # (..., d_k) each
    return torch.cat(rows, dim=-1)  # (..., d)


class AxialPositionalEmbedding(nn.Module):
    """Axial position embeddings over the grid ``axial_pos_shape`` (any number of axes).

    ``self.weights[k]`` has HF's layout: shape (1, .., n_k, .., 1, d_k) with n_k at position k,
    e.g. (n1, 1, d1) and (1, n2, d2) in 2-D, so HF weights copy over unchanged.
    ``forward(position_ids)``: (B, L) or (L,) integers -> (B, L, d) or (L, d).
    """

    def __init__(self, axial_pos_shape: Sequence[int], axial_pos_embds_dim: Sequence[int], init_std: float = 1.0):
        super().__init__()
        for name, sizes in (("axial_pos_shape", axial_pos_shape), ("axial_pos_embds_dim", axial_pos_embds_dim)):
            if any(isinstance(size, bool) or not isinstance(size, numbers.Integral) for size in sizes):
                raise TypeError(f"{name} must hold integers, got {tuple(sizes)!r}")
        self.axial_pos_shape = tuple(int(size) for size in axial_pos_shape)
        self.axial_pos_embds_dim = tuple(int(dim) for dim in axial_pos_embds_dim)
        if not self.axial_pos_shape or len(self.axial_pos_shape) != len(self.axial_pos_embds_dim):
            raise ValueError(
                f"axial_pos_shape {self.axial_pos_shape} and axial_pos_embds_dim {self.axial_pos_embds_dim} "
                "must be non-empty and of equal length (one embedding width per axis)"
            )
        if min(self.axial_pos_shape + self.axial_pos_embds_dim) < 1:
            raise ValueError("axial_pos_shape and axial_pos_embds_dim must hold positive integers")
        self.init_std = init_std
        self.capacity = math.prod(self.axial_pos_shape)
        self.weights = nn.ParameterList()
        for axis, (size, dim) in enumerate(zip(self.axial_pos_shape, self.axial_pos_embds_dim)):
            shape = [1] * len(self.axial_pos_shape) + [dim]
            shape[axis] = size
            self.weights.append(nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight in self.weights:
            nn.init.normal_(weight, std=self.init_std)

    def forward(self, position_ids: Tensor) -> Tensor:
        position_ids = check_positions(
            position_ids,
            self.capacity,
            f"axial positional embedding's capacity prod({self.axial_pos_shape})={self.capacity}",
            "increase axial_pos_shape",
        )
        tables = [weight.reshape(size, -1) for weight, size in zip(self.weights, self.axial_pos_shape)]  # (n_k, d_k)
        return axial_position_embedding(position_ids, tables)

    def extra_repr(self) -> str:
        return f"axial_pos_shape={self.axial_pos_shape}, axial_pos_embds_dim={self.axial_pos_embds_dim}"


class LearnedPositionalEmbedding(nn.Module):
    """One learned vector per position, HF layout ``embedding.weight`` of shape (max_positions, dim).

    ``forward(position_ids)``: (B, L) or (L,) integers -> (B, L, dim) or (L, dim).
    """

    def __init__(self, max_positions: int, dim: int, init_std: float = 0.02):
        super().__init__()
        if max_positions < 1 or dim < 1:
            raise ValueError(f"max_positions ({max_positions}) and dim ({dim}) must be positive")
        self.init_std = init_std
        self.embedding = nn.Embedding(max_positions, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embedding.weight, std=self.init_std)

    def forward(self, position_ids: Tensor) -> Tensor:
        capacity = self.embedding.num_embeddings
        position_ids = check_positions(
            position_ids,
            capacity,
            f"learned positional embedding's capacity max_position_embeddings={capacity}",
            "increase max_position_embeddings",
        )
        return self.embedding(position_ids)
