"""The reversible engine against plain autograd through the same computation."""

import gc
import math
import warnings
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_reformer.layers import ChunkedFeedForward
from torch_reformer.reversible import (
    MEMORY_MODES,
    ReversibleSequential,
    additive_coupling_forward,
    additive_coupling_inverse,
    is_recomputing,
    reversible_forward,
    saved_state,
)

SAVING_MODES = ("reversible", "checkpoint")


def mlp_block(width: int, hidden: int, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(
        nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width)
    )


class NoisyBlock(nn.Module):
    """Draws fresh Gaussian noise from the global RNG on every call (like LSH rotations)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.linear(x)) * (1 + torch.randn_like(x))


class Recorder(nn.Module):
    """Records the inputs it sees, split by whether the engine is re-running it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen = {False: [], True: []}

    def forward(self, x, **kwargs):
        self.seen[is_recomputing()].append(
            {"input": x.detach().clone(), "autocast": torch.is_autocast_enabled("cpu"), "kwargs": kwargs}
        )
        return self.inner(x)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def train_step(model: nn.Module, x: torch.Tensor, seed: int = 0, **kwargs):
    """Output, input gradient and parameter gradients of one weighted-sum loss."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out = model(x, **kwargs)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weights).sum().backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return out.detach(), x.grad.clone(), grads


def assert_modes_match(model: nn.Module, x: torch.Tensor, tolerance: float, modes=SAVING_MODES, **kwargs):
    model.memory_mode = "autograd"
    expected = train_step(model, x, **kwargs)
    for mode in modes:
        model.memory_mode = mode
        out, x_grad, grads = train_step(model, x, **kwargs)
        assert relative_error(out, expected[0]) <= tolerance, mode
        assert relative_error(x_grad, expected[1]) <= tolerance, mode
        for got, want in zip(grads, expected[2]):
            assert relative_error(got, want) <= tolerance, mode
    return expected


def mixed_blocks(width: int, depth: int) -> list:
    blocks = [mlp_block(width, 2 * width, dropout=0.2) for _ in range(depth)]
    blocks[1] = NoisyBlock(width)
    return blocks


@pytest.mark.parametrize("depth", [1, 4, 5])
def test_fp64_gradients_match_autograd_with_dropout_and_noise(depth):
    torch.manual_seed(0)
    blocks = mixed_blocks(6, max(depth, 2))[:depth]
    model = ReversibleSequential(*blocks).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    assert_modes_match(model, x, 1e-10)


def test_fp32_gradients_match_autograd_over_12_blocks():
    torch.manual_seed(0)
    model = ReversibleSequential(*mixed_blocks(16, 12))
    x = torch.randn(2, 9, 32)
    assert_modes_match(model, x, 1e-4)


def test_rebuilt_inputs_equal_the_true_inputs():
    torch.manual_seed(0)
    blocks = [Recorder(mlp_block(4, 8, dropout=0.1)) for _ in range(6)]
    model = ReversibleSequential(*blocks).double()
    train_step(model, torch.randn(3, 8, dtype=torch.float64))
    for block in blocks:
        (forward,), (rebuilt,) = block.seen[False], block.seen[True]
        torch.testing.assert_close(rebuilt["input"], forward["input"], rtol=1e-12, atol=1e-12)


def test_parameters_get_gradients_when_the_input_needs_none():
    torch.manual_seed(0)
    model = ReversibleSequential(*[mlp_block(4, 8) for _ in range(3)]).double()
    x = torch.randn(2, 8, dtype=torch.float64)  # requires_grad=False
    model.memory_mode = "autograd"
    model(x).square().sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    for mode in SAVING_MODES:
        model.zero_grad(set_to_none=True)
        model.memory_mode = mode
        model(x).square().sum().backward()
        for param, want in zip(model.parameters(), expected):
            assert param.grad is not None, mode
            torch.testing.assert_close(param.grad, want, rtol=1e-10, atol=1e-12)


def test_leaf_input_gradient_is_not_doubled():
    """y = x + f(x2) with f = 0 is the identity: each input gradient is exactly the output gradient."""
    zero_blocks = [nn.Linear(3, 3) for _ in range(4)]
    for block in zero_blocks:
        nn.init.zeros_(block.weight)
        nn.init.zeros_(block.bias)
    model = ReversibleSequential(*zero_blocks)
    x = torch.randn(5, 6, requires_grad=True)
    grad_out = torch.randn(5, 6)
    model(x).backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_caller_input_is_left_untouched(mode):
    torch.manual_seed(0)
    model = ReversibleSequential(*[mlp_block(4, 8) for _ in range(4)], memory_mode=mode)
    x = torch.randn(3, 8, requires_grad=True)
    original = x.detach().clone()
    out = model(x)
    out.sum().backward()
    assert x.shape == original.shape and torch.equal(x.detach(), original)
    assert x.untyped_storage().size() == original.untyped_storage().size()


def test_bf16_autocast_is_replayed_in_the_recomputation():
    torch.manual_seed(0)
    blocks = [Recorder(mlp_block(16, 32)) for _ in range(4)]
    model = ReversibleSequential(*blocks)
    x = torch.randn(4, 10, 32)

    def parameter_grads(mode, autocast):
        model.memory_mode = mode
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(x.requires_grad_()).square().mean()
        loss.backward()  # outside autocast, as in a usual training loop
        return [p.grad.clone() for p in model.parameters()]

    reference, reversible = parameter_grads("autograd", True), parameter_grads("reversible", True)
    fp32 = parameter_grads("autograd", False)
    assert all(seen["autocast"] for block in blocks for seen in block.seen[True])
    for got, want, other in zip(reversible, reference, fp32):
        # Replaying bf16 reproduces the bf16 reference far more closely than fp32 would.
        assert relative_error(got, want) <= 0.05 * relative_error(other, want)


def test_momentum_coupling_matches_autograd_and_its_formula():
    beta = 0.9

    def momentum_forward(other_stream, fn_out):
        return beta * other_stream + (1 - beta) * fn_out

    def momentum_inverse(output, fn_out):
        return (output - (1 - beta) * fn_out) / beta

    torch.manual_seed(0)
    blocks = [layer for _ in range(3) for layer in (nn.Linear(5, 5), nn.Identity())]
    model = ReversibleSequential(
        *blocks,
        coupling_forward=[momentum_forward, additive_coupling_forward],
        coupling_inverse=[momentum_inverse, additive_coupling_inverse],
    ).double()
    x = torch.randn(4, 10, dtype=torch.float64)
    out = assert_modes_match(model, x, 1e-10)[0]
    v, h = x[:, :5], x[:, 5:]  # velocity and position streams
    for linear in blocks[::2]:
        v = beta * v + (1 - beta) * linear(h)
        h = h + v
    torch.testing.assert_close(out, torch.cat([v, h], -1).detach(), rtol=1e-12, atol=1e-12)


def _momentum_net(beta: float, depth: int) -> ReversibleSequential:
    torch.manual_seed(0)
    return ReversibleSequential(
        *[mlp_block(16, 32) for _ in range(depth)],
        coupling_forward=lambda x, f_out: beta * x + (1 - beta) * f_out,
        coupling_inverse=lambda y, f_out: (y - (1 - beta) * f_out) / beta,
    )


def test_a_rebuild_that_drifts_from_the_real_input_warns():
    """Each MomentumNet inverse divides the rounding error by beta: with beta 0.1 over 8 blocks the
    rebuilt input is off by about 9 % in float32 and the gradients are not autograd's. The engine
    measures the drift at the end of backward (from a projection of the input it kept) and warns;
    with beta 0.9 the rebuild is exact to rounding and nothing is said."""
    x = torch.randn(4, 50, 32)
    drifting = _momentum_net(0.1, 8)
    with pytest.warns(RuntimeWarning, match=r"rebuilt its input with a relative error of 0\.(0[5-9]|1)"):
        drifting(x).sum().backward()
    rebuilt = [p.grad.clone() for p in drifting.parameters()]
    drifting.zero_grad()
    drifting.memory_mode = "autograd"
    drifting(x).sum().backward()
    assert max(relative_error(a, p.grad) for a, p in zip(rebuilt, drifting.parameters())) > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _momentum_net(0.9, 8)(x).sum().backward()


def test_the_drift_measure_on_zero_non_finite_and_large_inputs():
    from torch_reformer.replay import InputFingerprint

    torch.manual_seed(0)
    x = torch.randn(3, 20, 16)
    zero = torch.zeros(3, 20, 16)
    fingerprint = InputFingerprint([x, zero])
    assert max(fingerprint.relative_errors([x, zero + 1e-6])) < 1e-5  # a zero stream is judged with the other
    assert fingerprint.relative_errors([x * 1.1, zero])[0] == pytest.approx(0.1, rel=1e-3)
    broken = x.clone()
    broken[0, 0, 0] = float("nan")
    assert fingerprint.relative_errors([broken, zero]) == (math.inf, math.inf)
    assert InputFingerprint([zero]).relative_errors([zero + 1e-6]) == (0.0, 0.0)  # nothing to compare against
    for scale in (1e-20, 1e20, 1e30):
        whole, _ = InputFingerprint([x * scale]).relative_errors([x * scale * 1.1])
        assert whole == pytest.approx(0.1, rel=1e-3)


def test_drift_confined_to_one_row_is_measured_against_the_typical_row():
    from torch_reformer.replay import ROW_REBUILD_TOLERANCE, InputFingerprint

    torch.manual_seed(0)
    x = torch.randn(2, 4096, 16)
    fingerprint = InputFingerprint([x])
    rebuilt = x.clone()
    rebuilt[1, 7] *= 1.5  # one token of 8192 off by half of itself
    projected_rows = fingerprint.projections[0].double().norm(dim=-1)  # (8192,)
    expected_worst = 0.5 * projected_rows[4096 + 7] / projected_rows.square().mean().sqrt()
    whole, worst_row = fingerprint.relative_errors([rebuilt])
    assert whole < 0.02  # diluted over the tensor: the whole-tensor measure alone would stay silent
    assert worst_row == pytest.approx(float(expected_worst), rel=1e-4)
    assert worst_row > ROW_REBUILD_TOLERANCE
    with pytest.warns(RuntimeWarning, match="in its worst row"):
        fingerprint.warn_if_drifted([rebuilt])


def test_a_rebuild_that_becomes_nan_warns():
    x = torch.randn(4, 50, 32)
    with pytest.warns(RuntimeWarning, match="relative error of inf"):
        _momentum_net(0.01, 30)(x).sum().backward()


def conv_block(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(), nn.Dropout(0.1)
    )


def test_irevnet_conv_stack_with_batchnorm_splits_channels():
    torch.manual_seed(0)
    model = ReversibleSequential(*[conv_block(3) for _ in range(4)], split_dim=1).double()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    start = {name: value.clone() for name, value in model.state_dict().items()}
    results = {}
    for mode in MEMORY_MODES:
        model.load_state_dict(start)
        model.memory_mode = mode
        results[mode] = train_step(model, x), {name: b.clone() for name, b in model.named_buffers()}
    (expected, expected_buffers) = results["autograd"]
    assert all(count == 1 for name, count in expected_buffers.items() if name.endswith("num_batches_tracked"))
    for mode in SAVING_MODES:
        (out, x_grad, grads), buffers = results[mode]
        assert relative_error(out, expected[0]) <= 1e-10
        assert relative_error(x_grad, expected[1]) <= 1e-10
        for got, want in zip(grads, expected[2]):
            assert relative_error(got, want) <= 1e-10
        for name, buffer in buffers.items():  # running statistics are updated once per step
            torch.testing.assert_close(buffer, expected_buffers[name], rtol=1e-12, atol=0)


def test_non_reversible_layers_before_and_after():
    torch.manual_seed(0)
    core = ReversibleSequential(*mixed_blocks(4, 4))
    model = nn.Sequential(nn.Linear(3, 8), core, nn.ReLU(), nn.Linear(8, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)

    def step(mode):
        core.memory_mode = mode
        return train_step(model, x)

    expected = step("autograd")
    for mode in SAVING_MODES:
        for got, want in zip(step(mode)[2], expected[2]):
            assert relative_error(got, want) <= 1e-10


class CallCounterBlock(nn.Module):
    """Scales by a value that changes on every call: only a stored value makes the rerun agree."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.calls = 0
        self.dicts = []

    def forward(self, x):
        state = saved_state(self)
        self.dicts.append(state)
        self.calls += 1
        if state is not None and "scale" in state:
            scale = state["scale"]
        else:
            scale = float(self.calls)
            if state is not None:
                state["scale"] = scale
        return self.linear(x) * scale


