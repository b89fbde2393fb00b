"""Benchmark the attention layer alone: forward + backward time and peak memory vs length.

Layers (hidden 256 = 4 heads x 64, batch 1, causal, chunk 64, one chunk back, no dropout):
- ``lsh``: our ``LSHSelfAttention`` (``num_buckets=None``: the automatic count for the length);
- ``local``: our ``LocalSelfAttention``; ``full``: our ``FullSelfAttention`` (SDPA);
- ``hf``: transformers' Reformer ``LSHSelfAttention`` followed by a 256 x 256 output projection
  (ours and reformer_pytorch's include theirs), ``num_buckets=None`` as well;
- ``reformer_pytorch``: reformer_pytorch's ``LSHSelfAttention`` (``bucket_size=64``).
LSH layers run with each of ``--hashes``. A step is ``layer(x).sum().backward()`` with ``x``
(1, L, 256) requiring grad, gradients set to None before each step.

Every configuration runs in a fresh subprocess. Memory: peak RSS (``resource.getrusage``
maxrss) minus the RSS after building the layer and the input and materialising every weight's
gradient, i.e. what the step itself adds. Workers run with a fixed ``MALLOC_MMAP_THRESHOLD_``
so freed large blocks go back to the system and RSS follows live memory. Time: median seconds
per step after a warm-up (fewer steps at long lengths, where one step takes minutes).
Configurations run interleaved (all layers at one length, then the next length) for
``--rounds`` rounds and every figure is a median over rounds, because the CPU may be shared.

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
import resource
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


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def timing_plan(length: int) -> tuple[int, int]:
    """(warm-up steps, timed steps) at ``length``: fewer where one step takes minutes."""
    if length <= 4096:
        return 1, 3
    if length <= 16384:
        return 1, 2
    return 0, 1


def measure(config: dict) -> dict:
    """One configuration in this process: {"seconds": [...], "baseline_mib", "peak_mib", "activation_mib"}.

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
    baseline = max(current_rss(), peak_rss())
    warmup, steps = timing_plan(length)
    warmup, steps = config.get("warmup", warmup), config.get("steps", steps)
    seconds = []
    for step in range(warmup + steps):
        layer.zero_grad(set_to_none=True)
        x = base.clone().requires_grad_()
        start = time.perf_counter()
        layer(x).sum().backward()
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
        del x
    return {
        "seconds": seconds,
        "baseline_mib": baseline / MIB,
        "peak_mib": peak_rss() / MIB,
        "activation_mib": (peak_rss() - baseline) / MIB,
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


def run_all(args: argparse.Namespace) -> dict:
    """Every (layer, hashes, length) for ``rounds`` rounds, interleaved per length."""
    results: dict[tuple[str, int, int], list[dict]] = {}
    for round_index in range(args.rounds):
        for length in args.lengths:
            for impl, hashes in configurations(args):
                runs = results.setdefault((impl, hashes, length), [])
                reason = skip_reason(impl, length, args)
                if reason:
                    runs.append({"skipped": reason})
                    continue
                if round_index > 0 and length > args.single_round_above:
                    continue  # one round is all the time allows at this length
                config = dict(impl=impl, length=length, num_hashes=max(hashes, 1), threads=args.threads)
                result = run_subprocess(config, args.timeout, args.mmap_threshold)
                runs.append(result)
                print(f"round {round_index + 1} L={length:<7} {label(impl, hashes):<22} {brief(result)}",
                      file=sys.stderr, flush=True)
    return results


def label(impl: str, hashes: int) -> str:
    names = {"lsh": "ours LSH", "local": "ours local", "full": "ours full (SDPA)", "hf": "transformers LSH",
             "reformer_pytorch": "reformer_pytorch LSH"}
    return f"{names[impl]} x{hashes}" if hashes else names[impl]


def brief(result: dict) -> str:
    if "seconds" not in result:
        return result.get("error") or result.get("skipped", "")
    return f"{statistics.median(result['seconds']):.3f} s/step, +{result['activation_mib']:.0f} MiB"


def summarise(runs: list[dict]) -> dict | None:
    done = [run for run in runs if "seconds" in run]
    if not done:
        return None
    return {
        "seconds": statistics.median(statistics.median(run["seconds"]) for run in done),
        "activation_mib": statistics.median(run["activation_mib"] for run in done),
        "peak_mib": statistics.median(run["peak_mib"] for run in done),
    }


def _cell(summary: dict | None, runs: list[dict], key: str, fmt: str) -> str:
    if summary is not None:
        return format(summary[key], fmt)
    notes = [run.get("skipped") or run.get("error") for run in runs]
    return (notes[0] or "n/a") if notes else "n/a"


def _ratio(numerator: dict | None, denominator: dict | None) -> str:
    if numerator is None or denominator is None:
        return "n/a"
    return f"{numerator['seconds'] / denominator['seconds']:.2f}x"


def markdown(args: argparse.Namespace, results: dict, command: str, load: tuple[str, str]) -> str:
    summary = {key: summarise(runs) for key, runs in results.items()}
    columns = configurations(args)
    header = "| L | " + " | ".join(label(impl, hashes) for impl, hashes in columns) + " |"
    rule = "|---" * (len(columns) + 1) + "|"
    lines = [
        "# Attention layer alone: forward + backward vs length (CPU)",
        "",
        f"- machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"{args.threads or torch.get_num_threads()} torch threads), {platform.platform()}",
        f"- torch {torch.__version__}, float32; date {datetime.date.today().isoformat()}",
        f"- command: `{command}`",
        f"- load average at start / end: {load[0]} / {load[1]} (the cores are shared: compare ratios within this run)",
        f"- layer: hidden {HIDDEN} = {HEADS} heads x {HEAD_SIZE}, batch 1, causal, chunk {CHUNK} (one chunk back), "
        "automatic bucket count, no dropout; step = layer(x).sum().backward()",
        f"- one fresh subprocess per configuration; {args.rounds} interleaved round(s) up to L = "
        f"{args.single_round_above}, one above; warm-up/timed steps: 1/3 up to 4K, 1/2 up to 16K, 0/1 above; medians",
        f"- memory = peak RSS minus RSS after building layer + input + zero gradients (what one step adds); "
        f"workers run with MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}",
        "",
        "## Seconds per step",
        "",
        header,
        rule,
    ]
    for length in args.lengths:
        cells = [_cell(summary.get((i, h, length)), results.get((i, h, length), []), "seconds", ".3f") for i, h in columns]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    lines += ["", "## Memory added by one step (MiB)", "", header, rule]
    for length in args.lengths:
        cells = [_cell(summary.get((i, h, length)), results.get((i, h, length), []), "activation_mib", ",.0f")
                 for i, h in columns]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    lines += ["", "## Time ratios (higher = ours faster)", ""]
    ratio_columns = [("full", 0, "lsh", 2, "full SDPA / ours LSH x2")]
    for hashes in args.hashes:
        for peer in ("hf", "reformer_pytorch"):
            ratio_columns.append((peer, hashes, "lsh", hashes, f"{label(peer, hashes)} / ours LSH x{hashes}"))
    lines += ["| L | " + " | ".join(name for *_, name in ratio_columns) + " |", "|---" * (len(ratio_columns) + 1) + "|"]
    for length in args.lengths:
        cells = [_ratio(summary.get((a, ah, length)), summary.get((b, bh, length))) for a, ah, b, bh, _ in ratio_columns]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
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
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--hashes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--single-round-above", type=int, default=16384,
                        help="lengths above this run one round only")
    parser.add_argument("--max-full-length", type=int, default=65536, help="longest length for full attention")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--mmap-threshold", type=int, default=131072,
                        help="MALLOC_MMAP_THRESHOLD_ for the workers (0 leaves glibc's default)")
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
    results = run_all(args)
    text = markdown(args, results, "python -m torch_reformer.bench.attention " + shlex.join(argv),
                    (start_load, _load_average()))
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
