"""Benchmark the attention layer alone: forward + backward time and peak memory vs length.

Layers (hidden 256 = 4 heads x 64, batch 1, causal, chunk 64, one chunk back, no dropout):
- ``lsh``: our ``LSHSelfAttention`` (``num_buckets=None``: the automatic count for the length);
- ``local``: our ``LocalSelfAttention``; ``full``: our ``FullSelfAttention`` (SDPA);
- ``hf``: transformers' Reformer ``LSHSelfAttention`` followed by a 256 x 256 output projection
  (ours and reformer_pytorch's include theirs), ``num_buckets=None`` as well;
- ``reformer_pytorch``: reformer_pytorch's ``LSHSelfAttention`` (``bucket_size=64``).
LSH layers run with each of ``--hashes``. A step is ``layer(x).sum().backward()`` with ``x``
(1, L, 256) requiring grad, gradients set to None before each step.

Every measurement runs in a fresh subprocess. Time: median wall-clock seconds per step after a
warm-up (fewer steps at long lengths, where one step takes minutes), and the process CPU time
of the same steps (steadier than wall-clock when other work shares the cores), with glibc's
default allocator settings, as users run. Configurations run interleaved (all layers at one
length, then the next length) for ``--rounds`` rounds; every figure is a median over rounds.
Memory: a separate one-step run per configuration with a fixed ``MALLOC_MMAP_THRESHOLD_``, so
freed large blocks go back to the system and RSS follows live memory; the figure is the peak
RSS (``harness.max_rss_bytes``) minus the RSS after building the layer and the input and
materialising every weight's gradient, i.e. what the step itself adds.

Run: ``python -m torch_reformer.bench.attention`` (``--help`` for options). It prints markdown
tables and writes them to ``--out``. ``measure(config)`` runs one configuration in-process.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from torch_reformer.attention.full import FullSelfAttention
from torch_reformer.attention.local import LocalSelfAttention
from torch_reformer.attention.lsh import LSHSelfAttention
from torch_reformer.bench.harness import max_rss_bytes

HIDDEN, HEADS, HEAD_SIZE, CHUNK = 256, 4, 64, 64
LSH_IMPLS = ("lsh", "hf", "reformer_pytorch")
IMPLS = ("lsh", "local", "full", "hf", "reformer_pytorch")
PEER_PACKAGES = {"hf": "transformers", "reformer_pytorch": "reformer_pytorch"}
DEFAULT_OUT = os.path.join("benchmarks", "results", "attention-cpu.md")
MIB = 2**20


class _HFLayer(nn.Module):
    """transformers' LSH self-attention plus an output projection, mapping (B, L, 256) -> (B, L, 256)."""

    def __init__(self, length: int, num_hashes: int):
        super().__init__()
        try:
            import transformers
            from transformers.models.reformer.modeling_reformer import LSHSelfAttention as HFLSH
        except ImportError:
            raise SystemExit("transformers is not installed: pip install torch-reformer[peers]") from None
        config = transformers.ReformerConfig(
            hidden_size=HIDDEN, num_attention_heads=HEADS, attention_head_size=HEAD_SIZE, num_hashes=num_hashes,
            num_buckets=None, lsh_attn_chunk_length=CHUNK, lsh_num_chunks_before=1, lsh_num_chunks_after=0,
            is_decoder=True, max_position_embeddings=length, attn_layers=["lsh"],
            lsh_attention_probs_dropout_prob=0.0,
        )
        self.attention = HFLSH(config)
        self.output = nn.Linear(HEADS * HEAD_SIZE, HIDDEN, bias=False)

    def forward(self, hidden_states):
        return self.output(self.attention(hidden_states).hidden_states)


def build_layer(impl: str, length: int, num_hashes: int) -> nn.Module:
    """The layer of configuration ``impl`` (one of ``IMPLS``)."""
    if impl == "lsh":
        return LSHSelfAttention(HIDDEN, HEADS, HEAD_SIZE, num_hashes=num_hashes, chunk_length=CHUNK, causal=True)
    if impl == "local":
        return LocalSelfAttention(HIDDEN, HEADS, HEAD_SIZE, chunk_length=CHUNK, causal=True)
    if impl == "full":
        return FullSelfAttention(HIDDEN, HEADS, HEAD_SIZE, causal=True)
    if impl == "hf":
        return _HFLayer(length, num_hashes)
    if impl == "reformer_pytorch":
        try:
            from reformer_pytorch.reformer_pytorch import LSHSelfAttention as PeerLSH
        except ImportError:
            raise SystemExit("reformer_pytorch is not installed: pip install torch-reformer[peers]") from None
        return PeerLSH(dim=HIDDEN, heads=HEADS, dim_head=HEAD_SIZE, bucket_size=CHUNK, n_hashes=num_hashes, causal=True)
    raise ValueError(f"unknown layer {impl!r}; choose from {IMPLS}")


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")



