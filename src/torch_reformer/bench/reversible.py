"""Benchmark the reversible engine: memory and time of one training step vs depth.

A stack of N residual MLP blocks (``LayerNorm(256) -> Linear(256, 1024) -> GELU ->
Linear(1024, 256)``) runs on an input of shape (1, 32768, 512) split into two 256-wide
streams. For each memory mode ("reversible", "checkpoint", "autograd" of
``torch_reformer.reversible.ReversibleSequential``, and RevLib's ReversibleSequential when
installed) and each depth, one fresh subprocess builds the model and times training
steps (forward, a squared-mean loss, backward).

Memory: peak RSS (``harness.max_rss_bytes``) minus a baseline taken after building the
model and the input and materialising every parameter's gradient, so the difference is
activation memory: parameters, gradients and the input are in the baseline. Each step
starts with ``zero_grad(set_to_none=True)``, as optimizers do by default.

Time: each memory run also reports its median seconds per step, but times taken in separate
processes move with whatever else shares the CPU. A second, interleaved pass therefore runs
all modes in one fresh process per depth, one step each in turn for ``--timing-rounds``
rounds, and reports the median of the per-round ratios to autograd.

Workers run with a fixed ``MALLOC_MMAP_THRESHOLD_`` (``--mmap-threshold``): with glibc's
dynamic threshold, freed blocks stay in a fragmented heap and RSS grows with the number of
allocations rather than with the memory actually live.

Run: ``python -m torch_reformer.bench.reversible`` (``--help`` for the options). It prints
a markdown table and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from torch_reformer.bench.harness import max_rss_bytes
from torch_reformer.reversible import ReversibleSequential

MODES = ("reversible", "checkpoint", "autograd", "revlib")
DEFAULT_OUT = os.path.join("benchmarks", "results", "reversible-engine-cpu.md")
MIB = 2**20


def mlp_block(width: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


def build_model(mode: str, depth: int, stream_width: int, hidden: int) -> nn.Module:
    torch.manual_seed(0)
    blocks = [mlp_block(stream_width, hidden) for _ in range(depth)]
    if mode == "revlib":
        try:
            import revlib
        except ImportError:
            raise SystemExit("RevLib is not installed: pip install torch-reformer[peers]") from None
        return revlib.ReversibleSequential(*blocks, split_dim=-1)
    return ReversibleSequential(*blocks, split_dim=-1, memory_mode=mode)


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")



def measure(config: dict) -> dict:
    """One configuration, in this process: baseline and peak RSS, seconds per step."""
    torch.set_num_threads(config["threads"])
    model = build_model(config["mode"], config["depth"], config["width"] // 2, config["hidden"])
    base = torch.randn(1, config["length"], config["width"])
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    baseline = max(current_rss(), max_rss_bytes())
    seconds = []
    for step in range(config["warmup"] + config["steps"]):
        model.zero_grad(set_to_none=True)
        x = base.clone().requires_grad_()  # fresh: RevLib frees its input's memory
        start = time.perf_counter()
        model(x).square().mean().backward()
        elapsed = time.perf_counter() - start
        if step >= config["warmup"]:
            seconds.append(elapsed)
        del x
    return {
        "baseline_mib": baseline / MIB,
        "peak_mib": max_rss_bytes() / MIB,
        "activation_mib": (max_rss_bytes() - baseline) / MIB,
        "seconds": seconds,
    }


def measure_alternating(config: dict) -> dict:
    """Time all modes in one process, one step each in turn, for ``rounds`` rounds.

    Other work on the machine then slows every mode alike, so the per-round ratios to
    autograd are far steadier than times taken in separate processes.
    """
    torch.set_num_threads(config["threads"])
    modes = config["modes"]
    models = {mode: build_model(mode, config["depth"], config["width"] // 2, config["hidden"]) for mode in modes}
    base = torch.randn(1, config["length"], config["width"])

    def step_seconds(mode: str) -> float:
        models[mode].zero_grad(set_to_none=True)
        x = base.clone().requires_grad_()
        start = time.perf_counter()
        models[mode](x).square().mean().backward()
        return time.perf_counter() - start

    for mode in modes:  # warm-up
        step_seconds(mode)
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_index in range(config["rounds"]):
        shift = round_index % len(modes)  # rotate the order so no mode always runs first
        for mode in modes[shift:] + modes[:shift]:
            seconds[mode].append(step_seconds(mode))
    return {"seconds": seconds}


def estimated_autograd_bytes(depth: int, length: int, width: int, hidden: int) -> int:
    """What plain autograd keeps per block: stream, LayerNorm output, two hidden tensors (fp32)."""
    return depth * length * (width + 2 * hidden) * 4


def available_memory() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_subprocess(config: dict, timeout: float, mmap_threshold: int) -> dict:
    command = [sys.executable, "-m", "torch_reformer.bench.reversible", "--worker", json.dumps(config)]
    env = dict(os.environ)
    if mmap_threshold:
        # A fixed threshold makes glibc return freed large blocks to the system at once, so RSS
        # follows live memory instead of the heap's fragmentation (the same for every mode).
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["exit code %d" % done.returncode])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def skip_reason(mode: str, depth: int, args: argparse.Namespace) -> str | None:
    """Why a configuration cannot run here, or None."""
    if mode == "revlib" and importlib.util.find_spec("revlib") is None:
        return "RevLib not installed: pip install torch-reformer[peers]"
    if mode == "autograd":
        needed = estimated_autograd_bytes(depth, args.length, args.width, args.hidden)
        if needed > args.memory_fraction * available_memory():
            return f"skipped: needs ~{needed / 2**30:.1f} GiB"
    return None


def run_all(args: argparse.Namespace) -> dict:
    """Every (mode, depth) for ``rounds`` rounds, interleaved; results per configuration."""
    results: dict[tuple[str, int], list[dict]] = {(m, d): [] for m in args.modes for d in args.depths}
    for round_index in range(args.rounds):
        for depth in args.depths:
            for mode in args.modes:
                reason = skip_reason(mode, depth, args)
                if reason:
                    results[(mode, depth)].append({"skipped": reason})
                    continue
                config = dict(mode=mode, depth=depth, length=args.length, width=args.width, hidden=args.hidden,
                              warmup=args.warmup, steps=args.steps, threads=args.threads)
                result = run_subprocess(config, args.timeout, args.mmap_threshold)
                results[(mode, depth)].append(result)
                print(f"round {round_index + 1} {mode:>10} N={depth:<3} {_brief(result)}", file=sys.stderr)
    return results


def run_timing(args: argparse.Namespace) -> dict[int, dict]:
    """The alternating timing pass: one fresh process per depth."""
    timings = {}
    for depth in args.timing_depths:
        modes = [mode for mode in args.modes if not skip_reason(mode, depth, args)]
        config = dict(depth=depth, modes=modes, rounds=args.timing_rounds, length=args.length, width=args.width,
                      hidden=args.hidden, threads=args.threads, alternating=True)
        timings[depth] = run_subprocess(config, args.timeout * len(modes), args.mmap_threshold)
        print(f"timing N={depth}: {timings[depth].get('error') or 'done'}", file=sys.stderr)
    return timings


def timing_rows(timings: dict[int, dict]) -> dict[tuple[str, int], dict]:
    """Median seconds and median per-round ratio to autograd, per (mode, depth)."""
    rows = {}
    for depth, result in timings.items():
        seconds = result.get("seconds", {})
        reference = seconds.get("autograd")
        for mode, times in seconds.items():
            ratio = statistics.median(t / r for t, r in zip(times, reference)) if reference else None
            rows[(mode, depth)] = {"seconds": statistics.median(times), "ratio": ratio, "rounds": len(times)}
    return rows


def _brief(result: dict) -> str:
    if "seconds" not in result:
        return result.get("error") or result.get("skipped", "")
    return f"act {result['activation_mib']:.0f} MiB, {statistics.median(result['seconds']):.2f} s/step"


def summarise(runs: list[dict]) -> dict | None:
    done = [run for run in runs if "seconds" in run]
    if not done:
        return None
    return {
        "activation_mib": statistics.median(run["activation_mib"] for run in done),
        "peak_mib": statistics.median(run["peak_mib"] for run in done),
        "seconds": statistics.median(s for run in done for s in run["seconds"]),
        "runs": len(done),
    }


def header(args: argparse.Namespace, command: str) -> list[str]:
    malloc = (f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold} so RSS follows live memory"
              if args.mmap_threshold else "glibc's default (dynamic) mmap threshold")
    return [
        "# Reversible engine: one training step vs depth (CPU)",
        "",
        f"- machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"{args.threads} torch threads), {platform.platform()}",
        f"- torch {torch.__version__}, fp32; date {datetime.date.today().isoformat()}",
        f"- command: `{command}`",
        f"- model: N blocks LayerNorm({args.width // 2}) -> Linear({args.width // 2}, {args.hidden}) -> GELU -> "
        f"Linear({args.hidden}, {args.width // 2}); input (1, {args.length}, {args.width}) split into two "
        f"{args.width // 2}-wide streams; loss = mean of squared outputs",
        f"- memory table: each configuration in a fresh subprocess, {args.warmup} warm-up + {args.steps} timed "
        f"step(s), {args.rounds} round(s), medians; workers run with {malloc}",
        "- activation memory = peak RSS minus the RSS after building model + input and materialising all "
        "gradients (parameters, gradients and input are in that baseline)",
        "",
    ]


def memory_table(args: argparse.Namespace, results: dict, summary: dict) -> list[str]:
    lines = [
        "| N | mode | activation MiB | peak RSS MiB | s/step (own process) | vs autograd |",
        "|---|---|---|---|---|---|",
    ]
    for depth in args.depths:
        reference = summary.get(("autograd", depth))
        for mode in args.modes:
            row = summary[(mode, depth)]
            if row is None:
                note = _brief(results[(mode, depth)][-1]) if results[(mode, depth)] else "not run"
                lines.append(f"| {depth} | {mode} | {note} | | | |")
                continue
            ratio = f"{row['seconds'] / reference['seconds']:.2f}x" if reference else "n/a"
            lines.append(f"| {depth} | {mode} | {row['activation_mib']:.0f} | {row['peak_mib']:.0f} | "
                         f"{row['seconds']:.2f} | {ratio} |")
    return lines


def timing_table(args: argparse.Namespace, rows: dict) -> list[str]:
    lines = [
        "",
        f"Interleaved timing: one fresh process per depth runs the modes one step each in turn (rotating the "
        f"order), {args.timing_rounds} rounds after a warm-up step per mode; medians over rounds.",
        "",
        "| N | mode | s/step | per-round ratio to autograd |",
        "|---|---|---|---|",
    ]
    for (mode, depth), row in sorted(rows.items(), key=lambda item: (item[0][1], MODES.index(item[0][0]))):
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "n/a"
        lines.append(f"| {depth} | {mode} | {row['seconds']:.2f} | {ratio} |")
    return lines


def markdown(args: argparse.Namespace, results: dict, timings: dict, command: str) -> str:
    summary = {key: summarise(runs) for key, runs in results.items()}
    rows = timing_rows(timings)
    lines = header(args, command)
    if args.depths:
        lines += memory_table(args, results, summary)
    if rows:
        lines += timing_table(args, rows)
    lines += ["", *targets(args, summary, rows)]
    return "\n".join(lines) + "\n"


def targets(args: argparse.Namespace, summary: dict, rows: dict) -> list[str]:
    """The three goals of the engine, checked on the measured figures."""

    def figure(mode: str, depth: int, key: str) -> float | None:
        row = summary.get((mode, depth))
        return row[key] if row else None

    lines = ["Targets:", ""]
    if args.depths:
        low, high = min(args.depths), max(args.depths)
        rev_low, rev_high = figure("reversible", low, "activation_mib"), figure("reversible", high, "activation_mib")
        if rev_low and rev_high:
            ratio = rev_high / rev_low
            lines.append(f"- reversible activation N={high} / N={low}: {ratio:.2f} (goal <= 1.1): "
                         f"{'met' if ratio <= 1.1 else 'missed'}")
    ratios = [(depth, row["ratio"]) for (mode, depth), row in sorted(rows.items())
              if mode == "reversible" and row["ratio"] is not None]
    source = "interleaved timing"
    if not ratios:
        source = "own-process times"
        ratios = [(d, figure("reversible", d, "seconds") / figure("autograd", d, "seconds"))
                  for d in args.depths if figure("reversible", d, "seconds") and figure("autograd", d, "seconds")]
    if ratios:
        text = ", ".join(f"N={d}: {r:.2f}x" for d, r in ratios)
        lines.append(f"- reversible / autograd time ({source}): {text} (goal <= 1.4x): "
                     f"{'met' if all(r <= 1.4 for _, r in ratios) else 'missed'}")
    compare_depth = 24 if 24 in args.depths else max(args.depths, default=None)
    mine = figure("reversible", compare_depth, "peak_mib")
    for other in ("revlib", "checkpoint"):
        theirs = figure(other, compare_depth, "peak_mib")
        if mine and theirs:
            lines.append(f"- reversible peak at N={compare_depth} {mine:.0f} MiB vs {other} {theirs:.0f} MiB: "
                         f"{'lower' if mine < theirs else 'not lower'}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="*", default=[2, 6, 12, 24, 48],
                        help="depths of the memory pass (none: skip it)")
    parser.add_argument("--timing-depths", type=int, nargs="*", default=[2, 6, 12],
                        help="depths of the interleaved timing pass (none: skip it)")
    parser.add_argument("--timing-rounds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--width", type=int, default=512, help="input width; each stream gets half")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--memory-fraction", type=float, default=0.6,
                        help="skip autograd runs whose estimated activations exceed this share of free memory")
    parser.add_argument("--mmap-threshold", type=int, default=131072,
                        help="MALLOC_MMAP_THRESHOLD_ for the workers in bytes (0: glibc's dynamic default)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="markdown file to write ('' for none)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.width % 2:
        parser.error("--width must be even: the input is split into two equal streams")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        config = json.loads(args.worker)
        print(json.dumps(measure_alternating(config) if config.get("alternating") else measure(config)))
        return
    command = "python -m torch_reformer.bench.reversible " + " ".join(sys.argv[1:] if argv is None else argv)
    results, timings = run_all(args), run_timing(args)
    report = markdown(args, results, timings, command.strip())
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as handle:
            handle.write(report)


if __name__ == "__main__":
    main()
