"""The reversible engine: train a chain of invertible steps without storing activations.

A reversible block holds two streams ``(x1, x2)`` and two functions ``f``, ``g``::

    y1 = x1 + f(x2)          x2 = y2 - g(y1)
    y2 = x2 + g(y1)          x1 = y1 - f(x2)

Because every step's inputs can be rebuilt from its outputs, the default
``memory_mode="reversible"`` keeps only the chain's final outputs. The backward pass
walks the steps in reverse: it rebuilds a step's inputs, re-runs its block with
autograd on, back-propagates through that one block and drops its graph, so training
memory is about one block's activations whatever the depth.

The engine is general: it runs a list of *steps* over a stack of tensors (stack item 0
is the top). Three kinds of step cover every front door:

- ``CouplingStep``: ``stack[target] <- coupling_forward(stack[target], block(*stack[contexts]))``
  (a RevNet half step; ``ReversibleSequential`` and ``ReversibleHalfResidual``);
- ``PermutationStep``: reorders the top items (``ReversibleSwap``);
- ``InvertibleStep``: any layer with a forward and an exact ``reverse`` (the general path).

One ``torch.autograd.Function`` (``_ReversibleChain``) runs the whole list. It takes the
steps' parameters as inputs and returns their gradients, so autograd accumulates them
normally (DistributedDataParallel then sees each parameter ready exactly once, and
parameters get gradients even when the stack's input needs none). Before each block
call it records the RNG state (CPU, and CUDA for CUDA tensors) and the autocast state;
the recomputation replays both, so dropout masks and random draws (LSH rotations) are
identical, and it puts the global RNG back afterwards. Buffers (BatchNorm running
statistics) are restored after a recomputation so they are updated once per step.

Blocks may keep state from their forward call for the recomputation (LSH stores its
bucket ids) through ``saved_state(owner)``; ``is_recomputing()`` tells a block that it is
being re-run.

Shapes: the engine does not constrain them. ``ReversibleSequential`` maps a tensor to a
tensor of the same shape, split in two equal halves along ``split_dim``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Protocol, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .block_state import BlockCallState, activated
from .block_state import is_recomputing, saved_state  # noqa: F401 - part of the engine's API

MEMORY_MODES = ("reversible", "checkpoint", "autograd")

Coupling = Callable[[Tensor, Tensor], Tensor]


def additive_coupling_forward(other_stream: Tensor, fn_out: Tensor) -> Tensor:
    """RevNet coupling: ``y = x + f``."""
    return other_stream + fn_out


def additive_coupling_inverse(output: Tensor, fn_out: Tensor) -> Tensor:
    """Inverse of the RevNet coupling: ``x = y - f``."""
    return output - fn_out


# --------------------------------------------------------------------------------------
# Replaying a block call: RNG, autocast, buffers
# --------------------------------------------------------------------------------------


def _autocast_states(device_type: str) -> tuple[tuple[str, bool, torch.dtype], ...]:
    """(device type, enabled, dtype) for the tensors' device type and for the CPU."""
    device_types = dict.fromkeys((device_type, "cpu"))
    return tuple(
        (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) for kind in device_types
    )


class _CallRecord:
    """What a forward block call needs to be replayed exactly."""

    __slots__ = ("cpu_rng", "device_rng", "state")

    def __init__(self, device: torch.device) -> None:
        self.cpu_rng = torch.get_rng_state()
        self.device_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.state = BlockCallState()