@pytest.mark.parametrize("mode", SAVING_MODES)
def test_saved_state_is_handed_back_to_the_recomputation(mode):
    torch.manual_seed(0)
    blocks = [CallCounterBlock(3) for _ in range(3)]
    model = ReversibleSequential(*blocks, memory_mode=mode).double()
    x = torch.randn(2, 6, dtype=torch.float64)
    _, x_grad, grads = train_step(model, x)
    for block in blocks:
        forward_dict, rerun_dict = block.dicts
        assert forward_dict is rerun_dict and forward_dict == {"scale": 1.0}
        block.calls, block.dicts = 0, []
    model.memory_mode = "autograd"
    expected = train_step(model, x)
    torch.testing.assert_close(x_grad, expected[1], rtol=1e-12, atol=0)
    for got, want in zip(grads, expected[2]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_saved_state_is_none_without_a_recomputation():
    block = CallCounterBlock(2)
    model = ReversibleSequential(block, memory_mode="reversible")
    with torch.no_grad():
        model(torch.randn(1, 4))
    model.memory_mode = "autograd"
    model(torch.randn(1, 4, requires_grad=True)).sum().backward()
    assert block.dicts == [None, None]
    assert saved_state(block) is None and not is_recomputing()


@pytest.mark.parametrize("mode", SAVING_MODES)
def test_global_rng_after_backward_is_as_without_recomputation(mode):
    torch.manual_seed(0)
    model = ReversibleSequential(*mixed_blocks(4, 4))
    x = torch.randn(2, 8)
    model.memory_mode = "autograd"
    train_step(model, x, seed=7)
    expected_state, expected_draw = torch.get_rng_state(), torch.rand(3)
    model.memory_mode = mode
    train_step(model, x, seed=7)
    assert torch.equal(torch.get_rng_state(), expected_state)
    assert torch.equal(torch.rand(3), expected_draw)


def test_block_kwargs_reach_every_block_in_every_mode():
    torch.manual_seed(0)
    blocks = [Recorder(mlp_block(3, 6)) for _ in range(3)]
    model = ReversibleSequential(*blocks).double()
    mask = torch.tensor([[1, 1, 0]])
    assert_modes_match(model, torch.randn(1, 3, 6, dtype=torch.float64), 1e-10, attention_mask=mask)
    for block in blocks:
        for seen in block.seen[False] + block.seen[True]:
            assert seen["kwargs"]["attention_mask"] is mask


def test_shared_block_parameters_are_counted_once_per_use():
    torch.manual_seed(0)
    shared = mlp_block(4, 8)
    model = ReversibleSequential(shared, mlp_block(4, 8), shared).double()
    assert_modes_match(model, torch.randn(3, 8, dtype=torch.float64), 1e-10)


def test_no_grad_inference_matches_training_forward():
    torch.manual_seed(0)
    model = ReversibleSequential(*[mlp_block(4, 8) for _ in range(3)]).eval()
    x = torch.randn(2, 8)
    with torch.no_grad():
        inference = model(x)
    torch.testing.assert_close(model(x.requires_grad_()).detach(), inference, rtol=0, atol=0)


def test_reversible_forward_two_streams():
    f, g = nn.Linear(3, 3).double(), nn.Linear(3, 3).double()
    x1, x2 = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    y1, y2 = reversible_forward(x1, x2, [f, g])
    expected_y1 = x1 + f(x2)
    torch.testing.assert_close(y1, expected_y1)
    torch.testing.assert_close(y2, x2 + g(expected_y1))


@pytest.mark.parametrize("mode", SAVING_MODES)
@pytest.mark.parametrize("tail", [1, 2, 5, 9])
def test_autograd_tail_keeps_the_last_graphs_and_matches_autograd(mode, tail):
    """The last ``tail`` blocks keep their graph: they are never re-run, and gradients stay exact
    (dropout and fresh noise in the chain before them and in the tail itself)."""
    torch.manual_seed(0)
    blocks = [Recorder(block) for block in mixed_blocks(6, 5)]
    for block in blocks:
        block.double()
    x1, x2 = (torch.randn(2, 3, 6, dtype=torch.float64) for _ in range(2))
    weights = torch.linspace(-1, 1, x1.numel(), dtype=torch.float64).reshape(x1.shape)

    def step(memory_mode, autograd_tail):
        inputs = [x.clone().requires_grad_() for x in (x1, x2)]
        for block in blocks:
            block.zero_grad(set_to_none=True)
            block.seen = {False: [], True: []}
        torch.manual_seed(1)
        y1, y2 = reversible_forward(*inputs, blocks, memory_mode=memory_mode, autograd_tail=autograd_tail)
        (y1 * weights + y2 * weights.flip(-1)).sum().backward()
        grads = [p.grad for block in blocks for p in block.parameters()]
        return [y1.detach(), y2.detach(), *(x.grad for x in inputs), *grads]

    expected = step("autograd", 0)
    got = step(mode, tail)
    for actual, want in zip(got, expected):
        assert relative_error(actual, want) <= 1e-10
    reruns = [len(block.seen[True]) for block in blocks]
    kept = min(tail, len(blocks))
    assert reruns == [1] * (len(blocks) - kept) + [0] * kept
    assert [len(block.seen[False]) for block in blocks] == [1] * len(blocks)


def test_reversible_sequential_passes_its_autograd_tail_on():
    torch.manual_seed(0)
    model = ReversibleSequential(*mixed_blocks(4, 4), autograd_tail=2).double()
    assert "autograd_tail=2" in repr(model)
    assert_modes_match(model, torch.randn(2, 3, 8, dtype=torch.float64), 1e-10)


@pytest.mark.parametrize("tail", [-1, 1.0, True, "1"])
def test_bad_autograd_tail_is_explained(tail):
    with pytest.raises(ValueError, match="autograd_tail must be an int >= 0"):
        reversible_forward(torch.randn(2, 3), torch.randn(2, 3), [nn.Linear(3, 3)], autograd_tail=tail)
    with pytest.raises(ValueError, match="autograd_tail must be an int >= 0"):
        ReversibleSequential(nn.Linear(2, 2), autograd_tail=tail)


def test_second_backward_explains_retain_graph_is_unsupported():
    model = ReversibleSequential(nn.Linear(2, 2), nn.Linear(2, 2))
    loss = model(torch.randn(3, 4)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"memory_mode": "fast"}, ValueError, "memory_mode must be one of"),
        ({"coupling_forward": [], "coupling_inverse": []}, ValueError, "has 0 entries for 2 block"),
        ({"coupling_forward": [additive_coupling_forward] * 3, "coupling_inverse": [additive_coupling_inverse] * 3},
         ValueError, "at most one per block"),
        ({"coupling_forward": [additive_coupling_forward] * 2, "coupling_inverse": additive_coupling_inverse},
         ValueError, "same length"),
        ({"coupling_forward": additive_coupling_forward}, ValueError, "pass both"),
        ({"coupling_forward": [1], "coupling_inverse": [additive_coupling_inverse]}, TypeError, "not a function"),
        ({"split_dim": 1.0}, TypeError, "split_dim"),
        ({"split_dim": None}, TypeError, r"torch.cat\(\[x, x\], dim\)"),
    ],
)
def test_bad_construction_is_explained(kwargs, error, message):
    with pytest.raises(error, match=message):
        ReversibleSequential(nn.Linear(2, 2), nn.Linear(2, 2), **kwargs)


