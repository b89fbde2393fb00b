"""The steps the reversible engine runs, and how each one walks back in the backward pass.

The engine (``reversible.py``) runs a list of steps over a stack of values (item 0 is the
top). A step says which modules it owns, runs forward on the stack, and in backward rebuilds
its inputs from its outputs and returns gradients. Three kinds cover every front door:

- ``CouplingStep``: ``stack[target] <- coupling_forward(stack[target], block(*stack[contexts]))``
  (a RevNet half step; ``ReversibleSequential`` and ``ReversibleHalfResidual``);
- ``PermutationStep``: reorders the top items (``ReversibleSwap``);
- ``InvertibleStep``: any layer with a forward and an exact ``reverse`` (the general path).

A block of a coupling step may offer a one-pass backward, ``block.rebuild_and_backward(inputs,
grad_output, wanted, subtract_from, **block_kwargs) -> gradients of wanted``: it re-runs itself on
``inputs``, subtracts its output from ``subtract_from`` in place (rebuilding the stream) and
back-propagates ``grad_output`` in the same pass. The chunked feed-forward offers one, which saves
the separate rebuild pass the generic path makes. The step uses it for additive couplings with the
default block call, under the same RNG and autocast replay as any recomputation, and only while
calling the block would run nothing else: a block with hooks, or one whose
``one_pass_matches_forward()`` is False (a subclass that overrides ``forward``), is rebuilt by
calling it.

``BackwardWalk`` holds the stack's values and gradients while backward walks the steps in
reverse, and knows which of them it allocated itself (those may be updated in place).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator, Protocol, Sequence

import torch
from torch import Tensor, nn

from .autograd_checks import changed_in_place, has_module_hooks, refuse_in_backward, version_of

Coupling = Callable[[Tensor, Tensor], Tensor]


def additive_coupling_forward(other_stream: Tensor, fn_out: Tensor) -> Tensor:
    """RevNet coupling: ``y = x + f``."""
    return other_stream + fn_out


def additive_coupling_inverse(output: Tensor, fn_out: Tensor) -> Tensor:
    """Inverse of the RevNet coupling: ``x = y - f``."""
    return output - fn_out


Invoke = Callable[..., object]


def invoke_plain(fn: Callable[..., object], *args: object) -> object:
    return fn(*args)


def _grad_leaf(value: object) -> object:
    """A fresh autograd leaf sharing ``value``'s memory (floating tensors only)."""
    if isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()):
        return value.detach().requires_grad_()
    return value


def _within_inverse_tolerance(error: float, scale: float, dtype: torch.dtype) -> bool:
    """Whether rebuilding values up to ``scale`` with ``error`` is an exact inverse up to rounding."""
    tolerance = min(0.1, max(1e-3, 100 * torch.finfo(dtype).eps))
    return error <= tolerance * scale


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _gradients(
    outputs: Sequence[Tensor], grad_outputs: Sequence[Tensor | None], inputs: Sequence[object]
) -> list[Tensor | None]:
    """d(outputs)/d(inputs) against grad_outputs; None for inputs that need no gradient."""
    pairs = [(out, grad) for out, grad in zip(outputs, grad_outputs) if grad is not None and out.requires_grad]
    wanted = [i for i, value in enumerate(inputs) if isinstance(value, Tensor) and value.requires_grad]
    result: list[Tensor | None] = [None] * len(inputs)
    if not pairs or not wanted:
        return result
    _refuse_unknown_leaves([out for out, _ in pairs], inputs)
    wrt = [inputs[i] for i in wanted]
    with _leaf_hooks_suspended(wrt):
        found = torch.autograd.grad([out for out, _ in pairs], wrt, [grad for _, grad in pairs], allow_unused=True)
    for i, grad in zip(wanted, found):
        result[i] = grad
    return result


@contextlib.contextmanager
def _leaf_hooks_suspended(tensors: Sequence[Tensor]) -> Iterator[None]:
    """Hold back the ``register_hook`` hooks of leaf tensors (the parameters) while the engine
    computes their gradients inside its own backward: the engine returns those gradients to the
    outer backward, which runs the hooks once, as plain autograd does, instead of twice."""
    suspended = []
    for tensor in tensors:
        hooks = tensor._backward_hooks if tensor.is_leaf else None
        if hooks:
            suspended.append((hooks, dict(hooks)))
            hooks.clear()
    try:
        yield
    finally:
        for hooks, entries in suspended:
            hooks.update(entries)


