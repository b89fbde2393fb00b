"""Stack semantics of the combinators on small hand-computed examples, and reversible training."""

import pytest
import torch
from torch import nn

from torch_reformer.combinators import (
    Add,
    Branch,
    Concatenate,
    Drop,
    Dup,
    Fn,
    Parallel,
    Residual,
    ReversibleHalfResidual,
    ReversibleLayer,
    ReversibleSerial,
    ReversibleSwap,
    Select,
    Serial,
    Split,
    Swap,
)
from torch_reformer.reversible import ReversibleSequential

a, b, c = torch.tensor([1.0, 2.0]), torch.tensor([10.0, 20.0]), torch.tensor([100.0, 200.0])


def double():
    return Fn("F", lambda x: 2 * x)


def assert_items(actual, expected):
    actual = actual if isinstance(actual, tuple) else (actual,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        else:
            assert got == want


def test_spec_examples():
    x = torch.tensor([1.0, -2.0, 3.0])
    assert_items(Residual(double())(x), 3 * x)
    model = Serial(Dup(), ReversibleSerial(ReversibleHalfResidual(double()), ReversibleSwap()), Concatenate())
    assert_items(model(x), torch.cat([x, 3 * x], -1))


def test_fn_arity_and_outputs():
    assert (Fn("f", lambda x, y, z=1: x).n_in, Fn("f", lambda: 0).n_in) == (2, 0)
    assert Fn("lin", nn.Linear(2, 2)).n_in == 1
    pair = Fn("pair", lambda x: (x + 1, x - 1), n_out=2)
    assert_items(pair((a, "below")), (a + 1, a - 1, "below"))
    assert_items(Fn("sum3", lambda x, y, z: x + y + z)((a, b, c)), a + b + c)


def test_serial_threads_the_stack_and_flattens_lists():
    assert_items(Serial(Dup(), Add())(a), 2 * a)
    nested = Serial([Dup(), [Add(), None]], Fn("neg", lambda x: -x))
    assert (nested.n_in, nested.n_out, len(nested.layers)) == (1, 1, 3)
    assert_items(nested(a), -2 * a)
    three = Serial(Add(), Add())
    assert (three.n_in, three.n_out) == (3, 1)
    assert_items(three((a, b, c, "s", None)), (a + b + c, "s", None))
    assert_items(Serial()((a, "s")), (a, "s"))


def test_plain_modules_are_one_in_one_out_layers():
    linear = nn.Linear(2, 2)
    model = Serial(linear, Dup())
    assert (model.n_in, model.n_out) == (1, 2)
    assert [name for name, _ in model.named_parameters()] == ["layers.0.weight", "layers.0.bias"]
    out = model((a, "s"))
    assert_items(out, (linear(a), linear(a), "s"))


def test_branch_copies_top_items_to_each_layer():
    assert_items(Branch(None, double())(a), (a, 2 * a))
    mixed = Branch(Add(), Fn("neg", lambda x: -x), [Swap(), Drop()])
    assert (mixed.n_in, mixed.n_out) == (2, 3)
    assert_items(mixed((a, b, "s")), (a + b, -a, a, "s"))


def test_parallel_feeds_consecutive_spans():
    layer = Parallel(double(), Add(), None)
    assert (layer.n_in, layer.n_out) == (4, 3)
    assert_items(layer((a, b, c, "t", "s")), (2 * a, b + c, "t", "s"))


def test_residual_with_shortcut_and_several_layers():
    assert_items(Residual(double(), double())((a, "s")), (5 * a, "s"))
    assert_items(Residual(double(), shortcut=Fn("neg", lambda x: -x))(a), a)


def test_select_dup_swap_drop_add():
    assert_items(Select([0, 0, 1])((a, b, c)), (a, a, b, c))
    assert_items(Select([1], n_in=3)((a, b, c, "s")), (b, "s"))
    assert_items(Dup()((a, "s")), (a, a, "s"))
    assert_items(Swap()((a, "s", c)), ("s", a, c))
    assert_items(Drop()(("s", a)), a)
    assert_items(Drop()(a), ())
    assert_items(Add()((a, b, "s")), (a + b, "s"))


def test_concatenate_and_split_round_trip():
    x = torch.arange(12.0).reshape(3, 4)
    parts = Split(3, axis=0)((x, "s"))
    assert_items(parts, (x[0:1], x[1:2], x[2:3], "s"))
    assert_items(Concatenate(3, axis=0)(parts), (x, "s"))
    assert_items(Concatenate()((a, b)), torch.cat([a, b]))


def test_reversible_swap_and_half_residual_values():
    assert_items(ReversibleSwap()((a, b, "s")), (b, a, "s"))
    assert_items(ReversibleHalfResidual(double())((a, b, "s")), (a + 2 * b, b, "s"))
    two_context = ReversibleHalfResidual(Add())
    assert two_context.n_in == 3
    assert_items(two_context((a, b, c)), (a + b + c, b, c))


class AffineCoupling(ReversibleLayer):
    """A reversible layer with no coupling-step form: ``(x, y) -> (x * exp(s(y)) + t(y), y)``."""

    n_in = n_out = 2

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale, self.shift = nn.Linear(width, width), nn.Linear(width, width)
        self.dropout = nn.Dropout(0.2)

    def stack_call(self, items):
        x, y = items
        return (x * torch.exp(torch.tanh(self.scale(y))) + self.dropout(self.shift(y)), y)

    def stack_reverse(self, items):
        z, y = items
        return ((z - self.dropout(self.shift(y))) / torch.exp(torch.tanh(self.scale(y))), y)


def revnet(width: int) -> ReversibleSerial:
    def block():
        return nn.Sequential(nn.Linear(width, 2 * width), nn.Tanh(), nn.Dropout(0.2), nn.Linear(2 * width, width))

    return ReversibleSerial(
        ReversibleHalfResidual(block()),
        ReversibleSwap(),
        [ReversibleHalfResidual(block()), ReversibleSwap()],
        ReversibleSerial(AffineCoupling(width), ReversibleSwap()),
    )


def test_reverse_round_trips_every_reversible_layer():
    torch.manual_seed(0)
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    layers = [ReversibleSwap(), ReversibleHalfResidual(nn.Linear(4, 4)), AffineCoupling(4), revnet(4)]
    for layer in layers:
        layer.double().eval()
        with torch.no_grad():
            outputs = layer((x, y, "s"))
            assert outputs[2] == "s"
            assert_close_items(layer.reverse(outputs), (x, y, "s"))


def assert_close_items(actual, expected):
    for got, want in zip(actual, expected):
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        else:
            assert got == want


def grads_of(model, mode, x1, x2):
    model.memory_mode = mode
    model.zero_grad(set_to_none=True)
    x1, x2 = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    torch.manual_seed(5)
    y1, y2, label = model((x1, x2, "label"))
    assert label == "label"
    (y1.sin().sum() + (y2 * y1).sum()).backward()
    return [y1.detach(), y2.detach(), x1.grad, x2.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
def test_reversible_serial_gradients_equal_autograd(mode):
    torch.manual_seed(0)
    model = revnet(5).double()
    x1, x2 = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    expected = grads_of(model, "autograd", x1, x2)
    for got, want in zip(grads_of(model, mode, x1, x2), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


class ScaleWithWrongReverse(ReversibleLayer):
    """``(x, y) -> (2x, y)`` whose reverse forgets to halve: rebuilding with it would be wrong."""

    n_in = n_out = 2

    def stack_call(self, items):
        return (2 * items[0], items[1])

    def stack_reverse(self, items):
        return items


def test_a_reverse_that_does_not_undo_the_forward_is_refused_at_the_first_forward():
    x1, x2 = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    layer = ScaleWithWrongReverse()
    with pytest.raises(ValueError, match="ScaleWithWrongReverse.stack_reverse does not undo its forward"):
        ReversibleSerial(layer, memory_mode="reversible")((x1.requires_grad_(), x2))
    # Modes that never call reverse do not check it; a correct reverse passes and is checked once.
    y1, _ = ReversibleSerial(ScaleWithWrongReverse(), memory_mode="autograd")((x1, x2))
    torch.testing.assert_close(y1, 2 * x1)
    affine = AffineCoupling(5).double()
    ReversibleSerial(affine, memory_mode="reversible")((x1, x2))[0].sum().backward()
    assert affine._reverse_checked


class DoubleAndCarryMask(ReversibleLayer):
    """``(x, mask) -> (2x, mask)``: a layer whose stack carries a non-float item."""

    n_in = n_out = 2

    def stack_call(self, items):
        return (2 * items[0], items[1])

    def stack_reverse(self, items):
        return (items[0] / 2, items[1])


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64])
def test_the_reverse_check_compares_non_float_items_exactly(mask_dtype):
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([1, 0, 1, 1, 0]).to(mask_dtype)
    y, kept = ReversibleSerial(DoubleAndCarryMask(), memory_mode="reversible")((x, mask))
    assert torch.equal(kept, mask)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


def test_reversible_serial_and_reversible_sequential_share_the_engine():
    torch.manual_seed(0)
    f, g = nn.Linear(3, 3).double(), nn.Linear(3, 3).double()
    combinator = ReversibleSerial(
        ReversibleHalfResidual(f), ReversibleSwap(), ReversibleHalfResidual(g), ReversibleSwap()
    )
    sequential = ReversibleSequential(f, g)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y1, y2 = combinator(tuple(x.chunk(2, -1)))
    assert type(y1.grad_fn).__name__ == "_ReversibleChainBackward"
    torch.testing.assert_close(torch.cat([y1, y2], -1), sequential(x), rtol=0, atol=0)
    (y1 * y2).sum().backward()
    combinator_grads = [x.grad.clone()] + [p.grad.clone() for p in (*f.parameters(), *g.parameters())]
    x.grad = None
    f.zero_grad(), g.zero_grad()
    y = sequential(x)
    (y[:, :3] * y[:, 3:]).sum().backward()
    sequential_grads = [x.grad] + [p.grad for p in (*f.parameters(), *g.parameters())]
    for got, want in zip(combinator_grads, sequential_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_parameters_inside_combinators_train():
    torch.manual_seed(0)
    linear = nn.Linear(2, 2)
    model = Serial(Dup(), ReversibleSerial(ReversibleHalfResidual(linear), ReversibleSwap()), Add())
    model(torch.randn(3, 2)).sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0


def test_bad_stacks_and_layers_are_explained():
    with pytest.raises(ValueError, match="Add takes 2 stack item"):
        Add()(a)
    with pytest.raises(ValueError, match="ReversibleSwap takes 2 stack item"):
        ReversibleSwap().reverse(a)
    with pytest.raises(TypeError, match="layer 1 is Linear"):
        ReversibleSerial(ReversibleSwap(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="size 3 .* into 2 equal parts"):
        Split()(torch.ones(2, 3))
    with pytest.raises(TypeError, match="not a layer"):
        Serial(Dup(), lambda x: x)
    with pytest.raises(ValueError, match="exactly 1 output"):
        ReversibleHalfResidual(Dup())
    with pytest.raises(ValueError, match="declares n_out=2"):
        Fn("bad", lambda x: x, n_out=2)(a)
    with pytest.raises(ValueError, match=r"\*args"):
        Fn("var", lambda *xs: xs)
    with pytest.raises(ValueError, match="n_in must be >= 3"):
        Select([2], n_in=1)
    with pytest.raises(ValueError, match="memory_mode must be one of"):
        ReversibleSerial(ReversibleSwap(), memory_mode="cheap")
    with pytest.raises(TypeError, match="stack item 1 is str"):
        ReversibleSerial(ReversibleHalfResidual(nn.Linear(2, 2)))((torch.ones(2, requires_grad=True), "s"))
