"""Run one benchmark configuration in a fresh process and bring back what it measured.

Every configuration of every benchmark is a *spec*: a JSON-ready dict that says what to build
(``impl``: "ours", "hf" or "reformer_pytorch", plus ``config``, our ``ReformerConfig`` fields),
what to do with it (``task``: "train_step", "inference", "generate", "duplication", "bpc", ...)
and how (``length``, ``batch``, ``warmup``, ``steps``, ``device``, ``dtype``). The parent runs

    python -m torch_reformer.bench.harness '<spec as JSON>'

and watches the child: a child past its wall-clock limit is killed and recorded as "timeout", one
whose resident memory passes the cap is killed and recorded as "OOM" (so the machine never swaps),
and any other failure becomes one row with its status ("not installed", "not available", "error"),
never an exception in the parent. Nothing leaks from one configuration to the next.

Measurements, made inside the child (``Meter``):
- memory on CPU: the process's peak resident memory (``VmHWM``, see ``max_rss_bytes``) after the
  timed steps (``peak_bytes``) and once before them, after the imports, the model and the inputs
  exist (``baseline_bytes``); ``activation_bytes = peak - baseline`` is what the steps themselves
  added (activations, gradient buffers, temporaries). On CUDA, ``torch.cuda.max_memory_allocated`` and ``memory_allocated``.
- time: wall clock around each step (``time.perf_counter``; CUDA events on a GPU), the median of
  ``steps`` steps after ``warmup`` untimed ones (``seconds``; every sample in ``all_seconds``).

A series (lengths or depths in increasing order) stops growing at its first "OOM" or "timeout", or
before a point whose time, extrapolated from the previous point (``Series.time_exponent``: 1 for
linear, 2 for full attention), would pass the time limit: the larger points are recorded as
"not run" with the reason.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

RESULT_MARKER = "BENCH_RESULT "
FAILED_STATUSES = ("OOM", "timeout")  # statuses that stop a series from growing
# Seconds between two looks at a running child (its wall time and resident memory).
WATCH_INTERVAL_S = 0.05
_OOM_SIGNS = ("out of memory", "can't allocate memory", "cannot allocate memory", "memoryerror")
# Where each task of a spec lives ("module:function" under torch_reformer.bench), resolved in the child
# only, so the parent never imports torch or a peer.
TASKS = {
    "train_step": "peers:train_step_task",
    "train_step_alternating": "peers:train_step_alternating_task",
    "inference": "peers:inference_task",
    "generate": "speed:generation_task",
    "attention": "speed:attention_task",
    "duplication": "quality:duplication_task",
    "bpc": "quality:bpc_task",
}


class PeerNotInstalled(ImportError):
    """An optional peer package (transformers, reformer_pytorch) is missing."""


class NotAvailable(RuntimeError):
    """A feature the benchmark needs does not exist in this version of the library."""


# ------------------------------------------------------------------------------------------ the plan


@dataclass
class Point:
    """One configuration of a series: its x value (a length or a depth) and its spec."""

    x: int | str
    spec: dict


@dataclass
class Series:
    """One line of a table/plot: the same model at growing x values."""

    label: str
    points: list[Point]
    key: str = ""  # stable name for lookups (summary ratios), e.g. "ours-reversible", "hf"
    impl: str = "ours"  # implementation under test ("ours", "hf", "reformer_pytorch")
    time_exponent: float = 1.0  # run time grows like x ** this (2 for full attention vs length)
    skip_reason: str | None = None  # e.g. "not installed": every point is recorded with it, none run


@dataclass
class View:
    """One table of an experiment: which measurement (``metric`` of ``format_metric``) fills the cells."""

    metric: str
    caption: str


@dataclass
class Experiment:
    """A table (or several views of it) and a plot: series side by side over the same x values."""

    key: str
    title: str
    x_name: str  # "sequence length" or "layers"
    series: list[Series]
    views: list[View]
    notes: list[str] = field(default_factory=list)
    plot_metric: str | None = None  # metric drawn in the PNG; None: no plot
    log_x: bool = True
    log_y: bool = True
    timeout_s: float = 600.0


@dataclass
class Profile:
    """How big a benchmark run is: the lengths, depths and budgets every suite's plan reads.

    ``FULL`` is the published run, ``QUICK`` a 2-3 minute subset; tests build smaller ones.
    ``model`` overrides fields of the benchmark model (``peers.benchmark_config``) everywhere;
    ``experiments`` (keys) restricts a run to some experiments (None: all).
    """

    name: str
    lengths: list[int]  # training memory vs length (2 layers)
    depth_length: int  # training memory vs depth, at this length
    depths: list[int]
    inference_lengths: list[int]  # global vs local+LSH inference memory
    blog_lengths: list[int]  # chunked feed-forward, axial vs learned positions
    blog_layers: list[int]  # the HF blog's training-memory-vs-layers experiment
    blog_layer_shape: tuple[int, int]  # its (batch, length)
    longest_lengths: list[int]  # the longest-trainable-length search (powers of two, increasing)
    longest_layers: int
    speed_lengths: list[int]
    attention_lengths: list[int]
    generation_contexts: list[int]
    generation_new_tokens: int
    duplication: dict  # quality (a): length, vocab, steps, batch, hidden, heads, chunk, eval_size
    bpc: dict  # quality (b): seq_len, steps, batch, hidden, layers, heads, chunk, corpus_bytes
    timeout_s: float  # per configuration
    long_timeout_s: float  # per configuration of the longest-length search and full attention at length
    impls: tuple[str, ...] = ("ours", "hf", "reformer_pytorch")
    model: dict = field(default_factory=dict)
    experiments: set[str] | None = None
    series: set[str] | None = None  # series keys to run (None: all), e.g. {"ours-reversible", "hf"}
    alternating_lengths: list[int] = field(default_factory=list)  # implementations timed in turn, one process
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None  # torch.set_num_threads in every child; None: torch's default
    # glibc MALLOC_MMAP_THRESHOLD_ for the memory suite's children (0: glibc's dynamic default); see
    # ``memory`` for why.
    mmap_threshold: int = 131072
    # glibc allocator settings (MALLOC_*=value) for the children of every suite, e.g. to time the
    # speed suite with a fixed mmap threshold; they win over ``mmap_threshold``.
    malloc_env: dict[str, str] = field(default_factory=dict)

    def wants(self, key: str) -> bool:
        return self.experiments is None or key in self.experiments

    def wants_series(self, key: str) -> bool:
        return self.series is None or key in self.series


# ---------------------------------------------------------------------------------------- the parent


def _proc_status_bytes(pid: int | str, field: str) -> int | None:
    """A memory field (``VmRSS``, ``VmHWM``) of a live process from /proc, in bytes (None where /proc is
    missing or the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _resident_bytes(pid: int) -> int | None:
    """Resident memory of a live process."""
    return _proc_status_bytes(pid, "VmRSS")


def _classify_failure(returncode: int, stderr: str) -> dict:
    """Status of a child that died without reporting a result."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else f"exit status {returncode}"
    lowered = stderr.lower()
    if returncode == -signal.SIGKILL or any(sign in lowered for sign in _OOM_SIGNS):
        return {"status": "OOM", "detail": f"killed by the system or out of memory: {last}"[:300]}
    return {"status": "error", "detail": last[:300]}


def run_spec(spec: dict, timeout_s: float, memory_cap_bytes: int | None, env: dict | None = None) -> dict:
    """Run ``spec`` in a fresh Python process; return its result dict (always one, never raises).

    The child is killed after ``timeout_s`` seconds ("timeout") or when its resident memory passes
    ``memory_cap_bytes`` ("OOM"). ``env`` adds environment variables for the child (e.g. glibc's
    ``MALLOC_MMAP_THRESHOLD_``). ``wall_seconds`` is the child's whole life, imports included.
    """
    command = [sys.executable, "-m", "torch_reformer.bench.harness", json.dumps(spec)]
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, text=True, env={**os.environ, **(env or {})})
        verdict, max_rss = None, 0
        while child.poll() is None:
            elapsed = time.monotonic() - started
            rss = _resident_bytes(child.pid) or 0
            max_rss = max(max_rss, rss)
            if elapsed > timeout_s:
                verdict = {"status": "timeout", "detail": f"still running after {timeout_s:.0f} s"}
            elif memory_cap_bytes is not None and rss > memory_cap_bytes:
                verdict = {"status": "OOM", "detail": f"resident memory passed the cap of {_gib(memory_cap_bytes)}"}
            if verdict is not None:
                child.kill()
                child.wait()
                break
            time.sleep(WATCH_INTERVAL_S)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    result = verdict or _parse_result(stdout)
    if result is None:
        result = _classify_failure(child.returncode, stderr)
    result["wall_seconds"] = round(time.monotonic() - started, 3)
    if hasattr(os, "getloadavg"):
        result["load_average"] = round(os.getloadavg()[0], 2)  # 1-minute load when it ended: contention marker
    if verdict is not None and max_rss:
        result["watched_rss_bytes"] = max_rss
    return result


def _parse_result(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    return None


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f} GiB"


def _predicted_seconds(previous: tuple[Point, dict] | None, point: Point, exponent: float) -> float | None:
    """Wall time of ``point`` extrapolated from the previous point's (x ** exponent growth)."""
    if previous is None or not isinstance(point.x, (int, float)) or "wall_seconds" not in previous[1]:
        return None
    last_point, last_result = previous
    step_count = last_point.spec.get("warmup", 0) + last_point.spec.get("steps", 1)
    compute = min(last_result["wall_seconds"], last_result.get("seconds", 0.0) * step_count)
    overhead = last_result["wall_seconds"] - compute  # imports, model creation: roughly constant
    return overhead + compute * (point.x / last_point.x) ** exponent


def run_series(
    series: Series,
    run: Callable[[dict], dict],
    on_result: Callable[[Point, dict], None] | None = None,
    timeout_s: float | None = None,
) -> list[dict]:
    """Run a series' points in order with ``run(spec)``; after an "OOM"/"timeout" run no larger point,
    nor one whose time extrapolated from the previous point exceeds ``timeout_s``.

    Returns one result per point (``on_result`` sees each as it arrives)."""
    results, stop_reason, previous = [], series.skip_reason, None
    for point in series.points:
        predicted = _predicted_seconds(previous, point, series.time_exponent)
        if stop_reason is None and timeout_s is not None and predicted is not None and predicted > timeout_s:
            stop_reason = f"predicted {predicted:,.0f} s > the {timeout_s:,.0f} s limit"
        if stop_reason is not None:
            status = series.skip_reason or "not run"
            result = {"status": status, "detail": stop_reason if series.skip_reason is None else ""}
        else:
            result = run(point.spec)
            previous = (point, result)
            if result["status"] in FAILED_STATUSES:
                stop_reason = f"{result['status']} at {point.x}"
            elif result["status"] in ("not installed", "not available"):
                stop_reason = result.get("detail") or result["status"]
                series.skip_reason = result["status"]
        results.append(result)
        if on_result is not None:
            on_result(point, result)
    return results


# ----------------------------------------------------------------------------------------- the child


class Meter:
    """Peak memory and step timing on one device (see the module docstring for what is measured)."""

    def __init__(self, device: str):
        import torch

        self.torch, self.device = torch, device
        self.cuda = device.startswith("cuda")

    def baseline(self) -> int:
        """Memory in use now (CPU: the resident peak so far); resets the CUDA peak counter."""
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            return int(self.torch.cuda.memory_allocated())
        return max_rss_bytes()

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return int(self.torch.cuda.max_memory_allocated())
        return max_rss_bytes()

    def seconds(self, fn: Callable[[], object]) -> float:
        """Wall time of one call of ``fn`` (CUDA events on a GPU)."""
        if self.cuda:
            start = self.torch.cuda.Event(enable_timing=True)
            end = self.torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        began = time.perf_counter()
        fn()
        return time.perf_counter() - began


def max_rss_bytes() -> int:
    """Peak resident memory of this process so far.

    On Linux this is ``VmHWM`` of /proc/self/status, the high-water mark of this program's own
    memory. Not ``ru_maxrss``: Linux carries the parent's resident size at the fork into the
    child's ``ru_maxrss`` across exec, so a child of a large parent (a test process holding
    models) would read the parent's size as its own peak. Elsewhere ``ru_maxrss`` (KiB on
    Linux, bytes on macOS).
    """
    high_water = _proc_status_bytes("self", "VmHWM")
    if high_water is not None:
        return high_water
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024)


