"""Layers against simple references: a materialised axial table, the unchunked feed-forward,
full-logit cross-entropy, and Hugging Face's modules where they exist."""

import math

import pytest
import torch
import torch.nn.functional as F

from torch_reformer.layers import (
    AxialPositionalEmbedding,
    ChunkedFeedForward,
    LearnedPositionalEmbedding,
    LMHead,
    chunked_recompute,
    feed_forward,
    get_activation,
    lm_head_loss,
)


def _hf_config(**overrides):
    transformers = pytest.importorskip("transformers")
    return transformers.ReformerConfig(**overrides)


def _hf_modeling():
    pytest.importorskip("transformers")
    from transformers.models.reformer import modeling_reformer

    return modeling_reformer


# ---------------------------------------------------------------------------- axial embeddings


def _materialised_axial_table(module):
    """The whole (prod(shape), sum(dims)) table, built by broadcasting as the definition says."""
    shape = module.axial_pos_shape
    expanded = [weight.expand(*shape, weight.shape[-1]) for weight in module.weights]
    return torch.cat(expanded, dim=-1).reshape(math.prod(shape), -1)


@pytest.mark.parametrize(
    "shape, dims",
    [((24,), (6,)), ((4, 6), (3, 5)), ((3, 4, 5), (2, 3, 4))],
)
def test_axial_matches_materialised_table_for_any_offsets_and_lengths(shape, dims):
    torch.manual_seed(0)
    module = AxialPositionalEmbedding(shape, dims).double()
    capacity = math.prod(shape)
    table = _materialised_axial_table(module)
    for position_ids in (
        torch.arange(capacity),  # full length
        torch.arange(capacity - 7),  # shorter than the product
        torch.arange(5, capacity),  # decoding offset
        torch.tensor([[0, 3, capacity - 1], [7, 7, 2]]),  # batched, arbitrary
    ):
        torch.testing.assert_close(module(position_ids), table[position_ids], rtol=0, atol=0)
    module.eval()
    torch.testing.assert_close(module(torch.arange(3, 9)[None]), table[3:9][None], rtol=0, atol=0)


def test_axial_gradient_equals_reference():
    torch.manual_seed(0)
    module = AxialPositionalEmbedding((3, 4, 5), (2, 3, 4)).double()
    position_ids = torch.tensor([[0, 1, 17, 59, 17], [30, 31, 2, 2, 44]])
    upstream = torch.randn(2, 5, 9, dtype=torch.float64)
    ours = torch.autograd.grad((module(position_ids) * upstream).sum(), list(module.weights))
    reference = torch.autograd.grad(
        (_materialised_axial_table(module)[position_ids] * upstream).sum(), list(module.weights)
    )
    for got, expected in zip(ours, reference):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_axial_layout_and_errors():
    module = AxialPositionalEmbedding((4, 8), (6, 10))
    assert [tuple(w.shape) for w in module.weights] == [(4, 1, 6), (1, 8, 10)]
    with pytest.raises(ValueError, match=r"sequence length 33 exceeds the axial positional embedding's capacity "
                                         r"prod\(\(4, 8\)\)=32: increase axial_pos_shape"):
        module(torch.arange(33))
    with pytest.raises(ValueError, match="must be >= 0"):
        module(torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="integer tensor"):
        module(torch.arange(4.0))
    with pytest.raises(ValueError, match="equal length"):
        AxialPositionalEmbedding((4, 8), (16,))


def test_axial_equals_hf_in_eval_and_training():
    modeling = _hf_modeling()
    config = _hf_config(
        axial_pos_shape=(4, 8), axial_pos_embds_dim=(6, 10), hidden_size=16, hidden_dropout_prob=0.0,
        attn_layers=["local"], local_attn_chunk_length=4,
    )
    torch.manual_seed(0)
    theirs = modeling.AxialPositionEmbeddings(config)
    ours = AxialPositionalEmbedding((4, 8), (6, 10))
    ours.load_state_dict(theirs.state_dict())  # same layout, same names
    for weight in ours.weights:
        weight.data.normal_()
    theirs.load_state_dict(ours.state_dict())
    theirs.eval()
    position_ids = torch.tensor([[5, 6, 7, 8, 9, 10], [20, 21, 22, 23, 24, 25]])
    torch.testing.assert_close(ours(position_ids), theirs(position_ids), rtol=0, atol=0)
    theirs.train()  # HF trains only at exactly the product length
    full = torch.arange(32).expand(2, 32)
    torch.testing.assert_close(ours(full), theirs(full), rtol=0, atol=0)


