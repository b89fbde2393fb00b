"""The models under test, built the same way for every implementation, and the two workloads run on them.

A spec names an implementation (``impl``) and a model (``config``: our ``ReformerConfig`` fields as
a dict). The same config is mapped onto each implementation:

- ``"ours"``: ``torch_reformer.model.ReformerLM(ReformerConfig(**config))``; the loss is computed
  with ``return_logits=False`` (chunk-wise LM head + cross-entropy: the (L, V) logits never exist).
- ``"hf"``: ``transformers.ReformerModelWithLMHead`` with a ``transformers.ReformerConfig`` of the
  same field values (the names are Hugging Face's to begin with). HF has no ``"full"`` layer type;
  "global" attention is expressed as local attention whose chunk is the whole sequence, as in the HF
  blog. HF computes the whole (L, V) logits before its loss.
- ``"reformer_pytorch"``: ``reformer_pytorch.ReformerLM``, the closest equivalent it offers:
  ``dim = hidden_size``, ``depth = len(attn_layers)``, ``heads = num_attention_heads``,
  ``dim_head = attention_head_size``, ``bucket_size = lsh_attn_chunk_length`` (its bucket is our
  chunk; it picks ``L / bucket_size`` buckets itself), ``n_hashes = num_hashes``, ``causal =
  is_decoder``, ``ff_mult = feed_forward_size / hidden_size``, ``ff_chunks = L /
  chunk_size_feed_forward``, ``ff_activation`` = the config's, no dropout, axial positions of the same
  shape (it splits their width itself). It cannot alternate local and LSH layers (its local heads
  mix inside a layer), so every layer is LSH; an all-"full" config maps to ``use_full_attn=True``.
  It is always reversible and returns logits; the loss is a plain cross-entropy over them.

Workloads (``train_step_task``, ``inference_task``), run in a fresh child process by the harness:
one training step is forward + backward of the causal LM loss on a random batch (no optimizer), one
inference pass is an eval-mode forward without autograd that returns logits.

``benchmark_config`` is the benchmark model: vocab 256, hidden 256, 4 heads x 64, feed-forward
1024, ``attn_layers`` alternating local/LSH, 2 hashes, chunks of 64, dropout 0, axial positions
(L / 128, 128) x (64, 192) sized to each length (HF trains only at exactly that product), the
feed-forward and LM head computed in chunks of 4096 positions (of gcd(L, 4096) for other lengths,
since HF needs the chunk to divide the length).
"""

from __future__ import annotations

import importlib.util
import math
from contextlib import nullcontext

from .harness import Meter, NotAvailable, PeerNotInstalled, timed_steps

# The package behind each implementation and the extra that installs it.
PEER_PACKAGES = {"hf": "transformers", "reformer_pytorch": "reformer_pytorch"}
PEER_EXTRAS = {"hf": "peers", "reformer_pytorch": "peers"}
IMPL_NAMES = {"ours": "torch-reformer", "hf": "transformers", "reformer_pytorch": "reformer_pytorch"}
# Positions per chunk of the feed-forward and of the LM head in the benchmark model.
FEED_FORWARD_CHUNK = 4096
LM_HEAD_CHUNK = 4096
AXIAL_ROW = 128  # axial_pos_shape = (L / AXIAL_ROW, AXIAL_ROW)


def is_installed(impl: str) -> bool:
    """Whether the package behind ``impl`` can be imported (checked without importing it)."""
    package = PEER_PACKAGES.get(impl)
    if package is None:
        return True
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def attention_pattern(kind: str, layers: int) -> list[str]:
    """``attn_layers`` for ``kind``: "mixed" alternates local/LSH (local first), else one type throughout."""
    if kind == "mixed":
        return ["local" if index % 2 == 0 else "lsh" for index in range(layers)]
    return [kind] * layers