def timed_steps(meter: Meter, step: Callable[[], object], warmup: int, steps: int) -> dict:
    """Run ``warmup`` untimed then ``steps`` timed calls; memory baseline before, peak after."""
    baseline = meter.baseline()
    for _ in range(warmup):
        step()
    samples = [meter.seconds(step) for _ in range(steps)]
    peak = meter.peak()
    return {
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "activation_bytes": max(0, peak - baseline),
        "seconds": statistics.median(samples),
        "all_seconds": [round(s, 6) for s in samples],
    }


def source_revision() -> str | None:
    """The git commit of the measured code, ``+dirty`` when the package's own files differ from it (results
    written next to the code do not count), or None outside a git checkout."""
    package_dir = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=package_dir,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=package_dir,
                                 capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}{'+dirty' if changed else ''}" or None


def _error_status(error: BaseException) -> dict:
    text = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    if isinstance(error, PeerNotInstalled):
        return {"status": "not installed", "detail": str(error)}
    if isinstance(error, NotAvailable):
        return {"status": "not available", "detail": str(error)}
    if isinstance(error, MemoryError) or any(sign in text.lower() for sign in _OOM_SIGNS):
        return {"status": "OOM", "detail": text[:300]}
    return {"status": "error", "detail": text[:300]}


def child_main(spec_json: str) -> int:
    """Entry point of the child process: run the spec's task, print one result line."""
    spec = json.loads(spec_json)
    try:
        if spec.get("threads"):
            import torch

            torch.set_num_threads(spec["threads"])
        module_name, function_name = TASKS[spec["task"]].split(":")
        task = getattr(import_module(f"torch_reformer.bench.{module_name}"), function_name)
        result = {"status": "ok", **task(spec)}
        result["revision"] = source_revision()  # the code this child ran, which may differ from the parent's
    except BaseException as error:  # noqa: BLE001 - every failure must become a result row
        if isinstance(error, KeyboardInterrupt):
            raise
        result = _error_status(error)
        if result["status"] == "error":
            traceback.print_exc(file=sys.stderr)
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m torch_reformer.bench.harness '<spec JSON>'")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(child_main(sys.argv[1]))
