"""Sorting, the chunk layout, the sliced chunk-attention core and the decoding cache, against plain definitions."""

import math

import pytest
import torch

from torch_reformer.attention import chunking, sliced
from torch_reformer.attention.cache import AttentionCache
from torch_reformer.attention.chunking import (
    MASK_VALUES,
    chunk_layout,
    mask_values,
    merge_rounds,
    normalize_keys,
    pad_sequence,
    sort_by_bucket,
)
from torch_reformer.attention.sliced import chunked_attention


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


@pytest.mark.parametrize("before, after", [(1, 0), (0, 0), (2, 1)])
def test_chunk_layout_indexes_rows_in_sorted_order(before, after):
    batch, heads, rounds, length = 2, 3, 2, 8
    _, sorted_positions = random_sorted_positions(batch, heads, rounds, length)
    layout = chunk_layout(sorted_positions, 4, before, after)
    assert layout.chunks_per_group == rounds * length // 4 and layout.shape == (batch, length, heads, rounds)
    rows = torch.randn(batch, length, heads, 5)
    gathered = rows.reshape(-1, 5)[layout.slot_rows].view(batch, heads, rounds, length, 5)
    for b in range(batch):
        for h in range(heads):
            for r in range(rounds):
                assert torch.equal(gathered[b, h, r], rows[b, sorted_positions[b, h, r], h])
    assert torch.equal(layout.positions.view(batch, heads, rounds, length), sorted_positions)
    with pytest.raises(ValueError, match="must divide"):
        chunk_layout(sorted_positions, 3, before, after)


def dense_reference(queries, keys, values, sorted_positions, chunk, before, after, *, causal, key_mask=None,
                    key_scale=1.0):
    """Loops over groups, rounds and chunks: scores against the concatenated wrapped neighbour
    chunks, masked by replacement, softmax; rounds merged by ``merge_rounds``. (B, H, L, D)."""
    shared = keys is None
    mask_value, self_mask_value = mask_values(queries.dtype)
    batch, heads, rounds, length = sorted_positions.shape
    per_group = rounds * length // chunk
    out = torch.zeros_like(values)
    for b in range(batch):
        for h in range(heads):
            order = sorted_positions[b, h].reshape(-1)  # (R*L,), rounds end to end
            round_outs = torch.zeros(length, rounds, values.shape[-1], dtype=values.dtype)
            round_lses = torch.zeros(length, rounds, dtype=values.dtype)
            chunks = list(range(per_group))
            for t in range(per_group):  # neighbour at offset o: the chunks rotated by list slicing, as Trax/HF
                window = [(chunks[o:] + chunks[:o])[t] for o in range(-before, after + 1)]
                key_pos = torch.cat([order[w * chunk:(w + 1) * chunk] for w in window])
                query_pos = order[t * chunk:(t + 1) * chunk]
                key_vectors = normalize_keys(queries[b, h, key_pos]) if shared else keys[b, h, key_pos]
                scores = key_scale * queries[b, h, query_pos] @ key_vectors.T
                ranks = key_pos.clone()
                if key_mask is not None:
                    ranks[~key_mask[b, key_pos]] = length
                hidden = ranks[None, :] > (query_pos[:, None] if causal else key_pos[None, :])
                scores = scores.masked_fill(hidden, mask_value)
                if shared:
                    scores = scores.masked_fill(query_pos[:, None] == key_pos[None, :], self_mask_value)
                r = t * chunk // length
                round_outs[query_pos, r] = torch.softmax(scores, -1) @ values[b, h, key_pos]
                round_lses[query_pos, r] = torch.logsumexp(scores, -1)
            out[b, h] = merge_rounds(round_outs, round_lses)
    return out


CASES = [  # (rounds, chunk, before, after, causal, shared, padded)
    (1, 4, 1, 0, True, False, False),
    (1, 4, 1, 1, False, False, True),
    (2, 4, 1, 0, True, True, True),
    (3, 4, 2, 1, False, True, False),
    (2, 12, 0, 0, False, True, True),  # one chunk per round: the exact path of short sequences
    (1, 4, 3, 0, True, True, False),  # more neighbours than chunks: a chunk appears twice in its window
    (2, 4, 7, 1, True, True, True),  # offsets beyond the 6 chunks give the chunk itself, as in Trax/HF
    (1, 4, 4, 3, False, False, True),
]


