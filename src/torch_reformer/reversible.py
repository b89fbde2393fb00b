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
is the top). Three kinds of step (``reversible_steps.py``) cover every front door:

- ``CouplingStep``: ``stack[target] <- coupling_forward(stack[target], block(*stack[contexts]))``
  (a RevNet half step; ``ReversibleSequential`` and ``ReversibleHalfResidual``);
- ``PermutationStep``: reorders the top items (``ReversibleSwap``);
- ``InvertibleStep``: any layer with a forward and an exact ``reverse`` (the general path).

One ``torch.autograd.Function`` (``_ReversibleChain``) runs the list (all of it unless an
``autograd_tail`` is given, see below). It takes the steps' parameters as inputs and
returns their gradients, so autograd accumulates them normally (DistributedDataParallel
then sees each parameter ready exactly once, and parameters get gradients even when the
stack's input needs none). Before each block
call it records the RNG state (CPU, and CUDA for CUDA tensors) and the autocast state;
the recomputation replays both, so dropout masks and random draws (LSH rotations) are
identical, and it puts the global RNG back afterwards. Buffers (BatchNorm running
statistics) are restored after a recomputation so they are updated once per step. Anything
else a rebuild depends on (train/eval flags, forward hooks, the parameters' identity, values and
``requires_grad``) is recorded with the call, and a rebuild that would find it changed is refused.

The last ``autograd_tail`` steps may run with plain autograd after the chain: backward needs
their activations first, so keeping their graph from the forward pass instead of rebuilding
and re-running them costs those steps' activations once (constant in depth) and saves one
forward of each (a Reformer keeps its last layer this way). The chain's outputs, which the tail
reads, are kept as usual.

Blocks may keep state from their forward call for the recomputation (LSH stores its
bucket ids) through ``saved_state(owner)``; ``is_recomputing()`` tells a block that it is
being re-run.

Shapes: the engine does not constrain them. ``ReversibleSequential`` maps a tensor to a
tensor of the same shape, split in two equal halves along ``split_dim``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .autograd_checks import changed_in_place, refuse_create_graph, refuse_in_backward, run_eagerly, version_of
from .block_state import BlockCallState, activated
from .block_state import is_recomputing, next_call_index, saved_state  # noqa: F401 - part of the engine's API
from .replay import (
    BufferSnapshot, CallRecord, InputFingerprint, ModulesState, autocast_states, replaying, scratch_buffers,
)
from .reversible_steps import (
    Coupling,
    CouplingStep,
    Invoke,
    ReversibleStep,
    BackwardWalk,
    invoke_plain,
    additive_coupling_forward,
    additive_coupling_inverse,
)

MEMORY_MODES = ("reversible", "checkpoint", "autograd")


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


def _has_uninitialized_parameters(steps: Sequence[ReversibleStep]) -> bool:
    return any(
        isinstance(param, nn.parameter.UninitializedParameter)
        for step in steps for module in step.modules for param in module.parameters()
    )


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
        self.autocast = autocast_states(self.device.type)
        self.records: list[CallRecord | None] = [None] * len(steps)
        self.outputs: list[Tensor] | None = None
        self.output_versions: list[int | None] = []
        self.input_fingerprint = InputFingerprint(top)

    def forward(self, stack: list) -> list:
        for k, step in enumerate(self.steps):
            if not step.replays_randomness:
                stack = step.forward(stack, self.block_kwargs, invoke_plain)
                continue
            record = self.records[k] = CallRecord(self.device)
            inputs = stack
            buffers = BufferSnapshot(step.modules)
            with activated(record.state, recomputing=False):
                stack = step.forward(stack, self.block_kwargs, invoke_plain)
            record.modules_state = ModulesState(step.modules)
            record.buffers_before = buffers.changed()
            check_inverse = getattr(step, "check_inverse", None)
            if check_inverse is not None:
                check_inverse(inputs, stack, lambda: replaying(record, self.device, self.autocast, step.modules))
        return stack

    def keep_outputs(self, outputs: list[Tensor]) -> None:
        """Hold the outputs for backward without ``save_for_backward``.

        Detached aliases share the outputs' memory and version counters but not their
        graph, so there is no reference cycle, and the walk can drop each output as soon
        as it has rebuilt the step's input from it instead of holding it to the end.
        """
        self.outputs = [output.detach() for output in outputs]
        self.output_versions = [version_of(output) for output in outputs]

    def _take_outputs(self) -> list[Tensor]:
        outputs, self.outputs = self.outputs, None
        if any(changed_in_place(output, version) for output, version in zip(outputs, self.output_versions)):
            refuse_in_backward("an output of the reversible engine was modified in place before the backward pass; "
                    "the engine rebuilds activations from its outputs: clone an output before changing it in place")
        return outputs

    def backward(self, grads: list[Tensor | None]) -> tuple[list, list]:
        walk = BackwardWalk(self._take_outputs(), list(grads))
        for step, record in zip(self.steps, self.records):  # refuse before any rebuild if anything changed
            if record is not None:
                record.modules_state.refuse_changes(step.modules)
        param_grads: list[Tensor | None] = [None] * len(self.params)
        for k in reversed(range(len(self.steps))):
            step, record = self.steps[k], self.records[k]
            params = [self.params[i] for i in self.per_step[k]]
            replay = lambda: replaying(record, self.device, self.autocast, step.modules)  # noqa: E731
            found = step.backward(walk, replay, self.block_kwargs, params)
            self.records[k] = None  # frees this call's saved_state
            for i, grad in zip(self.per_step[k], found):
                if grad is not None:
                    current = param_grads[i]
                    param_grads[i] = grad if current is None else current + grad
        self.input_fingerprint.warn_if_drifted(walk.values)
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
        refuse_create_graph(
            "the reversible engine (memory_mode 'reversible')",
            "memory_mode='autograd' supports it for blocks that do (the Reformer's attention layers do not)",
        )
        run: _ChainRun | None = ctx.run
        if run is None:
            refuse_in_backward("the reversible engine's backward runs once per forward (retain_graph is not supported); "
                    "run the forward again or use memory_mode='autograd'")
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
        modules_state: list[ModulesState] = []  # taken once the forward call is done
        buffers_before: dict = {}  # the values the forward read of the buffers it changed

        def call_with_state(*items: object) -> object:
            recomputing = state.calls > 0
            if recomputing and modules_state:
                modules_state[0].refuse_changes(modules)
            state.calls += 1
            if recomputing:
                with scratch_buffers(modules, buffers_before), activated(state, recomputing):
                    return fn(*items)
            snapshot = None if torch.compiler.is_compiling() else BufferSnapshot(modules)
            with activated(state, recomputing):
                result = fn(*items)
            if snapshot is not None:
                buffers_before.update(snapshot.changed())
            return result

        result = checkpoint(call_with_state, *args, use_reentrant=False)
        if not torch.compiler.is_compiling():  # a graph break here would break dynamo's checkpoint tracing
            modules_state.append(ModulesState(modules))
        return result

    return invoke


def _run_plain(steps: Sequence[ReversibleStep], stack: list, block_kwargs: dict, checkpointed: bool) -> list:
    for step in steps:
        invoke = _checkpointing_invoke(step.modules) if checkpointed and step.modules else invoke_plain
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


def _check_autograd_tail(autograd_tail: object) -> None:
    if isinstance(autograd_tail, bool) or not isinstance(autograd_tail, int) or autograd_tail < 0:
        raise ValueError(
            f"autograd_tail must be an int >= 0 (how many final steps keep their autograd graph), got {autograd_tail!r}"
        )


def run_reversible_steps(
    steps: Sequence[ReversibleStep],
    stack: Sequence[object],
    *,
    memory_mode: str = "reversible",
    block_kwargs: dict | None = None,
    autograd_tail: int = 0,
) -> list:
    """Run ``steps`` over ``stack`` (top first) and return the new stack.

    Items below the deepest item any step touches pass through untouched. Under
    ``torch.no_grad`` every mode is a plain loop. In the "reversible" and "checkpoint" modes
    the last ``autograd_tail`` steps run with plain autograd (their graph is kept, not rebuilt).
    """
    _check_memory_mode(memory_mode)
    _check_autograd_tail(autograd_tail)
    kwargs = dict(block_kwargs or {})
    stack = list(stack)
    if memory_mode == "autograd" or not torch.is_grad_enabled():
        return _run_plain(steps, stack, kwargs, checkpointed=False)
    split = max(len(steps) - autograd_tail, 0)
    head, tail = steps[:split], steps[split:]
    _refuse_sharded_blocks(head, memory_mode)
    if memory_mode == "checkpoint":
        stack = _run_plain(head, stack, kwargs, checkpointed=True)
    else:
        stack = _run_chain(head, stack, kwargs)
    return _run_plain(tail, stack, kwargs, checkpointed=False)


def _refuse_sharded_blocks(steps: Sequence[ReversibleStep], memory_mode: str) -> None:
    """Refuse, before any work, a rebuilt block under FSDP2's ``fully_shard``: FSDP swaps a sharded
    module's parameters for gathered copies around each of its calls, so the rebuild would not see
    the tensors the forward pass used (the state checks would refuse it later, in backward, with a
    less helpful message). Sharding the whole model, or only blocks that keep their graph, works."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return  # fully_shard needs a process group: nothing can be sharded
    from torch.distributed.fsdp import FSDPModule

    for step in steps:
        for owned in step.modules:
            sharded = next((m for m in owned.modules() if isinstance(m, FSDPModule)), None)
            if sharded is not None:
                raise RuntimeError(
                    f"{type(sharded).__name__} inside a reversible block is sharded with FSDP2's fully_shard, which "
                    f"memory_mode={memory_mode!r} cannot rebuild: FSDP swaps a sharded module's parameters around "
                    "each call. Shard the whole model instead (fully_shard(model), which works in every memory "
                    "mode), keep the sharded blocks in the autograd tail (kept_graph_layers), or use "
                    "memory_mode='autograd'"
                )


def _run_chain(steps: Sequence[ReversibleStep], stack: list, kwargs: dict) -> list:
    """The reversible chain over ``steps`` (plain autograd where nothing needs a gradient)."""
    if not steps:
        return stack
    depth = max([step.n_items for step in steps] + [0])
    if depth > len(stack):
        raise ValueError(f"the reversible steps need {depth} stack items, got {len(stack)}")
    top = stack[:depth]
    _check_reversible_inputs(top, kwargs)
    if _has_uninitialized_parameters(steps):
        # Lazy modules create their parameters during this first call, and the engine must know
        # them before it: this one call runs with plain autograd.
        return _run_plain(steps, stack, kwargs, checkpointed=False)
    params, per_step = _step_parameters(steps)
    if not params and not any(item.requires_grad for item in top):
        return _run_plain(steps, stack, kwargs, checkpointed=False)
    outputs = _apply_chain(_ChainRun(steps, top, kwargs, params, per_step), top, params)
    return list(outputs) + stack[depth:]


@run_eagerly
def _apply_chain(run: _ChainRun, top: list[Tensor], params: list[nn.Parameter]) -> tuple[Tensor, ...]:
    """The chain runs eagerly under torch.compile: its backward rebuilds the blocks eagerly, and a
    compiled forward would draw its dropout masks from inductor's own generator, which the
    rebuild cannot replay."""
    return _ReversibleChain.apply(run, *top, *params)


# --------------------------------------------------------------------------------------
# The two-stream front door
# --------------------------------------------------------------------------------------


def _coupling_list(coupling: Coupling | Sequence[Coupling], name: str, n_blocks: int) -> list[Coupling]:
    couplings = list(coupling) if isinstance(coupling, (list, tuple)) else [coupling]
    if not 1 <= len(couplings) <= n_blocks:
        raise ValueError(
            f"{name} has {len(couplings)} entries for {n_blocks} block(s): pass at least one and at most one "
            "per block (a shorter list is cycled over the blocks)"
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
    autograd_tail: int = 0,
) -> tuple[Tensor, Tensor]:
    """Run the two-stream chain: block i is ``f`` for even i and ``g`` for odd i.

    even i:  ``x1 <- coupling_forward(x1, blocks[i](x2, **block_kwargs))``
    odd i:   ``x2 <- coupling_forward(x2, blocks[i](x1, **block_kwargs))``

    (for additive coupling: ``y1 = x1 + f(x2)``; ``y2 = x2 + g(y1)``). Returns the final
    ``(x1, x2)``. ``coupling_forward`` / ``coupling_inverse`` may each be a function or a
    list of functions cycled over the blocks. ``block_kwargs`` (may hold tensors such as
    an attention mask, which get no gradient) are passed to every block call; when empty
    or None a block is called as ``block(x)``. The last ``autograd_tail`` blocks run with
    plain autograd (see ``run_reversible_steps``).
    """
    _check_memory_mode(memory_mode)
    for name, stream in (("x1", x1), ("x2", x2)):
        if not isinstance(stream, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(stream).__name__}")
    steps = coupling_steps(blocks, coupling_forward, coupling_inverse)
    y1, y2 = run_reversible_steps(
        steps, [x1, x2], memory_mode=memory_mode, block_kwargs=block_kwargs, autograd_tail=autograd_tail
    )
    return y1, y2


class ReversibleSequential(nn.Module):
    """A RevNet over arbitrary blocks: maps a tensor to a tensor of the same shape.

    The input is split into two equal halves along ``split_dim``; blocks alternate
    ``f, g, f, g, ...`` (an odd count is allowed) as in ``reversible_forward``; the two
    output streams are concatenated back along ``split_dim``. Keyword arguments of
    ``forward`` are passed to every block. The last ``autograd_tail`` blocks keep their
    autograd graph instead of being rebuilt (see ``run_reversible_steps``).

    With ``memory_mode="reversible"`` the blocks run without autograd in the forward pass: a
    tensor a block creates besides its output (an auxiliary loss kept on the module, a value a
    hook captures) carries no gradient. Losses built from such tensors need ``"checkpoint"`` or
    ``"autograd"``.
    """

    def __init__(
        self,
        *blocks: nn.Module,
        split_dim: int = -1,
        coupling_forward: Coupling | Sequence[Coupling] | None = None,
        coupling_inverse: Coupling | Sequence[Coupling] | None = None,
        memory_mode: str = "reversible",
        autograd_tail: int = 0,
    ) -> None:
        super().__init__()
        _check_memory_mode(memory_mode)
        _check_autograd_tail(autograd_tail)
        if isinstance(split_dim, bool) or not isinstance(split_dim, int):
            raise TypeError(
                f"split_dim must be an int naming the dimension cut into the two streams, got "
                f"{type(split_dim).__name__}; to give both streams the same input, pass torch.cat([x, x], dim) "
                "with split_dim=dim"
            )
        coupling_steps(blocks, coupling_forward, coupling_inverse)  # validates blocks and couplings
        self.blocks = nn.ModuleList(blocks)
        self.split_dim = split_dim
        self.coupling_forward = coupling_forward
        self.coupling_inverse = coupling_inverse
        self.memory_mode = memory_mode
        self.autograd_tail = autograd_tail

    def forward(self, x: Tensor, *extra: object, **block_kwargs: object) -> Tensor:
        if extra:
            raise TypeError(
                f"ReversibleSequential takes one input tensor and passes extra inputs to every block by keyword; "
                f"got {len(extra)} more positional argument(s): call it as net(x, name=value) (for example "
                "net(x, mask=mask)) with blocks that accept that keyword"
            )
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
            autograd_tail=self.autograd_tail,
        )
        return torch.cat((y1, y2), dim=self.split_dim)

    def extra_repr(self) -> str:
        return f"split_dim={self.split_dim}, memory_mode={self.memory_mode!r}, autograd_tail={self.autograd_tail}"
