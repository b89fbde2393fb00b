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


def train(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> list[list[torch.Tensor]]:
    """SGD steps on mean-squared error; the gradients of every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    for step_inputs, step_targets in zip(inputs, targets):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(step_inputs), step_targets).backward()
        history.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
    return history


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        inputs, targets = global_batch()
        local = slice(rank * 4, (rank + 1) * 4)
        results = {}
        for mode in MODES:
            model = nn.parallel.DistributedDataParallel(make_model(*mode))
            results[mode] = train(model, inputs[:, local], targets[:, local])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_on_two_processes_matches_one_process_on_the_global_batch():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(os.path.join(out_dir, "init"), out_dir), nprocs=WORLD_SIZE, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD_SIZE)]
    inputs, targets = global_batch()
    expected = train(make_model("autograd"), inputs, targets)
    for mode in MODES:
        for rank_results in ranks:
            for got_step, want_step in zip(rank_results[mode], expected):
                for got, want in zip(got_step, want_step):
                    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