def timing_plan(length: int) -> tuple[int, int]:
    """(warm-up steps, timed steps) at ``length``: fewer where one step takes minutes."""
    if length <= 4096:
        return 1, 3
    if length <= 16384:
        return 1, 2
    return 0, 1


def measure(config: dict) -> dict:
    """One configuration in this process: {"seconds", "cpu_seconds" (lists), "baseline_mib", "peak_mib", "activation_mib"}.

    ``config`` holds ``impl``, ``length``, ``num_hashes`` and optionally ``threads``, ``warmup``,
    ``steps``.
    """
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    length = config["length"]
    layer = build_layer(config["impl"], length, config.get("num_hashes", 1))
    base = torch.randn(1, length, HIDDEN)
    for param in layer.parameters():
        param.grad = torch.zeros_like(param)
    baseline = max(current_rss(), max_rss_bytes())
    warmup, steps = timing_plan(length)
    warmup, steps = config.get("warmup", warmup), config.get("steps", steps)
    seconds, cpu_seconds = [], []
    for step in range(warmup + steps):
        layer.zero_grad(set_to_none=True)
        x = base.clone().requires_grad_()
        start, cpu_start = time.perf_counter(), time.process_time()
        layer(x).sum().backward()
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
        del x
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "baseline_mib": baseline / MIB,
        "peak_mib": max_rss_bytes() / MIB,
        "activation_mib": (max_rss_bytes() - baseline) / MIB,
    }


