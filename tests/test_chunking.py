"""Sorting, the window layout, the chunked softmax core and the decoding cache, against plain definitions."""

import math

import pytest
import torch

from torch_reformer.attention.chunking import (
    MASK_VALUES,
    AttentionCache,
    from_windows,
    mask_values,
    merge_rounds,
    normalize_keys,
    pad_sequence,
    sort_by_bucket,
    to_windows,
    window_attention,
    window_key_ranks,
    window_layout,
)


def random_sorted_positions(batch, heads, rounds, length, num_buckets=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    bucket_ids = torch.randint(0, num_buckets, (batch, heads, rounds, length), generator=generator)
    return bucket_ids, sort_by_bucket(bucket_ids)


def test_sort_is_stable_by_bucket_then_position():
    bucket_ids, sorted_positions = random_sorted_positions(2, 2, 3, 17)
    for index in torch.cartesian_prod(torch.arange(2), torch.arange(2), torch.arange(3)).tolist():
        buckets = bucket_ids[tuple(index)].tolist()
        expected = sorted(range(17), key=lambda position: (buckets[position], position))
        assert sorted_positions[tuple(index)].tolist() == expected


@pytest.mark.parametrize("before, after", [(1, 0), (0, 0), (2, 1), (3, 2)])
def test_window_layout_places_each_chunk_after_its_wrapped_neighbours(before, after):
    batch, heads, rounds, length, chunk = 2, 3, 2, 8, 4
    _, sorted_positions = random_sorted_positions(batch, heads, rounds, length)
    layout = window_layout(sorted_positions, chunk, before, after)
    num_chunks = rounds * length // chunk
    slots = sorted_positions.reshape(batch * heads, num_chunks, chunk)
    positions = layout.positions.view(batch * heads, num_chunks + before + after, chunk)
    for layout_chunk in range(num_chunks + before + after):
        source = (layout_chunk - before) % num_chunks
        assert torch.equal(positions[:, layout_chunk], slots[:, source])


def test_rows_go_to_windows_and_back():
    batch, heads, rounds, length, width = 2, 3, 3, 8, 5
    _, sorted_positions = random_sorted_positions(batch, heads, rounds, length)
    layout = window_layout(sorted_positions, 4, 1, 1)
    rows = torch.randn(batch, length, heads, width, dtype=torch.float64)  # (B, L, H, E)
    slots = to_windows(rows, layout)
    gathered = rows.permute(0, 2, 1, 3).reshape(batch * heads, length, width)
    positions = layout.positions.view(batch * heads, -1)
    assert torch.equal(slots.view(batch * heads, -1, width), torch.stack([g[p] for g, p in zip(gathered, positions)]))
    # Reading back merges the rounds: every round holds the same row, and the weights sum to 1.
    logsumexp = torch.randn(slots.shape[:2], dtype=torch.float64)
    assert torch.allclose(from_windows(slots, layout, logsumexp), rows)
    with pytest.raises(ValueError, match="log-sum-exp"):
        from_windows(slots, layout)


def test_reading_back_weights_each_round_by_softmax_of_its_logsumexp():
    batch, heads, rounds, length, width = 1, 2, 3, 8, 4
    _, sorted_positions = random_sorted_positions(batch, heads, rounds, length, seed=4)
    layout = window_layout(sorted_positions, 4, 1, 0)
    slots = torch.randn(layout.positions.shape[0], 4, width, dtype=torch.float64)
    logsumexp = torch.randn(slots.shape[:2], dtype=torch.float64)
    expected = torch.zeros(batch, length, heads, width, dtype=torch.float64)
    num_chunks, groups = rounds * length // 4, batch * heads
    for group in range(groups):
        for r in range(rounds):
            for position in range(length):
                slot = (sorted_positions[0, group, r] == position).nonzero().item() + r * length + 4  # + 1 copy chunk
                index = group * (num_chunks + 1) * 4 + slot
                row_lse = []
                for other in range(rounds):
                    other_slot = (sorted_positions[0, group, other] == position).nonzero().item() + other * length + 4
                    row_lse.append(logsumexp.view(-1)[group * (num_chunks + 1) * 4 + other_slot])
                weight = torch.softmax(torch.stack(row_lse), 0)[r]
                expected[0, position, group] += weight * slots.view(-1, width)[index]
    assert torch.allclose(from_windows(slots, layout, logsumexp), expected)


def test_gradients_of_the_permutations_are_their_definitions():
    batch, heads, rounds, length, width = 1, 2, 2, 8, 3
    _, sorted_positions = random_sorted_positions(batch, heads, rounds, length, seed=1)
    layout = window_layout(sorted_positions, 4, 2, 1)
    rows = torch.randn(batch, length, heads, width, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: to_windows(x, layout), (rows,))
    slots = torch.randn(to_windows(rows, layout).shape, dtype=torch.float64, requires_grad=True)
    logsumexp = torch.randn(slots.shape[:2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, lse: from_windows(x, layout, lse), (slots, logsumexp))


def dense_window_reference(queries, keys, values, positions, key_ranks, before, after, causal, self_mask):
    """Per chunk: scores against the concatenated neighbour chunks, masked by replacement, softmax."""
    mask_value, self_mask_value = mask_values(queries.dtype)
    total = queries.shape[0]
    outs, lses = [], []
    for chunk in range(before, total - after):
        window = list(range(chunk - before, chunk + after + 1))
        key_block, value_block = keys[window].flatten(0, 1), values[window].flatten(0, 1)
        key_positions, query_positions = positions[window].flatten(), positions[chunk]
        ranks = key_positions if key_ranks is None else key_ranks[window].flatten()
        scores = queries[chunk] @ key_block.T
        hidden = ranks[None, :] > (query_positions[:, None] if causal else key_positions[None, :])
        scores = scores.masked_fill(hidden, mask_value)
        if self_mask:
            scores = scores.masked_fill(query_positions[:, None] == key_positions[None, :], self_mask_value)
        outs.append(torch.softmax(scores, -1) @ value_block)
        lses.append(torch.logsumexp(scores, -1))
    return torch.stack(outs), torch.stack(lses)


@pytest.mark.parametrize("causal, self_mask, padded", [(False, True, False), (True, True, True), (True, False, True)])
def test_window_attention_equals_per_chunk_softmax(causal, self_mask, padded):
    torch.manual_seed(0)
    batch, heads, length, chunk, before, after = 1, 2, 12, 4, 1, 1
    _, sorted_positions = random_sorted_positions(batch, heads, 2, length)
    layout = window_layout(sorted_positions, chunk, before, after)
    key_mask = torch.ones(batch, length, dtype=torch.bool)
    key_mask[:, -3:] = not padded
    ranks = window_key_ranks(layout, key_mask if padded else None)
    shape = (layout.positions.shape[0], chunk, 5)
    queries, values = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    keys = None if self_mask else torch.randn(shape, dtype=torch.float64)
    out, lse = window_attention(
        queries, keys, values, layout.positions, ranks, before=before, after=after, causal=causal, self_mask=self_mask
    )
    reference_keys = normalize_keys(queries) if keys is None else keys
    expected_out, expected_lse = dense_window_reference(
        queries, reference_keys, values, layout.positions, ranks, before, after, causal, self_mask
    )
    # The core computes every chunk of the flat layout that has all its neighbours, wrap copies included.
    inner = slice(before, layout.positions.shape[0] - after)
    assert torch.allclose(out[inner], expected_out, atol=1e-12)
    assert torch.allclose(lse[inner], expected_lse, atol=1e-9)


def test_window_attention_gradcheck_with_dropout_off_and_masks():
    torch.manual_seed(1)
    _, sorted_positions = random_sorted_positions(1, 1, 2, 8, seed=2)
    layout = window_layout(sorted_positions, 4, 1, 0)
    key_mask = torch.tensor([[True] * 6 + [False] * 2])
    ranks = window_key_ranks(layout, key_mask)
    shape = (layout.positions.shape[0], 4, 3)
    tensors = [torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3)]

    def run(queries, keys, values, shared):
        out, lse = window_attention(
            queries, None if shared else keys, values, layout.positions, ranks,
            before=1, after=0, causal=True, self_mask=shared,
        )
        return out[1:], lse[1:]  # chunk 0 is a wrap copy: its rows are not outputs

    assert torch.autograd.gradcheck(lambda q, k, v: run(q, k, v, True), tensors)
    assert torch.autograd.gradcheck(lambda q, k, v: run(q, k, v, False), tensors)


def test_mask_constants_are_finite_ordered_and_in_one_place():
    for dtype, (mask, self_mask) in MASK_VALUES.items():
        assert mask < self_mask < 0
        assert math.isfinite(torch.tensor(mask, dtype=dtype).item())
        assert mask_values(dtype) == (mask, self_mask)
    assert mask_values(torch.float16) == (-1e4, -1e3)
    with pytest.raises(TypeError, match="not supported"):
        mask_values(torch.int32)


def test_merge_rounds_weights_rounds_by_softmax_of_their_logsumexp():
    outputs = torch.randn(2, 5, 3, 4, dtype=torch.float64)  # (…, R, D)
    lse = torch.randn(2, 5, 3, dtype=torch.float64)
    weights = lse.exp() / lse.exp().sum(-1, keepdim=True)
    assert torch.allclose(merge_rounds(outputs, lse), (outputs * weights[..., None]).sum(-2))
    assert torch.equal(merge_rounds(outputs[..., :1, :], lse[..., :1]), outputs[..., 0, :])


def test_normalize_keys_definition():
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(8)
    assert torch.allclose(normalize_keys(x), expected)


def test_pad_sequence():
    hidden = torch.randn(2, 3, 4)
    padded, mask = pad_sequence(hidden, None, 5)
    assert padded.shape == (2, 5, 4) and padded[:, 3:].eq(0).all()
    assert mask.tolist() == [[True, True, True, False, False]] * 2
    assert pad_sequence(hidden, None, 3) == (hidden, None)
    with pytest.raises(ValueError, match="shorter"):
        pad_sequence(hidden, None, 2)


def test_cache_appends_reorders_and_refuses_overflow():
    cache = AttentionCache(2, 3, 1, 2, num_hashes=2)
    cache.append(torch.ones(2, 1, 2, 2), 2 * torch.ones(2, 1, 2, 2), torch.tensor([[True, False], [True, True]]),
                 torch.full((2, 1, 2, 2), 5))
    cache.keys[1] *= 3
    cache.reorder(torch.tensor([1, 1]))
    assert cache.length == 2 and cache.keys[:, :, :2].eq(3).all() and cache.key_mask[:, :2].all()
    assert cache.bucket_ids[..., :2].eq(5).all() and cache.bucket_ids[..., 2].eq(0).all()
    with pytest.raises(ValueError, match="max_length"):
        cache.append(torch.ones(2, 1, 2, 2), torch.ones(2, 1, 2, 2), torch.ones(2, 2, dtype=torch.bool),
                     torch.zeros(2, 1, 2, 2, dtype=torch.long))
