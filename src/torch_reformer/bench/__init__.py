"""`reformer bench {memory,speed,quality}`: our Reformer against full attention and the peers, side by side.

``main(argv)`` parses the command line, runs the chosen suites one configuration per fresh process
(``harness``), and writes markdown tables, PNG plots, ``summary.md`` and the raw ``results.json``
under ``--out`` (default ``benchmarks/results/<date>-<machine>``). Results already in that folder
are kept and merged, so suites may be run at different times, or side by side, into the same folder
(each result is merged into ``results.json`` under a lock on the folder).

Suites: ``memory`` (``bench.memory``), ``speed`` (``bench.speed``), ``quality`` (``bench.quality``).
``--quick`` runs a small subset in a few minutes; the full run takes hours on a 2-core CPU (the
longest-trainable-length search and full attention at 64K tokens dominate). The parent process
imports no peer and builds no model (torch comes in with the package): only the children do; each
child measures its own peak (``harness.max_rss_bytes``), whatever the parent's size.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

from ..arguments import NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, OneLineArgumentParser
from .harness import Profile, run_series, run_spec

SUITES = ("memory", "speed", "quality")
DTYPES = ("float32", "bfloat16", "float16")
RESULTS_FILE = "results.json"

FULL = Profile(
    name="full",
    lengths=[1024, 4096, 16384, 65536, 262144, 1048576],
    depth_length=16384, depths=[2, 6, 12, 24],
    inference_lengths=[1024, 4096, 16384, 65536, 262144],
    blog_lengths=[4096, 16384, 65536],
    blog_layers=[4, 8, 12], blog_layer_shape=(8, 512),
    longest_lengths=[131072, 262144, 524288, 1048576, 2097152], longest_layers=6,
    speed_lengths=[1024, 4096, 16384, 65536], alternating_lengths=[4096, 16384],
    attention_lengths=[1024, 4096, 16384, 65536],
    generation_contexts=[1024, 4096], generation_new_tokens=32,
    duplication=dict(length=256, vocab=64, steps=300, batch=16, lr=3e-3, hidden=256, heads=4, chunk=32, eval_size=256),
    bpc=dict(seq_len=512, steps=800, batch=8, lr=3e-3, hidden=128, layers=2, heads=4, chunk=64,
             corpus_bytes=4_000_000, eval_size=64),
    timeout_s=900.0, long_timeout_s=2400.0,
)

QUICK = Profile(
    name="quick",
    lengths=[1024, 4096],
    depth_length=2048, depths=[2, 6],
    inference_lengths=[1024, 4096],
    blog_lengths=[2048],
    blog_layers=[2, 4], blog_layer_shape=(1, 512),
    longest_lengths=[], longest_layers=6,
    speed_lengths=[2048],
    attention_lengths=[1024],
    generation_contexts=[256], generation_new_tokens=8,
    duplication=dict(length=64, vocab=16, steps=40, batch=8, lr=3e-3, hidden=64, heads=4, chunk=8, eval_size=32),
    bpc=dict(seq_len=128, steps=20, batch=4, lr=1e-3, hidden=64, layers=2, heads=4, chunk=32,
             corpus_bytes=300_000, eval_size=8),
    timeout_s=120.0, long_timeout_s=240.0,
    experiments={"train_memory_vs_length", "train_memory_vs_depth", "train_speed_vs_length", "attention_speed",
                 "generation_speed", "duplication", "bpc"},
    series={"ours-reversible", "ours-full-reversible", "hf", "reformer_pytorch", "lsh-2", "local", "full", "hf-2",
            "reformer_pytorch-2", "cache", "no-cache", "lsh-1", "lsh"},
)


def _suite_module(name: str):
    from . import memory, quality, speed

    return {"memory": memory, "speed": speed, "quality": quality}[name]


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog=prog, description="Measure memory, speed and quality of torch-reformer against full attention and "
        "the peers (transformers, reformer_pytorch when installed), one configuration per fresh process.")
    parser.add_argument("suites", nargs="+", choices=SUITES, help="which suites to run")
    parser.add_argument("--quick", action="store_true", help="a small subset (a few minutes on 2 CPU cores)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default benchmarks/results/<date>-<machine>)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="float32, or bfloat16/float16 autocast for the forward passes")
    parser.add_argument("--only", metavar="KEYS", help="comma-separated experiment keys to run (default: all)")
    parser.add_argument("--series", metavar="KEYS", help="comma-separated series keys to run, e.g. "
                        "ours-reversible,hf (default: all; --quick: a subset)")
    parser.add_argument("--memory-cap-gib", type=POSITIVE_FLOAT, metavar="GIB",
                        help="kill a configuration whose resident memory passes this (default: 80%% of the "
                             "memory available at start; CPU only)")
    parser.add_argument("--threads", type=POSITIVE_INT, metavar="N",
                        help="torch threads in every configuration (default: torch's own choice)")
    parser.add_argument("--mmap-threshold", type=NON_NEGATIVE_INT, default=131072, metavar="BYTES",
                        help="glibc MALLOC_MMAP_THRESHOLD_ of the memory suite's configurations, so resident "
                             "memory follows live memory (0: glibc's dynamic default)")
    parser.add_argument("--malloc", action="append", default=[], metavar="NAME=VALUE",
                        help="a glibc allocator setting for every configuration of every suite, e.g. "
                             "MALLOC_MMAP_THRESHOLD_=131072 (repeatable; recorded in the reports)")
    parser.add_argument("--timeout-scale", type=POSITIVE_FLOAT, default=1.0, metavar="X",
                        help="multiply every per-configuration time limit by X")
    return parser


def make_profile(args: argparse.Namespace) -> Profile:
    from dataclasses import replace

    base = QUICK if args.quick else FULL
    experiments, series = base.experiments, base.series
    if args.only:
        experiments = _keys(args.only)
    if args.series:
        series = _keys(args.series)
    return replace(base, device=args.device, dtype=args.dtype, experiments=experiments, series=series,
                   threads=args.threads, mmap_threshold=args.mmap_threshold, malloc_env=parse_malloc(args.malloc),
                   timeout_s=base.timeout_s * args.timeout_scale, long_timeout_s=base.long_timeout_s * args.timeout_scale)


def unknown_selection(args: argparse.Namespace, profile: Profile) -> str | None:
    """What is wrong with ``--only``/``--series`` (keys that the named suites do not have), or None."""
    from dataclasses import replace

    everything = replace(profile, experiments=None, series=None)
    experiments = [e for suite in dict.fromkeys(args.suites) for e in _suite_module(suite).plan(everything)]
    selections = (("--only", args.only, {e.key for e in experiments}),
                  ("--series", args.series, {series.key for e in experiments for series in e.series}))
    for flag, chosen, available in selections:
        missing = sorted(_keys(chosen) - available)
        if missing:
            quick = " with --quick" if args.quick else ""
            return (f"{flag}: no {', '.join(missing)} in the {'/'.join(dict.fromkeys(args.suites))} suite(s){quick}; "
                    f"choose from {', '.join(sorted(available))}")
    return None


def _keys(text: str | None) -> set[str]:
    """The keys of a comma-separated flag value (none when the flag was not given)."""
    return {key.strip() for key in (text or "").split(",") if key.strip()}


def parse_malloc(settings: list[str]) -> dict[str, str]:
    """``--malloc`` values (``MALLOC_X_=value``) as an environment dict; a clear error for anything else."""
    env = {}
    for setting in settings:
        name, equals, value = setting.partition("=")
        if not (equals and name.startswith("MALLOC_") and name.endswith("_") and value):
            raise ValueError(f"--malloc takes a glibc setting NAME=VALUE with NAME like MALLOC_MMAP_THRESHOLD_ "
                             f"(glibc's variables end in an underscore), got {setting!r}")
        env[name] = value
    return env


def default_out_dir(device: str) -> Path:
    from .report import machine_slug

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return Path("benchmarks") / "results" / f"{date}-{machine_slug(device)}"


def _describe(result: dict) -> str:
    parts = [result["status"]]
    if result["status"] == "ok":
        if "peak_bytes" in result:
            parts.append(f"peak {result['peak_bytes'] / 2**20:,.0f} MiB")
        if "seconds" in result:
            parts.append(f"{result['seconds']:.3g} s")
        if "cells" in result:
            parts.append(", ".join(f"{k} {v:.3g}" for k, v in result["cells"].items()))
    elif result.get("detail"):
        parts.append(result["detail"][:120])
    return ", ".join(parts)


def run_experiments(suite: str, profile: Profile, results: dict, out_dir: Path, command: str,
                    memory_cap_bytes: int | None, log=print) -> None:
    """Run ``suite``'s planned experiments, storing each result in ``results`` and on disk as it arrives."""
    from .peers import is_installed
    from .report import environment, experiment_record, read_results, store_experiment, write_reports

    child_env = {}
    if suite == "memory" and profile.mmap_threshold:
        child_env["MALLOC_MMAP_THRESHOLD_"] = str(profile.mmap_threshold)
    child_env.update(profile.malloc_env)
    env = environment(profile.device, profile.dtype, command, profile.threads, child_env)
    record = results["suites"].setdefault(suite, {"experiments": {}})
    for experiment in _suite_module(suite).plan(profile):
        planned_keys = [series.key for series in experiment.series]
        experiment.series = [series for series in experiment.series if profile.wants_series(series.key)]
        if not experiment.series:
            continue
        on_disk = read_results(out_dir / RESULTS_FILE)["suites"].get(suite, {}).get("experiments", {})
        previous = on_disk.get(experiment.key) or record["experiments"].get(experiment.key)
        stored = experiment_record(experiment, env, previous, planned_keys)
        record["experiments"][experiment.key] = stored
        records = {series_record["key"]: series_record for series_record in stored["series"]}
        for series in experiment.series:
            series_record = records[series.key]
            if not is_installed(series.impl):
                series.skip_reason = "not installed"

            def on_result(point, result, series=series, series_record=series_record):
                index = series.points.index(point)
                series_record["points"][index]["result"] = result
                store_experiment(out_dir / RESULTS_FILE, suite, stored)
                log(f"[{suite}] {experiment.key} | {series.label} | {point.x}: {_describe(result)}", flush=True)

            run_series(series, lambda spec: run_spec({**spec, "threads": profile.threads}, experiment.timeout_s,
                                                     memory_cap_bytes, child_env), on_result, experiment.timeout_s)
        write_reports(out_dir, store_experiment(out_dir / RESULTS_FILE, suite, stored))


