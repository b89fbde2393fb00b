"""What a training run reports: progress lines, ``log.csv`` (+ TensorBoard) and ``metrics.json``."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from .checkpoints import write_json


CSV_FIELDS = ("step", "lr", "train_loss", "grad_norm", "tokens_per_second", "elapsed_seconds",
               "eval_loss", "eval_accuracy", "eval_bpc")


class LineReporter:
    """Plain progress lines on stdout every ``log_every`` steps (and after each evaluation)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def start(self, first_step: int, total_steps: int) -> None:
        self.total_steps = total_steps

    def step(self, step: int, loss: float, tokens_per_second: float) -> None:
        pass  # lines are written per log row only

    def update(self, record: dict) -> None:
        parts = [f"step {record['step']}/{self.total_steps}"]
        for key, fmt in (("train_loss", ".4f"), ("eval_loss", ".4f"), ("eval_accuracy", ".4f"),
                         ("eval_bpc", ".4f"), ("lr", ".2e"), ("tokens_per_second", ".0f")):
            if record.get(key) is not None:
                parts.append(f"{key} {record[key]:{fmt}}")
        self.message(" | ".join(parts))

    def message(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class RunLog:
    """``log.csv`` (+ TensorBoard when installed) and ``metrics.json`` of a run; used on rank 0 only."""

    def __init__(self, out_dir: Path, resumed_step: int):
        self.csv_path, self.metrics_path = out_dir / "log.csv", out_dir / "metrics.json"
        kept = []
        if resumed_step and self.csv_path.is_file():  # drop rows a killed run logged after its checkpoint
            with open(self.csv_path, newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= resumed_step]
        self.handle = open(self.csv_path, "w", newline="")
        self.writer = csv.DictWriter(self.handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(kept)
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package
        except ImportError:
            SummaryWriter = None
        if SummaryWriter is not None:
            self.tensorboard = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=resumed_step + 1)

    def row(self, record: dict) -> None:
        self.writer.writerow(record)
        self.handle.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, float):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.metrics_path, metrics)

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
