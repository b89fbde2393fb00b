"""`reformer bench memory`: peak memory of training and inference vs length and depth, side by side.

Every configuration runs in a fresh process (see ``harness``); on CPU the peak is the process's
maximum resident set, on CUDA ``torch.cuda.max_memory_allocated``. On CPU the children run with a
fixed glibc ``MALLOC_MMAP_THRESHOLD_`` (128 KiB, ``--mmap-threshold``), as the attention and
engine benchmarks do: with glibc's dynamic threshold, freed blocks of up to 32 MiB stay in the heap
and fragment it, so the resident peak also counts memory that is free (measured here: our 2-layer
model at 16K tokens peaks at 1,045 MiB with the default and 838 MiB with the fixed threshold, the
12-layer one at 1,392 and 897 MiB). With the fixed threshold every large block is returned when
freed and the resident peak follows the live peak, for every implementation alike. The
experiments:

- ``train_memory_vs_length``: one training step (forward + backward, batch 1) of the 2-layer
  benchmark model (``peers.benchmark_config``) vs length, ours in each memory mode, ours with every
  layer "full" (SDPA) in reversible and checkpoint modes, transformers and reformer_pytorch.
- ``train_memory_vs_depth``: the same at one length for 2 / 6 / 12 / 24 layers.
- ``longest_trainable``: the 6-layer model at growing powers of two until it no longer fits.
- the Hugging Face blog's experiments, on our benchmark model unless said otherwise:
  ``inference_global_vs_lsh`` (every layer full attention vs local + LSH, inference),
  ``feed_forward_chunking`` (a wide feed-forward, 2 heads, chunked vs unchunked, inference and
  training), ``axial_vs_learned`` (the crime-and-punishment shape, 524,288 positions, axial vs
  learned position embeddings, inference) and ``layers_in_training`` (the enwik8 shape with one
  hash, 4 / 8 / 12 layers, batch 8 x 512, training; "autograd" mode stores every activation like
  the blog's BERT).
"""

from __future__ import annotations

from .harness import Experiment, Point, Profile, Series, View
from .peers import IMPL_NAMES, axial_shape, benchmark_config

MEMORY_VIEWS = [
    View("peak_mib", "peak memory (MiB)"),
    View("activation_mib", "peak minus the baseline after imports and model creation (MiB)"),
    View("peak_kib_per_token", "peak memory per token (KiB)"),
]
MODEL_NOTE = (
    "Model: vocab 256, hidden 256, 4 heads x 64, feed-forward 1024, attn_layers alternating local/LSH, 2 hashes, "
    "chunk 64, dropout 0, axial positions (L/128, 128) x (64, 192); feed-forward and LM head in chunks of 4096 "
    "positions (chunk_size_feed_forward = chunk_size_lm_head = 4096); ours computes the loss with "
    "return_logits=False (the L x V logits never exist), transformers builds the full logits. reformer_pytorch: "
    "every layer LSH (it cannot alternate local and LSH layers), bucket_size 64, ff_chunks L/4096."
)


def spec(profile: Profile, task: str, impl: str, length: int, config: dict, batch: int = 1, **extra) -> dict:
    """One configuration: ``task`` on ``impl`` built from ``config`` at ``length`` (one cold step)."""
    return dict(task=task, impl=impl, config=config, length=length, batch=batch, warmup=0, steps=1,
                device=profile.device, dtype=profile.dtype, **extra)


def model_config(profile: Profile, length: int, layers: int = 2, attention: str = "mixed", **overrides) -> dict:
    """The benchmark model with the profile's overrides, then ``overrides``."""
    return benchmark_config(length, layers, attention, **{**profile.model, **overrides})


