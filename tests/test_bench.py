"""The benchmark harness: fresh-process runs, failure statuses, missing peers, tables, plots and headline ratios.

A tiny run (2 lengths of one configuration, a 64-wide model) goes through the same code as
`reformer bench` and its tables, plot and JSON are checked; failures (memory cap, time limit, a
broken configuration, a missing peer) must become rows, never exceptions; the summary's ratios are
checked against hand-computed values on a synthetic results document.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest

from torch_reformer.bench import QUICK, build_parser, make_profile, run_experiments
from torch_reformer.bench import harness, peers, quality, report, summary
from torch_reformer.bench.harness import Point, Series, run_series, run_spec

TINY_MODEL = dict(hidden_size=64, num_attention_heads=2, attention_head_size=32, feed_forward_size=128,
                  axial_pos_embds_dim=[16, 48])
FULL_SERIES = "ours-full-reversible"
TINY = replace(QUICK, name="tiny", lengths=[512, 4096], model=TINY_MODEL, threads=1,
               experiments={"train_memory_vs_length"}, series={FULL_SERIES})


def _tiny_spec(**overrides) -> dict:
    spec = dict(task="train_step", impl="ours", length=256, config=peers.benchmark_config(256, **TINY_MODEL), threads=1)
    spec.update(overrides)
    return spec


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    results = report.load_results(out_dir / "results.json")
    logged = []
    run_experiments("memory", TINY, results, out_dir, "reformer bench memory (tiny)", 8 * 2**30,
                    log=lambda *args, **kwargs: logged.append(args[0]))
    return out_dir, results, logged


def test_tiny_run_measures_positive_numbers_and_full_attention_grows(tiny_run):
    _, results, logged = tiny_run
    experiment = results["suites"]["memory"]["experiments"]["train_memory_vs_length"]
    assert [s["key"] for s in experiment["series"]] == [FULL_SERIES]
    assert len(logged) == 2
    for series in experiment["series"]:
        assert [p["x"] for p in series["points"]] == [512, 4096]
        for point in series["points"]:
            result = point["result"]
            assert result["status"] == "ok", result
            assert result["peak_bytes"] >= result["baseline_bytes"] > 0
            assert result["seconds"] > 0 and result["tokens_per_second"] > 0
            assert result["tokens"] == point["x"]
            assert "revision" in result  # the code this configuration ran (None outside a git checkout)
    full = summary._series(experiment, FULL_SERIES)["points"]
    assert full[1]["result"]["activation_bytes"] > full[0]["result"]["activation_bytes"]
    assert full[1]["result"]["peak_bytes"] > full[0]["result"]["peak_bytes"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_child_of_a_large_parent_measures_its_own_peak():
    """Linux hands a parent's resident size at fork to the child's ru_maxrss; the child's peak must
    be its own (a large test process once made every configuration read the same peak)."""
    ballast = bytearray(768 * 2**20)
    ballast[::4096] = b"\x01" * len(range(0, len(ballast), 4096))  # make every page resident
    parent = harness._resident_bytes("self")
    result = run_spec(_tiny_spec(), timeout_s=120, memory_cap_bytes=None)
    del ballast
    assert result["status"] == "ok", result
    assert result["baseline_bytes"] < result["peak_bytes"] < parent


def test_tiny_run_writes_tables_plot_json_and_summary(tiny_run):
    out_dir, results, _ = tiny_run
    markdown = (out_dir / "memory.md").read_text()
    assert "Command: `reformer bench memory (tiny)`" in markdown
    assert "device cpu, dtype float32, torch " in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| ours, all layers full (SDPA), reversible |")]
    assert len(rows) == 3  # one per view: peak, peak above baseline, per token
    peak_cells = rows[0].strip("|").split("|")[1:]
    experiment = results["suites"]["memory"]["experiments"]["train_memory_vs_length"]
    expected = [report.format_cell(p, "peak_mib") for p in experiment["series"][0]["points"]]
    assert [cell.strip() for cell in peak_cells] == expected
    assert all(float(cell.replace(",", "")) > 0 for cell in expected)
    assert "| model | 512 | 4K |" in markdown
    png = out_dir / "train_memory_vs_length.png"
    if report._import_pyplot() is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "](train_memory_vs_length.png)" in markdown
    assert json.loads((out_dir / "results.json").read_text()) == results
    assert "# Benchmark summary" in (out_dir / "summary.md").read_text()


def test_memory_cap_and_time_limit_become_statuses():
    oom = run_spec(_tiny_spec(), timeout_s=120, memory_cap_bytes=40 * 2**20)
    assert oom["status"] == "OOM" and "cap" in oom["detail"]
    timeout = run_spec(_tiny_spec(), timeout_s=0.3, memory_cap_bytes=None)
    assert timeout["status"] == "timeout"


def test_a_broken_configuration_is_an_error_row_not_a_crash():
    result = run_spec(_tiny_spec(config=dict(peers.benchmark_config(256), hidden_size=-1)), 120, None)
    assert result["status"] == "error"
    assert "hidden_size" in result["detail"]


def test_series_stops_growing_after_oom_or_timeout():
    outcomes = iter([{"status": "ok"}, {"status": "OOM", "detail": "cap"}])
    series = Series("s", [Point(x, {"x": x}) for x in (1, 2, 4, 8)])
    ran = []

    def fake_run(spec):
        ran.append(spec["x"])
        return next(outcomes)

    results = run_series(series, fake_run)
    assert ran == [1, 2]
    assert [r["status"] for r in results] == ["ok", "OOM", "not run", "not run"]
    assert results[2]["detail"] == "OOM at 2"


def test_missing_peer_gives_not_installed_rows(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "reformer_pytorch", None)  # import fails as if it were not installed
    assert not peers.is_installed("reformer_pytorch")
    with pytest.raises(peers.PeerNotInstalled, match="pip install torch-reformer\\[peers\\]"):
        peers._require("reformer_pytorch")
    status = harness._error_status(peers.PeerNotInstalled("reformer_pytorch is not installed"))
    assert status["status"] == "not installed"
    profile = replace(TINY, series={"reformer_pytorch"})
    results = report.load_results(tmp_path / "results.json")
    run_experiments("memory", profile, results, tmp_path, "test", None, log=lambda *a, **k: None)
    experiment = results["suites"]["memory"]["experiments"]["train_memory_vs_length"]
    assert [p["result"]["status"] for p in experiment["series"][0]["points"]] == ["not installed"] * 2
    assert "| reformer_pytorch | not installed | not installed |" in (tmp_path / "memory.md").read_text()


def _point(x, length, peak_mib=None, seconds=None, status="ok", baseline_mib=100):
    if status != "ok":
        return {"x": x, "spec": {"length": length}, "result": {"status": status}}
    result = {"status": "ok", "peak_bytes": int(peak_mib * 2**20), "baseline_bytes": int(baseline_mib * 2**20),
              "activation_bytes": int((peak_mib - baseline_mib) * 2**20)}
    if seconds is not None:
        result["seconds"] = seconds
    return {"x": x, "spec": {"length": length}, "result": result}


def _experiment(key, series, env):
    return {"key": key, "environment": env, "series": [{"key": k, "label": k, "points": p} for k, p in series.items()]}


def test_summary_ratios_match_hand_computed_values():
    env = {"machine": "m", "cpu": "c", "gpu": None, "device": "cpu", "dtype": "float32", "torch": "t", "threads": 2,
           "python": "p", "date": "d", "command": "reformer bench memory speed"}
    k16, k64 = 16384, 65536
    memory = {
        "train_memory_vs_length": _experiment("train_memory_vs_length", {
            "ours-reversible": [_point(k16, k16, 400), _point(k64, k64, 1000)],
            "ours-full-reversible": [_point(k16, k16, 300), _point(k64, k64, 1200)],
            "hf": [_point(k16, k16, 900), _point(k64, k64, 3000)],
        }, env),
        "train_memory_vs_depth": _experiment("train_memory_vs_depth", {
            "ours-reversible": [_point(2, k16, 500), _point(12, k16, 520), _point(24, k16, 544)],
            "hf": [_point(2, k16, 1000), _point(12, k16, 2000), _point(24, k16, None, status="OOM")],
        }, env),
        "longest_trainable": _experiment("longest_trainable", {
            "ours-reversible": [_point(k64, k64, 2000), _point(4 * k64, 4 * k64, 8000),
                                _point(16 * k64, 16 * k64, None, status="OOM")],
            "hf": [_point(k64, k64, 4000), _point(2 * k64, 2 * k64, None, status="OOM")],
            "reformer_pytorch": [_point(k64, k64, None, status="OOM"), _point(2 * k64, 2 * k64, None, status="not run")],
        }, env),
    }
    speed = {"train_speed_vs_length": _experiment("train_speed_vs_length", {
        "ours-reversible": [_point(4096, 4096, 200, 2.0), _point(k16, k16, 300, 4.0), _point(k64, k64, 900, 16.0)],
        "ours-full-reversible": [_point(4096, 4096, 200, 1.0), _point(k16, k16, 300, 8.0), _point(k64, k64, 900, 100.0)],
        "hf": [_point(4096, 4096, 200, 3.0), _point(k16, k16, 300, 10.0), _point(k64, k64, 900, None, "timeout")],
    }, env)}
    results = {"format": 1, "suites": {"memory": {"experiments": memory}, "speed": {"experiments": speed}}}

    assert "ours 15.6 KiB, transformers 46.9 KiB: transformers needs 3.00x ours" in summary.memory_per_token(results, "hf", "transformers")
    slope, ratio, depths = summary.depth_slope(results, "ours-reversible")
    assert slope == pytest.approx(44 / 22) and ratio == pytest.approx(544 / 500) and depths == (2, 24)
    assert summary.depth_slope(results, "hf")[:2] == (pytest.approx(100.0), pytest.approx(2.0))
    assert "ours 4 s, transformers 10 s: ours takes 0.40x" in summary.step_time(results, "hf", "transformers")
    assert summary.longest(results, "ours-reversible") == (4 * k64, "limit, 6-layer search")
    assert "ours 262,144 tokens (limit, 6-layer search), transformers 65,536 (limit, 6-layer search): ratio 4" in \
        summary.longest_headline(results, "hf", "transformers")
    assert "ours 262,144 tokens (limit, 6-layer search), reformer_pytorch none of the lengths tried, 6-layer " \
        "search: 64K OOM: ratio > 4." in summary.longest_headline(results, "reformer_pytorch", "reformer_pytorch")
    timing = _experiment_of(results, "speed", "train_speed_vs_length")
    assert summary.crossover(timing, "ours-reversible", "ours-full-reversible", "seconds") == "between 4K and 16K tokens"
    sizes = _experiment_of(results, "memory", "train_memory_vs_length")
    assert summary.crossover(sizes, "ours-reversible", "ours-full-reversible", "peak_mib") == "between 16K and 64K tokens"
    targets = "\n".join(summary.model_targets(results))
    assert "12-layer peak 520 MiB vs 2-layer 500 MiB = 1.04x" in targets
    assert "parameters + gradients" not in targets  # the points carry no parameter sizes
    depth_points = memory["train_memory_vs_depth"]["series"][0]["points"]
    for point, parameter_mib in zip(depth_points, (2, 7, 13)):
        point["result"]["parameter_bytes"] = parameter_mib * 2**20
    targets = "\n".join(summary.model_targets(results))
    # 10 added layers: 2 * (7 - 2) = 10 MiB of the 20 MiB difference; 510 / 500 without them
    assert "parameters + gradients of the 10 added layers: 10 MiB of the 20 MiB difference; without them 1.02x" in targets
    # peak - baseline (100 MiB) - gradients: 500 - 100 - 2 and 520 - 100 - 7
    assert [report.metric_value(p, "activation_less_gradients_mib") for p in depth_points[:2]] == [398.0, 413.0]
    assert "Seconds per step at 16K: ours 4, transformers 10 = 0.40x" in targets
    assert "trains on: 262,144 tokens; 1M failed: OOM" in targets
    assert "step 16 s vs 100 s = 6.25x faster (target >= 5x), peak 1,000 MiB vs 1,200 MiB = 0.83x" in targets
    assert "timed in turn" not in targets  # no alternating run in the results
    speed["train_speed_alternating"] = _experiment("train_speed_alternating", {"alternating": [
        {"x": k16, "spec": {"length": k16}, "result": {"status": "ok", "seconds_ours-reversible": 3.0, "seconds_hf": 7.5}}
    ]}, env)
    assert "16K, timed in turn in one process: ours 3, transformers 7.5 = 0.40x (target <= 0.5x)" in \
        "\n".join(summary.model_targets(results))
    del speed["train_speed_alternating"]
    assert "12-layer / 2-layer peak: ours 1.04x (500 -> 520 MiB), transformers 2.00x (1,000 -> 2,000 MiB)" in \
        summary.depth_headline(results, "hf", "transformers")
    assert "Command: `reformer bench memory speed`" in summary.summary_markdown(results)
    assert summary.run_time_lines(results) == ["- " + summary.NOT_MEASURED]  # no configuration recorded its time
    for index, point in enumerate(speed["train_speed_vs_length"]["series"][0]["points"]):
        point["result"]["wall_seconds"] = 30.0 * (index + 1)  # 30 + 60 + 90 s
    memory["train_memory_vs_length"]["series"][0]["points"][0]["result"]["wall_seconds"] = 900.0
    assert summary.run_time_lines(results)[:2] == ["- memory: 1 configuration, 15 min",
                                                    "- speed: 3 configurations, 3.0 min"]
    assert summary.run_time_lines(results)[2].startswith("- all suites: 4 configurations, 18 min")


def _experiment_of(results, suite, key):
    return results["suites"][suite]["experiments"][key]


def test_duplication_config_full_is_one_chunk_and_lsh_keeps_the_chunk():
    settings = dict(length=64, vocab=16, hidden=32, heads=2, chunk=8)
    full = quality.duplication_config(settings, "full")
    lsh4 = quality.duplication_config(settings, "lsh-4")
    assert full["lsh_attn_chunk_length"] == 64 and full["attn_layers"] == ["lsh"]
    assert lsh4["lsh_attn_chunk_length"] == 8 and lsh4["num_hashes"] == 4
    assert {k: v for k, v in full.items() if k not in ("lsh_attn_chunk_length", "num_hashes")} == \
        {k: v for k, v in lsh4.items() if k not in ("lsh_attn_chunk_length", "num_hashes")}


def test_stdlib_corpus_is_sorted_and_just_covers_the_requested_bytes():
    files = quality.stdlib_corpus(200_000)
    sizes = [f.stat().st_size for f in files]
    assert [f.name for f in files] == sorted(f.name for f in files)
    assert sum(sizes) >= 200_000 > sum(sizes[:-1])
    assert files[0].name in quality.describe_corpus(files)


def test_peer_config_mappings():
    config = peers.benchmark_config(2048, layers=4)
    assert config["attn_layers"] == ["local", "lsh", "local", "lsh"]
    assert config["axial_pos_shape"] == [16, 128] and config["chunk_size_feed_forward"] == 2048
    hf = peers.hf_config_kwargs(dict(config, position_embedding_type="learned"))
    assert hf["axial_pos_embds"] is False and "memory_mode" not in hf and "position_embedding_type" not in hf
    with pytest.raises(harness.NotAvailable, match="full"):
        peers.hf_config_kwargs(peers.benchmark_config(2048, attention="full"))
    pytest.importorskip("torch")
    rp = peers.reformer_pytorch_kwargs(config, 2048)
    assert (rp["dim"], rp["depth"], rp["heads"], rp["dim_head"], rp["bucket_size"], rp["n_hashes"]) == (256, 4, 4, 64, 64, 2)
    assert rp["ff_mult"] == 4 and rp["ff_chunks"] == 1 and rp["causal"] and not rp["use_full_attn"]


def test_memory_plan_covers_training_and_inference_vs_length_and_depth():
    from torch_reformer.bench import FULL, memory

    experiments = {experiment.key: experiment for experiment in memory.plan(FULL)}
    assert {"train_memory_vs_length", "train_memory_vs_depth", "inference_memory_vs_depth",
            "inference_global_vs_lsh", "longest_trainable"} <= set(experiments)
    depth = experiments["inference_memory_vs_depth"]
    assert [series.key for series in depth.series] == ["ours", "hf", "reformer_pytorch"]
    for series in depth.series:
        assert [point.x for point in series.points] == FULL.depths
        for point in series.points:
            assert point.spec["task"] == "inference" and point.spec["length"] == FULL.depth_length
            assert len(point.spec["config"]["attn_layers"]) == point.x


def test_command_line_rejects_unknown_suites():
    parser = build_parser("reformer bench")
    assert parser.parse_args(["memory", "speed", "--quick"]).suites == ["memory", "speed"]
    with pytest.raises(SystemExit):
        parser.parse_args(["bogus"])


@pytest.mark.parametrize("argv, message", [
    (["memory", "--only", "nope"], "--only: no nope in the memory suite"),
    (["speed", "--series", "nope"], "--series: no nope in the speed suite"),
    (["memory", "--quick", "--only", "longest_trainable"], "with --quick"),
    (["memory", "--threads", "-3"], "must be >= 1"),
    (["memory", "--timeout-scale", "0"], "must be > 0"),
    (["memory", "--malloc", "BAD"], "--malloc takes"),
])
def test_bad_flags_end_in_one_line_before_any_work(argv, message, tmp_path, capsys):
    from torch_reformer.bench import main

    with pytest.raises(SystemExit) as stop:
        main([*argv, "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and error.startswith("reformer bench: error:")
    assert not (tmp_path / "out").exists()


def test_an_out_folder_that_cannot_be_made_is_a_one_line_error(tmp_path, capsys):
    from torch_reformer.bench import main

    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        main(["memory", "--only", "train_memory_vs_length", "--out", str(tmp_path / "file" / "out")])
    assert "cannot create --out" in capsys.readouterr().err


def test_malloc_settings_reach_every_child_and_the_report(monkeypatch, tmp_path):
    import torch_reformer.bench as bench

    parser = build_parser("reformer bench")
    args = parser.parse_args(["speed", "memory", "--malloc", "MALLOC_MMAP_THRESHOLD_=65536",
                              "--malloc", "MALLOC_TRIM_THRESHOLD_=1"])
    profile = make_profile(args)
    assert profile.malloc_env == {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "1"}
    for bad in ("MALLOC_MMAP_THRESHOLD_", "MMAP_THRESHOLD_=1", "MALLOC_MMAP_THRESHOLD=1", "MALLOC_TOP_PAD_="):
        with pytest.raises(ValueError, match="--malloc"):
            make_profile(parser.parse_args(["speed", "--malloc", bad]))
    seen = []
    monkeypatch.setattr(bench, "run_spec", lambda spec, timeout, cap, env: seen.append(env) or {"status": "error"})
    results = report.load_results(tmp_path / "results.json")
    tiny = replace(TINY, experiments={"train_memory_vs_length"}, malloc_env=profile.malloc_env)
    run_experiments("memory", tiny, results, tmp_path, "test", None, log=lambda *a, **k: None)
    assert seen and all(env == profile.malloc_env for env in seen)  # they win over the memory suite's threshold
    assert "children run with MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=1" in (tmp_path / "memory.md").read_text()


def test_series_skips_a_point_whose_extrapolated_time_exceeds_the_limit():
    series = Series("full", [Point(x, {"x": x, "warmup": 0, "steps": 1}) for x in (1024, 4096, 16384)], time_exponent=2.0)
    ran = []

    def fake_run(spec):
        ran.append(spec["x"])
        step = 10.0 * (spec["x"] / 1024) ** 2
        return {"status": "ok", "seconds": step, "wall_seconds": 5.0 + step}  # 5 s of start-up + one step

    results = run_series(series, fake_run, timeout_s=200.0)  # 4096: 5 + 10 * 16 = 165 s fits; 16384 would not
    assert ran == [1024, 4096]
    assert results[2] == {"status": "not run", "detail": "predicted 2,565 s > the 200 s limit"}


def test_rerunning_some_series_keeps_the_others_with_their_environment():
    old_env, new_env = {"command": "old"}, {"command": "new"}
    experiment = harness.Experiment(key="e", title="t", x_name="x", views=[], series=[
        Series("B", [Point(1, {})], key="b")])
    previous = {"series": [{"key": "a", "label": "A", "environment": old_env, "points": []},
                           {"key": "b", "label": "B", "environment": old_env, "points": []}]}
    record = report.experiment_record(experiment, new_env, previous, planned_keys=["a", "b"])
    assert [(s["key"], s["environment"]["command"]) for s in record["series"]] == [("a", "old"), ("b", "new")]
    assert record["series"][1]["points"] == [{"x": 1, "spec": {}, "result": None}]


def test_configurations_on_other_code_revisions_are_listed():
    env = {"revision": "aaa"}
    same = {"key": "e", "environment": env, "series": [
        {"key": "s", "environment": env, "points": [{"x": 1, "result": {"status": "ok", "revision": "aaa"}}]}]}
    assert report.revision_lines(same) == []
    mixed = {"key": "e", "environment": env, "series": [
        {"key": "s", "environment": env, "points": [{"x": 1, "result": {"status": "ok", "revision": "aaa"}},
                                                    {"x": 2, "result": {"status": "ok", "revision": "bbb"}},
                                                    {"x": 4, "result": {"status": "OOM"}}]}]}
    assert report.revision_lines(mixed)[0].startswith("Code revisions the configurations ran (number of "
                                                      "configurations): aaa (1), bbb (1);")


def test_alternating_task_rotates_the_first_model_and_reports_medians(monkeypatch):
    order = []
    ticks = iter(range(1, 1000))

    def fake_seconds(self, step):
        step()
        order.append(current["key"])
        return float(next(ticks))

    current = {}
    original_build = peers.build

    def tracking_build(spec):
        workload, ids = original_build(spec)
        loss = workload.loss

        def tagged_loss(batch, key=spec["impl"] + str(spec["config"]["feed_forward_size"])):
            current["key"] = key
            return loss(batch)

        workload.loss = tagged_loss
        return workload, ids

    monkeypatch.setattr(harness.Meter, "seconds", fake_seconds)
    monkeypatch.setattr(peers, "build", tracking_build)
    models = [dict(key=name, impl="ours", config=peers.benchmark_config(128, **dict(TINY_MODEL, feed_forward_size=size)))
              for name, size in (("a", 128), ("b", 64))]
    result = peers.train_step_alternating_task(dict(length=128, batch=1, rounds=3, models=models))
    assert order == ["ours128", "ours64", "ours64", "ours128", "ours128", "ours64"]  # timed steps only
    # fake times 1..6 in call order: a got 1, 4, 5 and b got 2, 3, 6
    assert result["all_seconds"] == {"a": [1.0, 4.0, 5.0], "b": [2.0, 3.0, 6.0]}
    assert result["seconds_a"] == 4.0 and result["seconds_b"] == 3.0
    assert result["ratio_b"] == pytest.approx(4.0 / 3.0)


def test_alternating_experiment_runs_ours_and_the_peers_in_one_child(tmp_path):
    pytest.importorskip("transformers")
    profile = replace(TINY, experiments={"train_speed_alternating"}, series=None, alternating_lengths=[256],
                      impls=("ours", "hf"))
    results = report.load_results(tmp_path / "results.json")
    run_experiments("speed", profile, results, tmp_path, "reformer bench speed (tiny)", 8 * 2**30, log=lambda *a, **k: None)
    experiment = results["suites"]["speed"]["experiments"]["train_speed_alternating"]
    (point,) = experiment["series"][0]["points"]
    result = point["result"]
    assert result["status"] == "ok", result
    assert sorted(result["all_seconds"]) == ["hf", "ours-reversible"]
    assert all(len(times) == 5 and min(times) > 0 for times in result["all_seconds"].values())
    assert result["ratio_hf"] == pytest.approx(result["seconds_ours-reversible"] / result["seconds_hf"])
    assert "Ours / transformers: ratio of the medians" in (tmp_path / "speed.md").read_text()


def test_a_ratio_between_series_of_separate_runs_says_so():
    k64 = 65536
    run_a = {"date": "2026-01-01 10:00 UTC", "revision": "aaa", "command": "reformer bench memory"}
    run_b = {"date": "2026-01-02 12:00 UTC", "revision": "bbb", "command": "reformer bench memory --series hf"}
    experiment = _experiment("train_memory_vs_length", {"ours-reversible": [_point(k64, k64, 1000)],
                                                         "hf": [_point(k64, k64, 3000)]}, run_a)
    results = {"format": 1, "suites": {"memory": {"experiments": {"train_memory_vs_length": experiment}}}}
    assert "side by side" not in summary.memory_per_token(results, "hf", "transformers")  # both from run_a
    experiment["series"][1]["environment"] = run_b
    line = summary.memory_per_token(results, "hf", "transformers")
    assert line.endswith("NOT side by side: measured in separate runs (ours-reversible: 2026-01-01 10:00 UTC, code aaa; "
                         "hf: 2026-01-02 12:00 UTC, code bbb).")
    assert "NOT side by side" in "\n".join(summary.model_targets(results))