def test_extra_positional_inputs_are_refused_with_the_keyword_form():
    net = ReversibleSequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"net\(x, mask=mask\)"):
        net(torch.randn(3, 4), torch.ones(3))


def test_bad_blocks_are_explained():
    with pytest.raises(TypeError, match="block 1 is function, not an nn.Module"):
        ReversibleSequential(nn.Linear(2, 2), lambda x: x)
    with pytest.raises(ValueError, match="at least one block"):
        ReversibleSequential()


def test_bad_inputs_are_explained():
    model = ReversibleSequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="size 5 is odd"):
        model(torch.randn(3, 5))
    with pytest.raises(ValueError, match="out of range"):
        ReversibleSequential(nn.Linear(2, 2), split_dim=2)(torch.randn(3, 4))
    with pytest.raises(TypeError, match="expects a tensor"):
        model([1.0, 2.0])
    grad_mask = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="'mask' requires grad"):
        ReversibleSequential(Recorder(nn.Linear(2, 2)))(torch.randn(3, 4, requires_grad=True), mask=grad_mask)


class ToDouble(nn.Module):
    def forward(self, x):
        return x.double()


def test_blocks_must_keep_the_stream_shape_and_dtype():
    with pytest.raises(ValueError, match="must keep its stream's shape and dtype"):
        ReversibleSequential(nn.Linear(2, 4))(torch.randn(3, 4, requires_grad=True))
    with pytest.raises(ValueError, match="must keep its stream's shape and dtype"):
        ReversibleSequential(ToDouble())(torch.randn(3, 4, requires_grad=True))
    with pytest.raises(TypeError, match="must return one tensor"):
        ReversibleSequential(nn.LSTM(2, 2))(torch.randn(3, 4, requires_grad=True))