@contextlib.contextmanager
def _scratch_buffers(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Let a rerun update copies of the modules' buffers, then put the originals back.

    The originals are rebound rather than copied into, so the rerun's graph (which may
    have saved a buffer, as BatchNorm does) stays valid and the statistics are updated
    once per step, by the forward.
    """
    originals = []
    for module in modules:
        for owner in module.modules():
            for name, buffer in owner._buffers.items():
                if buffer is not None:
                    originals.append((owner, name, buffer))
                    owner._buffers[name] = buffer.clone()
    try:
        yield
    finally:
        for owner, name, buffer in originals:
            owner._buffers[name] = buffer


@contextlib.contextmanager
def _replaying(
    record: _CallRecord,
    device: torch.device,
    autocast_states: tuple[tuple[str, bool, torch.dtype], ...],
    modules: Sequence[nn.Module],
) -> Iterator[None]:
    """Re-enter a forward call's RNG, autocast and scratch state; undo their side effects after."""
    outer_cpu_rng = torch.get_rng_state()
    outer_device_rng = torch.cuda.get_rng_state(device) if record.device_rng is not None else None
    torch.set_rng_state(record.cpu_rng)
    if record.device_rng is not None:
        torch.cuda.set_rng_state(record.device_rng, device)
    try:
        with contextlib.ExitStack() as contexts:
            for device_type, enabled, dtype in autocast_states:
                contexts.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            contexts.enter_context(torch.enable_grad())
            contexts.enter_context(_scratch_buffers(modules))
            contexts.enter_context(activated(record.state, recomputing=True))
            yield
    finally:
        # Put the global generators back where the caller's code left them.
        torch.set_rng_state(outer_cpu_rng)
        if outer_device_rng is not None:
            torch.cuda.set_rng_state(outer_device_rng, device)


# --------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------


Invoke = Callable[..., object]


def _invoke_plain(fn: Callable[..., object], *args: object) -> object:
    return fn(*args)


def _grad_leaf(value: object) -> object:
    """A fresh autograd leaf sharing ``value``'s memory (floating tensors only)."""
    if isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()):
        return value.detach().requires_grad_()
    return value


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
    found = torch.autograd.grad(
        [out for out, _ in pairs], [inputs[i] for i in wanted], [grad for _, grad in pairs], allow_unused=True
    )
    for i, grad in zip(wanted, found):
        result[i] = grad
    return result


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


class _BackwardWalk:
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

    def backward(self, walk: _BackwardWalk, replay: Callable, block_kwargs: dict, params: list) -> list: ...


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
        fn_out = invoke(lambda *items: self.block_output(items, block_kwargs), *context_items)
        stream = stack[self.target]
        if isinstance(stream, Tensor) and not _broadcasts_to(fn_out, stream):
            self._stream_changed(stream, f"the block's output of shape {tuple(fn_out.shape)}")
        updated = self.coupling_forward(stream, fn_out)
        if isinstance(stream, Tensor) and (updated.shape != stream.shape or updated.dtype != stream.dtype):
            self._stream_changed(stream, f"shape {tuple(updated.shape)} and dtype {updated.dtype}")
        stack[self.target] = updated
        return stack

    def _stream_changed(self, stream: Tensor, result: str) -> None:
        raise ValueError(
            f"block {type(self.block).__name__} updates a stream of shape {tuple(stream.shape)} and dtype "
            f"{stream.dtype} with {result}; a reversible step must keep its stream's shape and dtype: "
            "make the block's output match the stream"
        )

    def backward(self, walk: _BackwardWalk, replay: Callable, block_kwargs: dict, params: list) -> list:
        target = self.target
        output, grad_output = walk.values[target], walk.grads[target]
        context_items = [_grad_leaf(walk.values[i]) for i in self.contexts]
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
        for position, grad in zip(self.contexts, found[: len(self.contexts)]):
            walk.add_grad(position, grad)
        return found[len(self.contexts) :]


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

    def backward(self, walk: _BackwardWalk, replay: Callable, block_kwargs: dict, params: list) -> list:
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

    def backward(self, walk: _BackwardWalk, replay: Callable, block_kwargs: dict, params: list) -> list:
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


# --------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------


def _step_parameters(steps: Sequence[ReversibleStep]) -> tuple[list[nn.Parameter], list[list[int]]]:
    """All parameters needing a gradient, once each, and each step's indices into that list."""
    params: list[nn.Parameter] = []
    index_of: dict[int, int] = {}
    per_step: list[list[int]] = []
    for step in steps:
        indices: list[int] = []
        for module in step.modules:
            for param in module.parameters():
                if not param.requires_grad:
                    continue
                if id(param) not in index_of:
                    index_of[id(param)] = len(params)
                    params.append(param)
                if index_of[id(param)] not in indices:
                    indices.append(index_of[id(param)])
        per_step.append(indices)
    return params, per_step