def test_learned_embedding():
    torch.manual_seed(0)
    module = LearnedPositionalEmbedding(10, 4)
    assert list(module.state_dict()) == ["embedding.weight"]
    position_ids = torch.tensor([[0, 9, 3], [4, 4, 1]])
    torch.testing.assert_close(module(position_ids), module.embedding.weight[position_ids], rtol=0, atol=0)
    with pytest.raises(ValueError, match="sequence length 11 exceeds the learned positional embedding's capacity "
                                         "max_position_embeddings=10: increase max_position_embeddings"):
        module(torch.arange(11))


# ---------------------------------------------------------------------------- feed-forward


def _grads(module, hidden, upstream, **kwargs):
    output = module(hidden, **kwargs)
    inputs = ([hidden] if hidden.requires_grad else []) + list(module.parameters())
    return output, torch.autograd.grad(output, inputs, upstream)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("chunk_size, length", [(4, 13), (5, 15), (1, 3), (16, 13)])
def test_chunked_feed_forward_equals_unchunked(dtype, tolerance, chunk_size, length):
    torch.manual_seed(0)
    module = ChunkedFeedForward(8, 24, "gelu_new", dropout=0.0, chunk_size=chunk_size).to(dtype)
    hidden = torch.randn(2, length, 8, dtype=dtype, requires_grad=True)
    upstream = torch.randn(2, length, 8, dtype=dtype)
    chunked, chunked_grads = _grads(module, hidden, upstream, attention_mask=None)
    module.chunk_size = 0
    plain, plain_grads = _grads(module, hidden, upstream)
    torch.testing.assert_close(chunked, plain, rtol=tolerance, atol=tolerance)
    for got, expected in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_chunked_feed_forward_parameter_grads_when_input_is_constant():
    torch.manual_seed(0)
    module = ChunkedFeedForward(8, 24, chunk_size=3).double()
    hidden = torch.randn(3, 10, 8, dtype=torch.float64)  # requires no grad
    upstream = torch.randn(3, 10, 8, dtype=torch.float64)
    _, chunked = _grads(module, hidden, upstream)
    module.chunk_size = 0
    _, plain = _grads(module, hidden, upstream)
    for got, expected in zip(chunked, plain):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the chunk loop without autograd
        plain = module(hidden)
        module.chunk_size = 3
        torch.testing.assert_close(module(hidden), plain, rtol=1e-12, atol=1e-12)


