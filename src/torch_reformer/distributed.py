"""Where a process sits in a ``torchrun`` job, and joining its process group.

Without ``torchrun`` (WORLD_SIZE unset or 1) everything here is a no-op: rank 0 of 1 on the CPU,
or on the first GPU when one is present.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    """Where this process sits in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistributedContext:
    """Join the ``torchrun`` process group (env://; NCCL with GPUs, gloo on CPU) when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistributedContext(rank=rank, world_size=world_size, device=device)


def all_reduce_sum(values: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    if context.active:
        values = values.to(context.device)
        dist.all_reduce(values)
    return values.cpu()


# ------------------------------------------------------------------------------ FSDP2 (sharded) state


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """Shard ``model`` as a whole with FSDP2's ``fully_shard``: between steps every process holds
    1/world of the parameters, gradients and optimizer state; during a step the parameters are
    gathered. (The reversible engine refuses sharding of the blocks it rebuilds on their own.)"""
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model)


def _is_dtensor(value: object) -> bool:
    return hasattr(value, "full_tensor") and hasattr(value, "placements")


def full_tensor(value):
    """The whole of a sharded tensor (a collective: every process must call it); other values as they are."""
    return value.full_tensor() if _is_dtensor(value) else value


def gather_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The model's and optimizer's state gathered whole onto rank 0's CPU, a tensor at a time (a
    collective: every process calls it; the others get empty dicts). The optimizer state has the
    layout of an unsharded optimizer's ``state_dict()``, so checkpoints do not depend on the sharding."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if not by_name:
        return weights, {}
    names = [name for group in by_name["param_groups"] for name in group["params"]]
    index = {name: position for position, name in enumerate(names)}  # as the optimizer numbers them
    return weights, {
        "state": {index[name]: entry for name, entry in by_name["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                         for group in by_name["param_groups"]],
    }


def _shard_like(value, reference):
    """``value`` (a whole tensor) cut like ``reference``, a sharded parameter; else unchanged."""
    if not (_is_dtensor(reference) and torch.is_tensor(value) and value.shape == reference.shape):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(reference.device, reference.dtype), reference.device_mesh, reference.placements)


def shard_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict:
    """Whole tensors of a saved state cut like the model's sharded ones, ready for ``load_state_dict``."""
    own = model.state_dict()
    return {name: _shard_like(tensor, own.get(name)) for name, tensor in state.items()}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A saved (whole) optimizer state cut like the optimizer's sharded parameters."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    sharded = {
        index: {key: _shard_like(value, params[int(index)]) for key, value in entry.items()}
        for index, entry in state["state"].items()
    }
    return {"state": sharded, "param_groups": state["param_groups"]}