@settings(max_examples=15, deadline=None)
@given(
    depth=st.integers(1, 6),
    width=st.integers(3, 6),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(SAVING_MODES),
)
def test_property_saving_modes_equal_autograd(depth, width, batch, seed, mode):
    torch.manual_seed(seed)
    model = ReversibleSequential(*[mlp_block(width, 3, dropout=0.3) for _ in range(depth)]).double()
    assert_modes_match(model, torch.randn(batch, 2 * width, dtype=torch.float64), 1e-9, modes=(mode,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dropout_and_noise_are_replayed():
    torch.manual_seed(0)
    model = ReversibleSequential(*mixed_blocks(8, 6)).cuda().double()
    x = torch.randn(2, 7, 16, dtype=torch.float64, device="cuda")
    model.memory_mode = "autograd"
    train_step(model, x, seed=3)
    expected_rng = torch.cuda.get_rng_state()
    assert_modes_match(model, x, 1e-10)
    model.memory_mode = "reversible"
    train_step(model, x, seed=3)
    assert torch.equal(torch.cuda.get_rng_state(), expected_rng)


def test_one_function_node_runs_the_whole_chain():
    model = ReversibleSequential(*[nn.Linear(2, 2) for _ in range(6)])
    out = model(torch.randn(3, 4, requires_grad=True))
    (first, _), (second, _) = out.grad_fn.next_functions  # torch.cat's two inputs
    assert first is second and type(first).__name__ == "_ReversibleChainBackward"


class StoringBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.stored = []

    def forward(self, x):
        state = saved_state(self)
        if "marker" not in state:
            state["marker"] = torch.zeros(1)
            self.stored.append(weakref.ref(state["marker"]))
        return self.linear(x)


def test_saved_state_is_freed_when_backward_ends():
    blocks = [StoringBlock(), StoringBlock()]
    loss = ReversibleSequential(*blocks)(torch.randn(3, 4, requires_grad=True)).sum()
    refs = [ref for block in blocks for ref in block.stored]
    assert len(refs) == 2 and all(ref() is not None for ref in refs)
    loss.backward()
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_outputs_changed_in_place_before_backward_are_refused():
    streams = [torch.randn(3, 2, requires_grad=True) for _ in range(2)]
    y1, y2 = reversible_forward(*streams, [nn.Linear(2, 2), nn.Linear(2, 2)])
    with torch.no_grad():
        y1.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        (y1 + y2).sum().backward()


def test_the_block_output_is_released_before_the_block_backward_runs():
    """The engine backpropagates into a rebuilt block without holding the block's output (a
    sequence-long tensor): only what the block's own graph saved stays alive."""

    class Recorded(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.last_output = None
            self.alive_in_backward = []

        def forward(self, x):
            out = self.linear(x)
            self.last_output = weakref.ref(out)
            return out

    block = Recorded()
    block.linear.weight.register_hook(lambda grad: block.alive_in_backward.append(block.last_output() is not None))
    model = ReversibleSequential(block, nn.Linear(4, 4))
    x = torch.randn(2, 8, requires_grad=True)
    model(x).sum().backward()
    assert block.alive_in_backward and not any(block.alive_in_backward)
    assert torch.isfinite(block.linear.weight.grad).all() and block.linear.weight.grad.abs().sum() > 0


def test_create_graph_is_refused_with_a_clear_error():
    # The engine's backward rebuilds activations by hand: it is not itself differentiable.
    blocks = [nn.Linear(4, 4), nn.Linear(4, 4)]
    x = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(ReversibleSequential(*blocks)(x).pow(2).sum(), x, create_graph=True)
    (grad,) = torch.autograd.grad(ReversibleSequential(*blocks, memory_mode="autograd")(x).pow(2).sum(), x,
                                  create_graph=True)
    assert grad.requires_grad


def test_a_block_that_changes_its_input_in_place_is_refused_in_the_forward():
    blocks = [nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 4)), nn.Linear(4, 4)]
    x = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(ValueError, match="Sequential changed its input in place"):
        ReversibleSequential(*blocks)(x * 1)


def test_a_coupling_inverse_that_does_not_undo_the_forward_is_refused():
    net = ReversibleSequential(nn.Linear(4, 4), nn.Linear(4, 4), coupling_forward=lambda a, f: 2 * a + f,
                               coupling_inverse=lambda y, f: y - f)
    with pytest.raises(ValueError, match="coupling_inverse does not undo coupling_forward"):
        net(torch.randn(3, 8, requires_grad=True))


def test_a_coupling_inverse_is_checked_once_per_block_not_on_every_forward():
    calls = []

    def inverse(y, f):
        calls.append(1)
        return (y - 0.5 * f) / 0.5

    blocks = [nn.Linear(4, 4), nn.Linear(4, 4)]
    net = ReversibleSequential(*blocks, coupling_forward=lambda x, f: 0.5 * x + 0.5 * f, coupling_inverse=inverse)
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(3, 8))
    assert len(calls) == 2  # one check per block
    wrong = ReversibleSequential(*blocks, coupling_forward=lambda x, f: 2 * x + f, coupling_inverse=lambda y, f: y - f)
    with pytest.raises(ValueError, match="coupling_inverse does not undo coupling_forward"):
        wrong(torch.randn(3, 8))  # the same blocks with another inverse are checked again


