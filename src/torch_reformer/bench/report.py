"""Turn benchmark results into markdown tables, PNG plots, a summary of headline ratios, and raw JSON.

The results of a run live in one JSON document (``results.json`` in the output folder), written
again after every configuration so an interrupted run keeps what it measured:

    {"format": 1, "suites": {"memory": {"experiments": {key: experiment}}}}
    experiment = {"key", "title", "environment", "x_name", "notes", "views": [{"metric", "caption"}],
                  "plot_metric", "log_x", "log_y", "timeout_s",
                  "series": [{"label", "key", "impl", "points": [{"x", "spec", "result"}]}]}

Everything else (``memory.md``, ``speed.md``, ``quality.md``, ``summary.md``, ``*.png``) is
rendered from that document alone, so results of separate invocations into the same folder
(say ``memory`` now, ``speed`` later) merge, and the report can be rebuilt without re-measuring.
Every table is preceded by the environment that produced it: machine, CPU/GPU, dtype, torch
version, date and the exact command. Plots need matplotlib (the ``plot`` extra); without it the
markdown says so and the tables are complete on their own.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from .harness import Experiment, source_revision

try:
    import fcntl
except ImportError:  # not on Windows: runs into one folder must then not overlap
    fcntl = None

MIB = 2**20
PLOT_EXTRA_NOTE = "Plots skipped: matplotlib is not installed (pip install torch-reformer[plot])."


# ------------------------------------------------------------------------------------------ environment


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def environment(device: str, dtype: str, command: str, threads: int | None = None,
                child_env: dict | None = None) -> dict:
    """What produced a set of results: machine, processor(s), dtype, torch version, threads, date, command."""
    import torch

    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None
    memory = _total_memory_bytes()
    return {
        "machine": socket.gethostname(),
        "cpu": f"{_cpu_model()}, {os.cpu_count()} cores" + (f", {memory / 2**30:.1f} GiB RAM" if memory else ""),
        "gpu": gpu,
        "device": device,
        "dtype": dtype,
        "torch": torch.__version__,
        "threads": threads or torch.get_num_threads(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "revision": source_revision(),
        "child_env": dict(child_env or {}),
        "command": command,
    }


def machine_slug(device: str) -> str:
    """Folder-name form of the machine: the host name, plus the GPU model on CUDA."""
    name = socket.gethostname().split(".")[0] or "machine"
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            name += "-" + torch.cuda.get_device_name(0).replace("NVIDIA", "").strip().replace(" ", "-")
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).lower()


def environment_lines(env: dict) -> list[str]:
    processor = env["cpu"] + (f"; GPU {env['gpu']}" if env.get("gpu") else "")
    allocator = " ".join(f"{k}={v}" for k, v in (env.get("child_env") or {}).items())
    return [
        f"Machine `{env['machine']}` ({processor}), device {env['device']}, dtype {env['dtype']}, "
        f"torch {env['torch']} ({env.get('threads', '?')} threads), Python {env['python']}, {env['date']}"
        + (f", code at {env['revision']}" if env.get("revision") else "")
        + (f", children run with {allocator}." if allocator else ", glibc's default allocator settings."),
        f"Command: `{env['command']}`",
    ]


# ------------------------------------------------------------------------------------------ cells


def experiment_record(experiment: Experiment, env: dict, previous: dict | None = None,
                      planned_keys: list[str] | None = None) -> dict:
    """The JSON form of a planned experiment run in ``env``, results still empty.

    Series of ``previous`` (the same experiment from an earlier run into the same folder) that are not
    re-run now are kept, each with the environment it was measured in, in the plan's order
    (``planned_keys``)."""
    record = {"environment": env, **asdict(experiment)}
    for series in record["series"]:
        series.pop("skip_reason", None)
        series["environment"] = env
        for point in series["points"]:
            point["result"] = None
    if previous:
        fresh = {series["key"]: series for series in record["series"]}
        kept = {series["key"]: series for series in previous["series"] if series["key"] not in fresh}
        order = planned_keys or list(fresh)
        record["series"] = [fresh.get(key) or kept[key] for key in order if key in fresh or key in kept]
        record["series"] += [series for key, series in kept.items() if key not in order]
    return record


def format_x(x) -> str:
    if isinstance(x, int) and x >= 1024 and x % 1024 == 0:
        return f"{x // 2**20}M" if x % 2**20 == 0 else f"{x // 1024}K"
    return str(x)


def _tokens(point: dict) -> int:
    spec = point["spec"]
    return spec.get("length", 1) * spec.get("batch", 1)


def metric_value(point: dict, metric: str) -> float | None:
    """The number behind ``metric`` for a measured point (None if it did not run or lacks it)."""
    result = point.get("result") or {}
    if result.get("status") != "ok":
        return None
    if metric == "peak_mib":
        return result["peak_bytes"] / MIB
    if metric == "activation_mib":
        return result["activation_bytes"] / MIB
    if metric == "peak_kib_per_token":
        return result["peak_bytes"] / 1024 / _tokens(point)
    if metric == "activation_kib_per_token":
        return result["activation_bytes"] / 1024 / _tokens(point)
    if metric == "activation_less_gradients_mib":  # a training step's gradients are as large as its parameters
        if "parameter_bytes" not in result:
            return None
        return (result["activation_bytes"] - result["parameter_bytes"]) / MIB
    value = result.get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def _number(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def status_text(point: dict) -> str:
    result = point.get("result")
    if result is None:
        return "pending"
    return result["status"]


def format_cell(point: dict, metric: str) -> str:
    """The metric's number, the status of a configuration that did not run, or "-" if it was not recorded."""
    value = metric_value(point, metric)
    if value is not None:
        return _number(value)
    return "-" if (point.get("result") or {}).get("status") == "ok" else status_text(point)