def main(argv: list[str] | None = None, prog: str = "reformer bench") -> int:
    """Run the benchmark suites named in ``argv``; 0 on success (failed configurations are results, not errors)."""
    from .report import read_results, write_reports

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        profile = make_profile(args)
    except ValueError as error:
        parser.error(str(error))
    unknown = unknown_selection(args, profile)
    if unknown:
        parser.error(unknown)
    out_dir = Path(args.out) if args.out else default_out_dir(args.device)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"cannot create --out {out_dir}: {error.strerror or error}")
    available = available_memory_bytes()
    cap = int(args.memory_cap_gib * 2**30) if args.memory_cap_gib else (int(0.8 * available) if available else None)
    if args.device == "cuda":
        cap = None  # GPU memory is the limit there, and CUDA reports its own out-of-memory errors
    command = f"{prog} {shlex.join(argv)}"
    results = read_results(out_dir / RESULTS_FILE)
    for suite in dict.fromkeys(args.suites):
        run_experiments(suite, profile, results, out_dir, command, cap)
    for path in write_reports(out_dir, read_results(out_dir / RESULTS_FILE)):
        print(f"wrote {path}")
    return 0


__all__ = ["FULL", "QUICK", "SUITES", "Profile", "main", "make_profile", "run_experiments"]