def _refuse_unknown_leaves(outputs: Sequence[Tensor], inputs: Sequence[object]) -> None:
    """Refuse a recomputed block whose graph reaches a tensor that requires grad and is neither one
    of ``inputs`` (the step's inputs and its modules' parameters) nor derived from them.

    Such a tensor (a parameter captured by a closure, or one of a module outside the block, or a
    tensor nested in a keyword argument) would get no gradient: the engine computes gradients for
    the tensors it knows. A block's graph is small, so walking it costs next to nothing.
    """
    known = {id(value) for value in inputs if isinstance(value, Tensor)}
    seen: set[int] = set()
    pending = [out.grad_fn for out in outputs]
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        leaf = getattr(node, "variable", None)  # AccumulateGrad nodes hold a leaf
        if leaf is None:
            pending.extend(next_node for next_node, _ in node.next_functions)
        elif id(leaf) not in known:
            refuse_in_backward(
                f"a reversible block uses a tensor of shape {tuple(leaf.shape)} that requires grad but is neither "
                "its input nor a parameter of its modules (a parameter captured by a function, a module outside "
                "the block, a tensor inside a keyword argument, or parameters swapped in for the forward pass only, "
                "as torch.func.functional_call does); the engine would drop its gradient. Make it a parameter of a "
                "module inside the block, or use memory_mode='autograd'"
            )


class _GradientRoot(torch.autograd.Function):
    """A scalar whose backward hands ``grad`` to ``output``.

    Backpropagating from this root instead of from ``output`` lets the engine drop its own
    reference to ``output`` (a sequence-long tensor) before the backward of the block runs: the
    node keeps the graph edge, not the values, and any node that needs the values saved them.
    """

    @staticmethod
    def forward(ctx, output: Tensor, grad: Tensor) -> Tensor:
        ctx.grad = grad
        return output.new_zeros(())

    @staticmethod
    def backward(ctx, _grad_root: Tensor):
        grad, ctx.grad = ctx.grad, None
        return grad, None