@pytest.mark.parametrize("rounds, chunk, before, after, causal, shared, padded", CASES)
@pytest.mark.parametrize("chunks_per_slice", [1, 3, None])
def test_chunked_attention_equals_the_dense_per_chunk_reference(
    rounds, chunk, before, after, causal, shared, padded, chunks_per_slice
):
    torch.manual_seed(0)
    batch, heads, length, width = 2, 2, 12, 5
    _, sorted_positions = random_sorted_positions(batch, heads, rounds, length)
    layout = chunk_layout(sorted_positions, chunk, before, after)
    key_mask = None
    if padded:
        key_mask = torch.ones(batch, length, dtype=torch.bool)
        key_mask[0, -3:] = False
    queries, keys, values = (torch.randn(batch, heads, length, width, dtype=torch.float64) for _ in range(3))
    keys = None if shared else keys
    out = chunked_attention(queries, keys, values, layout, key_mask, causal=causal, self_mask=shared,
                            key_scale=0.5 if not shared else 1.0, chunks_per_slice=chunks_per_slice)
    expected = dense_reference(queries, keys, values, sorted_positions, chunk, before, after, causal=causal,
                               key_mask=key_mask, key_scale=0.5 if not shared else 1.0)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-12)


def _half_and_exact(dtype, shared, scale, length=128, width=32):
    """Outputs and (query, key, value) gradients of the core at ``dtype`` and in float64 from the same
    (rounded) inputs. Queries scaled by ``scale`` give logits of about that standard deviation."""
    generator = torch.Generator().manual_seed(3)
    queries, keys, values, probe = (
        (torch.randn(1, 2, length, width, generator=generator, dtype=torch.float64) * factor).to(dtype).double()
        for factor in (scale, 1, 1, 1)
    )
    rounds = 2 if shared else 1
    sorted_positions = random_sorted_positions(1, 2, rounds, length, num_buckets=8, seed=4)[1]
    layout = chunk_layout(sorted_positions, 16, 1, 0)
    key_mask = torch.ones(1, length, dtype=torch.bool)
    key_mask[0, -3:] = False

    def run(inputs):
        queries, keys, values = (x.detach().requires_grad_() for x in inputs)
        out = chunked_attention(queries, None if shared else keys, values, layout, key_mask, causal=True,
                                self_mask=shared, key_scale=1.0 if shared else width**-0.5)
        grads = torch.autograd.grad((out * probe.to(out.dtype)).sum(), (queries, keys, values), allow_unused=True)
        return out, grads

    return run([x.to(dtype) for x in (queries, keys, values)]), run((queries, keys, values))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared", [True, False])
def test_half_inputs_attend_in_float32_to_within_the_rounding_of_the_exact_result(dtype, shared):
    # Logits of standard deviation 16: scores kept in bfloat16 (3 significant digits) or float16 lose
    # the softmax; in float32 the output is the exact result rounded to the dtype.
    (out, grads), (exact, exact_grads) = _half_and_exact(dtype, shared, scale=16.0)
    assert out.dtype == dtype and all(grad is None or grad.dtype == dtype for grad in grads)
    rounding = (exact.to(dtype).double() - exact)[..., :-3, :].abs().max()
    error = (out.double() - exact)[..., :-3, :].abs().max()
    assert error <= max(2 * rounding, torch.finfo(dtype).eps)
    for grad, exact_grad in zip(grads, exact_grads):
        if exact_grad is not None:
            size = exact_grad.abs().max()
            grad_rounding = (exact_grad.to(dtype).double() - exact_grad).abs().max()
            assert (grad.double() - exact_grad).abs().max() <= 5 * grad_rounding + 1e-6 * size


def test_float16_scores_do_not_overflow_before_scaling():
    # Entries x30 at D = 64: q · k reaches ~5e4 to 6e4 and beyond float16's 65504 before the 1/8 scale.
    (out, grads), (exact, _) = _half_and_exact(torch.float16, False, scale=30.0, width=64)
    assert torch.isfinite(out).all() and all(torch.isfinite(grad).all() for grad in grads if grad is not None)
    rounding = (exact.to(torch.float16).double() - exact)[..., :-3, :].abs().max()
    assert (out.double() - exact)[..., :-3, :].abs().max() <= 2 * rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # scores are never half: see _slice_scores
