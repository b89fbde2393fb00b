"""What stops a training run early, or refuses to start it: signals and the memory floor.

``StopOnSignal`` turns the first SIGINT/SIGTERM into a request the training loop honours at the end
of the current step (after checkpointing it). ``check_memory_floor`` refuses a micro-batch that
cannot fit in the memory available, with an error that says what to shrink, instead of letting the
kernel kill the process mid-step.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import torch

from .distributed import DistributedContext, all_reduce_sum


class StopOnSignal:
    """While training: the first SIGINT or SIGTERM asks the loop to stop at the end of the current
    step (it checkpoints first, so nothing is lost); a second signal of either kind interrupts at once. Handlers
    are installed only in the main thread (Python delivers signals there) and restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_request: Callable[[str], None] | None = None):
        self.requested: int | None = None
        self.on_request = on_request  # told once, with the signal's name, when a stop is first asked for
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:  # asked twice: stop now
            raise KeyboardInterrupt
        if self.requested is None and self.on_request is not None:
            self.on_request(signal.Signals(signum).name)
        self.requested = signum

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def available_memory(device: torch.device) -> int | None:
    """Bytes the device can still allocate: free GPU memory, or Linux's MemAvailable; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory_floor(hidden_size: int, rows: int, seq_len: int, context: DistributedContext) -> None:
    """Refuse a micro-batch whose smallest possible footprint exceeds the available memory, rather
    than let the kernel kill the process mid-step: the backward pass holds at least the two fp32
    streams of width ``hidden_size`` and their gradients for every token. In a multi-process job
    every process refuses when one does (a process left alone would wait for the others forever)."""
    floor = 4 * rows * seq_len * hidden_size * 4
    available = available_memory(context.device)
    short = available is not None and floor > available
    if context.active:
        short = bool(all_reduce_sum(torch.tensor([float(short)]), context).item())
    if short:
        where = ("another process of this job has less available" if available is None or floor <= available
                 else f"{available / 2**30:.1f} GiB is available")
        raise ValueError(
            f"a training step needs more than {floor / 2**30:.1f} GiB here (at least 4 fp32 tensors of {rows} x "
            f"{seq_len} x {hidden_size}) and {where}: use a shorter --seq-len, a smaller --batch-size or a larger "
            "--grad-accum"
        )