def run_subprocess(config: dict, timeout: float, mmap_threshold: int) -> dict:
    command = [sys.executable, "-m", "torch_reformer.bench.attention", "--worker", json.dumps(config)]
    env = dict(os.environ)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def configurations(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(layer, hashes) pairs in run order; hashes is 0 for layers without hashing."""
    pairs = []
    for impl in args.impls:
        pairs += [(impl, hashes) for hashes in args.hashes] if impl in LSH_IMPLS else [(impl, 0)]
    return pairs


def skip_reason(impl: str, length: int, args: argparse.Namespace) -> str | None:
    package = PEER_PACKAGES.get(impl)
    if package and importlib.util.find_spec(package) is None:
        return f"{package} not installed"
    if impl == "full" and length > args.max_full_length:
        return f"skipped above {args.max_full_length} tokens"
    return None


def run_all(args: argparse.Namespace) -> tuple[dict, dict]:
    """Every (layer, hashes, length): timing runs for ``rounds`` rounds, interleaved per length, and one
    memory run in the first round. Returns (timing runs, memory run) per configuration."""
    timings: dict[tuple[str, int, int], list[dict]] = {}
    memory: dict[tuple[str, int, int], dict] = {}
    for round_index in range(args.rounds):
        for length in args.lengths:
            for impl, hashes in configurations(args):
                key = (impl, hashes, length)
                runs = timings.setdefault(key, [])
                reason = skip_reason(impl, length, args)
                if reason:
                    runs.append({"skipped": reason})
                    memory[key] = {"skipped": reason}
                    continue
                if round_index > 0 and length > args.single_round_above:
                    continue  # one round is all the time allows at this length
                config = dict(impl=impl, length=length, num_hashes=max(hashes, 1), threads=args.threads)
                runs.append(run_subprocess(config, args.timeout, 0))
                print(f"round {round_index + 1} L={length:<7} {label(impl, hashes):<26} {brief(runs[-1])}",
                      file=sys.stderr, flush=True)
                if round_index == 0 and args.memory:
                    memory[key] = run_subprocess({**config, "warmup": 0, "steps": 1}, args.timeout, args.mmap_threshold)
                    print(f"memory  L={length:<7} {label(impl, hashes):<26} {brief(memory[key])}",
                          file=sys.stderr, flush=True)
    return timings, memory


def label(impl: str, hashes: int) -> str:
    names = {"lsh": "ours LSH", "local": "ours local", "full": "ours full (SDPA)", "hf": "transformers LSH",
             "reformer_pytorch": "reformer_pytorch LSH"}
    return f"{names[impl]} x{hashes}" if hashes else names[impl]


def brief(result: dict) -> str:
    if "seconds" not in result:
        return result.get("error") or result.get("skipped", "")
    return (f"{statistics.median(result['seconds']):.3f} s/step (cpu {statistics.median(result['cpu_seconds']):.3f}), "
            f"+{result['activation_mib']:.0f} MiB")


def summarise(runs: list[dict], memory_run: dict | None) -> dict | None:
    done = [run for run in runs if "seconds" in run]
    if not done:
        return None
    summary = {
        "seconds": statistics.median(statistics.median(run["seconds"]) for run in done),
        "cpu_seconds": statistics.median(statistics.median(run["cpu_seconds"]) for run in done),
    }
    if memory_run and "activation_mib" in memory_run:
        summary["activation_mib"] = memory_run["activation_mib"]
    return summary


def _cell(summary: dict | None, runs: list[dict], key: str, fmt: str) -> str:
    if summary is not None and key in summary:
        return format(summary[key], fmt)
    notes = [run.get("skipped") or run.get("error") for run in runs]
    return (notes[0] or "n/a") if notes else "n/a"


def _ratio(numerator: dict | None, denominator: dict | None, key: str) -> str:
    if numerator is None or denominator is None:
        return "n/a"
    return f"{numerator[key] / denominator[key]:.2f}x"


def _table(title: str, columns: list, rows: list[str]) -> list[str]:
    return ["", title, "", "| L | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|", *rows]


def markdown(args: argparse.Namespace, timings: dict, memory: dict, command: str, load: tuple[str, str]) -> str:
    summary = {key: summarise(runs, memory.get(key)) for key, runs in timings.items()}
    columns = configurations(args)
    names = [label(impl, hashes) for impl, hashes in columns]

    def rows(key: str, fmt: str, runs_of=lambda k: timings.get(k, [])) -> list[str]:
        return [f"| {length} | " + " | ".join(_cell(summary.get((i, h, length)), runs_of((i, h, length)), key, fmt)
                                          for i, h in columns) + " |" for length in args.lengths]

    ratio_columns = [("full", 0, "lsh", 2, "full SDPA / ours LSH x2")]
    for hashes in args.hashes:
        for peer in ("hf", "reformer_pytorch"):
            ratio_columns.append((peer, hashes, "lsh", hashes, f"{label(peer, hashes)} / ours LSH x{hashes}"))

    def ratio_rows(key: str) -> list[str]:
        return [f"| {length} | " + " | ".join(_ratio(summary.get((a, ah, length)), summary.get((b, bh, length)), key)
                                          for a, ah, b, bh, _ in ratio_columns) + " |" for length in args.lengths]

    lines = [
        "# Attention layer alone: forward + backward vs length (CPU)",
        "",
        f"- machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"{args.threads or torch.get_num_threads()} torch thread(s)), {platform.platform()}",
        f"- torch {torch.__version__}, float32; date {datetime.date.today().isoformat()}",
        f"- command: `{command}`",
        f"- load average at start / end: {load[0]} / {load[1]} (the cores are shared: compare ratios within this run)",
        f"- layer: hidden {HIDDEN} = {HEADS} heads x {HEAD_SIZE}, batch 1, causal, chunk {CHUNK} (one chunk back), "
        "automatic bucket count, no dropout; step = layer(x).sum().backward()",
        f"- one fresh subprocess per measurement; {args.rounds} interleaved timing round(s) up to L = "
        f"{args.single_round_above}, one above; warm-up/timed steps: 1/3 up to 4K, 1/2 up to 16K, 0/1 above; "
        "medians; default allocator settings",
    ]
    if args.memory:
        lines.append(f"- memory: one step in its own subprocess with MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}; "
                     "peak RSS minus RSS after building layer + input + zero gradients (what one step adds)")
    lines += _table("## Seconds per step (wall clock)", names, rows("seconds", ".3f"))
    lines += _table("## CPU seconds per step (process time)", names, rows("cpu_seconds", ".3f"))
    if args.memory:
        lines += _table("## Memory added by one step (MiB)", names,
                        rows("activation_mib", ",.0f", lambda k: [memory[k]] if k in memory else []))
    lines += _table("## Wall-clock ratios (higher = ours faster)", [name for *_, name in ratio_columns],
                    ratio_rows("seconds"))
    lines += _table("## CPU-time ratios (higher = ours faster)", [name for *_, name in ratio_columns],
                    ratio_rows("cpu_seconds"))
    return "\n".join(lines) + "\n"


def _load_average() -> str:
    try:
        return " ".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m torch_reformer.bench.attention",
        description="Forward+backward time and peak memory of the attention layer alone, ours vs the peers.",
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 65536])
    parser.add_argument("--hashes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--single-round-above", type=int, default=16384,
                        help="lengths above this run one round only")
    parser.add_argument("--max-full-length", type=int, default=65536, help="longest length for full attention")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--mmap-threshold", type=int, default=131072,
                        help="MALLOC_MMAP_THRESHOLD_ for the memory runs (0 leaves glibc's default)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory runs")
    parser.add_argument("--out", default=DEFAULT_OUT, help="markdown file to write ('' for none)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0
    start_load = _load_average()
    timings, memory = run_all(args)
    text = markdown(args, timings, memory, "python -m torch_reformer.bench.attention " + shlex.join(argv),
                    (start_load, _load_average()))
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