@pytest.mark.parametrize("causal, padded", [(True, False), (True, True), (False, True), (False, False)])
def test_masks_set_exactly_the_masked_scores_to_their_constants(dtype, causal, padded):
    """The arithmetic masks against comparisons written out."""
    generator = torch.Generator().manual_seed(6)
    count, chunk, window, length = 3, 4, 8, 10
    query_positions = torch.randint(0, length, (count, chunk), generator=generator)
    key_positions = torch.cat([query_positions, torch.randint(0, length, (count, window - chunk), generator=generator)], 1)
    ranks = torch.where(key_positions >= 7, length, key_positions) if padded else None  # positions 7.. are padding
    part = sliced._Slice(None, None, None, query_positions, key_positions, ranks)
    scores = (torch.randn(count, chunk, window, generator=generator) * 3).to(dtype)
    for position_dtype in (torch.float32, torch.float64):
        spec = sliced.AttentionSpec(True, causal, True, 1.0, 0.0, 1, position_dtype, dtype, True)
        masked = scores.clone()
        sliced._mask_scores_(masked, part, spec)
        mask_value, self_mask_value = mask_values(dtype)
        effective = key_positions if ranks is None else ranks
        hidden = effective[:, None, :] > (query_positions[:, :, None] if causal else key_positions[:, None, :])
        own = query_positions[:, :, None] == key_positions[:, None, :]
        expected = scores.masked_fill(hidden, mask_value).masked_fill(own, self_mask_value)
        assert torch.equal(masked, expected)
        assert own.any() and (hidden.any() or not (causal or padded))


@pytest.mark.parametrize("rounds", [1, 2])
def test_causal_core_never_reads_a_later_token_for_a_given_layout(rounds):
    """With the sorted layout held fixed, changing every vector after position p leaves outputs 0..p
    unchanged: no later query, key or value enters an earlier output. (Through the layout itself a
    later token can still change which earlier keys share a query's chunk: see ``LSHSelfAttention``.)"""
    torch.manual_seed(4)
    batch, heads, length, width, cut = 1, 2, 24, 4, 13
    _, sorted_positions = random_sorted_positions(batch, heads, rounds, length, num_buckets=4, seed=5)
    layout = chunk_layout(sorted_positions, 4, 1, 0)
    qk, values = (torch.randn(batch, heads, length, width, dtype=torch.float64) for _ in range(2))
    changed_qk, changed_values = qk.clone(), values.clone()
    changed_qk[:, :, cut + 1 :] = torch.randn(batch, heads, length - cut - 1, width, dtype=torch.float64)
    changed_values[:, :, cut + 1 :] = torch.randn(batch, heads, length - cut - 1, width, dtype=torch.float64)
    before = chunked_attention(qk, None, values, layout, causal=True, self_mask=True)
    after = chunked_attention(changed_qk, None, changed_values, layout, causal=True, self_mask=True)
    assert torch.equal(before[:, :, : cut + 1], after[:, :, : cut + 1])
    assert not torch.allclose(before[:, :, cut + 1 :], after[:, :, cut + 1 :])


@pytest.mark.parametrize("rounds, chunk, before, after, causal, shared, padded", CASES[:4])
def test_chunked_attention_gradients_match_finite_differences(rounds, chunk, before, after, causal, shared, padded):
    torch.manual_seed(1)
    batch, heads, length, width = 1, 2, 8, 3
    _, sorted_positions = random_sorted_positions(batch, heads, rounds, length, seed=2)
    layout = chunk_layout(sorted_positions, chunk, before, after)
    key_mask = torch.tensor([[True] * 6 + [False] * 2]) if padded else None
    tensors = [torch.randn(batch, heads, length, width, dtype=torch.float64, requires_grad=True) for _ in range(3)]

    def run(queries, keys, values):  # two chunks per slice: gradients cross slice boundaries
        return chunked_attention(queries, None if shared else keys, values, layout, key_mask, causal=causal,
                                 self_mask=shared, key_scale=0.7, chunks_per_slice=2)

    assert torch.autograd.gradcheck(run, tensors)


def test_dropout_keep_mask_is_u_at_least_p_scaled():
    spec = sliced.AttentionSpec(True, True, True, 1.0, 0.3, 1, torch.float32, torch.float32, True)
    keep = sliced._dropout_keep((40, 50, 60), 11, 2, spec, torch.device("cpu"))
    uniform = torch.rand((40, 50, 60), generator=torch.Generator().manual_seed(13))  # seed + index
    assert torch.equal(keep, (uniform >= 0.3).float() / 0.7)
    assert abs((keep > 0).float().mean().item() - 0.7) < 0.01