def lineup(profile: Profile) -> list[tuple[str, str, str, dict]]:
    """(key, label, impl, config overrides) of the models compared in training: ours in each memory
    mode, ours with full attention, and the peers."""
    rows = [
        ("ours-reversible", "ours, reversible", "ours", {"memory_mode": "reversible"}),
        ("ours-reversible-rebuild-all", "ours, reversible, every layer rebuilt (kept_graph_layers=0)", "ours",
         {"memory_mode": "reversible", "kept_graph_layers": 0}),
        ("ours-checkpoint", "ours, checkpoint", "ours", {"memory_mode": "checkpoint"}),
        ("ours-autograd", "ours, autograd", "ours", {"memory_mode": "autograd"}),
        ("ours-full-reversible", "ours, all layers full (SDPA), reversible", "ours",
         {"memory_mode": "reversible", "attention": "full"}),
        ("ours-full-checkpoint", "ours, all layers full (SDPA), checkpoint", "ours",
         {"memory_mode": "checkpoint", "attention": "full"}),
        ("hf", IMPL_NAMES["hf"], "hf", {}),
        ("reformer_pytorch", IMPL_NAMES["reformer_pytorch"], "reformer_pytorch", {}),
    ]
    return [row for row in rows if row[2] in profile.impls]


def _series(profile: Profile, key: str, label: str, impl: str, xs: list[int], make_spec, exponent: float = 1.0) -> Series:
    return Series(label=label, key=key, impl=impl, points=[Point(x, make_spec(x)) for x in xs], time_exponent=exponent)


def _train_config(profile: Profile, length: int, layers: int, overrides: dict) -> dict:
    overrides = dict(overrides)
    attention = overrides.pop("attention", "mixed")
    return model_config(profile, length, layers, attention, **overrides)


def train_vs_length(profile: Profile) -> Experiment:
    series = [
        _series(profile, key, label, impl, profile.lengths,
                lambda L, impl=impl, o=overrides: spec(profile, "train_step", impl, L, _train_config(profile, L, 2, o)),
                exponent=2.0 if "full" in key else 1.0)
        for key, label, impl, overrides in lineup(profile)
    ]
    return Experiment(
        key="train_memory_vs_length", title="Training step (forward + backward, batch 1) vs sequence length, 2 layers",
        x_name="sequence length", series=series, views=MEMORY_VIEWS, notes=[MODEL_NOTE],
        plot_metric="peak_mib", timeout_s=profile.long_timeout_s,
    )


def train_vs_depth(profile: Profile) -> Experiment:
    length = profile.depth_length
    series = [
        _series(profile, key, label, impl, profile.depths,
                lambda n, impl=impl, o=overrides: spec(profile, "train_step", impl, length,
                                                       _train_config(profile, length, n, o)))
        for key, label, impl, overrides in lineup(profile) if "full" not in key
    ]
    return Experiment(
        key="train_memory_vs_depth", title=f"Training step (batch 1) vs depth at {length:,} tokens",
        x_name="layers", series=series,
        views=[*MEMORY_VIEWS[:2], View("activation_less_gradients_mib", "peak minus the baseline and the parameters' "
                                       "gradients (MiB): what activations and temporaries add")],
        notes=[MODEL_NOTE],
        plot_metric="peak_mib", log_x=False, log_y=False, timeout_s=profile.timeout_s,
    )


def inference_vs_depth(profile: Profile) -> Experiment:
    length = profile.depth_length
    rows = [("ours", "ours", "ours"), ("hf", IMPL_NAMES["hf"], "hf"),
            ("reformer_pytorch", IMPL_NAMES["reformer_pytorch"], "reformer_pytorch")]
    series = [
        _series(profile, key, label, impl, profile.depths,
                lambda n, impl=impl: spec(profile, "inference", impl, length, _train_config(profile, length, n, {})))
        for key, label, impl in rows if impl in profile.impls
    ]
    return Experiment(
        key="inference_memory_vs_depth", title=f"Inference (no autograd, batch 1) vs depth at {length:,} tokens",
        x_name="layers", series=series, views=MEMORY_VIEWS[:2],
        notes=[MODEL_NOTE, "The model of the training-depth table, in eval mode under torch.no_grad (logits "
               "returned)."],
        plot_metric="peak_mib", log_x=False, log_y=False, timeout_s=profile.timeout_s,
    )