# ------------------------------------------------------------------------------------------ tables


def _series_table(experiment: dict, metric: str) -> list[str]:
    xs = list(dict.fromkeys(point["x"] for series in experiment["series"] for point in series["points"]))
    lines = ["| " + " | ".join(["model"] + [format_x(x) for x in xs]) + " |", "|---" * (len(xs) + 1) + "|"]
    for series in experiment["series"]:
        by_x = {point["x"]: point for point in series["points"]}
        cells = [format_cell(by_x[x], metric) if x in by_x else "-" for x in xs]
        lines.append("| " + " | ".join([series["label"]] + cells) + " |")
    return lines


def measured_by_lines(experiment: dict) -> list[str]:
    """The environment lines of an experiment; per group of series when they were measured apart."""
    groups: dict[str, list[str]] = {}
    for series in experiment["series"]:
        text = "\n".join(environment_lines(series.get("environment") or experiment["environment"]))
        groups.setdefault(text, []).append(series["label"])
    if len(groups) == 1:
        return next(iter(groups)).split("\n")
    lines = []
    for text, labels in groups.items():
        lines += [f"Series {', '.join(labels)}:", "", *text.split("\n"), ""]
    return lines


def _cells_table(experiment: dict) -> list[str]:
    columns: list[str] = []
    for series in experiment["series"]:
        for point in series["points"]:
            for name in ((point.get("result") or {}).get("cells") or {}):
                if name not in columns:
                    columns.append(name)
    lines = ["| " + " | ".join([experiment["x_name"]] + columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for series in experiment["series"]:
        point = series["points"][0]
        cells = (point.get("result") or {}).get("cells")
        row = [_number(cells[c]) if cells and c in cells else status_text(point) for c in columns]
        lines.append("| " + " | ".join([series["label"]] + (row or [status_text(point)])) + " |")
    return lines


def _failures(experiment: dict) -> list[str]:
    """One line per configuration that failed, and per series the first one left out and why."""
    lines = []
    for series in experiment["series"]:
        for point in series["points"]:
            result = point.get("result") or {}
            status, detail = result.get("status"), result.get("detail")
            if status in ("error", "not available", "OOM", "timeout", "not run") and detail:
                lines.append(f"- {series['label']}, {format_x(point['x'])}: {status}: {detail}")
            if status == "not run":
                break  # the larger points were left out for the same reason
    return lines


def revision_lines(experiment: dict) -> list[str]:
    """Which code revisions the configurations ran (each child records its own), when that is not simply the
    revision in the environment line above: the library may change between the start of a run and its end."""
    counts: dict[str, int] = {}
    for series in experiment["series"]:
        for point in series["points"]:
            revision = (point.get("result") or {}).get("revision")
            if revision:
                counts[revision] = counts.get(revision, 0) + 1
    stated = {(series.get("environment") or experiment["environment"]).get("revision")
              for series in experiment["series"]}
    if not counts or (len(counts) == 1 and set(counts) == stated):
        return []
    listed = ", ".join(f"{revision} ({count})" for revision, count in counts.items())
    return [f"Code revisions the configurations ran (number of configurations): {listed}; per configuration in "
            "results.json.", ""]


def experiment_markdown(experiment: dict, plot_file: str | None) -> str:
    lines = [f"## {experiment['title']}", "", *measured_by_lines(experiment), "", *revision_lines(experiment)]
    lines += [note for note in experiment["notes"]] + [""]
    for view in experiment["views"]:
        lines += [f"{view['caption'][:1].upper()}{view['caption'][1:]}, by {experiment['x_name']}:", ""]
        table = _cells_table(experiment) if view["metric"] == "cells" else _series_table(experiment, view["metric"])
        lines += table + [""]
    failures = _failures(experiment)
    if failures:
        lines += ["Configurations that did not finish:", "", *failures, ""]
    if plot_file:
        lines += [f"![{experiment['title']}]({plot_file})", ""]
    return "\n".join(lines)


def suite_markdown(suite: str, record: dict, plots: dict[str, str], plot_note: str | None) -> str:
    lines = [f"# reformer bench {suite}", ""]
    if plot_note:
        lines += [plot_note, ""]
    for key, experiment in record["experiments"].items():
        lines.append(experiment_markdown(experiment, plots.get(key)))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ plots


def _import_pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError:
        return None
    return pyplot


def _plot_series(pyplot, experiment: dict, path: Path) -> bool:
    metric = experiment["plot_metric"]
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    drawn = False
    for series in experiment["series"]:
        points = [(p["x"], metric_value(p, metric)) for p in series["points"]]
        points = [(x, y) for x, y in points if y is not None and isinstance(x, (int, float))]
        if points:
            axes.plot(*zip(*points), marker="o", label=series["label"])
            drawn = True
    if not drawn:
        pyplot.close(figure)
        return False
    caption = next((v["caption"] for v in experiment["views"] if v["metric"] == metric), metric)
    axes.set_xlabel(experiment["x_name"])
    axes.set_ylabel(caption)
    if experiment["log_x"]:
        axes.set_xscale("log", base=2)
    if experiment["log_y"]:
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(pyplot.FuncFormatter(lambda y, _: _number(y)))
    xs = sorted({p["x"] for s in experiment["series"] for p in s["points"] if isinstance(p["x"], (int, float))})
    axes.set_xticks(xs, labels=[format_x(x) for x in xs])
    axes.minorticks_off()
    axes.set_title(experiment["title"], fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return True


def _plot_cells(pyplot, experiment: dict, path: Path) -> bool:
    rows = [s for s in experiment["series"] if ((s["points"][0].get("result") or {}).get("cells"))]
    if not rows:
        return False
    columns = list(rows[0]["points"][0]["result"]["cells"])
    if experiment["key"] == "bpc":
        columns = ["eval bpc"]
    values = [[float(s["points"][0]["result"]["cells"].get(c, float("nan"))) for c in columns] for s in rows]
    figure, axes = pyplot.subplots(figsize=(1.4 * len(columns) + 3, 0.6 * len(rows) + 1.8))
    image = axes.imshow(values, cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(columns)), labels=columns)
    axes.set_yticks(range(len(rows)), labels=[s["label"] for s in rows])
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            axes.text(j, i, _number(value), ha="center", va="center", color="white", fontsize=8)
    axes.set_xlabel(experiment["x_name"])
    axes.set_title(experiment["title"], fontsize=9)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return True


def plot_experiment(experiment: dict, directory: Path) -> str | None:
    """Draw the experiment's PNG into ``directory``; its file name, or None (nothing to draw / no matplotlib)."""
    if experiment.get("plot_metric") is None:
        return None
    pyplot = _import_pyplot()
    if pyplot is None:
        return None
    path = directory / f"{experiment['key']}.png"
    draw = _plot_cells if experiment["plot_metric"] == "cells" else _plot_series
    return path.name if draw(pyplot, experiment, path) else None


# ------------------------------------------------------------------------------------------ writing


def write_json(path: Path, results: dict) -> None:
    """Atomically replace ``path`` with ``results`` as indented JSON."""
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def load_results(path: Path) -> dict:
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            pass
    return {"format": 1, "suites": {}}


@contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on the folder of ``path``, so that two runs into one folder take turns
    (the folder, not the file: the file is replaced on every write, and no lock file is left behind)."""
    if fcntl is None:
        yield
        return
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)  # closing the descriptor releases the lock


def store_experiment(path: Path, suite: str, record: dict) -> dict:
    """Put one experiment's ``record`` into the results document at ``path`` and return the whole document.

    The document is read again under a lock before it is written, so suites run at the same time into
    the same folder (say ``quality`` beside ``memory``) keep each other's results."""
    with _locked(path):
        results = load_results(path)
        experiments = results["suites"].setdefault(suite, {"experiments": {}})["experiments"]
        experiments[record["key"]] = record
        write_json(path, results)
    return results


def read_results(path: Path) -> dict:
    """The results document at ``path``, read under the same lock as ``store_experiment`` writes it."""
    with _locked(path):
        return load_results(path)


def write_reports(out_dir: Path, results: dict) -> list[Path]:
    """Render every suite's markdown and plots and the summary from ``results``; return the files written."""
    from .summary import summary_markdown

    written = []
    plot_note = None if _import_pyplot() is not None else PLOT_EXTRA_NOTE
    for suite, record in results["suites"].items():
        plots = {}
        for key, experiment in record["experiments"].items():
            name = plot_experiment(experiment, out_dir)
            if name:
                plots[key] = name
                written.append(out_dir / name)
        path = out_dir / f"{suite}.md"
        path.write_text(suite_markdown(suite, record, plots, plot_note), encoding="utf-8")
        written.append(path)
    path = out_dir / "summary.md"
    path.write_text(summary_markdown(results), encoding="utf-8")
    written.append(path)
    return written
