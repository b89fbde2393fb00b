"""LSH self-attention against a brute-force dense reference built from the same bucket ids, and against HF."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import torch_reformer.attention.lsh as lsh_module
from torch_reformer.attention.chunking import mask_values, sort_by_bucket
from torch_reformer.attention.hashing import assign_padding_bucket, draw_rotations, hash_vectors
from torch_reformer.attention.lsh import LSHSelfAttention, lsh_attention, shared_qk_attention
from torch_reformer.reversible import ReversibleSequential

# ---------------------------------------------------------------------------------------- reference


def visible_counts(bucket_ids, chunk_length, before, after):
    """(B, H, R, L, L): how many times each key position sits in each query's window, per round.

    From the definition: sort every round by (bucket, position) with Python's sort, lay the rounds
    end to end, cut chunks, a chunk's window is itself and its neighbours, the neighbour at offset i
    taken as Trax and HF take it, from the chunks rotated by list slicing (chunks[i:] + chunks[:i]).
    """
    batch, heads, rounds, length = bucket_ids.shape
    counts = torch.zeros(batch, heads, rounds, length, length)
    num_chunks = rounds * length // chunk_length
    chunks = list(range(num_chunks))
    for b in range(batch):
        for h in range(heads):
            order = []
            for r in range(rounds):
                ids = bucket_ids[b, h, r].tolist()
                order += sorted(range(length), key=lambda position: (ids[position], position))
            slots = torch.tensor(order).view(num_chunks, chunk_length)
            for chunk in range(num_chunks):
                window = torch.cat([slots[(chunks[o:] + chunks[:o])[chunk]] for o in range(-before, after + 1)])
                slot = torch.arange(chunk * chunk_length, (chunk + 1) * chunk_length)
                index = (slot // length)[:, None], slots[chunk][:, None], window[None, :]
                counts[b, h].index_put_(index, torch.ones(chunk_length, len(window)), accumulate=True)
    return counts


def reference_attention(qk, values, counts, causal, key_mask, lse_dtype=None):
    """Dense shared-QK attention where key k counts counts[..., q, k] times for query q in each round.

    With ``lse_dtype`` the log-sum-exps are rounded to it as Trax and HF compute with them:
    probabilities exp(s - lse), round weights exp(lse_r - logsumexp(lse)) (see ``merge_rounds``).
    """
    dtype, (batch, _, length, head_size) = qk.dtype, qk.shape
    mask_value, self_mask_value = mask_values(dtype)
    keys = qk / torch.sqrt(qk.pow(2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(head_size)
    scores = (qk @ keys.transpose(-1, -2))[:, :, None]  # (B, H, 1, L, L)
    positions = torch.arange(length)
    hidden = torch.zeros(batch, 1, 1, length, length, dtype=torch.bool)
    if causal:
        hidden |= positions[None, :] > positions[:, None]
    if key_mask is not None:
        hidden |= ~key_mask[:, None, None, None, :]
    scores = scores.masked_fill(hidden, mask_value).masked_fill(torch.eye(length, dtype=torch.bool), self_mask_value)
    counts = counts.to(dtype)
    present = counts > 0
    row_max = torch.where(present, scores, -math.inf).amax(-1, keepdim=True).detach()
    weights = torch.where(present, counts * torch.exp(torch.where(present, scores, row_max) - row_max), 0)
    total = weights.sum(-1, keepdim=True)
    per_round = (weights / total) @ values[:, :, None]  # (B, H, R, L, D)
    logsumexp = (total.log() + row_max).squeeze(-1)  # (B, H, R, L)
    if lse_dtype is None:
        return (per_round * torch.softmax(logsumexp, dim=2)[..., None]).sum(2)
    rounded = logsumexp.to(lse_dtype)
    per_round = per_round * torch.exp(logsumexp - rounded.to(dtype))[..., None]
    round_weights = torch.exp(rounded - torch.logsumexp(rounded, dim=2, keepdim=True)).to(dtype)
    return (per_round * round_weights[..., None]).sum(2)


def make_inputs(batch, heads, length, head_size, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    qk = torch.randn(batch, heads, length, head_size, generator=generator, dtype=dtype)
    values = torch.randn(batch, heads, length, head_size, generator=generator, dtype=dtype)
    return qk.requires_grad_(), values.requires_grad_()


def padding_mask(batch, length, padded):
    mask = torch.ones(batch, length, dtype=torch.bool)
    if padded:
        mask[0, -5:] = False
        mask[-1, :3] = False
    return mask if padded else None


def bucket_ids_for(qk, num_hashes, num_buckets, key_mask, seed=1):
    rotations = draw_rotations(qk.shape[1], qk.shape[3], num_hashes, num_buckets, seed=seed, dtype=torch.float64)
    return assign_padding_bucket(hash_vectors(qk, rotations, num_buckets), key_mask, num_buckets)


# ---------------------------------------------------------------------------------------- against the reference


REFERENCE_CASES = [  # (causal, num_hashes, num_buckets, padded): every value of each setting, mixed
    (False, 1, 8, False), (True, 1, [2, 4], True), (False, 2, [2, 4], False), (True, 2, 8, True),
    (True, 8, 8, False), (False, 8, [2, 4], True), (True, 3, [2, 2, 2], False),
]


@pytest.mark.parametrize("causal, num_hashes, num_buckets, padded", REFERENCE_CASES)
def test_lsh_equals_dense_reference_fp64(causal, num_hashes, num_buckets, padded):
    qk, values = make_inputs(2, 2, 40, 6)
    key_mask = padding_mask(2, 40, padded)
    ids = bucket_ids_for(qk, num_hashes, num_buckets, key_mask)
    settings = dict(chunk_length=4, num_chunks_before=1, num_chunks_after=0)
    out = lsh_attention(qk, values, ids, causal=causal, key_mask=key_mask, **settings)
    expected = reference_attention(qk, values, visible_counts(ids, 4, 1, 0), causal, key_mask)
    assert torch.allclose(out, expected, atol=1e-10, rtol=0)
    probe = torch.randn_like(out)
    grads = torch.autograd.grad((out * probe).sum(), (qk, values))
    expected_grads = torch.autograd.grad((expected * probe).sum(), (qk, values))
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.allclose(grad, expected_grad, atol=1e-9, rtol=0)


@pytest.mark.parametrize("before, after", [(0, 0), (2, 1), (0, 2), (20, 0), (2, 19)])  # 18 chunks
def test_other_neighbour_windows(before, after):
    qk, values = make_inputs(1, 2, 24, 4, seed=3)
    ids = bucket_ids_for(qk, 3, 4, None)
    out = lsh_attention(qk, values, ids, chunk_length=4, num_chunks_before=before, num_chunks_after=after, causal=True)
    expected = reference_attention(qk, values, visible_counts(ids, 4, before, after), True, None)
    assert torch.allclose(out, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("length, chunk, causal", [(97, 8, True), (97, 8, False), (1025, 32, True)])
def test_module_at_odd_lengths_matches_reference(length, chunk, causal):
    torch.manual_seed(0)
    layer = LSHSelfAttention(16, 2, 8, num_hashes=2, num_buckets=[4, 4], chunk_length=chunk, causal=causal).double()
    hidden = torch.randn(1, length, 16, dtype=torch.float64, requires_grad=True)
    rotations = draw_rotations(2, 8, 2, [4, 4], seed=4, dtype=torch.float64)
    out = layer(hidden, rotations=rotations)

    padded = -(-length // chunk) * chunk
    hidden_padded = torch.nn.functional.pad(hidden, (0, 0, 0, padded - length))
    key_mask = torch.arange(padded)[None, :] < length
    qk = layer.query_key(hidden_padded).view(1, padded, 2, 8).transpose(1, 2)
    values = layer.value(hidden_padded).view(1, padded, 2, 8).transpose(1, 2)
    ids = assign_padding_bucket(hash_vectors(qk, rotations, [4, 4]), key_mask, [4, 4])
    attended = reference_attention(qk, values, visible_counts(ids, chunk, 1, 0), causal, key_mask)
    expected = layer.output(attended.transpose(1, 2).reshape(1, padded, 16))[:, :length]
    assert torch.allclose(out, expected, atol=1e-10, rtol=0)
    probe = torch.randn_like(out)
    params = [hidden, layer.query_key.weight, layer.value.weight]
    grads = torch.autograd.grad((out * probe).sum(), params)
    for grad, expected_grad in zip(grads, torch.autograd.grad((expected * probe).sum(), params)):
        assert torch.allclose(grad, expected_grad, atol=1e-9, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_float32_within_1e_5_of_the_float64_reference(causal):
    qk, values = make_inputs(2, 2, 64, 16, seed=5)
    key_mask = padding_mask(2, 64, True)
    ids = bucket_ids_for(qk, 4, [4, 4], key_mask)
    qk32, values32 = qk.detach().float().requires_grad_(), values.detach().float().requires_grad_()
    out = lsh_attention(qk32, values32, ids, chunk_length=8, causal=causal, key_mask=key_mask)
    expected = reference_attention(qk, values, visible_counts(ids, 8, 1, 0), causal, key_mask, torch.float32)
    assert (out.double() - expected).abs().max() <= 1e-5
    probe = torch.randn_like(expected)
    grads = torch.autograd.grad((out * probe.float()).sum(), (qk32, values32))
    for grad, expected_grad in zip(grads, torch.autograd.grad((expected * probe).sum(), (qk, values))):
        assert (grad.double() - expected_grad).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_stays_within_twice_the_naive_error(dtype):
    qk, values = make_inputs(1, 2, 64, 16, seed=6)
    key_mask = padding_mask(1, 64, True)
    ids = bucket_ids_for(qk, 2, 8, key_mask)
    low_qk, low_values = qk.detach().to(dtype), values.detach().to(dtype)
    counts = visible_counts(ids, 8, 1, 0)
    exact = reference_attention(low_qk.double(), low_values.double(), counts, True, key_mask)
    naive = reference_attention(low_qk, low_values, counts, True, key_mask)
    ours = lsh_attention(low_qk, low_values, ids, chunk_length=8, causal=True, key_mask=key_mask)
    assert ours.dtype == dtype and torch.isfinite(ours).all()
    naive_error = (naive.double() - exact).abs().max()
    assert (ours.double() - exact).abs().max() <= 2 * naive_error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients_stay_within_twice_the_naive_error(dtype):
    qk, values = make_inputs(1, 2, 64, 16, seed=8)
    key_mask = padding_mask(1, 64, True)
    ids = bucket_ids_for(qk, 2, 8, key_mask)
    counts = visible_counts(ids, 8, 1, 0)
    probe = torch.randn(1, 2, 64, 16, dtype=torch.float64)

    def gradients(run, dtype):
        low_qk = qk.detach().to(dtype).requires_grad_()
        low_values = values.detach().to(dtype).requires_grad_()
        out = run(low_qk, low_values)
        return [g.double() for g in torch.autograd.grad((out * probe.to(dtype)).sum(), (low_qk, low_values))]

    def naive(q, v):
        return reference_attention(q, v, counts, True, key_mask)

    def ours(q, v):
        return lsh_attention(q, v, ids, chunk_length=8, causal=True, key_mask=key_mask)

    exact = gradients(naive, torch.float64)
    for ours_grad, naive_grad, exact_grad in zip(gradients(ours, dtype), gradients(naive, dtype), exact):
        assert torch.isfinite(ours_grad).all()
        assert (ours_grad - exact_grad).abs().max() <= 2 * (naive_grad - exact_grad).abs().max()


def test_float16_layer_with_internal_padding_has_finite_weight_gradients():
    torch.manual_seed(0)  # length 40 is padded to 48: zero rows whose key statistics overflowed float16
    layer = LSHSelfAttention(64, 2, 32, num_hashes=2, num_buckets=4, chunk_length=16, hash_seed=0).half()
    hidden = torch.randn(2, 40, 64, dtype=torch.half, requires_grad=True)
    layer(hidden).float().sum().backward()
    assert torch.isfinite(layer.query_key.weight.grad).all() and torch.isfinite(hidden.grad).all()


def test_one_chunk_is_full_shared_qk_attention_with_the_self_mask():
    qk, values = make_inputs(2, 2, 12, 5, seed=7)
    key_mask = padding_mask(2, 12, True)
    every_key_once = torch.ones(2, 2, 1, 12, 12)
    for causal in (False, True):
        expected = reference_attention(qk, values, every_key_once, causal, key_mask)
        assert torch.allclose(shared_qk_attention(qk, values, key_mask=key_mask, causal=causal), expected, atol=1e-12)
        one_round_one_chunk = torch.zeros(2, 2, 1, 12, dtype=torch.long)
        hashed = lsh_attention(qk, values, one_round_one_chunk, chunk_length=12, num_chunks_before=0,
                               causal=causal, key_mask=key_mask)
        assert torch.allclose(hashed, expected, atol=1e-12)
    layer = LSHSelfAttention(8, 2, 4, chunk_length=16, causal=True).double()
    hidden = torch.randn(1, 16, 8, dtype=torch.float64)
    qk = layer.query_key(hidden).view(1, 16, 2, 4).transpose(1, 2)
    values = layer.value(hidden).view(1, 16, 2, 4).transpose(1, 2)
    attended = reference_attention(qk, values, torch.ones(1, 2, 1, 16, 16), True, None)
    assert torch.allclose(layer(hidden), layer.output(attended.transpose(1, 2).reshape(1, 16, 8)), atol=1e-12)


def test_gradcheck_module_fp64():
    torch.manual_seed(0)
    layer = LSHSelfAttention(4, 2, 2, num_hashes=2, num_buckets=4, chunk_length=4, causal=True).double()
    rotations = draw_rotations(2, 2, 2, 4, seed=0, dtype=torch.float64)
    hidden = torch.randn(1, 10, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x, rotations=rotations), (hidden,), fast_mode=True)


def test_causal_lsh_never_attends_to_future_values():
    # Changing a future value never changes an earlier output when the bucket ids are fixed.
    qk, values = make_inputs(1, 2, 32, 4, seed=8)
    ids = bucket_ids_for(qk, 3, 8, None)
    out = lsh_attention(qk, values, ids, chunk_length=4, causal=True)
    changed = values.detach().clone()
    changed[:, :, 20:] += 10
    again = lsh_attention(qk.detach(), changed, ids, chunk_length=4, causal=True)
    assert torch.allclose(out[:, :, :20], again[:, :, :20], atol=1e-12)


# ---------------------------------------------------------------------------------------- module behaviour


def test_padding_invariance():
    torch.manual_seed(0)
    layer = LSHSelfAttention(16, 2, 8, num_hashes=2, num_buckets=8, chunk_length=8).double()
    rotations = draw_rotations(2, 8, 2, 8, seed=2, dtype=torch.float64)
    hidden = torch.randn(2, 29, 16, dtype=torch.float64)
    internal = layer(hidden, rotations=rotations)
    # Explicit padding to the chunk multiple, with anything in the padded positions, changes nothing.
    explicit = torch.cat([hidden, torch.randn(2, 3, 16, dtype=torch.float64)], dim=1)
    mask = torch.arange(32)[None, :].expand(2, 32) < 29
    assert torch.allclose(layer(explicit, mask, rotations=rotations)[:, :29], internal, atol=1e-12)
    other = explicit.clone()
    other[:, 29:] = 100.0
    assert torch.allclose(layer(other, mask, rotations=rotations)[:, :29], internal, atol=1e-12)


def test_hash_seed_is_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    layer = LSHSelfAttention(16, 2, 8, num_hashes=2, chunk_length=4, hash_seed=3)
    hidden = torch.randn(1, 32, 16)
    state = torch.get_rng_state()
    first, second = layer(hidden), layer(hidden)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, second)
    expected = layer(hidden, rotations=draw_rotations(2, 8, 2, layer.bucket_spec(32), seed=3))
    assert torch.equal(first, expected)
    layer.hash_seed = 4
    assert not torch.allclose(layer(hidden), first)


def test_without_a_seed_rotations_come_from_the_global_rng():
    layer = LSHSelfAttention(16, 2, 8, num_hashes=2, chunk_length=4)
    hidden = torch.randn(1, 32, 16)
    torch.manual_seed(9)
    first = layer(hidden)
    torch.manual_seed(9)
    assert torch.equal(layer(hidden), first)


def test_num_hashes_and_num_buckets_may_change_between_calls():
    torch.manual_seed(0)
    layer = LSHSelfAttention(8, 1, 8, num_hashes=1, num_buckets=None, chunk_length=4, hash_seed=0).double()
    hidden = torch.randn(1, 64, 8, dtype=torch.float64)
    layer(hidden)
    assert layer.num_buckets is None and layer.bucket_spec(64) == [4, 8]  # auto, per call, nothing stored
    layer.num_hashes, layer.num_buckets = 4, [2, 4]
    rotations = draw_rotations(1, 8, 4, [2, 4], seed=0, dtype=torch.float64)
    qk = layer.query_key(hidden).view(1, 64, 1, 8).transpose(1, 2)
    values = layer.value(hidden).view(1, 64, 1, 8).transpose(1, 2)
    ids = hash_vectors(qk, rotations, [2, 4])
    expected = layer.output(reference_attention(qk, values, visible_counts(ids, 4, 1, 0), False, None).transpose(1, 2)
                            .reshape(1, 64, 8))
    assert torch.allclose(layer(hidden), expected, atol=1e-10)


def test_fixed_rotations_attribute_is_used_when_no_rotations_are_passed():
    layer = LSHSelfAttention(8, 2, 4, num_hashes=2, num_buckets=4, chunk_length=4)
    hidden = torch.randn(1, 16, 8)
    rotations = torch.randn(2, 4, 2, 2)
    layer.fixed_rotations = rotations
    assert torch.equal(layer(hidden), layer(hidden, rotations=rotations))
    torch.manual_seed(1)
    assert torch.equal(layer(hidden), layer(hidden, rotations=rotations))


def test_reversible_engine_reuses_bucket_ids_and_matches_autograd(monkeypatch):
    hash_calls = []
    original = lsh_module.hash_vectors
    monkeypatch.setattr(lsh_module, "hash_vectors", lambda *args: hash_calls.append(1) or original(*args))
    torch.manual_seed(0)
    # Attention dropout draws after the rotations: the rerun must see the same random stream.
    blocks = [LSHSelfAttention(8, 2, 4, num_hashes=2, num_buckets=4, chunk_length=4, causal=True, dropout=0.25)
              for _ in range(2)]
    hidden = torch.randn(2, 16, 16, requires_grad=True)
    results = {}
    for mode in ("reversible", "autograd"):
        stack = ReversibleSequential(*blocks, memory_mode=mode)
        hash_calls.clear()
        torch.manual_seed(5)
        out = stack(hidden)
        grads = torch.autograd.grad(out.square().sum(), [hidden, *stack.parameters()])
        results[mode] = (out, grads, len(hash_calls))
    assert results["reversible"][2] == results["autograd"][2] == 2  # no hashing in the recomputation
    assert torch.allclose(results["reversible"][0], results["autograd"][0], atol=1e-6)
    for grad, expected in zip(results["reversible"][1], results["autograd"][1]):
        assert torch.allclose(grad, expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
def test_a_layer_called_twice_in_one_block_keeps_both_calls_buckets(mode):
    class Twice(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x) + self.layer(torch.tanh(3 * x).flip(1))

    torch.manual_seed(0)
    layer = LSHSelfAttention(8, 2, 4, num_hashes=2, num_buckets=4, chunk_length=4, causal=True).double()
    blocks = [Twice(layer), torch.nn.Linear(8, 8).double()]
    hidden = torch.randn(1, 16, 16, dtype=torch.float64, requires_grad=True)
    results = {}
    for memory_mode in (mode, "autograd"):
        torch.manual_seed(5)  # the same rotations in both runs
        out = ReversibleSequential(*blocks, memory_mode=memory_mode)(hidden)
        results[memory_mode] = (out, torch.autograd.grad(out.square().sum(), [hidden, *layer.parameters()]))
    torch.testing.assert_close(results[mode][0], results["autograd"][0], rtol=0, atol=1e-12)
    for grad, expected in zip(results[mode][1], results["autograd"][1]):
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-10)


def test_dropout_acts_only_in_training():
    torch.manual_seed(0)
    layer = LSHSelfAttention(8, 2, 4, num_hashes=2, num_buckets=4, chunk_length=4, dropout=0.5, hash_seed=1)
    hidden = torch.randn(1, 16, 8)
    evaluated = layer.eval()(hidden)
    layer.train()
    torch.manual_seed(3)
    dropped = layer(hidden)
    torch.manual_seed(3)
    assert torch.equal(layer(hidden), dropped) and not torch.allclose(dropped, evaluated)
    layer.dropout = 0.0
    assert torch.allclose(layer(hidden), evaluated, atol=1e-6)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_no_tensor_grows_like_length_squared():
    length = 512
    layer = LSHSelfAttention(8, 2, 4, num_hashes=2, num_buckets=16, chunk_length=16, causal=True)
    hidden = torch.randn(1, length, 8, requires_grad=True)
    mask = torch.ones(1, length, dtype=torch.bool)
    with _LargestTensor() as tracker:
        layer(hidden, mask).sum().backward()
    # Scores are (J, ~B*H*R*L/C, C, C) = 2 * 2 * 2 * 512 * 16: far below L^2.
    assert tracker.largest <= 2 * 2 * 2 * length * 16 * 1.1 < length * length


# ---------------------------------------------------------------------------------------- errors


def test_bad_input_is_refused_with_a_clear_message():
    layer = LSHSelfAttention(8, 2, 4, num_buckets=4, chunk_length=4)
    with pytest.raises(ValueError, match="hidden_size=8"):
        layer(torch.randn(1, 8, 6))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        layer(torch.randn(1, 8, 8), torch.ones(1, 7))
    with pytest.raises(ValueError, match="even"):
        LSHSelfAttention(8, 2, 4, num_buckets=5)
    layer.num_buckets = [4, 3]
    with pytest.raises(ValueError, match="even"):
        layer(torch.randn(1, 8, 8))
    layer.num_buckets = 4
    with pytest.raises(ValueError, match="rotations"):
        layer(torch.randn(1, 8, 8), rotations=torch.randn(2, 4, 3, 2))
    with pytest.raises(ValueError, match="rotations"):
        layer(torch.randn(1, 8, 8), rotations=torch.randn(2, 4, 1, 3))
    with pytest.raises(ValueError, match="num_hashes"):
        LSHSelfAttention(8, 2, 4, num_hashes=0)
    with pytest.raises(ValueError, match="chunk_length"):
        LSHSelfAttention(8, 2, 4, chunk_length=0)
    with pytest.raises(ValueError, match="dropout"):
        LSHSelfAttention(8, 2, 4, dropout=1.5)
    with pytest.raises(TypeError, match="hash_seed"):
        LSHSelfAttention(8, 2, 4, hash_seed="7")
    with pytest.raises(ValueError, match="multiple of chunk_length"):
        lsh_attention(torch.randn(1, 1, 6, 2), torch.randn(1, 1, 6, 2), torch.zeros(1, 1, 1, 6, dtype=torch.long),
                      chunk_length=4)


def test_numpy_integers_and_the_seed_range():
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    hidden = torch.randn(1, 10, 8)
    layer = LSHSelfAttention(8, 2, 4, num_buckets=np.int64(4), chunk_length=4, hash_seed=np.int64(3))
    same = LSHSelfAttention(8, 2, 4, num_buckets=4, chunk_length=4, hash_seed=3)
    same.load_state_dict(layer.state_dict())
    assert layer.num_buckets == 4 and type(layer.num_buckets) is int and layer.hash_seed == 3
    assert torch.equal(layer(hidden), same(hidden))
    layer.num_buckets = [np.int32(2), 2]
    assert layer(hidden).shape == (1, 10, 8)
    assert LSHSelfAttention(8, 2, 4, num_buckets=8, hash_seed=2**64 - 1).draw_rotations(8).shape == (2, 4, 1, 4)
    for seed in (2**64, -(2**63) - 1):  # what torch.Generator.manual_seed refuses
        with pytest.raises(ValueError, match="hash_seed"):
            LSHSelfAttention(8, 2, 4, hash_seed=seed)
    layer.hash_seed = 2**64
    with pytest.raises(ValueError, match="hash_seed"):
        layer(hidden)


@pytest.mark.parametrize("length", [10, 12, 3])  # padded, a chunk multiple, one chunk
@pytest.mark.parametrize("masked", [False, True])
def test_an_empty_batch_gives_an_empty_output(length, masked):
    layer = LSHSelfAttention(8, 2, 4, num_hashes=2, num_buckets=4, chunk_length=4)
    hidden = torch.randn(0, length, 8, requires_grad=True)
    out = layer(hidden, torch.ones(0, length) if masked else None)
    out.sum().backward()
    assert out.shape == hidden.grad.shape == (0, length, 8)


# ---------------------------------------------------------------------------------------- Hugging Face parity


def _hf_pair(num_hashes, num_buckets, causal, dtype, chunk=8, before=1, after=0, max_position_embeddings=None):
    transformers = pytest.importorskip("transformers")
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention as HFLSH

    config = transformers.ReformerConfig(
        hidden_size=32, num_attention_heads=2, attention_head_size=16, num_hashes=num_hashes,
        num_buckets=num_buckets, lsh_attn_chunk_length=chunk, lsh_num_chunks_before=before, lsh_num_chunks_after=after,
        is_decoder=causal, hash_seed=7, attn_layers=["lsh"], lsh_attention_probs_dropout_prob=0.0,
    )
    hf = HFLSH(config).eval().to(dtype)
    ours = LSHSelfAttention(32, 2, 16, num_hashes=num_hashes, num_buckets=num_buckets, chunk_length=chunk,
                            num_chunks_before=before, num_chunks_after=after, causal=causal, hash_seed=7,
                            max_position_embeddings=max_position_embeddings).eval().to(dtype)
    ours.query_key.weight.data.copy_(hf.query_key.weight)
    ours.value.weight.data.copy_(hf.value.weight)
    return hf, ours


def _compare_with_hf(hf, ours, length, dtype, padded):
    hidden = torch.randn(2, length, 32, dtype=dtype)
    mask = None
    if padded:
        mask = torch.ones(2, length, dtype=torch.long)
        mask[0, -5:] = 0
        mask[1, :3] = 0
    with torch.no_grad(), torch.random.fork_rng():  # HF reseeds the global RNG
        expected = ours.output(hf(hidden, attention_mask=mask).hidden_states)
    with torch.no_grad():
        out = ours(hidden, mask)
    real = torch.ones(2, length, dtype=torch.bool) if mask is None else mask.bool()
    return (out - expected).abs()[real].max().item()


HF_CASES = [  # (num_buckets, causal, num_hashes, length, padded); length 8 is one chunk (no hashing)
    (8, False, 1, 64, False), ([4, 6], False, 3, 64, True), (8, True, 1, 64, True), ([4, 6], True, 1, 64, False),
    (8, False, 4, 64, True), ([4, 6], False, 2, 8, True), (8, True, 3, 8, True),
]


@pytest.mark.parametrize("num_buckets, causal, num_hashes, length, padded", HF_CASES)
def test_matches_hf_lsh_layer_float32(num_buckets, causal, num_hashes, length, padded):
    torch.manual_seed(0)
    hf, ours = _hf_pair(num_hashes, num_buckets, causal, torch.float32)
    assert _compare_with_hf(hf, ours, length, torch.float32, padded) <= 1e-5


def test_automatic_bucket_count_matches_hf_given_the_position_range():
    # HF's config has max_position_embeddings=4096: at length 64 in chunks of 4 the count is 32, not
    # factorised; taken from the length alone the limit would be 8 and the count [4, 8].
    torch.manual_seed(3)
    hf, ours = _hf_pair(1, None, False, torch.float32, chunk=4, max_position_embeddings=4096)
    assert ours.bucket_spec(64) == 32
    assert _compare_with_hf(hf, ours, 64, torch.float32, False) <= 1e-5
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LSHSelfAttention(8, 2, 4, max_position_embeddings=0)


@pytest.mark.parametrize("num_hashes, before, after", [(1, 5, 0), (2, 9, 2), (1, 1, 4), (2, 2, 1)])
def test_windows_reaching_past_the_chunk_count_match_hf(num_hashes, before, after):
    # Length 16 in chunks of 4: 4 chunks per round. HF takes offsets of at least the chunk count as 0.
    torch.manual_seed(2)
    hf, ours = _hf_pair(num_hashes, 4, False, torch.float32, chunk=4, before=before, after=after)
    assert _compare_with_hf(hf, ours, 16, torch.float32, False) <= 1e-5


@pytest.mark.parametrize("num_buckets, num_hashes", [(8, 2), ([4, 6], 4)])
def test_matches_hf_causal_multi_round_float64(num_buckets, num_hashes):
    torch.manual_seed(1)
    hf, ours = _hf_pair(num_hashes, num_buckets, True, torch.float64)
    for padded in (False, True):
        assert _compare_with_hf(hf, ours, 48, torch.float64, padded) <= 1e-10


@pytest.mark.parametrize("num_hashes", [2, 3, 4])
def test_causal_multi_round_matches_hf_float32_where_a_token_sees_only_itself(num_hashes):
    # Causal position 0 sees only itself in every round: its log-sum-exps sit at the self-mask value
    # (-1e5), where float32's spacing is 0.008, so how they are rounded shows in its output (HF's round
    # weights sum to 1 within 0.4 %). With 3 hashes position 0 also appears twice in one window.
    torch.manual_seed(0)
    hf, ours = _hf_pair(num_hashes, 4, True, torch.float32, chunk=16)
    hidden = torch.randn(1, 64, 32)
    with torch.no_grad(), torch.random.fork_rng():
        expected = ours.output(hf(hidden).hidden_states)
    with torch.no_grad():
        out = ours(hidden)
    assert (out - expected).abs().max() <= 1e-5
    with torch.no_grad():
        values = ours.output(ours.value(hidden[:, :1]))
    assert (out[:, 0] - values[:, 0]).abs().max() > 1e-5  # the case at hand: not exactly its own value


def test_causal_model_with_two_hash_rounds_matches_hf_float32():
    transformers = pytest.importorskip("transformers")
    from torch_reformer.model import ReformerLM

    config = transformers.ReformerConfig(
        is_decoder=True, hash_seed=0, num_hashes=2, num_buckets=4, attn_layers=["lsh", "lsh"], hidden_size=256,
        num_attention_heads=2, attention_head_size=64, feed_forward_size=256, lsh_attn_chunk_length=32,
        axial_pos_shape=[8, 16], axial_pos_embds_dim=[64, 192], max_position_embeddings=128, vocab_size=40,
    )  # position 0's value rounded as HF rounds it moved these logits by 1.7e-4
    torch.manual_seed(0)
    theirs = transformers.ReformerModelWithLMHead(config).eval()
    ours = ReformerLM.from_hf(theirs).eval()
    ids = torch.randint(0, 40, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.random.fork_rng():
        expected = theirs(ids).logits
    with torch.no_grad():
        logits = ours(ids).logits
    assert (logits - expected).abs().max() <= 1e-4


def test_sorted_order_is_hf_order_with_or_without_the_padding_bucket():
    ids = torch.randint(0, 4, (1, 1, 3, 16))
    sorted_positions = sort_by_bucket(ids).flatten(2)
    for offset in (4, 5):  # HF offsets rounds by num_buckets, or num_buckets + 1 when padding exists
        keys = (ids + torch.arange(3).view(1, 1, 3, 1) * offset).flatten(2)
        hf_order = torch.argsort(keys * 48 + torch.arange(48), dim=-1) % 16
        assert torch.equal(sorted_positions, hf_order)