def test_a_tensor_from_outside_the_blocks_modules_is_refused_rather_than_left_without_gradient():
    outside = nn.Parameter(torch.tensor(2.0))

    class ScaleByOutside(nn.Module):
        def forward(self, x):
            return x * outside

    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="neither its input nor a parameter of its modules"):
        ReversibleSequential(ScaleByOutside(), nn.Linear(4, 4))(x).sum().backward()
    ReversibleSequential(ScaleByOutside(), nn.Linear(4, 4), memory_mode="autograd")(x).sum().backward()
    assert outside.grad is not None


def test_reversible_sequential_runs_under_inference_mode():
    torch.manual_seed(0)
    engine = ReversibleSequential(*[nn.Linear(4, 4) for _ in range(3)])
    inputs = torch.randn(5, 8)
    with torch.no_grad():
        expected = engine(inputs)
    with torch.inference_mode():
        assert torch.equal(engine(inputs), expected)


class _HalvedFeedForward(ChunkedFeedForward):
    def forward(self, hidden, **kwargs):
        return 0.5 * super().forward(hidden)


@pytest.mark.parametrize("variant", ["subclass overriding forward", "forward hook", "forward pre-hook"])
def test_one_pass_rebuild_is_skipped_where_calling_the_block_runs_more(variant):
    """The feed-forward's one-pass rebuild mirrors ChunkedFeedForward.forward only; with hooks or an
    overridden forward the engine must call the block, or it rebuilds wrong streams."""

    def block():
        if variant == "subclass overriding forward":
            return _HalvedFeedForward(8, 16, chunk_size=3)
        module = ChunkedFeedForward(8, 16, chunk_size=3)
        if variant == "forward hook":
            module.register_forward_hook(lambda mod, args, out: out * 0.5)
        else:
            module.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))
        return module

    def gradients(mode):
        torch.manual_seed(0)
        net = ReversibleSequential(*[block() for _ in range(4)], memory_mode=mode).double()
        inputs = torch.randn(2, 10, 16, dtype=torch.float64, requires_grad=True)
        net(inputs).pow(2).sum().backward()
        return [inputs.grad] + [p.grad for p in net.parameters()]

    for got, expected in zip(gradients("reversible"), gradients("autograd")):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def _clamp_weight_in_place(module, inputs):
    with torch.no_grad():
        module.weight.clamp_(-0.3, 0.3)


