"""`reformer bench speed`: training-step time vs length, the attention layer alone, generation throughput.

- ``train_speed_vs_length``: seconds per training step (forward + backward, batch 1) and tokens/s
  of the 2-layer benchmark model (``peers.benchmark_config``): ours (local/LSH, reversible), ours
  with every layer "full" (SDPA) in reversible and checkpoint modes, transformers and
  reformer_pytorch. Median of a few steps after a warm-up (one cold step at 64K tokens and above,
  where a step takes minutes on a CPU).
- ``train_speed_alternating``: the same step of ours, transformers and reformer_pytorch timed in
  turn inside one process, round after round, so the ratios do not move with load that comes
  and goes between configurations (``peers.train_step_alternating_task``).
- ``attention_speed``: the attention layer alone, forward + backward vs length, measured by the
  attention benchmark (``torch_reformer.bench.attention``), one fresh process per configuration.
- ``generation_speed``: new tokens per second of greedy ``model.generate`` after a prompt of 1K
  and 4K tokens, with and without the incremental cache ("not available" while the model has no
  ``generate`` with ``use_cache``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect

from .harness import Experiment, Meter, NotAvailable, Point, Profile, Series, View
from .memory import MODEL_NOTE, lineup, model_config
from .peers import IMPL_NAMES, is_installed, precision

LOAD_VIEW = View("load_average", "1-minute load average when the configuration ended (2 cores: above about 2, "
                                "other work shared the CPU and slowed the step)")
SPEED_VIEWS = [
    View("seconds", "seconds per training step"),
    View("tokens_per_second", "tokens per second"),
    View("peak_mib", "peak memory (MiB)"),
    LOAD_VIEW,
]
SPEED_KEYS = (
    "ours-reversible", "ours-reversible-rebuild-all", "ours-full-reversible", "ours-full-checkpoint", "hf",
    "reformer_pytorch", "ours-lsh-reversible",
)
# reformer_pytorch cannot alternate local and LSH layers; this series is ours built the same way.
ALL_LSH_ROW = ("ours-lsh-reversible", "ours, all layers LSH (like reformer_pytorch), reversible", "ours",
               {"memory_mode": "reversible", "attention": "lsh"})


def _timing(length: int) -> dict:
    """Warm-up and timed steps at ``length``: fewer where one step takes minutes."""
    if length <= 4096:
        return dict(warmup=1, steps=3)
    if length <= 16384:
        return dict(warmup=1, steps=2)
    return dict(warmup=0, steps=1)


def train_speed(profile: Profile) -> Experiment:
    series = []
    rows = lineup(profile) + ([ALL_LSH_ROW] if "ours" in profile.impls else [])
    for key, label, impl, overrides in rows:
        if key not in SPEED_KEYS:
            continue
        overrides = dict(overrides)
        attention = overrides.pop("attention", "mixed")
        points = [
            Point(L, dict(task="train_step", impl=impl, length=L, batch=1, device=profile.device, dtype=profile.dtype,
                          config=model_config(profile, L, 2, attention, **overrides), **_timing(L)))
            for L in profile.speed_lengths
        ]
        series.append(Series(label=label, key=key, impl=impl, points=points, time_exponent=2.0 if "full" in key else 1.0))
    return Experiment(
        key="train_speed_vs_length", title="Training step time (forward + backward, batch 1) vs sequence length, 2 layers",
        x_name="sequence length", series=series, views=SPEED_VIEWS, notes=[MODEL_NOTE,
            "Median of 3 steps after 1 warm-up step up to 4K tokens, of 2 up to 16K, one cold step above."],
        plot_metric="seconds", timeout_s=profile.long_timeout_s,
    )


ALTERNATING_MODELS = (("ours", "ours-reversible"), ("hf", "hf"), ("reformer_pytorch", "reformer_pytorch"))
ALTERNATING_ROUNDS = 5


def train_speed_alternating(profile: Profile) -> Experiment:
    """One point per length: every implementation's step, timed in turn in one process."""
    models = [(impl, key) for impl, key in ALTERNATING_MODELS if impl in profile.impls and is_installed(impl)]
    names = {**IMPL_NAMES, "ours": "ours"}
    points = [
        Point(L, dict(task="train_step_alternating", length=L, batch=1, device=profile.device, dtype=profile.dtype,
                      rounds=ALTERNATING_ROUNDS,
                      models=[dict(key=key, impl=impl, config=model_config(profile, L, 2)) for impl, key in models]))
        for L in profile.alternating_lengths
    ]
    label = " / ".join(names[impl] for impl, _ in models) + ", one step each in turn"
    views = [View(f"seconds_{key}", f"{names[impl]}: seconds per training step (median of the rounds)")
             for impl, key in models]
    views += [View(f"ratio_{key}", f"ours / {names[impl]}: ratio of the medians") for impl, key in models[1:]]
    series = [Series(label=label, key="alternating", impl="ours", points=points)] if len(models) > 1 else []
    notes = [MODEL_NOTE, f"One warm-up step each, then {ALTERNATING_ROUNDS} rounds; each round times every model "
                         "once, starting with a different one."]
    return Experiment(
        key="train_speed_alternating", title="Training step time, 2 layers, implementations timed in turn in one process",
        x_name="sequence length", series=series, views=views + [LOAD_VIEW], notes=notes, plot_metric=None,
        timeout_s=profile.long_timeout_s,
    )