def test_dropout_masks_are_rebuilt_exactly_in_backward():
    batch, heads, rounds, length, width = 1, 2, 2, 16, 4
    _, sorted_positions = random_sorted_positions(batch, heads, rounds, length, seed=3)
    layout = chunk_layout(sorted_positions, 4, 1, 0)
    tensors = [torch.randn(batch, heads, length, width, dtype=torch.float64, requires_grad=True) for _ in range(2)]

    def run(queries, values, seed=0):
        torch.manual_seed(seed)  # the call draws its mask seed from the global RNG
        return chunked_attention(queries, None, values, layout, causal=True, self_mask=True, dropout=0.4,
                                 training=True, chunks_per_slice=3)

    # gradcheck compares backward with finite differences of forward: they agree only if
    # backward uses forward's masks.
    assert torch.autograd.gradcheck(run, tensors)
    plain = chunked_attention(*tensors[:1], None, tensors[1], layout, causal=True, self_mask=True)
    assert not torch.allclose(run(*tensors), plain)  # the masks act
    assert torch.equal(run(*tensors), run(*tensors)) and not torch.equal(run(*tensors, seed=1), run(*tensors))
    eval_out = chunked_attention(*tensors[:1], None, tensors[1], layout, causal=True, self_mask=True, dropout=0.4)
    assert torch.equal(eval_out, plain)  # no dropout outside training


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
    # At the self-mask value float32 rounds logsumexp(lse) (spacing 0.008): Trax/HF weights, kept by default.
    self_only = torch.full((2,), -1e5)
    rounded = torch.exp(self_only - torch.logsumexp(self_only, dim=0)).sum()
    assert abs(rounded.item() - 1) > 1e-3
    assert torch.allclose(merge_rounds(torch.ones(2, 1), self_only), rounded, rtol=1e-6)
    assert torch.allclose(merge_rounds(torch.ones(2, 1), self_only, reference_rounding=False), torch.ones(1))


def test_normalize_keys_definition():
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(8)
    assert torch.allclose(normalize_keys(x), expected)


def test_float16_keys_keep_their_statistics_in_float32():
    # |x| > 256 overflows a float16 squared norm; a zero row (internal padding) has rsqrt(eps)^2 = 1e6.
    generator = torch.Generator().manual_seed(0)
    rows = torch.stack([torch.full((64,), 40.0), torch.zeros(64), torch.randn(64, generator=generator)])
    rows = rows.half().double()  # values a float16 tensor holds exactly
    keys = normalize_keys(rows.half())
    assert keys.dtype == torch.float16 and torch.equal(keys[0], torch.full((64,), 0.125, dtype=torch.float16))
    assert torch.allclose(keys.double(), normalize_keys(rows), atol=1e-3, rtol=1e-3)
    grad = torch.randn(3, 64, generator=generator).half().double()
    exact = torch.autograd.grad(normalize_keys(rows.requires_grad_()), rows, grad)[0]
    ours = chunking._normalize_keys_backward(rows.detach().half(), grad.half())
    assert ours.dtype == torch.float16 and torch.isfinite(ours).all()
    assert torch.allclose(ours.double(), exact, atol=1e-3, rtol=1e-2)


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


def test_changing_the_output_in_place_before_backward_is_an_error():
    layout = chunk_layout(torch.arange(8).expand(1, 1, 1, 8), 4, 1, 0)
    queries = torch.randn(1, 1, 8, 3, requires_grad=True)
    out = chunked_attention(queries, None, queries, layout, causal=True, self_mask=True)
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


def test_a_second_backward_through_the_same_graph_gives_the_same_gradients():
    layout = chunk_layout(random_sorted_positions(1, 2, 2, 8)[1], 4, 1, 0)
    queries = torch.randn(1, 2, 8, 3, dtype=torch.float64, requires_grad=True)
    out = chunked_attention(queries, None, queries, layout, causal=True, self_mask=True)
    first = torch.autograd.grad(out.square().sum(), queries, retain_graph=True)[0]
    assert torch.equal(torch.autograd.grad(out.square().sum(), queries)[0], first)


def test_shared_keys_without_the_self_mask_have_exact_gradients():
    layout = chunk_layout(random_sorted_positions(1, 2, 2, 8, seed=5)[1], 4, 1, 0)
    tensors = [torch.randn(1, 2, 8, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradcheck(
        lambda q, v: chunked_attention(q, None, v, layout, causal=True, self_mask=False, chunks_per_slice=1), tensors
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_leaves_the_core_in_its_own_precision(dtype):
    # Under autocast the products would run in bfloat16 again, and the statistics would not fit
    # their float32 buffers: the core turns autocast off and gives what it gives outside it.
    layout = chunk_layout(random_sorted_positions(1, 2, 2, 16, seed=2)[1], 4, 1, 0)
    inputs = [torch.randn(1, 2, 16, 8, dtype=dtype, requires_grad=True) for _ in range(2)]

    def run():
        out = chunked_attention(inputs[0], None, inputs[1], layout, causal=True, self_mask=True)
        return (out, *torch.autograd.grad(out.float().square().sum(), inputs))

    plain = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = run()
    assert all(torch.equal(a, b) for a, b in zip(plain, under_autocast))