def test_blocks_that_change_their_own_weights_while_running_are_not_refused():
    """A pre-hook that clamps a weight in place is part of the block's forward, and every rebuild
    runs it again (the generic path of a custom coupling rebuilds twice): none of that is a change
    made between forward and backward, and the gradients are autograd's."""
    torch.manual_seed(0)
    blocks = [nn.Linear(4, 4).double(), nn.Linear(4, 4).double()]
    for block in blocks:
        block.register_forward_pre_hook(_clamp_weight_in_place)
    x = torch.randn(3, 8, dtype=torch.float64)
    grads = {}
    for mode in ("reversible", "checkpoint", "autograd"):
        with torch.no_grad():
            for block in blocks:
                block.weight.copy_(torch.linspace(-1, 1, 16, dtype=torch.float64).view(4, 4))
        net = ReversibleSequential(*blocks, memory_mode=mode,
                                   coupling_forward=lambda x, f: x + 2 * f, coupling_inverse=lambda y, f: y - 2 * f)
        leaf = x.clone().requires_grad_()
        net(leaf).pow(2).sum().backward()
        grads[mode] = [leaf.grad] + [p.grad.clone() for p in net.parameters()]
        net.zero_grad(set_to_none=True)
    for mode in ("reversible", "checkpoint"):
        for ours, reference in zip(grads[mode], grads["autograd"]):
            torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