def test_chunked_dropout_inside_an_outer_recomputation():
    # The reversible engine and torch.utils.checkpoint re-run the block in backward after
    # restoring the RNG state; the chunked backward must then still see the same masks.
    torch.manual_seed(0)
    module = ChunkedFeedForward(8, 24, dropout=0.3, chunk_size=3).double()
    hidden = torch.randn(2, 10, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 10, 8, dtype=torch.float64)
    inputs = [hidden, *module.parameters()]
    torch.manual_seed(7)
    direct = module(hidden)
    direct_grads = torch.autograd.grad(direct, inputs, upstream)
    torch.manual_seed(7)
    recomputed = torch.utils.checkpoint.checkpoint(module, hidden, use_reentrant=False)
    recomputed_grads = torch.autograd.grad(recomputed, inputs, upstream)
    torch.testing.assert_close(recomputed, direct, rtol=0, atol=0)
    for got, want in zip(recomputed_grads, direct_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_chunked_feed_forward_never_holds_the_whole_intermediate():
    torch.manual_seed(0)
    module = ChunkedFeedForward(8, 24, chunk_size=4)
    seen_lengths = []

    def recording_relu(inner):
        seen_lengths.append(inner.shape[-2])
        return F.relu(inner)

    module.activation = recording_relu
    hidden = torch.randn(2, 12, 8, requires_grad=True)
    module(hidden).sum().backward()
    assert seen_lengths == [4] * 6  # three chunks in forward, three recomputed in backward


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_chunked_feed_forward_backward_skips_the_last_linear(dropout):
    """Backward recomputes each chunk up to the activation only: its matmul work is five sixths of
    a full recompute's (generic ``backward_by_chunks``), and the gradients are the same."""
    from torch.utils.flop_counter import FlopCounterMode

    module = ChunkedFeedForward(8, 24, dropout=dropout, chunk_size=4).double()
    hidden = torch.randn(2, 12, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 12, 8, dtype=torch.float64)
    fn, params = module._function_and_params()
    results = []
    for backward in ("feed-forward", "generic"):
        torch.manual_seed(5)
        if backward == "generic":
            out = chunked_recompute(fn, hidden, params, 4)
        else:
            out = module(hidden)
        with FlopCounterMode(display=False) as counter:
            grads = torch.autograd.grad(out, (hidden, *params), upstream)
        results.append((counter.get_total_flops(), grads))
    (fast_flops, fast_grads), (generic_flops, generic_grads) = results
    assert fast_flops * 6 == generic_flops * 5
    for fast, generic in zip(fast_grads, generic_grads):
        torch.testing.assert_close(fast, generic, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size, length", [(4, 10), (0, 10), (16, 10)])
@pytest.mark.parametrize("needs_input", [True, False])
def test_one_pass_rebuild_and_backward_equals_forward_then_backward(chunk_size, length, needs_input):
    """The engine's one-pass hook: ``subtract_from`` loses exactly the block's output and the
    gradients equal those of a forward + backward under the same RNG state (dropout on)."""
    torch.manual_seed(0)
    module = ChunkedFeedForward(8, 24, dropout=0.3, chunk_size=chunk_size).double()
    module.dense.bias.requires_grad_(False)  # a frozen parameter gets no gradient
    hidden = torch.randn(2, length, 8, dtype=torch.float64, requires_grad=needs_input)
    upstream = torch.randn(2, length, 8, dtype=torch.float64)
    stream = torch.randn(2, length, 8, dtype=torch.float64)
    trainable = [p for p in module.parameters() if p.requires_grad]
    wanted = [hidden, *module.parameters()]

    torch.manual_seed(11)
    output = module(hidden)
    expected = torch.autograd.grad(output, ([hidden] if needs_input else []) + trainable, upstream)
    torch.manual_seed(11)
    rebuilt = stream.clone()
    with torch.no_grad():  # the engine's backward runs with grad mode off
        found = module.rebuild_and_backward([hidden], upstream, wanted, rebuilt, attention_mask=None)

    torch.testing.assert_close(rebuilt, stream - output, rtol=0, atol=1e-14)
    assert (output == 0).any()  # dropout acted, so the masks had to repeat
    assert len(found) == len(wanted)
    assert (found[0] is not None) == needs_input
    assert found[next(i for i, item in enumerate(wanted) if item is module.dense.bias)] is None
    got = [grad for grad in found if grad is not None]
    assert len(got) == len(expected)
    for grad, want in zip(got, expected):
        torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)


def test_reversible_model_uses_the_one_pass_feed_forward_backward():
    """In the engine's backward each feed-forward chunk runs once (rebuild and gradient together),
    not twice (a rebuild pass, then a recompute inside the chunked backward)."""
    from torch_reformer.config import ReformerConfig
    from torch_reformer.model import ReformerLM

    config = ReformerConfig.from_preset("tiny", is_decoder=True, chunk_size_feed_forward=8, memory_mode="reversible")
    model = ReformerLM(config)
    seen_lengths = []

    def recording_relu(inner):
        seen_lengths.append(inner.shape[-2])
        return F.relu(inner)

    for layer in model.reformer.layers:
        layer.feed_forward.activation = recording_relu
    ids = torch.randint(0, config.vocab_size, (1, 32))
    loss = model(ids, labels=ids, return_logits=False).loss
    forward_calls = len(seen_lengths)
    assert forward_calls == 4 * len(config.attn_layers) and set(seen_lengths) == {8}
    loss.backward()
    assert len(seen_lengths) == 2 * forward_calls  # one pass per chunk in backward


def test_chunked_dropout_matches_chunkwise_reference_and_replays_in_backward():
    torch.manual_seed(0)
    chunk_size, length = 4, 10
    module = ChunkedFeedForward(8, 24, "relu", dropout=0.3, chunk_size=chunk_size).double()
    hidden = torch.randn(2, length, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, length, 8, dtype=torch.float64)
    params = list(module.parameters())

    torch.manual_seed(123)
    output, grads = _grads(module, hidden, upstream)
    state_after_forward_and_backward = torch.get_rng_state()

    torch.manual_seed(123)  # reference: the same chunk-wise dropout draws, plain autograd
    reference = torch.cat(
        [
            feed_forward(hidden[:, start : start + chunk_size], *params, activation=F.relu, dropout=0.3,
                         layer_norm_eps=1e-12)
            for start in range(0, length, chunk_size)
        ],
        dim=1,
    )
    reference_grads = torch.autograd.grad(reference, [hidden, *params], upstream)
    torch.testing.assert_close(output, reference, rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # backward replays the forward's draws without moving the global generator
    assert torch.equal(state_after_forward_and_backward, torch.get_rng_state())
    assert (output == 0).any()  # dropout really acted


def test_chunked_feed_forward_under_bf16_autocast():
    torch.manual_seed(0)
    module = ChunkedFeedForward(16, 32, chunk_size=4)
    hidden = torch.randn(2, 12, 16, requires_grad=True)
    upstream = torch.randn(2, 12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, grads = _grads(module, hidden, upstream)
    module.chunk_size = 0
    plain, plain_grads = _grads(module, hidden, upstream)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), plain, rtol=0.05, atol=0.05)
    for got, expected in zip(grads, plain_grads):
        assert got.dtype == expected.dtype
        assert (got - expected).norm() <= 0.03 * expected.norm()


def test_feed_forward_equals_hf_chunked_feed_forward():
    modeling = _hf_modeling()
    config = _hf_config(hidden_size=16, feed_forward_size=40, hidden_act="gelu", hidden_dropout_prob=0.0,
                        chunk_size_feed_forward=4, layer_norm_eps=1e-12)
    torch.manual_seed(0)
    theirs = modeling.ChunkReformerFeedForward(config)
    ours = ChunkedFeedForward(16, 40, "gelu", dropout=0.0, layer_norm_eps=1e-12, chunk_size=4)
    hf_names = {"dense.weight": "dense.dense.weight", "dense.bias": "dense.dense.bias",
                "output.weight": "output.dense.weight", "output.bias": "output.dense.bias"}
    ours.load_state_dict({name: theirs.state_dict()[hf_names.get(name, name)] for name in ours.state_dict()})
    hidden = torch.randn(2, 12, 16, requires_grad=True)
    upstream = torch.randn(2, 12, 16)
    expected = theirs(hidden)
    expected_grads = torch.autograd.grad(expected, [hidden, *theirs.parameters()], upstream)
    got, got_grads = _grads(ours, hidden, upstream)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    hf_order = [hf_names.get(n, n) for n, _ in ours.named_parameters()]
    expected_by_name = dict(zip([n for n, _ in theirs.named_parameters()], expected_grads[1:]))
    torch.testing.assert_close(got_grads[0], expected_grads[0], rtol=1e-5, atol=1e-6)
    for got_grad, name in zip(got_grads[1:], hf_order):
        torch.testing.assert_close(got_grad, expected_by_name[name], rtol=1e-5, atol=1e-5)


def test_feed_forward_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown activation 'gelu2'"):
        ChunkedFeedForward(8, 16, "gelu2")
    with pytest.raises(ValueError, match="chunk_size must be an int >= 0"):
        ChunkedFeedForward(8, 16, chunk_size=-2)
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\)"):
        ChunkedFeedForward(8, 16, dropout=1.0)


