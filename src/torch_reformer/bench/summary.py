"""The headline ratios of a benchmark run, read from its results document (see ``report``).

Against each peer (transformers, reformer_pytorch): training memory per token, memory slope with
depth, step time, longest trainable length. For our own model: where local/LSH attention overtakes
full (SDPA) attention in time and memory, and the bits-per-character gap of LSH vs full. Then the
benchmark model's figures against the project's targets (memory with depth and per token, step
time, longest length, local/LSH vs full). A figure whose configurations did not run reads "n/a"
with the reason, never a guess.
"""

from __future__ import annotations

from .report import environment_lines, format_x, metric_value, status_text

PEERS = (("hf", "transformers"), ("reformer_pytorch", "reformer_pytorch"))
NOT_MEASURED = "n/a (not measured in this run)"


def _experiment(results: dict, suite: str, key: str) -> dict | None:
    return results["suites"].get(suite, {}).get("experiments", {}).get(key)


def _series(experiment: dict | None, series_key: str) -> dict | None:
    if experiment is None:
        return None
    return next((s for s in experiment["series"] if s["key"] == series_key), None)


def value(experiment: dict | None, series_key: str, x, metric: str) -> float | None:
    """``metric`` of one point (None when the experiment, series or point is missing or did not run)."""
    series = _series(experiment, series_key)
    if series is None:
        return None
    point = next((p for p in series["points"] if p["x"] == x), None)
    return None if point is None else metric_value(point, metric)


def measured_xs(experiment: dict | None, series_key: str, metric: str) -> list:
    series = _series(experiment, series_key)
    if series is None:
        return []
    return [p["x"] for p in series["points"] if metric_value(p, metric) is not None]


def common_largest_x(experiment: dict | None, keys: tuple[str, ...], metric: str):
    """The largest x at which every series in ``keys`` was measured (None if there is none)."""
    sets = [set(measured_xs(experiment, key, metric)) for key in keys]
    common = set.intersection(*sets) if sets else set()
    return max(common) if common else None


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def _fmt(number: float | None, unit: str = "") -> str:
    if number is None:
        return "n/a"
    text = f"{number:,.0f}" if abs(number) >= 100 else f"{number:.3g}"
    return f"{text}{unit}"


def _run_of(experiment: dict | None, series_key: str) -> tuple | None:
    """(date, code revision, command) of the invocation that measured a series (None if unknown)."""
    series = _series(experiment, series_key) or {}
    environment = series.get("environment") or (experiment or {}).get("environment")
    if not environment:
        return None
    return environment.get("date"), environment.get("revision"), environment.get("command")


def separate_runs(*compared: tuple[dict | None, str]) -> str:
    """A warning to append to a comparison whose series (experiment, series key) were measured by
    different invocations: a results folder may merge several runs, and a ratio is a side-by-side
    figure only when both sides ran in one (same machine state, same code). "" when they did."""
    runs: dict[tuple, list[str]] = {}
    for experiment, key in compared:
        run = _run_of(experiment, key)
        if run is not None and key not in runs.setdefault(run, []):
            runs[run].append(key)
    if len(runs) <= 1:
        return ""
    parts = "; ".join(f"{', '.join(keys)}: {date}, code {revision}" for (date, revision, _), keys in runs.items())
    return f" NOT side by side: measured in separate runs ({parts})."


# ------------------------------------------------------------------------------------ peer headlines


def memory_per_token(results: dict, peer: str, name: str) -> str:
    experiment = _experiment(results, "memory", "train_memory_vs_length")
    x = common_largest_x(experiment, ("ours-reversible", peer), "peak_kib_per_token")
    if x is None:
        return f"- Training memory per token vs {name}: {NOT_MEASURED}"
    ours, theirs = (value(experiment, k, x, "peak_kib_per_token") for k in ("ours-reversible", peer))
    ours_act, theirs_act = (value(experiment, k, x, "activation_mib") for k in ("ours-reversible", peer))
    return (f"- Training memory per token at {format_x(x)} tokens (2 layers): ours {_fmt(ours, ' KiB')}, {name} "
            f"{_fmt(theirs, ' KiB')}: {name} needs {_ratio(theirs, ours)} ours (peak above baseline: "
            f"{_ratio(theirs_act, ours_act)})." + separate_runs((experiment, "ours-reversible"), (experiment, peer)))