def generation_speed(profile: Profile) -> Experiment:
    new_tokens = profile.generation_new_tokens
    series = []
    for use_cache in (True, False):
        points = []
        for context in profile.generation_contexts:
            total = -(-(context + new_tokens) // 128) * 128  # positions the model must cover, in whole axial rows
            points.append(Point(context, dict(
                task="generate", impl="ours", length=context, new_tokens=new_tokens, use_cache=use_cache,
                config=model_config(profile, total), device=profile.device, dtype=profile.dtype,
            )))
        label = "ours, with cache" if use_cache else "ours, without cache"
        series.append(Series(label=label, key="cache" if use_cache else "no-cache", impl="ours", points=points))
    return Experiment(
        key="generation_speed", title=f"Greedy generation of {new_tokens} tokens after a prompt (batch 1)",
        x_name="prompt length", series=series, views=[View("new_tokens_per_second", "new tokens per second"), LOAD_VIEW],
        notes=[MODEL_NOTE.split(";")[0] + "; axial positions sized to prompt + new tokens.",
               "Time of one generate() call after a 1-token warm-up call."],
        plot_metric=None, timeout_s=profile.timeout_s,
    )


ATTENTION_KINDS = [
    ("lsh-1", "ours, LSH 1 hash", "ours"), ("lsh-2", "ours, LSH 2 hashes", "ours"),
    ("lsh-4", "ours, LSH 4 hashes", "ours"), ("lsh-8", "ours, LSH 8 hashes", "ours"),
    ("local", "ours, local", "ours"), ("full", "ours, full (SDPA)", "ours"),
    ("hf-2", "transformers, LSH 2 hashes", "hf"), ("hf-4", "transformers, LSH 4 hashes", "hf"),
    ("reformer_pytorch-2", "reformer_pytorch, LSH 2 hashes", "reformer_pytorch"),
    ("reformer_pytorch-4", "reformer_pytorch, LSH 4 hashes", "reformer_pytorch"),
]


def attention_speed(profile: Profile) -> Experiment:
    series = [
        Series(label=label, key=kind, impl=impl, time_exponent=2.0 if kind == "full" else 1.0, points=[
            Point(L, dict(task="attention", impl=impl, attention=kind, length=L, device=profile.device,
                          dtype=profile.dtype)) for L in profile.attention_lengths])
        for kind, label, impl in ATTENTION_KINDS if impl in profile.impls
    ]
    return Experiment(
        key="attention_speed", title="The attention layer alone vs length (batch 1, hidden 256 = 4 heads x 64, causal)",
        x_name="sequence length", series=series,
        views=[View("seconds", "seconds for forward + backward"), View("forward_seconds", "seconds for the forward pass"),
               View("activation_mib", "memory added by forward + backward (MiB)"), LOAD_VIEW],
        notes=["Layers and forward + backward measurement from the attention benchmark "
               "(torch_reformer.bench.attention: build_layer, measure): chunk 64, one chunk back, automatic bucket "
               "count, step = layer(x).sum().backward(), median after a warm-up (one cold step above 16K). The "
               "forward pass alone is timed here on the same layer under torch.no_grad()."],
        plot_metric="seconds", timeout_s=profile.long_timeout_s,
    )


def plan(profile: Profile) -> list[Experiment]:
    experiments = [train_speed(profile), train_speed_alternating(profile), attention_speed(profile),
                   generation_speed(profile)]
    return [e for e in experiments if profile.wants(e.key) and e.series and e.series[0].points]


# ------------------------------------------------------------------------------------ child-side tasks


def generation_task(spec: dict) -> dict:
    """Tokens per second of one greedy ``generate`` call (with or without the cache)."""
    import torch

    from torch_reformer.config import ReformerConfig
    from torch_reformer.model import ReformerLM

    generate = getattr(ReformerLM, "generate", None)
    if generate is None or importlib.util.find_spec("torch_reformer.generation") is None:
        raise NotAvailable("model.generate is not available in this version of torch_reformer")
    if "use_cache" not in inspect.signature(importlib.import_module("torch_reformer.generation").generate).parameters:
        raise NotAvailable("generate() has no use_cache option in this version of torch_reformer")
    torch.manual_seed(spec.get("seed", 0))
    device = spec.get("device", "cpu")
    model = ReformerLM(ReformerConfig(**spec["config"])).to(device).eval()
    prompt = torch.randint(0, spec["config"]["vocab_size"], (1, spec["length"]), device=device)
    meter = Meter(device)
    with torch.no_grad(), precision(spec):
        model.generate(prompt, max_new_tokens=1, use_cache=spec["use_cache"])
        baseline = meter.baseline()
        seconds = meter.seconds(lambda: model.generate(prompt, max_new_tokens=spec["new_tokens"],
                                                       use_cache=spec["use_cache"]))
    peak = meter.peak()
    return {"seconds": seconds, "new_tokens_per_second": spec["new_tokens"] / seconds, "baseline_bytes": baseline,
            "peak_bytes": peak, "activation_bytes": max(0, peak - baseline)}


def attention_task(spec: dict) -> dict:
    """One layer of the attention benchmark (``torch_reformer.bench.attention``): its forward + backward
    measurement, then the forward pass alone timed on the same layer."""
    import statistics

    import torch

    if importlib.util.find_spec("torch_reformer.bench.attention") is None:
        raise NotAvailable("the attention benchmark (torch_reformer.bench.attention) is not in this version")
    from torch_reformer.bench import attention as attention_bench

    kind = spec["attention"]
    impl, _, hashes = kind.rpartition("-") if kind[-1].isdigit() else (kind, "", "1")
    impl = "lsh" if impl in ("lsh", "ours") else impl
    config = dict(impl=impl, length=spec["length"], num_hashes=int(hashes), threads=spec.get("threads"))
    measured = attention_bench.measure(config)
    layer = attention_bench.build_layer(impl, spec["length"], int(hashes))
    inputs = torch.randn(1, spec["length"], attention_bench.HIDDEN)
    meter = Meter(spec.get("device", "cpu"))
    with torch.no_grad():
        warmup, steps = attention_bench.timing_plan(spec["length"])
        for _ in range(warmup):
            layer(inputs)
        forward = [meter.seconds(lambda: layer(inputs)) for _ in range(steps)]
    mib = 2**20
    return {
        "seconds": statistics.median(measured["seconds"]), "all_seconds": measured["seconds"],
        "forward_seconds": statistics.median(forward),
        "baseline_bytes": int(measured["baseline_mib"] * mib), "peak_bytes": int(measured["peak_mib"] * mib),
        "activation_bytes": int(measured["activation_mib"] * mib),
    }