def test_activations_equal_hf():
    pytest.importorskip("transformers")
    from transformers.activations import ACT2FN

    from torch_reformer.config import ACTIVATION_NAMES

    values = torch.linspace(-12, 12, 241, dtype=torch.float64)  # past gelu_10's clip and relu6's cap
    compared = [name for name in ACTIVATION_NAMES if name in ACT2FN]  # older transformers lack a few names
    assert {"gelu", "relu", "gelu_new"} <= set(compared)
    for name in compared:
        torch.testing.assert_close(get_activation(name)(values), ACT2FN[name](values), rtol=1e-6, atol=1e-6,
                                   msg=name)


def test_activations_added_for_hf_configs_against_their_definitions():
    x = torch.tensor([-20.0, -3.0, -0.5, 0.0, 0.5, 3.0, 7.0, 20.0], dtype=torch.float64)
    erf_gelu = x * 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    tanh_gelu = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    torch.testing.assert_close(get_activation("gelu_python")(x), F.gelu(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(get_activation("gelu_python")(x), erf_gelu, rtol=0, atol=0)
    for name in ("gelu_accurate", "gelu_python_tanh"):
        torch.testing.assert_close(get_activation(name)(x), tanh_gelu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(get_activation("gelu_10")(x), erf_gelu.clamp(-10, 10), rtol=1e-12, atol=1e-12)
    assert get_activation("gelu_10")(x)[-1].item() == 10.0
    expected = {
        "relu6": [0, 0, 0, 0, 0.5, 3, 6, 6],
        "relu2": [0, 0, 0, 0, 0.25, 9, 49, 400],
        "hardswish": [0, 0, -0.5 * 2.5 / 6, 0, 0.5 * 3.5 / 6, 3, 7, 20],
    }
    for name, values in expected.items():
        torch.testing.assert_close(get_activation(name)(x), torch.tensor(values, dtype=x.dtype), msg=name)
    # Laplace: the normal CDF with mean 0.707107 and standard deviation 0.282095
    mean, std = torch.tensor([0.707107, 0.282095], dtype=x.dtype)
    laplace = torch.distributions.Normal(mean, std).cdf(x)
    torch.testing.assert_close(get_activation("laplace")(x), laplace, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(get_activation("sqrtsoftplus")(x), torch.log1p(torch.exp(x)).sqrt())


# ---------------------------------------------------------------------------- LM head and loss


def _loss_and_grads(loss_fn, hidden, weight, bias, labels):
    loss = loss_fn(hidden, weight, bias, labels)
    inputs = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    return loss, torch.autograd.grad(loss, inputs)


def _reference_loss(hidden, weight, bias, labels, ignore_index=-100):
    logits = hidden @ weight.T + (0 if bias is None else bias)
    return F.cross_entropy(logits.reshape(-1, weight.shape[0]), labels.reshape(-1), ignore_index=ignore_index)


def _loss_inputs(dtype, batch=2, length=9, dim=6, vocab=17, with_bias=True):
    torch.manual_seed(0)
    hidden = torch.randn(batch, length, dim, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, dim, dtype=dtype, requires_grad=True)
    bias = torch.randn(vocab, dtype=dtype, requires_grad=True) if with_bias else None
    labels = torch.randint(0, vocab, (batch, length))
    labels[0, :4] = -100
    return hidden, weight, bias, labels


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk_size", [0, 1, 4, 7, 18, 100])
@pytest.mark.parametrize("with_bias", [True, False])
def test_lm_loss_equals_cross_entropy_reference(dtype, tolerance, chunk_size, with_bias):
    hidden, weight, bias, labels = _loss_inputs(dtype, with_bias=with_bias)
    loss, grads = _loss_and_grads(lambda *a: lm_head_loss(*a, chunk_size=chunk_size), hidden, weight, bias, labels)
    expected, expected_grads = _loss_and_grads(_reference_loss, hidden, weight, bias, labels)
    torch.testing.assert_close(loss, expected, rtol=tolerance, atol=tolerance)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("chunk_size", [0, 5])
def test_lm_loss_custom_ignore_index_and_partial_requires_grad(chunk_size):
    hidden, weight, bias, labels = _loss_inputs(torch.float64)
    labels = labels.masked_fill(labels == -100, 3)  # 3 is the ignored id here
    labels[1, 2:5] = 3
    weight.requires_grad_(False)
    loss, grads = _loss_and_grads(
        lambda *a: lm_head_loss(*a, chunk_size=chunk_size, ignore_index=3), hidden, weight, bias, labels
    )
    expected, expected_grads = _loss_and_grads(
        lambda *a: _reference_loss(*a, ignore_index=3), hidden, weight, bias, labels
    )
    assert len(grads) == 2  # hidden and bias only
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="labels must lie in"):  # -100 is no longer ignored
        lm_head_loss(hidden, weight, bias, labels.masked_fill(labels == 3, -100), chunk_size, ignore_index=3)


@pytest.mark.parametrize("chunk_size", [0, 4])
def test_lm_loss_all_ignored_is_zero_with_zero_gradients(chunk_size):
    hidden, weight, bias, labels = _loss_inputs(torch.float32)
    labels.fill_(-100)
    loss, grads = _loss_and_grads(lambda *a: lm_head_loss(*a, chunk_size=chunk_size), hidden, weight, bias, labels)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(grad) == 0 for grad in grads)


def test_lm_loss_without_autograd_and_without_whole_logits():
    hidden, weight, bias, labels = _loss_inputs(torch.float64, batch=3, length=8, dim=4, vocab=40)
    expected = _reference_loss(hidden, weight, bias, labels)
    with torch.no_grad():
        torch.testing.assert_close(lm_head_loss(hidden, weight, bias, labels, chunk_size=5), expected)
    saved_shapes = []

    def record(tensor):
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
        loss = lm_head_loss(hidden, weight, bias, labels, chunk_size=5)
    loss.backward()
    assert sorted(saved_shapes) == sorted([(24, 4), (40, 4), (40,)])  # gradients only, no (24, 40) logits


def test_lm_loss_under_bf16_autocast():
    hidden, weight, bias, labels = _loss_inputs(torch.float32, length=32, dim=16, vocab=50)
    expected, expected_grads = _loss_and_grads(_reference_loss, hidden, weight, bias, labels)
    for chunk_size in (0, 8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, grads = _loss_and_grads(
                lambda *a: lm_head_loss(*a, chunk_size=chunk_size), hidden, weight, bias, labels
            )
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)
        for got, want in zip(grads, expected_grads):
            assert got.dtype == torch.float32 and torch.isfinite(got).all()
            assert (got - want).norm() <= 0.03 * want.norm()


def test_lm_loss_rejects_bad_inputs():
    hidden, weight, bias, labels = _loss_inputs(torch.float32)
    with pytest.raises(ValueError, match="labels shape"):
        lm_head_loss(hidden, weight, bias, labels[:, :-1])
    with pytest.raises(TypeError, match="integer tensor"):
        lm_head_loss(hidden, weight, bias, labels.float())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 17\)"):
        lm_head_loss(hidden, weight, bias, labels.masked_fill(labels == 1, 17), chunk_size=4)
    with pytest.raises(ValueError, match="weight must have shape"):
        lm_head_loss(hidden, weight[:, :-1], bias, labels)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 0"):
        lm_head_loss(hidden, weight, bias, labels, chunk_size=-1)


def test_lm_head_layout_logits_and_loss():
    modeling = _hf_modeling()
    torch.manual_seed(0)
    head = LMHead(12, 30)
    torch.nn.init.normal_(head.bias)
    theirs = modeling.ReformerOnlyLMHead(_hf_config(hidden_size=6, vocab_size=30))
    assert set(head.state_dict()) == {"decoder.weight", "bias"} <= set(theirs.state_dict())
    hidden = torch.randn(2, 5, 12)
    labels = torch.randint(0, 30, (2, 5))
    logits = head(hidden)
    torch.testing.assert_close(logits, hidden @ head.decoder.weight.T + head.bias)
    torch.testing.assert_close(head.loss(hidden, labels, chunk_size=3),
                               F.cross_entropy(logits.reshape(-1, 30), labels.reshape(-1)))


def test_second_derivatives_of_chunked_paths_raise_instead_of_being_wrong():
    torch.manual_seed(0)
    ff = ChunkedFeedForward(8, 16, chunk_size=4).double()
    x = torch.randn(2, 10, 8, dtype=torch.float64, requires_grad=True)
    weight, labels = torch.randn(5, 8, dtype=torch.float64), torch.randint(0, 5, (2, 10))
    for value in (ff(x).sum(), lm_head_loss(x, weight, None, labels, chunk_size=4)):
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.grad(value + x.pow(3).sum(), x, create_graph=True)


def test_bad_sizes_widths_and_position_types_get_clear_errors():
    for sizes in ((4.5, 3), ("4", 3), (True, 3)):
        with pytest.raises(TypeError, match="axial_pos_shape must hold integers"):
            AxialPositionalEmbedding(sizes, (4, 4))
    with pytest.raises(ValueError, match="inputs of width 8"):
        ChunkedFeedForward(8, 16, chunk_size=4)(torch.randn(2, 10, 6))
    axial = AxialPositionalEmbedding((4, 8), (4, 4))
    learned = LearnedPositionalEmbedding(32, 8)
    positions = torch.arange(20)
    for embedding in (axial, learned):
        assert torch.equal(embedding(positions.to(torch.uint8)), embedding(positions))