class _ChainRun:
    """One reversible call: the steps, and what backward needs to replay them."""

    def __init__(
        self, steps: Sequence[ReversibleStep], top: list[Tensor], block_kwargs: dict, params: list, per_step: list
    ) -> None:
        self.steps = steps
        self.n_items = len(top)
        self.block_kwargs = block_kwargs
        self.params = params
        self.per_step = per_step
        self.device = top[0].device
        self.autocast = _autocast_states(self.device.type)
        self.records: list[_CallRecord | None] = [None] * len(steps)
        self.outputs: list[Tensor] | None = None
        self.output_versions: list[int] = []

    def forward(self, stack: list) -> list:
        for k, step in enumerate(self.steps):
            if not step.replays_randomness:
                stack = step.forward(stack, self.block_kwargs, _invoke_plain)
                continue
            record = self.records[k] = _CallRecord(self.device)
            with activated(record.state, recomputing=False):
                stack = step.forward(stack, self.block_kwargs, _invoke_plain)
        return stack

    def keep_outputs(self, outputs: list[Tensor]) -> None:
        """Hold the outputs for backward without ``save_for_backward``.

        Detached aliases share the outputs' memory and version counters but not their
        graph, so there is no reference cycle, and the walk can drop each output as soon
        as it has rebuilt the step's input from it instead of holding it to the end.
        """
        self.outputs = [output.detach() for output in outputs]
        self.output_versions = [output._version for output in outputs]

    def _take_outputs(self) -> list[Tensor]:
        outputs, self.outputs = self.outputs, None
        if any(output._version != version for output, version in zip(outputs, self.output_versions)):
            raise RuntimeError(
                "an output of the reversible engine was modified in place before the backward pass; "
                "the engine rebuilds activations from its outputs: clone an output before changing it in place"
            )
        return outputs

    def backward(self, grads: list[Tensor | None]) -> tuple[list, list]:
        walk = _BackwardWalk(self._take_outputs(), list(grads))
        param_grads: list[Tensor | None] = [None] * len(self.params)
        for k in reversed(range(len(self.steps))):
            step, record = self.steps[k], self.records[k]
            params = [self.params[i] for i in self.per_step[k]]
            replay = lambda: _replaying(record, self.device, self.autocast, step.modules)  # noqa: E731
            found = step.backward(walk, replay, self.block_kwargs, params)
            self.records[k] = None  # frees this call's saved_state
            for i, grad in zip(self.per_step[k], found):
                if grad is not None:
                    current = param_grads[i]
                    param_grads[i] = grad if current is None else current + grad
        return walk.grads, param_grads


class _ReversibleChain(torch.autograd.Function):
    """Runs a chain of steps keeping only its outputs; rebuilds and backpropagates step by step."""

    @staticmethod
    def forward(ctx, run: _ChainRun, *tensors: Tensor) -> tuple[Tensor, ...]:
        outputs = run.forward(list(tensors[: run.n_items]))
        ctx.run = run
        ctx.set_materialize_grads(False)
        run.keep_outputs(outputs)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor | None) -> tuple:
        run: _ChainRun | None = ctx.run
        if run is None:
            raise RuntimeError(
                "the reversible engine's backward runs once per forward (retain_graph is not supported); "
                "run the forward again or use memory_mode='autograd'"
            )
        stream_grads, param_grads = run.backward(list(grad_outputs))
        ctx.run = None
        needs = ctx.needs_input_grad[1 : 1 + run.n_items]
        stream_grads = [grad if need else None for grad, need in zip(stream_grads, needs)]
        return (None, *stream_grads, *param_grads)


def _check_memory_mode(memory_mode: object) -> None:
    if memory_mode not in MEMORY_MODES:
        raise ValueError(f"memory_mode must be one of {MEMORY_MODES}, got {memory_mode!r}")


def _checkpointing_invoke(modules: Sequence[nn.Module]) -> Invoke:
    """Invoke a block under torch.utils.checkpoint with saved_state and buffer restoring."""

    def invoke(fn: Callable[..., object], *args: object) -> object:
        state = BlockCallState()

        def call_with_state(*items: object) -> object:
            recomputing = state.calls > 0
            state.calls += 1
            buffers = _scratch_buffers(modules) if recomputing else contextlib.nullcontext()
            with buffers, activated(state, recomputing):
                return fn(*items)

        return checkpoint(call_with_state, *args, use_reentrant=False)

    return invoke