def set_memory_mode(model: nn.Module, mode: str) -> None:
    if hasattr(model, "config"):
        model.config.memory_mode = mode  # a Reformer model reads it on every call
    else:
        model.memory_mode = mode


def _hooked_gradients(model: nn.Module, run) -> tuple[list[torch.Tensor], int]:
    """Gradients after ``run(model)`` with a hook on every parameter that doubles its gradient, and
    how many times the hooks ran."""
    calls = []
    handles = [p.register_hook(lambda grad: (calls.append(1), grad * 2)[1]) for p in model.parameters()]
    run(model)
    for handle in handles:
        handle.remove()
    return [p.grad.clone() for p in model.parameters()], len(calls)


@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
def test_parameter_hooks_run_once_as_in_autograd(mode):
    from torch_reformer.config import ReformerConfig
    from torch_reformer.model import ReformerLM

    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    chain = ReversibleSequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()).double() for _ in range(3)])
    config = ReformerConfig.from_preset("tiny", is_decoder=True, attn_layers=("local", "lsh"))
    lm = ReformerLM(config).double()
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    for model, run in ((chain, lambda m: m(x).square().sum().backward()),
                       (lm, lambda m: m(ids, labels=ids).loss.backward())):
        expected = {}
        for memory_mode in ("autograd", mode):
            model.zero_grad(set_to_none=True)
            set_memory_mode(model, memory_mode)
            expected[memory_mode] = _hooked_gradients(model, run)
        grads, calls = expected[mode]
        want_grads, want_calls = expected["autograd"]
        assert calls == want_calls == sum(p.requires_grad for p in model.parameters())
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # Gradients asked for one input only: the parameters' hooks do not run at all, as in autograd.
    set_memory_mode(chain, mode)
    calls = []
    handles = [p.register_hook(lambda grad: calls.append(1)) for p in chain.parameters()]
    torch.autograd.grad(chain(x).sum(), [x])
    assert calls == []
    for handle in handles:
        handle.remove()