def depth_slope(results: dict, series_key: str) -> tuple[float | None, float | None, tuple]:
    """(MiB per added layer between the smallest and largest depth measured, peak ratio of those, depths)."""
    experiment = _experiment(results, "memory", "train_memory_vs_depth")
    depths = measured_xs(experiment, series_key, "peak_mib")
    if len(depths) < 2:
        return None, None, ()
    low, high = min(depths), max(depths)
    peak_low, peak_high = value(experiment, series_key, low, "peak_mib"), value(experiment, series_key, high, "peak_mib")
    return (peak_high - peak_low) / (high - low), peak_high / peak_low, (low, high)


def depth_peaks(results: dict, series_key: str, low: int = 2, high: int = 12) -> tuple[float | None, float | None]:
    """Training peaks (MiB) of ``series_key`` at ``low`` and ``high`` layers (None where not measured)."""
    experiment = _experiment(results, "memory", "train_memory_vs_depth")
    return value(experiment, series_key, low, "peak_mib"), value(experiment, series_key, high, "peak_mib")


def depth_headline(results: dict, peer: str, name: str) -> str:
    ours_slope, ours_ratio, ours_depths = depth_slope(results, "ours-reversible")
    peer_slope, peer_ratio, peer_depths = depth_slope(results, peer)
    if ours_slope is None or peer_slope is None:
        return f"- Memory slope with depth vs {name}: {NOT_MEASURED}"
    ours_2, ours_12 = depth_peaks(results, "ours-reversible")
    peer_2, peer_12 = depth_peaks(results, peer)
    twelve = (f"12-layer / 2-layer peak: ours {_ratio(ours_12, ours_2)} ({_fmt(ours_2)} -> {_fmt(ours_12, ' MiB')}), "
              f"{name} {_ratio(peer_12, peer_2)} ({_fmt(peer_2)} -> {_fmt(peer_12, ' MiB')}); ")
    experiment = _experiment(results, "memory", "train_memory_vs_depth")
    return (f"- Memory with depth: {twelve}slope ours {_fmt(ours_slope, ' MiB')}/layer (peak x{ours_ratio:.2f} from "
            f"{ours_depths[0]} to {ours_depths[1]} layers), {name} {_fmt(peer_slope, ' MiB')}/layer (x{peer_ratio:.2f} "
            f"from {peer_depths[0]} to {peer_depths[1]})." + separate_runs((experiment, "ours-reversible"), (experiment, peer)))


def step_time(results: dict, peer: str, name: str) -> str:
    experiment = _experiment(results, "speed", "train_speed_vs_length")
    x = 16384 if value(experiment, peer, 16384, "seconds") and value(experiment, "ours-reversible", 16384, "seconds") \
        else common_largest_x(experiment, ("ours-reversible", peer), "seconds")
    if x is None:
        return f"- Training step time vs {name}: {NOT_MEASURED}"
    ours, theirs = (value(experiment, k, x, "seconds") for k in ("ours-reversible", peer))
    return (f"- Training step at {format_x(x)} tokens: ours {_fmt(ours, ' s')}, {name} {_fmt(theirs, ' s')}: ours "
            f"takes {_ratio(ours, theirs)} the time of {name}."
            + separate_runs((experiment, "ours-reversible"), (experiment, peer)))


LONGEST_SOURCES = (("longest_trainable", "6-layer search"), ("train_memory_vs_length", "2-layer series"))


def _ran(experiment: dict | None, series_key: str) -> bool:
    """Whether any configuration of the series was run (or failed) in this experiment."""
    series = _series(experiment, series_key)
    return series is not None and any(
        (p.get("result") or {}).get("status") not in (None, "not installed") for p in series["points"])