def _run_plain(steps: Sequence[ReversibleStep], stack: list, block_kwargs: dict, checkpointed: bool) -> list:
    for step in steps:
        invoke = _checkpointing_invoke(step.modules) if checkpointed and step.modules else _invoke_plain
        stack = step.forward(stack, block_kwargs, invoke)
    return stack


def _check_reversible_inputs(top: Sequence[object], block_kwargs: dict) -> None:
    for position, item in enumerate(top):
        if not isinstance(item, Tensor):
            raise TypeError(
                f"the reversible engine moves tensors only; stack item {position} is {type(item).__name__}: "
                "keep other values below the reversible layers' inputs or pass them as block keyword arguments"
            )
    for name, value in block_kwargs.items():
        if isinstance(value, Tensor) and value.requires_grad:
            raise ValueError(
                f"block keyword argument {name!r} requires grad, but memory_mode='reversible' passes keyword "
                "tensors without gradient: detach it, route it through the streams, or use "
                "memory_mode='checkpoint' or 'autograd'"
            )


def run_reversible_steps(
    steps: Sequence[ReversibleStep],
    stack: Sequence[object],
    *,
    memory_mode: str = "reversible",
    block_kwargs: dict | None = None,
) -> list:
    """Run ``steps`` over ``stack`` (top first) and return the new stack.

    Items below the deepest item any step touches pass through untouched. Under
    ``torch.no_grad`` every mode is a plain loop.
    """
    _check_memory_mode(memory_mode)
    kwargs = dict(block_kwargs or {})
    stack = list(stack)
    if memory_mode == "autograd" or not torch.is_grad_enabled():
        return _run_plain(steps, stack, kwargs, checkpointed=False)
    if memory_mode == "checkpoint":
        return _run_plain(steps, stack, kwargs, checkpointed=True)
    depth = max([step.n_items for step in steps] + [0])
    if depth > len(stack):
        raise ValueError(f"the reversible steps need {depth} stack items, got {len(stack)}")
    top = stack[:depth]
    _check_reversible_inputs(top, kwargs)
    params, per_step = _step_parameters(steps)
    if not params and not any(item.requires_grad for item in top):
        return _run_plain(steps, stack, kwargs, checkpointed=False)
    run = _ChainRun(steps, top, kwargs, params, per_step)
    outputs = _ReversibleChain.apply(run, *top, *params)
    return list(outputs) + stack[depth:]


# --------------------------------------------------------------------------------------
# The two-stream front door
# --------------------------------------------------------------------------------------


def _coupling_list(coupling: Coupling | Sequence[Coupling], name: str, n_blocks: int) -> list[Coupling]:
    couplings = list(coupling) if isinstance(coupling, (list, tuple)) else [coupling]
    if not 1 <= len(couplings) <= n_blocks:
        raise ValueError(
            f"{name} has {len(couplings)} entries for {n_blocks} blocks; a coupling list is cycled over the "
            f"blocks and must have between 1 and {n_blocks} entries"
        )
    for i, fn in enumerate(couplings):
        if not callable(fn):
            raise TypeError(f"{name}[{i}] is {type(fn).__name__}, not a function (other_stream, fn_out) -> tensor")
    return couplings


def coupling_steps(
    blocks: Sequence[nn.Module],
    coupling_forward: Coupling | Sequence[Coupling] | None = None,
    coupling_inverse: Coupling | Sequence[Coupling] | None = None,
) -> list[CouplingStep]:
    """Two-stream steps: block i updates stream ``i % 2`` from the other stream.

    Couplings default to additive; a list of couplings is cycled over the blocks.
    """
    blocks = list(blocks)
    if not blocks:
        raise ValueError("a reversible chain needs at least one block")
    for i, block in enumerate(blocks):
        if not isinstance(block, nn.Module):
            raise TypeError(
                f"block {i} is {type(block).__name__}, not an nn.Module: wrap functions in a module "
                "(e.g. torch_reformer.combinators.Fn) and pass blocks as separate arguments"
            )
    if (coupling_forward is None) != (coupling_inverse is None):
        raise ValueError("pass both coupling_forward and coupling_inverse (its exact inverse), or neither")
    if coupling_forward is None:
        coupling_forward, coupling_inverse = additive_coupling_forward, additive_coupling_inverse
    forwards = _coupling_list(coupling_forward, "coupling_forward", len(blocks))
    inverses = _coupling_list(coupling_inverse, "coupling_inverse", len(blocks))
    if len(forwards) != len(inverses):
        raise ValueError(
            f"coupling_forward has {len(forwards)} entries but coupling_inverse has {len(inverses)}; "
            "they pair up entry by entry and must have the same length"
        )
    return [
        CouplingStep(block, i % 2, ((i + 1) % 2,), forwards[i % len(forwards)], inverses[i % len(inverses)])
        for i, block in enumerate(blocks)
    ]


