"""How to train: ``TrainingArguments``, the learning-rate schedule and the optimizer they define."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch


SCHEDULES = ("cosine", "rsqrt", "constant")


@dataclass
class TrainingArguments:
    """How to train. ``batch_size`` is global: split over processes, then over ``grad_accum`` micro-steps."""

    out_dir: str = "runs/duplication"  # config.json, metrics.json, log.csv, checkpoints/
    steps: int = 1000  # optimizer steps in total
    batch_size: int = 32  # sequences per optimizer step, over all processes
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.0  # AdamW decay of matrices (biases, norms and other 1-D weights never decay)
    adam_betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100  # linear warmup from 0 to lr
    schedule: str = "cosine"  # after warmup: "cosine" (to min_lr_ratio * lr), "rsqrt" or "constant"
    min_lr_ratio: float = 0.1
    clip_grad_norm: float | None = 1.0  # None: no clipping
    bf16: bool = False  # bf16 autocast for forward passes
    seed: int = 0
    eval_every: int = 100  # steps between evaluations (0: only at the end)
    eval_batch_size: int | None = None  # default: batch_size
    eval_num_hashes: int | None = None  # evaluate LSH layers with this many hash rounds
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 3  # newest checkpoints kept on disk
    resume: bool = False  # continue from the newest valid checkpoint in out_dir
    log_every: int = 10  # steps between log lines / CSV rows
    progress: bool | None = None  # a live progress bar; None: when stdout is a terminal
    fsdp: bool = False  # in a multi-process job, shard the model with FSDP2 instead of replicating it (DDP)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "keep_checkpoints", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        float32_max = torch.finfo(torch.float32).max  # the optimizer scales float32 updates by lr
        if not (math.isfinite(self.lr) and 0 < self.lr < float32_max):
            raise ValueError(f"lr must be a positive number below {float32_max:.3g}, got {self.lr!r}")
        if not (isinstance(self.min_lr_ratio, (int, float)) and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"min_lr_ratio (the cosine schedule's final lr / lr) must lie in [0, 1], got "
                             f"{self.min_lr_ratio!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be > 0 (or None for no clipping), got {self.clip_grad_norm!r}")
        if self.eval_num_hashes is not None and self.eval_num_hashes < 1:
            raise ValueError(f"eval_num_hashes must be >= 1, got {self.eval_num_hashes!r}")

    def check_batch_split(self, world_size: int) -> None:
        """Refuse a global batch that ``world_size`` processes x ``grad_accum`` micro-steps cannot share evenly."""
        shards = world_size * self.grad_accum
        if self.batch_size % shards:
            raise ValueError(
                f"--batch-size {self.batch_size} cannot be split evenly over {world_size} process(es) x "
                f"{self.grad_accum} accumulation step(s): use a multiple of {shards}"
            )

    def warn_about_warmup(self) -> None:
        if self.warmup_steps > self.steps and not self.resume:
            warnings.warn(f"warmup_steps {self.warmup_steps} > steps {self.steps}: the learning rate rises for the "
                          f"whole run and never reaches lr={self.lr:g}", stacklevel=3)


def learning_rate(step: int, args: TrainingArguments) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup, then the chosen decay."""
    if args.warmup_steps and step <= args.warmup_steps:
        return args.lr * step / args.warmup_steps
    if args.schedule == "constant":
        return args.lr
    if args.schedule == "rsqrt":
        return args.lr * math.sqrt(max(args.warmup_steps, 1) / step)
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cosine)


def build_optimizer(model: torch.nn.Module, args: TrainingArguments) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (biases, norms and 1-D weights are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.adam_betas))