def longest(results: dict, series_key: str, source: str | None = None) -> tuple[int | None, str]:
    """Longest length that trained and how it is known: "limit" when a longer one failed (OOM/timeout)
    or was not run because of a failure or the time limit, "at least" when every length tried ran.
    ``source`` picks the experiment; by default the dedicated search (``longest_trainable``) is
    preferred over the 2-layer length series. (None, why) when the series ran but no length fitted."""
    for key, where in LONGEST_SOURCES:
        experiment = _experiment(results, "memory", key)
        if (source is not None and key != source) or not _ran(experiment, series_key):
            continue
        points = _series(experiment, series_key)["points"]
        xs = measured_xs(experiment, series_key, "peak_mib")
        if not xs:
            return None, f"none of the lengths tried, {where}: {format_x(points[0]['x'])} {status_text(points[0])}"
        limited = any((p.get("result") or {}).get("status") in ("OOM", "timeout", "not run") for p in points)
        return max(xs), f"{'limit' if limited else 'at least'}, {where}"
    return None, ""


def longest_headline(results: dict, peer: str, name: str) -> str:
    """Ours against ``peer`` in the same experiment: the 6-layer search where both ran there."""
    source = next((key for key, _ in LONGEST_SOURCES
                   if all(_ran(_experiment(results, "memory", key), k) for k in ("ours-reversible", peer))), None)
    if source is None:
        return f"- Longest trainable length vs {name}: {NOT_MEASURED}"
    ours, ours_source = longest(results, "ours-reversible", source)
    theirs, their_source = longest(results, peer, source)
    if ours is None:
        return f"- Longest trainable length: ours {ours_source}; {name} {_fmt(theirs)} ({their_source})."
    if theirs is None:
        first = _series(_experiment(results, "memory", source), peer)["points"][0]["x"]
        return (f"- Longest trainable length: ours {ours:,} tokens ({ours_source}), {name} {their_source}: "
                f"ratio > {ours / first:g}.")
    experiment = _experiment(results, "memory", source)
    return (f"- Longest trainable length: ours {ours:,} tokens ({ours_source}), {name} {theirs:,} ({their_source}): "
            f"ratio {ours / theirs:g}." + separate_runs((experiment, "ours-reversible"), (experiment, peer)))


# ------------------------------------------------------------------------------------ ours: LSH vs full


def crossover(experiment: dict | None, fast_key: str, slow_key: str, metric: str) -> str:
    """Where ``fast_key`` (local/LSH) becomes smaller than ``slow_key`` (full) in ``metric``."""
    xs = sorted(set(measured_xs(experiment, fast_key, metric)) & set(measured_xs(experiment, slow_key, metric)))
    if not xs:
        return NOT_MEASURED
    below = [x for x in xs if value(experiment, fast_key, x, metric) < value(experiment, slow_key, x, metric)]
    if not below:
        return f"full stays below local/LSH at every length measured (up to {format_x(xs[-1])})"
    first = below[0]
    before = [x for x in xs if x < first]
    if not before:
        return f"local/LSH is below full at every length measured (from {format_x(first)})"
    return f"between {format_x(before[-1])} and {format_x(first)} tokens"


def lsh_vs_full(results: dict) -> list[str]:
    speed = _experiment(results, "speed", "train_speed_vs_length")
    memory = _experiment(results, "memory", "train_memory_vs_length")
    lines = [
        f"- Crossover in training step time, local/LSH vs full (SDPA), both reversible: "
        f"{crossover(speed, 'ours-reversible', 'ours-full-reversible', 'seconds')}.",
        f"- Crossover in training peak memory: {crossover(memory, 'ours-reversible', 'ours-full-reversible', 'peak_mib')}.",
    ]
    for x in (16384, 65536):
        for mode in ("reversible", "checkpoint"):
            full_time = value(speed, f"ours-full-{mode}", x, "seconds")
            full_peak = value(memory, f"ours-full-{mode}", x, "peak_mib") or value(speed, f"ours-full-{mode}", x, "peak_mib")
            lsh_time = value(speed, "ours-reversible", x, "seconds")
            lsh_peak = value(memory, "ours-reversible", x, "peak_mib") or value(speed, "ours-reversible", x, "peak_mib")
            lines.append(
                f"- At {format_x(x)} tokens, full (SDPA, {mode}) vs local/LSH (reversible): step "
                f"{_fmt(full_time, ' s')} vs {_fmt(lsh_time, ' s')} (local/LSH {_ratio(full_time, lsh_time)} faster), "
                f"peak {_fmt(full_peak, ' MiB')} vs {_fmt(lsh_peak, ' MiB')}."
                + separate_runs((speed, f"ours-full-{mode}"), (speed, "ours-reversible"))
            )
    return lines