def reversible_forward(
    x1: Tensor,
    x2: Tensor,
    blocks: Sequence[nn.Module],
    *,
    coupling_forward: Coupling | Sequence[Coupling] | None = None,
    coupling_inverse: Coupling | Sequence[Coupling] | None = None,
    memory_mode: str = "reversible",
    block_kwargs: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the two-stream chain: block i is ``f`` for even i and ``g`` for odd i.

    even i:  ``x1 <- coupling_forward(x1, blocks[i](x2, **block_kwargs))``
    odd i:   ``x2 <- coupling_forward(x2, blocks[i](x1, **block_kwargs))``

    (for additive coupling: ``y1 = x1 + f(x2)``; ``y2 = x2 + g(y1)``). Returns the final
    ``(x1, x2)``. ``coupling_forward`` / ``coupling_inverse`` may each be a function or a
    list of functions cycled over the blocks. ``block_kwargs`` (may hold tensors such as
    an attention mask, which get no gradient) are passed to every block call; when empty
    or None a block is called as ``block(x)``.
    """
    _check_memory_mode(memory_mode)
    for name, stream in (("x1", x1), ("x2", x2)):
        if not isinstance(stream, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(stream).__name__}")
    steps = coupling_steps(blocks, coupling_forward, coupling_inverse)
    y1, y2 = run_reversible_steps(steps, [x1, x2], memory_mode=memory_mode, block_kwargs=block_kwargs)
    return y1, y2


class ReversibleSequential(nn.Module):
    """A RevNet over arbitrary blocks: maps a tensor to a tensor of the same shape.

    The input is split into two equal halves along ``split_dim``; blocks alternate
    ``f, g, f, g, ...`` (an odd count is allowed) as in ``reversible_forward``; the two
    output streams are concatenated back along ``split_dim``. Keyword arguments of
    ``forward`` are passed to every block.
    """

    def __init__(
        self,
        *blocks: nn.Module,
        split_dim: int = -1,
        coupling_forward: Coupling | Sequence[Coupling] | None = None,
        coupling_inverse: Coupling | Sequence[Coupling] | None = None,
        memory_mode: str = "reversible",
    ) -> None:
        super().__init__()
        _check_memory_mode(memory_mode)
        if isinstance(split_dim, bool) or not isinstance(split_dim, int):
            raise TypeError(f"split_dim must be an int, got {type(split_dim).__name__}")
        coupling_steps(blocks, coupling_forward, coupling_inverse)  # validates blocks and couplings
        self.blocks = nn.ModuleList(blocks)
        self.split_dim = split_dim
        self.coupling_forward = coupling_forward
        self.coupling_inverse = coupling_inverse
        self.memory_mode = memory_mode

    def forward(self, x: Tensor, **block_kwargs: object) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"ReversibleSequential expects a tensor, got {type(x).__name__}")
        if not -x.dim() <= self.split_dim < x.dim():
            raise ValueError(f"split_dim={self.split_dim} is out of range for an input of shape {tuple(x.shape)}")
        size = x.shape[self.split_dim]
        if size % 2:
            raise ValueError(
                f"ReversibleSequential splits dim {self.split_dim} of the input (shape {tuple(x.shape)}) into two "
                f"equal streams, but its size {size} is odd: make that dimension even or choose another split_dim"
            )
        x1, x2 = x.chunk(2, dim=self.split_dim)  # two views, no copy
        y1, y2 = reversible_forward(
            x1,
            x2,
            self.blocks,
            coupling_forward=self.coupling_forward,
            coupling_inverse=self.coupling_inverse,
            memory_mode=self.memory_mode,
            block_kwargs=block_kwargs,
        )
        return torch.cat((y1, y2), dim=self.split_dim)

    def extra_repr(self) -> str:
        return f"split_dim={self.split_dim}, memory_mode={self.memory_mode!r}"
