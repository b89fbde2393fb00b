"""Local attention against a dense banded (cyclic) reference and HF; full attention against naive softmax."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_reformer.attention import banded, local
from torch_reformer.attention.chunking import chunk_layout, mask_values
from torch_reformer.attention.full import FullSelfAttention, full_attention
from torch_reformer.attention.local import LocalSelfAttention, local_attention
from torch_reformer.attention.sliced import chunked_attention

# ---------------------------------------------------------------------------------------- references


def banded_counts(length, chunk_length, before, after):
    """(L, L): how often key k is in the window of query q: q's chunk and its neighbours, the
    neighbours at offset i taken as Trax and HF take them, from the chunks rotated by list slicing."""
    if length <= chunk_length:
        return torch.ones(length, length)
    chunks = list(range(length // chunk_length))
    counts = torch.zeros(length, length)
    for query in range(length):
        for offset in range(-before, after + 1):
            chunk = (chunks[offset:] + chunks[:offset])[query // chunk_length]
            counts[query, chunk * chunk_length : (chunk + 1) * chunk_length] += 1
    return counts


def reference_local(queries, keys, values, counts, causal, key_mask):
    """Dense attention where key k counts counts[q, k] times; masked scores replaced by the mask constant."""
    length, head_size = queries.shape[2], queries.shape[3]
    scores = queries @ keys.transpose(-1, -2) / math.sqrt(head_size)  # (B, H, L, L)
    positions = torch.arange(length)
    hidden = torch.zeros(queries.shape[0], 1, length, length, dtype=torch.bool)
    if causal:
        hidden |= positions[None, :] > positions[:, None]
    if key_mask is not None:
        hidden |= ~key_mask[:, None, None, :]
    scores = scores.masked_fill(hidden, mask_values(queries.dtype)[0])
    present = counts > 0
    row_max = torch.where(present, scores, -math.inf).amax(-1, keepdim=True).detach()
    weights = torch.where(present, counts.to(scores.dtype) * torch.exp(torch.where(present, scores, row_max) - row_max), 0)
    return (weights / weights.sum(-1, keepdim=True)) @ values


def naive_full(queries, keys, values, causal, key_mask):
    """softmax(q k^T / sqrt(D)) v. A query that would see no key sees itself (causal) or, in a row
    that is all padding, every key."""
    length = queries.shape[2]
    scores = queries @ keys.transpose(-1, -2) / math.sqrt(queries.shape[3])
    visible = torch.ones(queries.shape[0], 1, length, length, dtype=torch.bool)
    if causal:
        visible &= torch.ones(length, length, dtype=torch.bool).tril()
    if key_mask is not None:
        visible &= key_mask[:, None, None, :]
        if causal:
            visible |= torch.eye(length, dtype=torch.bool) & ~visible.any(-1, keepdim=True)
        else:
            visible |= ~key_mask.any(-1)[:, None, None, None]
    return torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1) @ values


def qkv(batch, heads, length, head_size, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, head_size, generator=generator, dtype=dtype).requires_grad_()
            for _ in range(3)]


def left_and_right_padding(batch, length):
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, -3:] = False
    mask[-1, :2] = False
    return mask


def assert_same_outputs_and_grads(out, expected, inputs, out_atol=1e-12, grad_atol=1e-10):
    """``out`` equals ``expected``, and so do their gradients for one random upstream gradient."""
    assert torch.allclose(out, expected, atol=out_atol)
    probe = torch.randn_like(out)
    grads = torch.autograd.grad((out * probe).sum(), inputs)
    for grad, expected_grad in zip(grads, torch.autograd.grad((expected * probe).sum(), inputs)):
        assert torch.allclose(grad, expected_grad, atol=grad_atol)


# ---------------------------------------------------------------------------------------- local


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("before, after", [(1, 0), (2, 1), (0, 0), (0, 3), (8, 0), (1, 7)])  # 6 chunks
@pytest.mark.parametrize("padded", [False, True])
def test_local_equals_banded_reference(causal, before, after, padded):
    queries, keys, values = qkv(2, 2, 24, 5)
    key_mask = left_and_right_padding(2, 24) if padded else None
    out = local_attention(queries, keys, values, chunk_length=4, num_chunks_before=before,
                          num_chunks_after=after, causal=causal, key_mask=key_mask)
    expected = reference_local(queries, keys, values, banded_counts(24, 4, before, after), causal, key_mask)
    real = slice(None) if key_mask is None else key_mask[:, None, :, None].expand_as(out)
    assert torch.allclose(out[real], expected[real], atol=1e-12)
    probe = torch.randn_like(out) * (1.0 if key_mask is None else key_mask[:, None, :, None])
    grads = torch.autograd.grad((out * probe).sum(), (queries, keys, values))
    for grad, expected_grad in zip(grads, torch.autograd.grad((expected * probe).sum(), (queries, keys, values))):
        assert torch.allclose(grad, expected_grad, atol=1e-10)


def test_query_whose_window_is_all_padding_averages_its_window():
    # transformers' weights for such a query sum to the window size, not 1 (its log-sum-exp of
    # equal -1e9 scores rounds away log(window)); ours are a proper average.
    queries, keys, values = qkv(1, 2, 16, 5)
    key_mask = torch.ones(1, 16, dtype=torch.bool)
    key_mask[0, 4:12] = False  # chunk 2 (positions 8-11) sees chunks 1 and 2: padding only
    out = local_attention(queries, keys, values, chunk_length=4, num_chunks_before=1, key_mask=key_mask)
    expected = values[:, :, 4:12].mean(dim=2, keepdim=True).expand(-1, -1, 4, -1)
    torch.testing.assert_close(out[:, :, 8:12], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_gradients_of_queries_whose_window_is_all_padding(dtype, atol):
    """Such a query's log-sum-exp is about the mask constant (-1e9; spacing 64 in float32), so
    probabilities rebuilt from it in backward would each be 1 instead of 1/window: the value
    gradients came out window-size times too large. Checked with every output scored, padded ones
    included, against the dense reference in float64."""
    queries, keys, values = qkv(2, 2, 16, 5)
    key_mask = torch.ones(2, 16, dtype=torch.bool)
    key_mask[0, 4:12] = False  # row 0: positions 8-11 see only padding (chunk 4, one chunk before)
    key_mask[1] = False  # row 1: every window is padding
    inputs = [x.detach().to(dtype).requires_grad_() for x in (queries, keys, values)]
    out = local_attention(*inputs, chunk_length=4, num_chunks_before=1, key_mask=key_mask)
    expected = reference_local(queries, keys, values, banded_counts(16, 4, 1, 0), False, key_mask)
    probe = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out.double() * probe).sum(), inputs)
    for grad, expected_grad in zip(grads, torch.autograd.grad((expected * probe).sum(), (queries, keys, values))):
        torch.testing.assert_close(grad.double(), expected_grad, rtol=0, atol=atol)


@pytest.mark.parametrize("kind", ["local", "lsh"])
def test_chunking_attributes_set_after_construction_are_checked_when_called(kind):
    from torch_reformer.attention.lsh import LSHSelfAttention

    layer = (LocalSelfAttention(8, 2, 4, chunk_length=4, causal=True) if kind == "local"
             else LSHSelfAttention(8, 2, 4, chunk_length=4, causal=True, hash_seed=0))
    x = torch.randn(1, 12, 8)
    for name, value, message in (("num_chunks_before", -1, "num_chunks_before must be an int >= 0"),
                                 ("chunk_length", 0, "chunk_length must be a positive int")):
        original = getattr(layer, name)
        setattr(layer, name, value)
        for call in (lambda: layer(x), lambda: layer.padded_length(12)):
            with pytest.raises(ValueError, match=message):
                call()
        setattr(layer, name, original)
    assert layer(x).shape == x.shape


@pytest.mark.parametrize("length, chunk", [(37, 8), (6, 8), (97, 8)])
def test_local_module_pads_internally(length, chunk):
    torch.manual_seed(0)
    layer = LocalSelfAttention(12, 3, 4, chunk_length=chunk, causal=False).double()
    hidden = torch.randn(2, length, 12, dtype=torch.float64)
    padded = length if length <= chunk else -(-length // chunk) * chunk
    hidden_padded = torch.nn.functional.pad(hidden, (0, 0, 0, padded - length))
    mask = torch.arange(padded)[None, :].expand(2, padded) < length

    def heads(projection):
        return projection(hidden_padded).view(2, padded, 3, 4).transpose(1, 2)

    attended = reference_local(heads(layer.query), heads(layer.key), heads(layer.value),
                               banded_counts(padded, chunk, 1, 0), False, mask)
    expected = layer.output(attended.transpose(1, 2).reshape(2, padded, 12))[:, :length]
    assert torch.allclose(layer(hidden), expected, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("before, after, length", [(1, 0, 32), (2, 1, 32), (1, 0, 8), (5, 0, 32), (1, 6, 32)])
def test_local_matches_hf(causal, before, after, length):
    transformers = pytest.importorskip("transformers")
    from transformers.models.reformer.modeling_reformer import LocalSelfAttention as HFLocal

    config = transformers.ReformerConfig(
        hidden_size=32, num_attention_heads=2, attention_head_size=16, local_attn_chunk_length=8,
        local_num_chunks_before=before, local_num_chunks_after=after, is_decoder=causal, attn_layers=["local"],
        local_attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    hf = HFLocal(config).eval()
    ours = LocalSelfAttention(32, 2, 16, chunk_length=8, num_chunks_before=before, num_chunks_after=after,
                              causal=causal).eval()
    for name in ("query", "key", "value"):
        getattr(ours, name).weight.data.copy_(getattr(hf, name).weight)
    hidden = torch.randn(2, length, 32)
    mask = left_and_right_padding(2, length)
    with torch.no_grad():
        for attention_mask in (None, mask.long()):
            expected = ours.output(hf(hidden, attention_mask=attention_mask).hidden_states)
            # Rows of padded queries whose every key is masked are HF float32 rounding noise: compare real rows.
            assert (ours(hidden, attention_mask) - expected)[mask].abs().max() <= 1e-5


# ------------------------------------------------------------------- local: the banded (fused-kernel) path


def sliced_local(queries, keys, values, chunk_length, before, after, causal):
    """Local attention through the sliced core, the path padded or dropout calls take."""
    batch, heads, length, head_size = queries.shape
    identity = torch.arange(length).expand(batch, heads, 1, length)
    layout = chunk_layout(identity, chunk_length, before, after)
    return chunked_attention(queries, keys, values, layout, causal=causal, self_mask=False,
                             key_scale=1 / math.sqrt(head_size))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length, chunk, before, after", [(64, 4, 1, 0), (64, 4, 2, 1), (12, 4, 2, 2), (8, 4, 1, 0),
                                                          (40, 8, 0, 2), (16, 4, 5, 0), (16, 4, 2, 6)])
def test_banded_path_equals_sliced_core_across_many_slices(monkeypatch, causal, length, chunk, before, after):
    # A tiny slice budget makes every slice one or two chunks, so the first and last slices wrap
    # around and the middle ones use the shared interior mask.
    monkeypatch.setattr(banded, "SLICE_WINDOW_ELEMENTS", 3 * (before + 1 + after) * chunk * 5)
    queries, keys, values = qkv(2, 3, length, 5, seed=7)
    out = local_attention(queries, keys, values, chunk_length=chunk, num_chunks_before=before,
                          num_chunks_after=after, causal=causal)
    expected = sliced_local(queries, keys, values, chunk, before, after, causal)
    assert_same_outputs_and_grads(out, expected, (queries, keys, values))


def test_banded_path_groups_short_sequences_of_several_batch_rows(monkeypatch):
    # Room for two whole sequences per kernel call: batch rows 0-1, 2-3 and 4 go in three parts.
    heads, length, chunk, head_size = 3, 16, 4, 5
    monkeypatch.setattr(banded, "SLICE_WINDOW_ELEMENTS", 2 * heads * 2 * chunk * head_size * (length // chunk))
    queries, keys, values = qkv(5, heads, length, head_size, seed=4)
    out = local_attention(queries, keys, values, chunk_length=chunk, causal=True)
    expected = sliced_local(queries, keys, values, chunk, 1, 0, True)
    assert_same_outputs_and_grads(out, expected, (queries, keys, values))


def test_banded_path_gradcheck_fp64():
    queries, keys, values = qkv(2, 2, 12, 3, seed=1)
    for causal in (False, True):
        assert torch.autograd.gradcheck(
            lambda q, k, v: banded.banded_attention(q, k, v, chunk_length=4, num_chunks_before=1, num_chunks_after=1,
                                                    causal=causal, scale=0.5),
            (queries, keys, values), fast_mode=True,
        )


def test_banded_path_reads_and_writes_the_projection_layout():
    # Per-head inputs are views of (B, L, H*D) projections; the output comes back in the same
    # layout, so merging heads for the output projection is free.
    projected = torch.randn(2, 32, 3 * 2 * 4, dtype=torch.float64)
    queries, keys, values = (x.view(2, 32, 2, 4).transpose(1, 2) for x in projected.split(8, dim=-1))
    out = local_attention(queries, keys, values, chunk_length=8, causal=True)
    assert out.transpose(1, 2).is_contiguous()
    assert torch.allclose(out, sliced_local(queries, keys, values, 8, 1, 0, True), atol=1e-12)


def test_banded_path_backward_twice_and_no_in_place_change_of_its_output():
    queries, keys, values = qkv(1, 2, 16, 4, seed=2)
    out = local_attention(queries, keys, values, chunk_length=4, causal=True)
    probe = torch.randn_like(out)
    first = torch.autograd.grad((out * probe).sum(), (queries, keys, values), retain_graph=True)
    second = torch.autograd.grad((out * probe).sum(), (queries, keys, values))  # rebuilds the dropped output
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(first, second))
    # The output is a view made inside the autograd Function, so autograd refuses in-place changes
    # (with or without grad mode); the alias backward keeps of it cannot go stale.
    out = local_attention(queries, keys, values, chunk_length=4, causal=True)
    with pytest.raises(RuntimeError, match="clon"):
        out.mul_(2)
    with torch.no_grad():
        out.mul_(2)
    with pytest.raises(RuntimeError, match="clon"):
        out.sum().backward()


def test_local_attention_takes_the_banded_path_only_where_it_applies(monkeypatch):
    calls = []
    real = local.banded_attention
    monkeypatch.setattr(local, "banded_attention", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    queries, keys, values = (x.detach() for x in qkv(1, 2, 16, 4))
    local_attention(queries, keys, values, chunk_length=4, causal=True)
    assert calls == [1]
    # Padding and attention dropout in training go through the sliced core.
    local_attention(queries, keys, values, chunk_length=4, causal=True, key_mask=torch.ones(1, 16, dtype=torch.bool))
    local_attention(queries, keys, values, chunk_length=4, causal=True, dropout=0.1, training=True)
    local_attention(queries, keys, values, chunk_length=4, causal=True, dropout=0.1, training=False)
    assert calls == [1, 1]
    assert not banded.banded_attention_applies(torch.empty(1, device="meta"), None, 0.0, False)
    monkeypatch.setattr(banded, "_FLASH_KERNELS", None)  # a torch build without the fused CPU kernel
    assert not banded.banded_attention_applies(queries, None, 0.0, False)
    local_attention(queries, keys, values, chunk_length=4, causal=True)
    assert calls == [1, 1]


# ---------------------------------------------------------------------------------------- full


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_full_equals_naive_softmax_attention(causal, padded):
    queries, keys, values = qkv(3, 3, 19, 8)
    key_mask = None
    if padded:
        key_mask = left_and_right_padding(3, 19)
        key_mask[1] = False  # a row that is all padding
    out = full_attention(queries, keys, values, causal=causal, key_mask=key_mask)
    expected = naive_full(queries, keys, values, causal, key_mask)
    assert_same_outputs_and_grads(out, expected, (queries, keys, values))


def test_full_module_is_projections_around_naive_attention():
    torch.manual_seed(0)
    layer = FullSelfAttention(12, 3, 4, causal=True).double()
    hidden = torch.randn(2, 9, 12, dtype=torch.float64)

    def heads(projection):
        return projection(hidden).view(2, 9, 3, 4).transpose(1, 2)

    attended = naive_full(heads(layer.query), heads(layer.key), heads(layer.value), True, None)
    assert torch.allclose(layer(hidden), layer.output(attended.transpose(1, 2).reshape(2, 9, 12)), atol=1e-12)


# ---------------------------------------------------------------------------------------- shared properties


@settings(max_examples=12, deadline=None)
@given(
    kind=st.sampled_from(["local", "full"]),
    length=st.integers(2, 40),
    chunk=st.integers(1, 9),
    before=st.integers(0, 2),
    after=st.integers(0, 2),
    heads=st.integers(1, 3),
    cut=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_causal_layers_never_look_ahead(kind, length, chunk, before, after, heads, cut, seed):
    torch.manual_seed(seed)
    if kind == "local":
        layer = LocalSelfAttention(8, heads, 4, chunk_length=chunk, num_chunks_before=before,
                                   num_chunks_after=after, causal=True).double()
    else:
        layer = FullSelfAttention(8, heads, 4, causal=True).double()
    hidden = torch.randn(1, length, 8, dtype=torch.float64)
    position = int(cut * (length - 1))
    changed = hidden.clone()
    changed[:, position + 1 :] = torch.randn(1, length - position - 1, 8, dtype=torch.float64)
    assert torch.allclose(layer(hidden)[:, : position + 1], layer(changed)[:, : position + 1], atol=1e-12)


def test_gradcheck_local_and_full_fp64():
    torch.manual_seed(0)
    hidden = torch.randn(1, 10, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 8 + [False] * 2])
    local = LocalSelfAttention(4, 2, 2, chunk_length=4, causal=True).double()
    full = FullSelfAttention(4, 2, 2, causal=False).double()
    assert torch.autograd.gradcheck(lambda x: local(x, mask), (hidden,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: full(x, mask), (hidden,), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind, padded", [("local", True), ("local", False), ("full", True)])
def test_half_precision_within_twice_the_naive_error(dtype, kind, padded):
    queries, keys, values = (x.detach().to(dtype) for x in qkv(1, 2, 64, 16, seed=3))
    key_mask = left_and_right_padding(1, 64) if padded else torch.ones(1, 64, dtype=torch.bool)
    if kind == "local":
        counts = banded_counts(64, 8, 1, 0)
        ours = local_attention(queries, keys, values, chunk_length=8, causal=True, key_mask=key_mask if padded else None)
        exact = reference_local(queries.double(), keys.double(), values.double(), counts, True, key_mask)
        naive = reference_local(queries, keys, values, counts, True, key_mask)
    else:
        ours = full_attention(queries, keys, values, causal=True, key_mask=key_mask)
        exact = naive_full(queries.double(), keys.double(), values.double(), True, key_mask)
        naive = naive_full(queries, keys, values, True, key_mask)
    assert ours.dtype == dtype and torch.isfinite(ours).all()
    real = key_mask[:, None, :, None].expand_as(ours)
    assert (ours.double() - exact)[real].abs().max() <= 2 * (naive.double() - exact)[real].abs().max()


def test_padding_invariance():
    torch.manual_seed(0)
    hidden = torch.randn(2, 21, 8, dtype=torch.float64)
    extra = torch.randn(2, 11, 8, dtype=torch.float64)
    longer = torch.cat([hidden, extra], dim=1)
    mask = torch.arange(32)[None, :].expand(2, 32) < 21
    # Full attention and causal local attention: any amount of appended padding changes nothing.
    for layer in (FullSelfAttention(8, 2, 4).double(), FullSelfAttention(8, 2, 4, causal=True).double(),
                  LocalSelfAttention(8, 2, 4, chunk_length=4, causal=True).double()):
        assert torch.allclose(layer(longer, mask)[:, :21], layer(hidden), atol=1e-12)
    # Non-causal local attention wraps around, so the padding must stop at the chunk multiple it would use.
    local = LocalSelfAttention(8, 2, 4, chunk_length=8).double()
    to_multiple = longer[:, :24]
    assert torch.allclose(local(to_multiple, mask[:, :24])[:, :21], local(hidden), atol=1e-12)


def test_dropout_acts_only_in_training():
    torch.manual_seed(0)
    hidden = torch.randn(1, 16, 8)
    for layer in (LocalSelfAttention(8, 2, 4, chunk_length=4, dropout=0.5), FullSelfAttention(8, 2, 4, dropout=0.5)):
        evaluated = layer.eval()(hidden)
        layer.train()
        torch.manual_seed(3)
        dropped = layer(hidden)
        torch.manual_seed(3)
        assert torch.equal(layer(hidden), dropped) and not torch.allclose(dropped, evaluated)


@pytest.mark.parametrize("length", [10, 12, 3])  # padded, a chunk multiple (the banded path), one chunk
@pytest.mark.parametrize("masked", [False, True])
def test_an_empty_batch_gives_an_empty_output(length, masked):
    for layer in (LocalSelfAttention(8, 2, 4, chunk_length=4), FullSelfAttention(8, 2, 4)):
        hidden = torch.randn(0, length, 8, requires_grad=True)
        out = layer(hidden, torch.ones(0, length) if masked else None)
        out.sum().backward()
        assert out.shape == hidden.grad.shape == (0, length, 8)


def test_bad_input_is_refused_with_a_clear_message():
    for layer in (LocalSelfAttention(8, 2, 4), FullSelfAttention(8, 2, 4)):
        with pytest.raises(ValueError, match="hidden_size=8"):
            layer(torch.randn(1, 4, 7))
        with pytest.raises(ValueError, match="attention_mask has shape"):
            layer(torch.randn(2, 4, 8), torch.ones(2, 5))
        with pytest.raises(TypeError, match="attention_mask"):
            layer(torch.randn(2, 4, 8), [[1, 1, 1, 1]] * 2)
        with pytest.raises(ValueError, match="1/True for real tokens"):
            layer(torch.randn(2, 4, 8), torch.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="num_heads"):
        FullSelfAttention(8, 0)
    with pytest.raises(ValueError, match="num_chunks_before"):
        LocalSelfAttention(8, 2, 4, num_chunks_before=-1)
    with pytest.raises(ValueError, match="multiple of chunk_length"):
        local_attention(*(torch.randn(1, 1, 6, 2) for _ in range(3)), chunk_length=4)
