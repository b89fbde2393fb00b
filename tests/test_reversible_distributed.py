"""DistributedDataParallel over the reversible engine: 2 gloo processes equal one process."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from torch_reformer.reversible import ReversibleSequential

WORLD_SIZE = 2
STEPS = 3
# (memory mode, autograd tail); with a tail of 1 the shared block gets gradients from both the
# reversible chain and plain autograd.
MODES = (("reversible", 0), ("checkpoint", 0), ("reversible", 1))


def make_model(mode: str, autograd_tail: int = 0) -> nn.Module:
    torch.manual_seed(0)
    shared = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    blocks = [shared, nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Tanh()), shared]
    reversible = ReversibleSequential(*blocks, memory_mode=mode, autograd_tail=autograd_tail)
    return nn.Sequential(nn.Linear(3, 8), reversible, nn.Linear(8, 2)).double()


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(STEPS, 4 * WORLD_SIZE, 5, 3, generator=generator, dtype=torch.float64)
    targets = torch.randn(STEPS, 4 * WORLD_SIZE, 5, 2, generator=generator, dtype=torch.float64)
    return inputs, targets


def _full_grads(model: nn.Module) -> list[torch.Tensor]:
    """Each parameter's whole gradient (FSDP2 keeps a shard of it on each process)."""
    return [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in model.parameters()]


def train(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> list[list[torch.Tensor]]:
    """SGD steps on mean-squared error; the (whole) gradients of every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    for step_inputs, step_targets in zip(inputs, targets):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(step_inputs), step_targets).backward()
        history.append([grad.clone() for grad in _full_grads(model)])
        optimizer.step()
    return history


def assert_match_one_process(ranks: list[dict]) -> None:
    """Every mode's gradients on every rank equal plain autograd's in one process on the global batch."""
    inputs, targets = global_batch()
    expected = train(make_model("autograd"), inputs, targets)
    for mode in MODES:
        for rank_results in ranks:
            for got_step, want_step in zip(rank_results[mode], expected):
                for got, want in zip(got_step, want_step):
                    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _worker(rank: int, init_file: str, out_dir: str, body) -> None:
    """One process of a 2-process gloo job: ``body(local rows, inputs, targets)``'s results saved to disk."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        inputs, targets = global_batch()
        results = body(slice(rank * 4, (rank + 1) * 4), inputs, targets)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def on_two_processes(body) -> list[dict]:
    """Every rank's results of ``body`` (a module-level function, so that it can be spawned)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(os.path.join(out_dir, "init"), out_dir, body), nprocs=WORLD_SIZE, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD_SIZE)]


def _ddp_steps(local: slice, inputs: torch.Tensor, targets: torch.Tensor) -> dict:
    return {mode: train(nn.parallel.DistributedDataParallel(make_model(*mode)), inputs[:, local], targets[:, local])
            for mode in MODES}


def test_ddp_on_two_processes_matches_one_process_on_the_global_batch():
    assert_match_one_process(on_two_processes(_ddp_steps))


def _fsdp_steps(local: slice, inputs: torch.Tensor, targets: torch.Tensor) -> dict:
    from torch.distributed.fsdp import fully_shard

    results = {mode: train(fully_shard(make_model(*mode)), inputs[:, local], targets[:, local])
               for mode in MODES}  # the whole model sharded: every memory mode
    # A block inside the rebuilt chain sharded on its own is refused before any work; a block in the
    # autograd tail may be sharded (with the root sharded too, so the rest is reduced).
    model = make_model("reversible")
    fully_shard(model[1].blocks[1])
    try:
        model(inputs[0, local])
    except RuntimeError as error:
        results["refusal"] = str(error)
    torch.manual_seed(0)
    tail = ReversibleSequential(nn.Linear(1, 1), nn.Linear(1, 1), autograd_tail=1).double()
    fully_shard(tail.blocks[1])
    fully_shard(tail)  # the root holds the chain's parameters
    tail(inputs[0, local, :, :2].contiguous()).square().mean().backward()
    results["tail"] = _full_grads(tail)
    return results


def test_fsdp2_whole_model_sharding_matches_one_process_and_block_sharding_is_refused():
    ranks = on_two_processes(_fsdp_steps)
    assert_match_one_process(ranks)
    inputs, _ = global_batch()
    torch.manual_seed(0)
    tail = ReversibleSequential(nn.Linear(1, 1), nn.Linear(1, 1), autograd_tail=1).double()
    tail(inputs[0, :, :, :2].contiguous()).square().mean().backward()
    for rank_results in ranks:
        assert "fully_shard" in rank_results["refusal"] and "fully_shard(model)" in rank_results["refusal"]
        for got, param in zip(rank_results["tail"], tail.parameters()):
            torch.testing.assert_close(got, param.grad, rtol=1e-10, atol=1e-12)