def axial_shape(length: int) -> list[int]:
    """(L / 128, 128), or (1, L) for lengths below 128 or not divisible by it."""
    if length >= AXIAL_ROW and length % AXIAL_ROW == 0:
        return [length // AXIAL_ROW, AXIAL_ROW]
    return [1, length]


def benchmark_config(length: int, layers: int = 2, attention: str = "mixed", **overrides) -> dict:
    """The benchmark model for sequences of ``length`` as ReformerConfig fields."""
    config = dict(
        vocab_size=256, hidden_size=256, num_attention_heads=4, attention_head_size=64, feed_forward_size=1024,
        attn_layers=attention_pattern(attention, layers), num_hashes=2, lsh_attn_chunk_length=64,
        local_attn_chunk_length=64, hidden_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0, is_decoder=True, axial_pos_shape=axial_shape(length),
        axial_pos_embds_dim=[64, 192], max_position_embeddings=length,
        # HF wants the chunk to divide the length: the largest divisor of L up to the chunk size.
        chunk_size_feed_forward=math.gcd(length, FEED_FORWARD_CHUNK), chunk_size_lm_head=math.gcd(length, LM_HEAD_CHUNK),
        eos_token_id=None, pad_token_id=0, memory_mode="reversible",
    )
    config.update(overrides)
    return config


# ------------------------------------------------------------------------------ building each model


def _require(impl: str):
    package = PEER_PACKAGES[impl]
    try:
        return __import__(package)
    except ImportError as error:
        raise PeerNotInstalled(
            f"{package} is not installed (pip install torch-reformer[{PEER_EXTRAS[impl]}]): {error}"
        ) from None


def hf_config_kwargs(config: dict) -> dict:
    """HF ``ReformerConfig`` keyword arguments for our config fields (same names; ours-only fields dropped)."""
    if "full" in config["attn_layers"]:
        raise NotAvailable('transformers has no "full" attention layer (use local attention with chunk = length)')
    ours_only = {"memory_mode", "kept_graph_layers", "position_embedding_type"}
    kwargs = {key: value for key, value in config.items() if key not in ours_only}
    if "position_embedding_type" in config:
        if config["position_embedding_type"] == "none":
            raise NotAvailable("transformers' Reformer always has a position embedding")
        kwargs["axial_pos_embds"] = config["position_embedding_type"] == "axial"
    return kwargs


def reformer_pytorch_kwargs(config: dict, length: int) -> dict:
    """``reformer_pytorch.ReformerLM`` keyword arguments closest to our config (see the module docstring)."""
    from torch import nn

    hidden, ff = config["hidden_size"], config["feed_forward_size"]
    if ff % hidden:
        raise NotAvailable(f"reformer_pytorch needs feed_forward_size ({ff}) to be a multiple of hidden_size ({hidden})")
    activations = {"relu": nn.ReLU, "gelu": nn.GELU}
    if config.get("hidden_act", "relu") not in activations:
        raise NotAvailable(f"reformer_pytorch mapping knows only {sorted(activations)} activations")
    chunk_ff = config.get("chunk_size_feed_forward", 0)
    positions = config.get("position_embedding_type", "axial")
    return dict(
        num_tokens=config["vocab_size"], dim=hidden, depth=len(config["attn_layers"]), max_seq_len=length,
        heads=config["num_attention_heads"], dim_head=config["attention_head_size"],
        bucket_size=config["lsh_attn_chunk_length"], n_hashes=config["num_hashes"], causal=config["is_decoder"],
        ff_chunks=max(1, math.ceil(length / chunk_ff)) if chunk_ff else 1, ff_mult=ff // hidden,
        ff_activation=activations[config.get("hidden_act", "relu")],
        lsh_dropout=0.0, ff_dropout=0.0, post_attn_dropout=0.0, layer_dropout=0.0,
        use_full_attn=set(config["attn_layers"]) == {"full"},
        axial_position_emb=positions == "axial", axial_position_shape=tuple(config["axial_pos_shape"]),
        absolute_position_emb=positions == "learned",
    )


class Workload:
    """A built model with its causal-LM loss and its inference call on (B, L) token ids."""

    def __init__(self, model, loss_fn, infer_fn):
        self.model, self.loss, self.infer = model, loss_fn, infer_fn


def _ours(config: dict, length: int) -> Workload:
    from torch_reformer.config import ReformerConfig
    from torch_reformer.model import ReformerLM

    model = ReformerLM(ReformerConfig(**config))
    return Workload(
        model,
        lambda ids: model(ids, labels=ids, return_logits=False).loss,
        lambda ids: model(ids).logits,
    )


def _hf(config: dict, length: int) -> Workload:
    transformers = _require("hf")
    transformers.logging.set_verbosity_error()
    model = transformers.ReformerModelWithLMHead(transformers.ReformerConfig(**hf_config_kwargs(config)))
    return Workload(
        model,
        lambda ids: model(input_ids=ids, labels=ids).loss,
        lambda ids: model(input_ids=ids).logits,
    )


def _reformer_pytorch(config: dict, length: int) -> Workload:
    import torch.nn.functional as F

    reformer_pytorch = _require("reformer_pytorch")
    model = reformer_pytorch.ReformerLM(**reformer_pytorch_kwargs(config, length))

    def loss(ids):
        logits = model(ids)  # (B, L, V)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    return Workload(model, loss, model)


BUILDERS = {"ours": _ours, "hf": _hf, "reformer_pytorch": _reformer_pytorch}


def build(spec: dict) -> tuple[Workload, object]:
    """The spec's model on its device, seeded, and a random (batch, length) batch of token ids."""
    import torch

    torch.manual_seed(spec.get("seed", 0))
    length, batch = spec["length"], spec.get("batch", 1)
    workload = BUILDERS[spec["impl"]](spec["config"], length)
    workload.model.to(spec.get("device", "cpu"))
    ids = torch.randint(0, spec["config"]["vocab_size"], (batch, length), device=spec.get("device", "cpu"))
    return workload, ids


def precision(spec: dict):
    """Autocast context for ``spec["dtype"]`` (float32: none)."""
    import torch

    dtype = spec.get("dtype", "float32")
    if dtype == "float32":
        return nullcontext()
    device_type = "cuda" if spec.get("device", "cpu").startswith("cuda") else "cpu"
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def _sizes(workload: Workload) -> dict:
    params = list(workload.model.parameters())
    return {
        "parameters": sum(p.numel() for p in params),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
    }


def train_step_task(spec: dict) -> dict:
    """Forward + backward of the LM loss; median step time and peak memory over the spec's steps."""
    workload, ids = build(spec)
    workload.model.train()
    step = _training_step(workload, ids, spec)
    measured = timed_steps(Meter(spec.get("device", "cpu")), step, spec.get("warmup", 0), spec.get("steps", 1))
    tokens = ids.numel()
    return {**measured, **_sizes(workload), "tokens": tokens, "tokens_per_second": tokens / measured["seconds"]}


def train_step_alternating_task(spec: dict) -> dict:
    """One training step of each of several models in turn, ``rounds`` times, all in this process.

    Configurations timed one after another in their own processes each see whatever else the
    machine runs at that moment, so their ratio moves from run to run. Here each round times every
    model back to back (starting with a different one each round), so load that comes and goes
    falls on all of them alike. ``spec["models"]`` lists ``{"key", "impl", "config"}``; returns
    per model the median seconds (``seconds_<key>``) and, for every model after the first, the
    first model's median over its median (``ratio_<key>``, e.g. ours / transformers). Peak memory
    is not reported: the models share the process.
    """
    import statistics

    meter = Meter(spec.get("device", "cpu"))
    steps = {}
    for model in spec["models"]:
        workload, ids = build({**spec, "impl": model["impl"], "config": model["config"]})
        workload.model.train()
        steps[model["key"]] = _training_step(workload, ids, spec)
    keys = list(steps)
    for key in keys:  # warm-up
        steps[key]()
    samples = {key: [] for key in keys}
    for round_index in range(spec["rounds"]):
        for key in keys[round_index % len(keys):] + keys[: round_index % len(keys)]:
            samples[key].append(meter.seconds(steps[key]))
    medians = {key: statistics.median(times) for key, times in samples.items()}
    result = {f"seconds_{key}": medians[key] for key in keys}
    result.update({f"ratio_{key}": medians[keys[0]] / medians[key] for key in keys[1:]})
    result["all_seconds"] = {key: [round(t, 6) for t in times] for key, times in samples.items()}
    return result


def _training_step(workload: Workload, ids, spec: dict):
    def step():
        workload.model.zero_grad(set_to_none=True)
        with precision(spec):
            loss = workload.loss(ids)
        loss.backward()

    return step


def inference_task(spec: dict) -> dict:
    """Eval-mode forward without autograd, returning logits; median time and peak memory."""
    import torch

    workload, ids = build(spec)
    workload.model.eval()

    def step():
        with torch.no_grad(), precision(spec):
            workload.infer(ids)

    measured = timed_steps(Meter(spec.get("device", "cpu")), step, spec.get("warmup", 0), spec.get("steps", 1))
    tokens = ids.numel()
    return {**measured, **_sizes(workload), "tokens": tokens, "tokens_per_second": tokens / measured["seconds"]}
