"""Trax-style stack combinators for PyTorch, with true reversible back-propagation.

A layer has ``n_in`` inputs and ``n_out`` outputs and works on a *stack*: it takes its
``n_in`` items from the top, pushes its ``n_out`` results, and leaves the items below
untouched whatever they are (tensors, strings, None). Item 0 is the top.

Calling convention: ``layer(x)`` when the stack holds one item, ``layer((a, b, c))`` or
``layer([a, b, c])`` with a tuple or list (top first); a tuple or list is always read
as a stack. The result is one value when exactly one item results, else a tuple.

Any plain ``nn.Module`` is a 1-in/1-out layer. Every layer here is an ``nn.Module``, so
parameters inside train normally.

Reversible layers (``ReversibleSwap``, ``ReversibleHalfResidual``, ``ReversibleSerial``
and subclasses of ``ReversibleLayer``) have ``reverse(outputs)`` that returns their
inputs. ``ReversibleSerial`` turns its layers into the engine's steps
(``torch_reformer.reversible``): a ``ReversibleHalfResidual`` is a coupling step that
updates the top item from the items below it, a ``ReversibleSwap`` a permutation step,
any other reversible layer an invertible step. The same autograd Function as
``ReversibleSequential`` then trains it without storing activations: one engine, two
front doors. ``Serial(Dup(), ReversibleSerial(ReversibleHalfResidual(F), ReversibleSwap(),
ReversibleHalfResidual(G), ReversibleSwap()), Concatenate())`` is exactly a RevNet block.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from torch_reformer.reversible import MEMORY_MODES, run_reversible_steps
from torch_reformer.reversible_steps import CouplingStep, InvertibleStep, PermutationStep


def _as_stack(inputs: object) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _as_result(items: tuple) -> object:
    return items[0] if len(items) == 1 else tuple(items)


def arity(layer: nn.Module) -> tuple[int, int]:
    """``(n_in, n_out)`` of a layer; a plain ``nn.Module`` is 1-in/1-out."""
    if isinstance(layer, Layer):
        return layer.n_in, layer.n_out
    if isinstance(layer, nn.Module):
        return 1, 1
    raise TypeError(f"expected a layer (an nn.Module), got {type(layer).__name__}")


def call_on_items(layer: nn.Module, items: tuple) -> tuple:
    """Run ``layer`` on exactly its ``n_in`` items and return its ``n_out`` items."""
    if isinstance(layer, Layer):
        return layer.stack_call(tuple(items))
    return (layer(items[0]),)


def _layer_name(layer: object) -> str:
    name = getattr(layer, "name", None)
    return name if isinstance(name, str) and name else type(layer).__name__


class Layer(nn.Module):
    """Base of the stack layers: subclasses set ``n_in``/``n_out`` and define ``stack_call``."""

    n_in: int = 1
    n_out: int = 1

    def stack_call(self, items: tuple) -> tuple:
        """Map exactly ``n_in`` items (top first) to ``n_out`` items."""
        raise NotImplementedError

    def _take(self, stack: tuple, count: int, what: str) -> None:
        if len(stack) < count:
            raise ValueError(
                f"{_layer_name(self)} takes {count} stack item(s) from its {what}, but got {len(stack)}: "
                "pass a tuple or list with at least that many items (top first)"
            )

    def forward(self, inputs: object) -> object:
        stack = _as_stack(inputs)
        self._take(stack, self.n_in, "input")
        return _as_result(self.stack_call(stack[: self.n_in]) + stack[self.n_in :])

    def extra_repr(self) -> str:
        return f"n_in={self.n_in}, n_out={self.n_out}"


def _flatten(layers: Sequence[object], where: str) -> list[nn.Module]:
    flat: list[nn.Module] = []
    for layer in layers:
        if isinstance(layer, (list, tuple)):
            flat.extend(_flatten(layer, where))
        elif layer is not None:
            if not isinstance(layer, nn.Module):
                _reject(layer, where)
            flat.append(layer)
    return flat


def _reject(layer: object, where: str) -> None:
    raise TypeError(
        f"{where} got {type(layer).__name__}, which is not a layer: pass nn.Modules or combinators "
        "(wrap a function with Fn(name, f))"
    )


def _branch_item(layer: object, where: str) -> nn.Module:
    """A Branch/Parallel entry: None is identity on the top item, a list is a Serial."""
    if layer is None:
        return Select([0])
    if isinstance(layer, (list, tuple)):
        return Serial(*layer)
    if not isinstance(layer, nn.Module):
        _reject(layer, where)
    return layer


class Fn(Layer):
    """Wraps a function; ``n_in`` is its number of positional parameters without defaults."""

    def __init__(self, name: str, f: Callable, n_out: int = 1) -> None:
        super().__init__()
        if not callable(f):
            raise TypeError(f"Fn({name!r}) needs a callable, got {type(f).__name__}")
        if isinstance(n_out, bool) or not isinstance(n_out, int) or n_out < 0:
            raise ValueError(f"Fn({name!r}): n_out must be a non-negative int, got {n_out!r}")
        self.name = name
        self.f = f
        self.n_in = self._count_inputs(name, f)
        self.n_out = n_out

    @staticmethod
    def _count_inputs(name: str, f: Callable) -> int:
        try:
            params = inspect.signature(f.forward if isinstance(f, nn.Module) else f).parameters.values()
        except (TypeError, ValueError):
            raise ValueError(f"Fn({name!r}): cannot read the signature of {f!r}; wrap it in a lambda") from None
        if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
            raise ValueError(f"Fn({name!r}): cannot infer n_in from *args; give the function named parameters")
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return sum(1 for p in params if p.kind in positional and p.default is inspect.Parameter.empty)

    def stack_call(self, items: tuple) -> tuple:
        out = self.f(*items)
        if self.n_out == 1:
            return (out,)
        if self.n_out == 0 and out is None:
            return ()
        if not isinstance(out, (tuple, list)) or len(out) != self.n_out:
            got = f"{len(out)} items" if isinstance(out, (tuple, list)) else type(out).__name__
            raise ValueError(f"Fn({self.name!r}) declares n_out={self.n_out} but its function returned {got}")
        return tuple(out)

    def extra_repr(self) -> str:
        return f"{self.name!r}, n_in={self.n_in}, n_out={self.n_out}"


class Serial(Layer):
    """Runs layers one after another on the stack; nested lists are flattened, None skipped."""

    def __init__(self, *layers: object) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_flatten(layers, "Serial"))
        self.n_in, self.n_out = self._arity(self.layers)

    @staticmethod
    def _arity(layers: Sequence[nn.Module]) -> tuple[int, int]:
        needed, height = 0, 0  # inputs drawn from below so far, items on the stack now
        for layer in layers:
            n_in, n_out = arity(layer)
            if height < n_in:
                needed += n_in - height
                height = n_in
            height += n_out - n_in
        return needed, height

    def stack_call(self, items: tuple) -> tuple:
        stack = tuple(items)
        for layer in self.layers:
            n_in = arity(layer)[0]
            stack = call_on_items(layer, stack[:n_in]) + stack[n_in:]
        return stack

    def extra_repr(self) -> str:
        return f"n_in={self.n_in}, n_out={self.n_out}"


class Branch(Layer):
    """Each layer gets a copy of the top items it needs; their outputs are pushed in order.

    ``None`` means identity on the top item; a list is a Serial. The first layer's
    outputs end on top.
    """

    def __init__(self, *layers: object) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_branch_item(layer, "Branch") for layer in layers)
        arities = [arity(layer) for layer in self.layers]
        self.n_in = max((n_in for n_in, _ in arities), default=0)
        self.n_out = sum(n_out for _, n_out in arities)

    def stack_call(self, items: tuple) -> tuple:
        outputs: tuple = ()
        for layer in self.layers:
            outputs += call_on_items(layer, items[: arity(layer)[0]])
        return outputs


class Parallel(Layer):
    """Consecutive stack spans go to consecutive layers (``None``: identity on one item)."""

    def __init__(self, *layers: object) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_branch_item(layer, "Parallel") for layer in layers)
        arities = [arity(layer) for layer in self.layers]
        self.n_in = sum(n_in for n_in, _ in arities)
        self.n_out = sum(n_out for _, n_out in arities)

    def stack_call(self, items: tuple) -> tuple:
        outputs: tuple = ()
        start = 0
        for layer in self.layers:
            n_in = arity(layer)[0]
            outputs += call_on_items(layer, items[start : start + n_in])
            start += n_in
        return outputs


class Residual(Serial):
    """``Serial(Branch(shortcut, Serial(layers)), Add())``: with one input, ``x + F(x)``."""

    def __init__(self, *layers: object, shortcut: object = None) -> None:
        super().__init__(Branch(shortcut, Serial(*layers)), Add())


class Select(Layer):
    """Copies, reorders or drops the top items: output ``i`` is input ``indices[i]``."""

    def __init__(self, indices: Sequence[int], n_in: int | None = None) -> None:
        super().__init__()
        indices = list(indices)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
            raise ValueError(f"Select indices must be non-negative ints (0 is the top), got {indices}")
        smallest = max(indices, default=-1) + 1
        if n_in is None:
            n_in = smallest
        if n_in < smallest:
            raise ValueError(f"Select{tuple(indices)} reads item {smallest - 1}, so n_in must be >= {smallest}")
        self.indices = tuple(indices)
        self.n_in = n_in
        self.n_out = len(indices)

    def stack_call(self, items: tuple) -> tuple:
        return tuple(items[i] for i in self.indices)

    def extra_repr(self) -> str:
        return f"indices={list(self.indices)}, n_in={self.n_in}"


class Dup(Layer):
    """``x -> (x, x)``."""

    n_in, n_out = 1, 2

    def stack_call(self, items: tuple) -> tuple:
        return (items[0], items[0])


class Swap(Layer):
    """``(a, b) -> (b, a)``."""

    n_in, n_out = 2, 2

    def stack_call(self, items: tuple) -> tuple:
        return (items[1], items[0])


class Drop(Layer):
    """Removes the top item."""

    n_in, n_out = 1, 0

    def stack_call(self, items: tuple) -> tuple:
        return ()


class Add(Layer):
    """``(a, b) -> a + b``."""

    n_in, n_out = 2, 1

    def stack_call(self, items: tuple) -> tuple:
        return (items[0] + items[1],)


def _check_count(name: str, n_items: int) -> None:
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 1:
        raise ValueError(f"{name}: n_items must be a positive int, got {n_items!r}")


class Concatenate(Layer):
    """``n_items`` tensors -> one, concatenated along ``axis`` (top item first)."""

    def __init__(self, n_items: int = 2, axis: int = -1) -> None:
        super().__init__()
        _check_count("Concatenate", n_items)
        self.n_in, self.n_out, self.axis = n_items, 1, axis

    def stack_call(self, items: tuple) -> tuple:
        return (torch.cat(items, dim=self.axis),)

    def extra_repr(self) -> str:
        return f"n_items={self.n_in}, axis={self.axis}"


class Split(Layer):
    """One tensor -> ``n_items`` equal parts along ``axis`` (the first part on top)."""

    def __init__(self, n_items: int = 2, axis: int = -1) -> None:
        super().__init__()
        _check_count("Split", n_items)
        self.n_in, self.n_out, self.axis = 1, n_items, axis

    def stack_call(self, items: tuple) -> tuple:
        x = items[0]
        if not isinstance(x, Tensor):
            raise TypeError(f"Split needs a tensor on top of the stack, got {type(x).__name__}")
        size = x.shape[self.axis]
        if size % self.n_out:
            raise ValueError(
                f"Split cannot cut axis {self.axis} of size {size} (shape {tuple(x.shape)}) into {self.n_out} "
                "equal parts: make the size a multiple of n_items"
            )
        return tuple(x.split(size // self.n_out, dim=self.axis))

    def extra_repr(self) -> str:
        return f"n_items={self.n_out}, axis={self.axis}"


class ReversibleLayer(Layer):
    """A layer with ``n_in == n_out`` whose ``reverse`` recovers its inputs from its outputs.

    Subclasses define ``stack_call`` and ``stack_reverse``; inside ``ReversibleSerial``
    they run as the engine's general invertible step unless they supply cheaper steps.
    """

    def stack_reverse(self, items: tuple) -> tuple:
        """Map exactly ``n_out`` output items back to the ``n_in`` input items."""
        raise NotImplementedError

    def reverse(self, outputs: object) -> object:
        """The inputs that produce ``outputs`` (same calling convention as the forward)."""
        stack = _as_stack(outputs)
        self._take(stack, self.n_out, "outputs to reverse")
        return _as_result(self.stack_reverse(stack[: self.n_out]) + stack[self.n_out :])

    def reversible_steps(self) -> list:
        """This layer as steps of the reversible engine."""
        apply = lambda *items: self.stack_call(items)  # noqa: E731
        reverse = lambda *items: self.stack_reverse(items)  # noqa: E731
        return [InvertibleStep(self, self.n_in, apply=apply, reverse=reverse)]


class ReversibleSwap(ReversibleLayer):
    """``(a, b) -> (b, a)``; reverse swaps back."""

    n_in, n_out = 2, 2

    def stack_call(self, items: tuple) -> tuple:
        return (items[1], items[0])

    def stack_reverse(self, items: tuple) -> tuple:
        return (items[1], items[0])

    def reversible_steps(self) -> list:
        return [PermutationStep((1, 0))]


def _residual_output(residual: nn.Module, items: Sequence[object], block_kwargs: dict) -> object:
    return call_on_items(residual, tuple(items))[0]


class ReversibleHalfResidual(ReversibleLayer):
    """``(acc, *ctx) -> (acc + F(*ctx), *ctx)`` with ``F = Serial(layers)``; reverse subtracts."""

    def __init__(self, *layers: object) -> None:
        super().__init__()
        self.residual = Serial(*layers)
        n_ctx, n_out = self.residual.n_in, self.residual.n_out
        if n_ctx < 1 or n_out != 1:
            raise ValueError(
                f"ReversibleHalfResidual needs a residual function with at least 1 input and exactly 1 output; "
                f"its layers take {n_ctx} and give {n_out}"
            )
        self.n_in = self.n_out = 1 + n_ctx

    def stack_call(self, items: tuple) -> tuple:
        return (items[0] + call_on_items(self.residual, items[1:])[0], *items[1:])

    def stack_reverse(self, items: tuple) -> tuple:
        return (items[0] - call_on_items(self.residual, items[1:])[0], *items[1:])

    def reversible_steps(self) -> list:
        return [CouplingStep(self.residual, 0, range(1, self.n_in), call_block=_residual_output)]


class ReversibleSerial(ReversibleLayer):
    """A Serial of reversible layers, trained with reversible back-propagation.

    ``memory_mode`` (``"reversible"``, ``"checkpoint"`` or ``"autograd"``) chooses how it
    trains; a nested ``ReversibleSerial`` runs as part of its outer one.
    """

    def __init__(self, *layers: object, memory_mode: str = "reversible") -> None:
        super().__init__()
        flat = _flatten(layers, "ReversibleSerial")
        for i, layer in enumerate(flat):
            if not isinstance(layer, ReversibleLayer):
                raise TypeError(
                    f"ReversibleSerial accepts reversible layers only, but layer {i} is {_layer_name(layer)}: "
                    "wrap it in ReversibleHalfResidual(...) or use ReversibleSwap/ReversibleSerial"
                )
        if memory_mode not in MEMORY_MODES:
            raise ValueError(f"memory_mode must be one of {MEMORY_MODES}, got {memory_mode!r}")
        self.layers = nn.ModuleList(flat)
        self.n_in = self.n_out = max((layer.n_in for layer in flat), default=0)
        self.memory_mode = memory_mode

    def reversible_steps(self) -> list:
        return [step for layer in self.layers for step in layer.reversible_steps()]

    def stack_call(self, items: tuple) -> tuple:
        return tuple(run_reversible_steps(self.reversible_steps(), items, memory_mode=self.memory_mode))

    def stack_reverse(self, items: tuple) -> tuple:
        stack = tuple(items)
        for layer in reversed(self.layers):
            stack = layer.stack_reverse(stack[: layer.n_out]) + stack[layer.n_out :]
        return stack

    def extra_repr(self) -> str:
        return f"n_in={self.n_in}, memory_mode={self.memory_mode!r}"