def quality_lines(results: dict) -> list[str]:
    lines = []
    bpc = _experiment(results, "quality", "bpc")
    cells = {s["key"]: ((s["points"][0].get("result") or {}).get("cells") or {}) for s in (bpc or {}).get("series", [])}
    scores = {key: c.get("eval bpc") for key, c in cells.items()}
    if scores.get("full") is not None:
        for key in ("lsh", "local"):
            if scores.get(key) is not None:
                lines.append(f"- Bits per character, {key} vs full: {scores[key]:.3f} vs {scores['full']:.3f} "
                             f"(gap {scores[key] - scores['full']:+.3f}).")
    else:
        lines.append(f"- Bits per character gap LSH vs full: {NOT_MEASURED}")
    duplication = _experiment(results, "quality", "duplication")
    for series in (duplication or {}).get("series", []):
        result = series["points"][0].get("result") or {}
        if result.get("cells"):
            same = series["key"].upper() if series["key"].startswith("lsh") else "full"
            lines.append(f"- Duplication, {series['label']}: eval accuracy {result['cells'].get(same, float('nan')):.3f} "
                         f"evaluated the same way, {result['cells'].get('full', float('nan')):.3f} with full attention.")
    return lines


# ------------------------------------------------------------------------------------ targets


def model_targets(results: dict) -> list[str]:
    depth = _experiment(results, "memory", "train_memory_vs_depth")
    memory = _experiment(results, "memory", "train_memory_vs_length")
    speed = _experiment(results, "speed", "train_speed_vs_length")
    lines = []
    for key, name in (("ours-reversible", "ours"), ("hf", "transformers"), ("reformer_pytorch", "reformer_pytorch")):
        p2, p12 = value(depth, key, 2, "peak_mib"), value(depth, key, 12, "peak_mib")
        w2, w12 = value(depth, key, 2, "parameter_bytes"), value(depth, key, 12, "parameter_bytes")
        weights = ""
        if None not in (p2, p12, w2, w12):
            added = 2 * (w12 - w2) / 2**20
            weights = (f"; parameters + gradients of the 10 added layers: {_fmt(added, ' MiB')} of the "
                       f"{_fmt(p12 - p2, ' MiB')} difference; without them {_ratio(p12 - added, p2)}")
        lines.append(f"- {name}: 12-layer peak {_fmt(p12, ' MiB')} vs 2-layer {_fmt(p2, ' MiB')} = {_ratio(p12, p2)}"
                     f"{weights} (target for ours: <= 1.10x)")
    ours, hf = (value(memory, k, 65536, "peak_kib_per_token") for k in ("ours-reversible", "hf"))
    lines.append(f"- Peak per token at 64K, 2 layers: ours {_fmt(ours, ' KiB')}, transformers {_fmt(hf, ' KiB')} = "
                 f"{_ratio(ours, hf)} (target <= 0.33x)" + separate_runs((memory, "ours-reversible"), (memory, "hf")))
    ours, hf = (value(speed, k, 16384, "seconds") for k in ("ours-reversible", "hf"))
    lines.append(f"- Seconds per step at 16K: ours {_fmt(ours)}, transformers {_fmt(hf)} = {_ratio(ours, hf)} "
                 "(target <= 0.5x)" + separate_runs((speed, "ours-reversible"), (speed, "hf")))
    alternating = _experiment(results, "speed", "train_speed_alternating")
    ours, hf = (value(alternating, "alternating", 16384, f"seconds_{k}") for k in ("ours-reversible", "hf"))
    if None not in (ours, hf):
        lines.append(f"- Seconds per step at 16K, timed in turn in one process: ours {_fmt(ours)}, transformers "
                     f"{_fmt(hf)} = {_ratio(ours, hf)} (target <= 0.5x)")
    search = _experiment(results, "memory", "longest_trainable")
    ours_longest = max(measured_xs(search, "ours-reversible", "peak_mib"), default=None)
    failed = next((p for p in (_series(search, "ours-reversible") or {}).get("points", [])
                   if (p.get("result") or {}).get("status") in ("OOM", "timeout")), None)
    reason = f"; {format_x(failed['x'])} failed: {failed['result']['status']}" if failed else ""
    lines.append(f"- Longest power-of-two length the 6-layer model trains on: "
                 f"{f'{ours_longest:,}' if ours_longest else 'n/a'} tokens{reason} (target 1,048,576)")
    lines.append(full_attention_target(memory, speed, 65536))
    return lines


