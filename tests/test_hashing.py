"""LSH hashing: bucket specs, the automatic bucket count, rotations and bucket ids against their definitions."""

import itertools

import pytest
import torch

from torch_reformer.attention import hashing
from torch_reformer.attention.hashing import (
    assign_padding_bucket,
    auto_num_buckets,
    bucket_factors,
    draw_rotations,
    hash_vectors,
    rotation_width,
    total_buckets,
)


def naive_buckets(vectors, rotations, num_buckets):
    """Bucket ids from the definition: per factor, argmax over [xR ; -xR]; mixed radix, first factor lowest."""
    factors = [num_buckets] if isinstance(num_buckets, int) else list(num_buckets)
    batch, heads, length, _ = vectors.shape
    rounds = rotations.shape[2]
    out = torch.zeros(batch, heads, rounds, length, dtype=torch.long)
    for b, h, r, p in itertools.product(range(batch), range(heads), range(rounds), range(length)):
        projected = vectors[b, h, p] @ rotations[h, :, r, :]  # (F,)
        column, radix, bucket = 0, 1, 0
        for factor in factors:
            part = projected[column : column + factor // 2]
            both = torch.cat([part, -part]).tolist()
            bucket += radix * both.index(max(both))  # first maximum
            column += factor // 2
            radix *= factor
        out[b, h, r, p] = bucket
    return out


@pytest.mark.parametrize("block_elements", [None, 100])
@pytest.mark.parametrize("num_buckets", [2, 8, [2, 4], [4, 2, 6]])
def test_bucket_ids_match_the_definition(num_buckets, block_elements, monkeypatch):
    if block_elements is not None:  # hash a few positions at a time, as a long sequence is hashed
        monkeypatch.setattr(hashing, "HASH_BLOCK_ELEMENTS", block_elements)
    torch.manual_seed(0)
    vectors = torch.randn(2, 3, 11, 5, dtype=torch.float64)
    rotations = draw_rotations(3, 5, 4, num_buckets, seed=3, dtype=torch.float64)
    ids = hash_vectors(vectors, rotations, num_buckets)
    assert ids.shape == (2, 3, 4, 11)
    assert torch.equal(ids, naive_buckets(vectors, rotations, num_buckets))
    assert int(ids.max()) < total_buckets(num_buckets)


def test_ties_resolve_to_the_first_maximum_like_the_concatenated_argmax():
    rotations = torch.ones(1, 2, 1, 3)
    zero = torch.zeros(1, 1, 1, 2)  # every projection is 0: the argmax of [0,0,0,-0,-0,-0] is 0
    assert hash_vectors(zero, rotations, 6).item() == 0
    assert hash_vectors(zero, rotations, [2, 4]).item() == 0
    negative = -torch.ones(1, 1, 1, 2)  # projections all -2: -xR wins, first of the second half
    assert hash_vectors(negative, rotations, 6).item() == 3


def test_bucket_specs():
    assert bucket_factors(8) == (8,) and bucket_factors([4, 6]) == (4, 6)
    assert total_buckets([4, 6]) == 24 and rotation_width([4, 6]) == 5 and rotation_width(64) == 32
    for bad in (7, 0, [4, 3], [], [2, 0]):
        with pytest.raises(ValueError, match="num_buckets"):
            bucket_factors(bad)
    with pytest.raises(TypeError, match="num_buckets"):
        bucket_factors(4.0)


@pytest.mark.parametrize(
    "length, chunk, expected",
    [(128, 64, 4), (4096, 64, 128), (8192, 64, [16, 16]), (65536, 64, [32, 64]), (100, 64, 2), (40, 4, [4, 4])],
)
def test_auto_num_buckets(length, chunk, expected):
    assert auto_num_buckets(length, chunk) == expected


def test_auto_num_buckets_follows_hf_rule_from_the_current_length():
    transformers = pytest.importorskip("transformers")
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention as HFLSH

    # HF: the count from the length, the factorisation limit from max_position_embeddings.
    cases = [(length, chunk, length) for length in (256, 4096, 8192, 32768, 131072) for chunk in (64,)]
    cases += [(64, 4, 4096), (4096, 4, 64), (8192, 64, 524288), (1024, 8, 4096)]
    for length, chunk, max_position_embeddings in cases:
        config = transformers.ReformerConfig(
            attn_layers=["lsh"], lsh_attn_chunk_length=chunk, num_buckets=None,
            max_position_embeddings=max_position_embeddings,
        )
        layer = HFLSH(config)
        layer._set_num_buckets(length)
        assert auto_num_buckets(length, chunk, max_position_embeddings) == layer.num_buckets
        if max_position_embeddings == length:
            assert auto_num_buckets(length, chunk) == layer.num_buckets  # a standalone layer's default


def test_factorisation_limit_comes_from_the_position_range():
    assert auto_num_buckets(64, 4) == [4, 8]  # limit 2 * max(sqrt(16), 4) = 8 from the length alone
    assert auto_num_buckets(64, 4, 4096) == 32  # limit 2 * max(sqrt(1024), 4) = 64, as HF


def test_seeded_rotations_equal_a_fresh_global_seed_draw_and_leave_the_global_rng_alone():
    before = torch.get_rng_state()
    rotations = draw_rotations(2, 8, 3, [4, 6], seed=1234)
    assert torch.equal(torch.get_rng_state(), before)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        expected = torch.randn(2, 8, 3, 5)
    assert torch.equal(rotations, expected)


def test_unseeded_rotations_come_from_the_global_rng():
    torch.manual_seed(5)
    first = draw_rotations(2, 4, 1, 8)
    torch.manual_seed(5)
    assert torch.equal(draw_rotations(2, 4, 1, 8), first)


def test_padding_bucket_is_the_extra_last_bucket():
    ids = torch.zeros(2, 1, 2, 4, dtype=torch.long)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    padded = assign_padding_bucket(ids, mask, [2, 4])
    assert padded[0, 0, :, 2:].eq(8).all() and padded[0, 0, :, :2].eq(0).all() and padded[1].eq(0).all()
    assert assign_padding_bucket(ids, None, 8) is ids


def test_rotations_of_the_wrong_shape_are_refused():
    vectors = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="rotations"):
        hash_vectors(vectors, torch.randn(2, 8, 1, 3), 8)  # width 3, expected 4
    with pytest.raises(ValueError, match="rotations"):
        hash_vectors(vectors, torch.randn(3, 8, 1, 4), 8)  # 3 heads, input has 2


def test_hashing_matches_hf_for_the_same_seed():
    transformers = pytest.importorskip("transformers")
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention as HFLSH

    for num_buckets in (8, [4, 6]):
        config = transformers.ReformerConfig(
            attn_layers=["lsh"], num_attention_heads=2, attention_head_size=8, hidden_size=16,
            num_hashes=3, num_buckets=num_buckets, hash_seed=11,
        )
        vectors = torch.randn(2, 2, 10, 8)
        with torch.random.fork_rng():
            hf_ids = HFLSH(config)._hash_vectors(vectors, 3, None)  # (B, H, R*L) with round offsets
        ours = hash_vectors(vectors, draw_rotations(2, 8, 3, num_buckets, seed=11), num_buckets)
        offsets = torch.arange(3).view(1, 1, 3, 1) * total_buckets(num_buckets)
        assert torch.equal((ours + offsets).flatten(2), hf_ids)


def test_hashing_projects_in_the_rotations_dtype_under_autocast_too():
    vectors = torch.randn(2, 2, 512, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    rotations = draw_rotations(2, 16, 2, 64, seed=0)
    plain = hash_vectors(vectors, rotations, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # would project in bfloat16: some ids moved
        assert torch.equal(hash_vectors(vectors, rotations, 64), plain)