def longest_trainable(profile: Profile) -> Experiment:
    layers = profile.longest_layers
    rows = [row for row in lineup(profile) if row[0] in ("ours-reversible", "hf", "reformer_pytorch")]
    series = [
        _series(profile, key, label, impl, profile.longest_lengths,
                lambda L, impl=impl, o=overrides: spec(profile, "train_step", impl, L, _train_config(profile, L, layers, o)))
        for key, label, impl, overrides in rows
    ]
    return Experiment(
        key="longest_trainable", title=f"Longest trainable power-of-two length, {layers} layers (one training step)",
        x_name="sequence length", series=series, views=[MEMORY_VIEWS[0], View("seconds", "seconds for the step")],
        notes=[MODEL_NOTE, "Each series grows until the first configuration that passes the memory cap (OOM) or "
               "the time limit; the longest trainable length is the last one that ran."],
        plot_metric=None, timeout_s=profile.long_timeout_s,
    )


def inference_global_vs_lsh(profile: Profile) -> Experiment:
    lengths = profile.inference_lengths

    def global_hf(L: int) -> dict:
        # HF has no full layer: the blog's "global" model is local attention over one chunk of length L.
        return model_config(profile, L, 2, "local", local_attn_chunk_length=L, local_num_chunks_before=0)

    rows = [
        ("ours", "ours, local + LSH", "ours", lambda L: model_config(profile, L)),
        ("ours-full", "ours, all layers full (SDPA)", "ours", lambda L: model_config(profile, L, attention="full")),
        ("hf", "transformers, local + LSH", "hf", lambda L: model_config(profile, L)),
        ("hf-global", "transformers, global (local with chunk = length)", "hf", global_hf),
    ]
    series = [
        _series(profile, key, label, impl, lengths, lambda L, impl=impl, make=make: spec(profile, "inference", impl, L, make(L)),
                exponent=2.0 if key in ("ours-full", "hf-global") else 1.0)
        for key, label, impl, make in rows if impl in profile.impls
    ]
    return Experiment(
        key="inference_global_vs_lsh", title="Inference (no autograd) vs sequence length: global vs local + LSH, 2 layers",
        x_name="sequence length", series=series, views=MEMORY_VIEWS[:2],
        notes=[MODEL_NOTE, "HF blog section 1: global attention grows quadratically in memory unless an O(L) kernel "
               "(SDPA) computes it; local + LSH grows linearly."],
        plot_metric="peak_mib", timeout_s=profile.long_timeout_s,
    )


def feed_forward_chunking(profile: Profile, task: str) -> Experiment:
    lengths = profile.blog_lengths
    hidden = profile.model.get("hidden_size", 256)
    wide = dict(num_attention_heads=2, feed_forward_size=16 * hidden)
    rows = [
        ("ours-unchunked", "ours, unchunked", "ours", dict(wide, chunk_size_feed_forward=0)),
        ("ours-chunked", "ours, chunked (1024 positions)", "ours", dict(wide, chunk_size_feed_forward=1024)),
        ("hf-unchunked", "transformers, unchunked", "hf", dict(wide, chunk_size_feed_forward=0)),
        ("hf-chunked", "transformers, chunked (1024 positions)", "hf", dict(wide, chunk_size_feed_forward=1024)),
    ]
    series = [
        _series(profile, key, label, impl, lengths,
                lambda L, impl=impl, o=overrides: spec(profile, task, impl, L, model_config(profile, L, **o)))
        for key, label, impl, overrides in rows if impl in profile.impls
    ]
    kind = "inference" if task == "inference" else "training step"
    return Experiment(
        key=f"feed_forward_chunking_{'inference' if task == 'inference' else 'training'}",
        title=f"Chunked vs unchunked feed-forward ({kind}), 2 heads x 64, feed-forward {16 * hidden}",
        x_name="sequence length", series=series, views=MEMORY_VIEWS[:2],
        notes=["HF blog section 2 on our benchmark model with the blog's change: fewer heads (2) and a 16x wider "
               "feed-forward (4096), so the feed-forward dominates memory; chunks of 1024 positions."],
        plot_metric="peak_mib", timeout_s=profile.timeout_s,
    )


