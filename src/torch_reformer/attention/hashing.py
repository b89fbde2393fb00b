"""Angular LSH hashing for shared-QK attention: rotations, bucket ids, automatic bucket count.

Legend: B batch, H heads, L length, R hash rounds, D head dim, F rotation width
(the sum over bucket factors of factor/2).

A vector x is hashed by projecting it on F random directions and taking the argmax over
[xR ; -xR]: vectors that point the same way land in the same bucket with high probability
(Andoni et al. 2015). With factorised buckets, e.g. ``num_buckets=[16, 32]``, each factor
hashes on its own slice of the rotation and the per-factor bucket ids are combined as
mixed-radix digits, the first factor being the least significant digit. This keeps the
rotation small (16/2 + 32/2 = 24 columns instead of 512/2) for large bucket counts.

Rotations have shape (H, D, R, F): one independent draw per head and per round, shared
across the batch. Drawing them from a fixed ``seed`` reproduces the numbers that
``torch.manual_seed(seed); torch.randn(shape)`` gives, but through a private generator,
so the global random state is never touched.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

BucketSpec = int | Sequence[int]


def is_integer(value) -> bool:
    """True for Python and NumPy integers (``numbers.Integral``), not for bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def bucket_factors(num_buckets: BucketSpec) -> tuple[int, ...]:
    """Validate ``num_buckets`` (an even int or a non-empty list of even ints; NumPy integers are
    fine) and return its factors as Python ints."""
    if is_integer(num_buckets):
        factors = (num_buckets,)
    elif isinstance(num_buckets, Sequence):
        factors = tuple(num_buckets)
    else:
        raise TypeError(f"num_buckets must be an even int or a list of even ints, got {num_buckets!r}")
    if not factors:
        raise ValueError("num_buckets is an empty list: give an even int such as 64 or even factors such as [8, 8]")
    if not all(is_integer(factor) for factor in factors):
        raise TypeError(f"num_buckets must be an int or a list of ints, got {num_buckets!r}")
    factors = tuple(int(factor) for factor in factors)
    for factor in factors:
        if factor < 2 or factor % 2:
            raise ValueError(
                f"num_buckets={num_buckets!r}: every bucket count (or factor) must be an even number >= 2, "
                "because each rotation column gives two buckets (xR and -xR); e.g. use 64 or [8, 8]"
            )
    return factors


def total_buckets(num_buckets: BucketSpec) -> int:
    """Number of distinct bucket ids (product of the factors), not counting the padding bucket."""
    return math.prod(bucket_factors(num_buckets))