def full_attention_target(memory: dict | None, speed: dict | None, x: int) -> str:
    """Local/LSH vs the faster of the two full-attention (SDPA) memory modes at ``x`` tokens, in time and memory."""
    timed = [(value(speed, f"ours-full-{mode}", x, "seconds"), mode) for mode in ("reversible", "checkpoint")]
    timed = [(seconds, mode) for seconds, mode in timed if seconds is not None]
    ours_time = value(speed, "ours-reversible", x, "seconds")
    if not timed or ours_time is None:
        return f"- Local/LSH vs full (SDPA) training at {format_x(x)}: {NOT_MEASURED} (target >= 5x faster, no more memory)"
    full_time, mode = min(timed)
    full_peak, ours_peak = value(memory, f"ours-full-{mode}", x, "peak_mib"), value(memory, "ours-reversible", x, "peak_mib")
    return (f"- Local/LSH vs full (SDPA, {mode}, the faster full mode) training at {format_x(x)}: step "
            f"{_fmt(ours_time, ' s')} vs {_fmt(full_time, ' s')} = {_ratio(full_time, ours_time)} faster (target >= 5x), "
            f"peak {_fmt(ours_peak, ' MiB')} vs {_fmt(full_peak, ' MiB')} = {_ratio(ours_peak, full_peak)} "
            "(target <= 1.00x)" + separate_runs((speed, "ours-reversible"), (speed, f"ours-full-{mode}"),
                                                 (memory, "ours-reversible"), (memory, f"ours-full-{mode}")))


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:,.0f} min" if seconds >= 600 else f"{seconds / 60:.1f} min"


def _configurations(count: int) -> str:
    return f"{count} configuration{'' if count == 1 else 's'}"


def run_time_lines(results: dict) -> list[str]:
    """How long the configurations of each suite ran (each child's whole life, imports included;
    the parent's own time between children is not counted), and the total."""
    lines, total, total_count = [], 0.0, 0
    for suite, record in results["suites"].items():
        seconds = [
            point["result"]["wall_seconds"]
            for experiment in record["experiments"].values()
            for series in experiment["series"]
            for point in series["points"]
            if "wall_seconds" in (point.get("result") or {})
        ]
        if seconds:
            lines.append(f"- {suite}: {_configurations(len(seconds))}, {_minutes(sum(seconds))}")
            total, total_count = total + sum(seconds), total_count + len(seconds)
    if not lines:
        return [f"- {NOT_MEASURED}"]
    return lines + [f"- all suites: {_configurations(total_count)}, {_minutes(total)} (the configurations' own "
                    "wall time, summed; a full run takes about this long on the machine above)"]


def summary_markdown(results: dict) -> str:
    lines = ["# Benchmark summary", "", "Measured by:", ""]
    seen = []
    for record in results["suites"].values():
        for experiment in record["experiments"].values():
            for series in experiment["series"]:
                text = " ".join(environment_lines(series.get("environment") or experiment["environment"]))
                if text not in seen:
                    seen.append(text)
    lines += [f"- {text}" for text in seen] + [""]
    for peer, name in PEERS:
        lines += [f"## Against {name}", ""]
        lines += [memory_per_token(results, peer, name), depth_headline(results, peer, name),
                  step_time(results, peer, name), longest_headline(results, peer, name), ""]
    lines += ["## Local/LSH vs full attention (ours)", "", *lsh_vs_full(results), ""]
    lines += ["## Quality", "", *quality_lines(results), ""]
    lines += ["## Targets", "", *model_targets(results), ""]
    lines += ["## Run time", "", *run_time_lines(results), ""]
    return "\n".join(lines)