def axial_vs_learned(profile: Profile) -> Experiment:
    from torch_reformer.config import PRESETS

    base = dict(PRESETS["crime-and-punishment"], num_hashes=1, hidden_dropout_prob=0.0,
                local_attention_probs_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0, eos_token_id=None)
    base = {key: list(value) if isinstance(value, tuple) else value for key, value in base.items()}
    rows = [
        ("ours-axial", "ours, axial (512, 1024) x (64, 192)", "ours", dict(base)),
        ("ours-learned", "ours, learned 524,288 x 256", "ours", dict(base, position_embedding_type="learned")),
        ("hf-axial", "transformers, axial", "hf", dict(base)),
        ("hf-learned", "transformers, learned", "hf", dict(base, position_embedding_type="learned")),
    ]
    series = [
        _series(profile, key, label, impl, profile.blog_lengths,
                lambda L, impl=impl, c=config: spec(profile, "inference", impl, L, c))
        for key, label, impl, config in rows if impl in profile.impls
    ]
    return Experiment(
        key="axial_vs_learned", title="Axial vs learned position embeddings (inference), crime-and-punishment shape",
        x_name="sequence length", series=series, views=MEMORY_VIEWS[:2],
        notes=["HF blog section 4: google/reformer-crime-and-punishment's shape (6 layers local/LSH, d 256, 2 x 64 "
               "heads, ff 512, 524,288 positions), 1 hash, dropout 0, random weights. A learned table of 524,288 "
               "positions holds 134M parameters; the axial one 98K."],
        plot_metric=None, timeout_s=profile.timeout_s,
    )


def layers_in_training(profile: Profile) -> Experiment:
    from torch_reformer.config import PRESETS

    batch, length = profile.blog_layer_shape
    enwik8 = {key: list(value) if isinstance(value, tuple) else value for key, value in PRESETS["enwik8"].items()}
    # HF trains only at exactly the product of the axial shape: (L / 128, 128) as everywhere here.
    enwik8.update(num_hashes=1, hidden_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
                  lsh_attention_probs_dropout_prob=0.0, axial_pos_shape=axial_shape(length), **profile.model)

    def config(layers: int, mode: str) -> dict:
        pattern = (enwik8["attn_layers"] * layers)[:layers]
        return dict(enwik8, attn_layers=pattern, memory_mode=mode)

    rows = [
        ("ours-reversible", "ours, reversible", "ours", "reversible"),
        ("ours-autograd", "ours, autograd (stores activations, like BERT)", "ours", "autograd"),
        ("hf", "transformers", "hf", "reversible"),
    ]
    series = [
        _series(profile, key, label, impl, profile.blog_layers,
                lambda n, impl=impl, mode=mode: spec(profile, "train_step", impl, length, config(n, mode), batch=batch))
        for key, label, impl, mode in rows if impl in profile.impls
    ]
    return Experiment(
        key="layers_in_training", title=f"Training memory vs layers, enwik8 shape, batch {batch} x {length}",
        x_name="layers", series=series, views=MEMORY_VIEWS[:2],
        notes=[f"HF blog section 3: the enwik8 configuration (d 1024, 8 x 128 heads, ff 4096, local/local/lsh/local "
               f"pattern, 1 hash, dropout 0, axial positions {tuple(axial_shape(length))}) at batch {batch} x {length}."],
        plot_metric="peak_mib", log_x=False, log_y=False, timeout_s=profile.timeout_s,
    )


def plan(profile: Profile) -> list[Experiment]:
    """The memory suite's experiments for ``profile`` (only those it wants)."""
    builders = [
        train_vs_length, train_vs_depth, inference_vs_depth, longest_trainable, inference_global_vs_lsh,
        lambda p: feed_forward_chunking(p, "inference"), lambda p: feed_forward_chunking(p, "train_step"),
        axial_vs_learned, layers_in_training,
    ]
    experiments = [build(profile) for build in builders]
    return [e for e in experiments if profile.wants(e.key) and e.series and e.series[0].points]