def test_lazy_modules_are_initialised_by_the_first_call_then_rebuilt():
    import copy

    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    net = ReversibleSequential(nn.LazyLinear(2, dtype=torch.float64), nn.LazyLinear(2, dtype=torch.float64))
    net(x).square().sum().backward()  # the first call creates the parameters: plain autograd
    reference = copy.deepcopy(net)
    reference.memory_mode = "autograd"
    for model in (net, reference):
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
    for got, want in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_torch_compile_inductor_replays_dropout_in_the_rebuild():
    # Inductor draws random numbers from its own generator, which the eager rebuild in backward
    # could not replay: the chain itself runs eagerly under torch.compile.
    def chain():
        torch.manual_seed(1)
        return ReversibleSequential(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)), nn.Linear(4, 4))

    x = torch.randn(16, 8)
    results = []
    for model in (chain(), torch.compile(chain())):
        torch.manual_seed(3)
        inputs = x.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no rebuild drift
            model(inputs).square().sum().backward()
        results.append([inputs.grad, *[p.grad for p in model.parameters()]])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


class CountingBlock(nn.Module):
    """Scales by how many times it ran before (a buffer its forward reads, then updates)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width, dtype=torch.float64)
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x) * (1 + self.calls)
        if self.training:
            self.calls += 1
        return out


@pytest.mark.parametrize("mode", SAVING_MODES)
def test_a_rebuild_reads_the_buffers_as_the_forward_read_them(mode):
    from torch.nn.utils.parametrizations import spectral_norm

    def build(kind: str, memory_mode: str) -> ReversibleSequential:
        torch.manual_seed(1)
        if kind == "counter":
            blocks = [CountingBlock(4) for _ in range(3)]
        else:  # the power iteration reads its vectors, then updates them
            blocks = [spectral_norm(nn.Linear(4, 4, dtype=torch.float64)) for _ in range(3)]
            with torch.no_grad():  # weights moved since the last power iteration, as after optimizer steps
                for block in blocks:
                    block.parametrizations.weight.original.add_(torch.randn(4, 4, dtype=torch.float64))
        return ReversibleSequential(*blocks, memory_mode=memory_mode)

    x = torch.randn(3, 8, dtype=torch.float64)
    for kind in ("counter", "spectral norm"):
        results = {}
        for memory_mode in ("autograd", mode):
            net = build(kind, memory_mode)
            for _ in range(2):  # the second step starts from buffers the first one updated
                net.zero_grad()
                net(x).square().sum().backward()
            results[memory_mode] = [p.grad for p in net.parameters()] + list(net.buffers())
        for got, want in zip(results[mode], results["autograd"]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=kind)


def test_importing_the_library_does_not_import_the_compiler():
    import subprocess
    import sys

    code = "import sys, torch_reformer, torch_reformer.model, torch_reformer.training; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"  # torch._dynamo costs seconds and ~70 MB at start-up