def _gradient_root(output: Tensor, grad: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(root, its gradient) standing for (``output``, ``grad``) in ``_gradients``."""
    if grad is None or not output.requires_grad:
        return output, grad
    with torch.enable_grad():  # the engine's backward runs with grad mode off
        root = _GradientRoot.apply(output, grad)
    return root, torch.ones((), dtype=output.dtype, device=output.device)


class BackwardWalk:
    """The stack (values and gradients) while the backward pass walks the steps in reverse.

    ``owned_*`` marks tensors the walk allocated itself and nobody else references, so
    they may be updated in place instead of copied.
    """

    def __init__(self, values: list[Tensor], grads: list[Tensor | None]) -> None:
        self.values = values
        self.grads = grads
        self.owned_values = [False] * len(values)
        self.owned_grads = [False] * len(values)

    def add_grad(self, position: int, grad: Tensor | None) -> None:
        if grad is None:
            return
        current = self.grads[position]
        if current is None:
            self.grads[position] = grad
            self.owned_grads[position] = False
        elif self.owned_grads[position] and current.shape == grad.shape and current.dtype == grad.dtype:
            current.add_(grad)
        else:
            self.grads[position] = current + grad
            self.owned_grads[position] = True


def _broadcasts_to(value: Tensor, stream: Tensor) -> bool:
    try:
        return torch.broadcast_shapes(value.shape, stream.shape) == stream.shape
    except RuntimeError:
        return False


def _call_module(block: nn.Module, items: Sequence[object], block_kwargs: dict) -> object:
    return block(*items, **block_kwargs) if block_kwargs else block(*items)


class ReversibleStep(Protocol):
    """What the engine needs from a step; ``CouplingStep``, ``PermutationStep`` and
    ``InvertibleStep`` implement it.

    - ``modules``: the modules whose parameters, buffers and RNG use the step owns;
    - ``n_items``: how many top stack items it reads or writes;
    - ``replays_randomness``: whether it calls a block (so RNG and autocast are recorded);
    - ``forward(stack, block_kwargs, invoke)``: the new stack; blocks are run through
      ``invoke(fn, *tensors)`` (plain, or under checkpoint);
    - ``backward(walk, replay, block_kwargs, params)``: rebuild the step's inputs in
      ``walk.values``, put their gradients in ``walk.grads`` and return the gradients of
      ``params``; every block call goes inside ``with replay():``.
    """

    modules: tuple[nn.Module, ...]
    n_items: int
    replays_randomness: bool

    def forward(self, stack: list, block_kwargs: dict, invoke: Invoke) -> list: ...

    def backward(self, walk: BackwardWalk, replay: Callable, block_kwargs: dict, params: list) -> list: ...


# block -> the coupling inverse it was last checked with (both held weakly: neither the module nor a
# closure is kept alive, and the module carries no attribute that would stop it from being pickled).
_CHECKED_INVERSES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class CouplingStep:
    """``stack[target] <- coupling_forward(stack[target], block(*stack[contexts], **block_kwargs))``.

    ``call_block(block, context_items, block_kwargs)`` runs the block (default: a plain
    module call) and must return one tensor.
    """

    def __init__(
        self,
        block: nn.Module,
        target: int,
        contexts: Sequence[int],
        coupling_forward: Coupling = additive_coupling_forward,
        coupling_inverse: Coupling = additive_coupling_inverse,
        call_block: Callable[[nn.Module, Sequence[object], dict], object] = _call_module,
    ) -> None:
        if target in contexts:
            raise ValueError(f"a coupling step cannot read the item it updates (target {target} in {contexts})")
        self.block = block
        self.target = target
        self.contexts = tuple(contexts)
        self.coupling_forward = coupling_forward
        self.coupling_inverse = coupling_inverse
        self.call_block = call_block
        self.modules = (block,)
        self.n_items = max(target, *self.contexts) + 1
        self.replays_randomness = True
        self.additive = (
            coupling_forward is additive_coupling_forward and coupling_inverse is additive_coupling_inverse
        )

    def block_output(self, context_items: Sequence[object], block_kwargs: dict) -> Tensor:
        out = self.call_block(self.block, context_items, block_kwargs)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"reversible block {type(self.block).__name__} returned {type(out).__name__}; "
                "a block must return one tensor shaped like the stream it updates"
            )
        return out

    def forward(self, stack: list, block_kwargs: dict, invoke: Invoke) -> list:
        context_items = [stack[i] for i in self.contexts]
        versions = [version_of(item) for item in context_items]
        fn_out = invoke(lambda *items: self.block_output(items, block_kwargs), *context_items)
        if any(changed_in_place(item, version) for item, version in zip(context_items, versions)):
            raise ValueError(
                f"block {type(self.block).__name__} changed its input in place (e.g. an inplace=True activation "
                "applied to it); the reversible engine rebuilds activations from unchanged inputs: make that "
                "operation out of place"
            )
        stream = stack[self.target]
        if isinstance(stream, Tensor) and not _broadcasts_to(fn_out, stream):
            self._stream_changed(stream, f"the block's output of shape {tuple(fn_out.shape)}")
        updated = self.coupling_forward(stream, fn_out)
        if isinstance(stream, Tensor) and (updated.shape != stream.shape or updated.dtype != stream.dtype):
            self._stream_changed(stream, f"shape {tuple(updated.shape)} and dtype {updated.dtype}")
        if not self.additive and isinstance(stream, Tensor) and not self._inverse_checked():
            self._check_inverse(stream, fn_out, updated)
        stack[self.target] = updated
        return stack

    def _inverse_checked(self) -> bool:
        checked = _CHECKED_INVERSES.get(self.block)
        return checked is not None and checked() is self.coupling_inverse

    def _check_inverse(self, stream: Tensor, fn_out: Tensor, updated: Tensor) -> None:
        """Once per block and inverse (the block remembers it): ``coupling_inverse(coupling_forward(x,
        f), f)`` must give x back, or backward would rebuild wrong activations and return wrong
        gradients without a word."""
        with torch.no_grad():
            rebuilt = self.coupling_inverse(updated, fn_out)
            scale = float(stream.abs().max()) + float(fn_out.abs().max()) + 1e-30
            error = float((rebuilt - stream).abs().max())
        if not _within_inverse_tolerance(error, scale, stream.dtype):
            raise ValueError(
                f"coupling_inverse does not undo coupling_forward for block {type(self.block).__name__}: "
                f"rebuilding the stream from the block's output is off by {error:.3g} (values up to {scale:.3g}); "
                "pass the exact inverse of the forward coupling"
            )
        _CHECKED_INVERSES[self.block] = weakref.ref(self.coupling_inverse)

    def _stream_changed(self, stream: Tensor, result: str) -> None:
        raise ValueError(
            f"block {type(self.block).__name__} updates a stream of shape {tuple(stream.shape)} and dtype "
            f"{stream.dtype} with {result}; a reversible step must keep its stream's shape and dtype: "
            "make the block's output match the stream"
        )

    def _one_pass_hook(self, grad_output: Tensor | None) -> Callable | None:
        """The block's ``rebuild_and_backward`` when this step can use it: an additive coupling,
        the default block call, and a gradient to propagate."""
        hook = getattr(self.block, "rebuild_and_backward", None)
        if hook is None or not self.additive or self.call_block is not _call_module or grad_output is None:
            return None
        if has_module_hooks(self.block) or not getattr(self.block, "one_pass_matches_forward", lambda: True)():
            return None  # calling the block runs more than the hook mirrors: rebuild it by calling it
        return hook

    def backward(self, walk: BackwardWalk, replay: Callable, block_kwargs: dict, params: list) -> list:
        target = self.target
        output, grad_output = walk.values[target], walk.grads[target]
        context_items = [_grad_leaf(walk.values[i]) for i in self.contexts]
        hook = self._one_pass_hook(grad_output)
        if hook is not None:
            # The block rebuilds the stream (y - f, in place) and back-propagates in one pass.
            rebuilt = output if walk.owned_values[target] else output.clone()
            with replay():
                found = hook(context_items, grad_output, [*context_items, *params], rebuilt, **block_kwargs)
            walk.values[target] = rebuilt
            walk.owned_values[target] = True
        else:
            found = self._rebuild_then_backward(walk, replay, block_kwargs, params, context_items)
        for position, grad in zip(self.contexts, found[: len(self.contexts)]):
            walk.add_grad(position, grad)
        return found[len(self.contexts) :]

    def _rebuild_then_backward(
        self, walk: BackwardWalk, replay: Callable, block_kwargs: dict, params: list, context_items: list
    ) -> list:
        """The generic path: re-run the block with autograd, rebuild the stream, back-propagate."""
        target = self.target
        output, grad_output = walk.values[target], walk.grads[target]
        with replay():
            fn_out = self.block_output(context_items, block_kwargs)
        # Additive coupling without broadcasting: dx = dy, and the block's gradient is dy.
        fast = self.additive and fn_out.shape == output.shape
        with torch.no_grad():
            if fast and walk.owned_values[target]:
                rebuilt = output.sub_(fn_out)  # reuse the buffer this walk allocated
            else:
                rebuilt = self.coupling_inverse(output, fn_out)
        wrt = [*context_items, *params]
        if fast:
            root, grad_root = _gradient_root(fn_out, grad_output)
            del fn_out  # its values are not needed any more; a node that saved them keeps its own reference
            found = _gradients([root], [grad_root], wrt)
            if grad_output is not None and any(g is not None and _shares_memory(g, grad_output) for g in found):
                walk.owned_grads[target] = False  # autograd handed grad_output itself back
        else:
            rebuilt_leaf = _grad_leaf(rebuilt)
            with replay():
                recoupled = self.coupling_forward(rebuilt_leaf, fn_out)
            del fn_out
            found = _gradients([recoupled], [grad_output], [rebuilt_leaf, *wrt])
            walk.grads[target] = found.pop(0)
            walk.owned_grads[target] = False
        walk.values[target] = rebuilt
        walk.owned_values[target] = fast
        return found


class PermutationStep:
    """Reorders the top items: new ``stack[i] = stack[order[i]]`` for ``i < len(order)``."""

    def __init__(self, order: Sequence[int]) -> None:
        if sorted(order) != list(range(len(order))):
            raise ValueError(f"a permutation step needs a permutation of 0..{len(order) - 1}, got {list(order)}")
        self.order = tuple(order)
        self.inverse_order = tuple(sorted(range(len(order)), key=lambda i: order[i]))
        self.modules = ()
        self.n_items = len(order)
        self.replays_randomness = False

    def forward(self, stack: list, block_kwargs: dict, invoke: Invoke) -> list:
        return [stack[i] for i in self.order] + stack[self.n_items :]

    def backward(self, walk: BackwardWalk, replay: Callable, block_kwargs: dict, params: list) -> list:
        for name in ("values", "grads", "owned_values", "owned_grads"):
            items = getattr(walk, name)
            items[: self.n_items] = [items[i] for i in self.inverse_order]
        return []


class InvertibleStep:
    """The general path: ``top = apply(*top)`` with an exact ``reverse(*top)``.

    ``apply`` and ``reverse`` take and return ``n_items`` values. ``module`` holds the
    parameters and buffers they use.
    """

    def __init__(self, module: nn.Module, n_items: int, apply: Callable, reverse: Callable) -> None:
        self.modules = (module,)
        self.n_items = n_items
        self.apply = apply
        self.reverse = reverse
        self.replays_randomness = True

    def _outputs(self, items: Sequence[object]) -> tuple:
        out = tuple(self.apply(*items))
        if len(out) != self.n_items:
            raise ValueError(f"{type(self.modules[0]).__name__} returned {len(out)} items, expected {self.n_items}")
        return out

    def forward(self, stack: list, block_kwargs: dict, invoke: Invoke) -> list:
        outputs = invoke(lambda *items: self._outputs(items), *stack[: self.n_items])
        return list(outputs) + stack[self.n_items :]

    def check_inverse(self, inputs: Sequence[object], outputs: Sequence[object], replay: Callable) -> None:
        """Once per layer: ``reverse(apply(x))`` must give x back, or backward would rebuild wrong
        inputs and return wrong gradients without a word. ``replay`` re-enters the forward call's
        RNG and buffer state, as the rebuild in backward does."""
        module = self.modules[0]
        if getattr(module, "_reverse_checked", False):
            return
        with replay(), torch.no_grad():
            rebuilt = self.reverse(*outputs[: self.n_items])
            for index, (original, again) in enumerate(zip(inputs[: self.n_items], rebuilt)):
                if not (isinstance(original, Tensor) and isinstance(again, Tensor)) or original.numel() == 0:
                    continue
                if not original.is_floating_point():  # masks, ids: exactly or not at all
                    exact = again.shape == original.shape and torch.equal(again, original)
                    error, scale = (0.0, 1.0) if exact else (float("inf"), 1.0)
                    tolerance_dtype = torch.float32
                else:
                    scale = float(original.abs().max()) + 1e-30
                    error = float((again - original).abs().max()) if again.shape == original.shape else float("inf")
                    tolerance_dtype = original.dtype
                if not _within_inverse_tolerance(error, scale, tolerance_dtype):
                    raise ValueError(
                        f"{type(module).__name__}.stack_reverse does not undo its forward: input {index} comes "
                        f"back off by {error:.3g} (values up to {scale:.3g}); backward rebuilds inputs with it, so "
                        "it must be the exact inverse"
                    )
        module._reverse_checked = True

    def backward(self, walk: BackwardWalk, replay: Callable, block_kwargs: dict, params: list) -> list:
        n = self.n_items
        with replay(), torch.no_grad():
            inputs = [_grad_leaf(value) for value in self.reverse(*walk.values[:n])]
        with replay():
            outputs = self._outputs(inputs)
        found = _gradients(outputs, walk.grads[:n], [*inputs, *params])
        del outputs
        walk.values[:n] = [value.detach() if isinstance(value, Tensor) else value for value in inputs]
        walk.grads[:n] = found[:n]
        walk.owned_values[:n] = [False] * n
        walk.owned_grads[:n] = [False] * n
        return found[n:]