def rotation_width(num_buckets: BucketSpec) -> int:
    """F, the number of random directions per round: sum of factor / 2."""
    return sum(factor // 2 for factor in bucket_factors(num_buckets))


def auto_num_buckets(length: int, chunk_length: int, max_position_embeddings: int | None = None) -> int | list[int]:
    """The bucket count for a sequence of ``length`` when none is configured.

    About two buckets per chunk (2 * length / chunk_length, rounded down to a power of two,
    at least 2), as the Reformer paper recommends. Above 2 * max(sqrt(span / chunk_length),
    chunk_length) the count is split into two power-of-two factors so the rotation stays small.
    The span is the model's position range ``max_position_embeddings``, as in HF, or ``length``
    for a layer that knows no model. Computed per call; nothing is stored.
    """
    chunks = max(length // chunk_length, 1)
    exponent = max((2 * chunks).bit_length() - 1, 1)
    span = length if max_position_embeddings is None else max_position_embeddings
    limit = 2 * max(int((span // chunk_length) ** 0.5), chunk_length)
    if 2**exponent <= limit:
        return 2**exponent
    return [2 ** (exponent // 2), 2 ** (exponent - exponent // 2)]


# The seeds torch.Generator.manual_seed accepts (negative ones wrap around to unsigned 64-bit values).
SEED_RANGE = (-(2**63), 2**64 - 1)


def check_hash_seed(seed) -> int | None:
    """``seed`` as a Python int (or None) after checking it is an integer that a generator accepts."""
    if seed is None:
        return None
    if not is_integer(seed):
        raise TypeError(f"hash_seed must be an int or None, got {seed!r}")
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ValueError(
            f"hash_seed={seed} is outside the range a torch.Generator accepts, [-2**63, 2**64 - 1]: use a smaller "
            "seed (e.g. seed % 2**64)"
        )
    return int(seed)


def draw_rotations(
    num_heads: int,
    head_size: int,
    num_hashes: int,
    num_buckets: BucketSpec,
    *,
    seed: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Random rotations (H, D, R, F) drawn from N(0, 1).

    With ``seed`` the draw uses a private generator seeded with it (same numbers as a fresh
    ``torch.manual_seed(seed)`` followed by ``torch.randn``); without it, the global torch RNG,
    so a caller that replays the RNG state (the reversible engine) gets the same rotations.
    """
    shape = (num_heads, head_size, num_hashes, rotation_width(num_buckets))
    device = torch.device("cpu") if device is None else torch.device(device)
    generator = None
    seed = check_hash_seed(seed)
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


# At most this many projections (B * H * R * positions * F floats) exist at once while hashing.
HASH_BLOCK_ELEMENTS = 1 << 24


def _argmax_of_both_signs(rotated: Tensor) -> Tensor:
    """argmax over [x ; -x] along the last axis without building the concatenation.

    Ties resolve as for the concatenated argmax: the first maximum wins, and +x comes before -x.
    """
    width = rotated.shape[-1]
    max_value, max_index = rotated.max(dim=-1)
    min_value, min_index = rotated.min(dim=-1)
    return torch.where(max_value >= -min_value, max_index, min_index + width)


def hash_vectors(vectors: Tensor, rotations: Tensor, num_buckets: BucketSpec) -> Tensor:
    """Bucket ids (B, H, R, L) in [0, total_buckets) for ``vectors`` (B, H, L, D).

    ``rotations`` (H, D, R, F) must match the heads, head size and the bucket spec. The
    projection runs in the rotations' dtype (float32 by default), autocast or not, so
    half-precision inputs hash as robustly as full precision ones. No gradient flows through hashing.
    """
    factors = bucket_factors(num_buckets)
    num_heads, head_size = vectors.shape[1], vectors.shape[3]
    expected = (num_heads, head_size, rotations.shape[2], rotation_width(factors))
    if rotations.dim() != 4 or tuple(rotations.shape) != expected:
        raise ValueError(
            f"rotations have shape {tuple(rotations.shape)}, expected (heads, head_size, num_hashes, "
            f"sum(num_buckets)/2) = {expected} for num_buckets={num_buckets!r}"
        )
    batch, _, length, _ = vectors.shape
    # The projections of a long sequence are (B, H, R, L, F): at a million tokens and F = 192 they
    # would take 6 GiB, so positions are hashed in blocks of at most HASH_BLOCK_ELEMENTS projections.
    block = max(1, HASH_BLOCK_ELEMENTS // max(1, batch * num_heads * rotations.shape[2] * rotations.shape[3]))
    bucket_ids = vectors.new_empty((batch, num_heads, rotations.shape[2], length), dtype=torch.long)
    with torch.no_grad(), torch.autocast(vectors.device.type, enabled=False):
        for start in range(0, length, block):
            part = vectors[:, :, start : start + block].detach().to(rotations.dtype)  # (B, H, l, D)
            rotated = torch.einsum("bhld,hdrf->bhrlf", part, rotations)  # (B, H, R, l, F)
            ids = None
            column, radix = 0, 1
            for factor in factors:
                digit = _argmax_of_both_signs(rotated[..., column : column + factor // 2])  # (B, H, R, l)
                ids = digit if ids is None else ids + radix * digit
                column += factor // 2
                radix *= factor
            bucket_ids[..., start : start + block] = ids
    return bucket_ids


def assign_padding_bucket(bucket_ids: Tensor, key_mask: Tensor | None, num_buckets: BucketSpec) -> Tensor:
    """Put padded positions (``key_mask`` False, shape (B, L)) in the extra bucket ``total_buckets``.

    The extra bucket is the largest id, so padded positions sort to the end of each round.
    """
    if key_mask is None:
        return bucket_ids
    padding_bucket = total_buckets(num_buckets)
    return bucket_ids.masked_fill(~key_mask[:, None, None, :], padding_bucket)  # (B, H, R, L)
