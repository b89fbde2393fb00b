"""Hugging Face ``transformers`` Reformer <-> torch_reformer: models and saved checkpoints.

Both libraries compute the same thing with the same parameter tensors (SPEC §7); only the
names differ, in the trunk alone:

    ours (trunk-relative)                             HF
    embeddings.*                                      embeddings.*
    layers.{i}.attention.self_attention.output.*      encoder.layers.{i}.attention.output.dense.*
    layers.{i}.feed_forward.dense.*                   encoder.layers.{i}.feed_forward.dense.dense.*
    layers.{i}.feed_forward.output.*                  encoder.layers.{i}.feed_forward.output.dense.*
    layers.{i}.*  (layer norms, query/key/value...)   encoder.layers.{i}.*
    layer_norm.*                                      encoder.layer_norm.*

Heads keep their names (``lm_head.decoder.weight``, ``lm_head.bias``, ``classifier.*``) and
both libraries put the trunk under ``reformer.`` in a head model. Every tensor on either side
is accounted for: a missing, unexpected or mis-shaped tensor raises ``CheckpointError``. The
only HF tensors set aside are the attention mask constants (``mask_value_float16`` and the
like) that older ``transformers`` versions saved as buffers, and ``lm_head.decoder.bias``,
which those versions saved as a second name of ``lm_head.bias``.

The LM-head bias. Recent ``transformers`` versions (5.x) keep ``lm_head.bias`` but never add it
to the logits; older ones did, and so do we (SPEC §8). The bias is copied as is both ways. HF
initialises it to zero, so converted fresh models agree exactly; when it is not zero, our logits
are HF's plus that bias, which is what the checkpoint was trained with.

Rotations of LSH layers agree only when the HF config fixes ``hash_seed`` (both draw the same
``torch.randn`` after seeding; we use a private generator). With ``num_buckets=None`` HF picks
the count once, from its first input and ``max_position_embeddings``, and writes it into its
config, while we pick it per call from the length: set ``num_buckets`` for exact parity.

Padding whose whole attention window is padding. HF masks scores with -1e9 and normalises by a
log-sum-exp that, over equal -1e9 scores, rounds away log(window) in float32: the weights of such
a query sum to the window size instead of 1. We average properly, so outputs at those padded
positions differ (every real position still matches); a loss that scores padded positions
(labels not -100 there) differs slightly too.

``transformers`` is optional and imported only inside ``from_hf`` and ``to_hf``;
``convert_checkpoint`` works on files alone and does not need it (``checkpoint_files`` reads
HF's weight files and creates the output folder).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch

from ..checkpoints import CHECKPOINT_DIR, MANIFEST, verify_checkpoint
from ..config import CONFIG_NAME, ReformerConfig
from ..model import (
    WEIGHTS_NAME,
    ReformerForMaskedLM,
    ReformerForSequenceClassification,
    ReformerLM,
    ReformerModel,
    ReformerPreTrainedModel,
)
from ..serialization import CheckpointError, atomic_write_files, load_safetensors, read_json_object, safetensors_chunks
from .checkpoint_files import load_hf_weights, output_folder

# Our class name -> HF class name; both libraries' names appear in config.json "architectures".
HF_CLASS_NAMES = {
    "ReformerModel": "ReformerModel",
    "ReformerLM": "ReformerModelWithLMHead",
    "ReformerForMaskedLM": "ReformerForMaskedLM",
    "ReformerForSequenceClassification": "ReformerForSequenceClassification",
}
OUR_CLASSES = {
    "ReformerModel": ReformerModel,
    "ReformerLM": ReformerLM,
    "ReformerForMaskedLM": ReformerForMaskedLM,
    "ReformerForSequenceClassification": ReformerForSequenceClassification,
}
OUR_CLASS_FOR_HF = {hf_name: OUR_CLASSES[ours] for ours, hf_name in HF_CLASS_NAMES.items()}

# Config fields HF does not have.
_OUR_ONLY_FIELDS = ("memory_mode", "kept_graph_layers", "position_embedding_type")

# Trunk-relative renames ours -> HF, tried in order; the first match wins.
_TRUNK_RENAMES = (
    (re.compile(r"^layers\.(\d+)\.attention\.self_attention\.output\."), r"encoder.layers.\1.attention.output.dense."),
    (re.compile(r"^layers\.(\d+)\.feed_forward\.(dense|output)\."), r"encoder.layers.\1.feed_forward.\2.dense."),
    (re.compile(r"^layers\.(\d+)\."), r"encoder.layers.\1."),
    (re.compile(r"^layer_norm\."), "encoder.layer_norm."),
)
_HEAD_PREFIXES = ("lm_head.", "classifier.")
_TRUNK_PREFIX = "reformer."
# Attention mask constants that older transformers versions stored as (persistent) buffers.
_HF_MASK_CONSTANT = re.compile(r"\.self_attention\.(self_)?mask_value_float(16|32)$")
# Older transformers versions tied lm_head.decoder.bias to lm_head.bias and saved both names.
_HF_LEGACY_BIAS, _LM_BIAS = "lm_head.decoder.bias", "lm_head.bias"

# Every tensor of a Reformer model is floating: the dtypes it may have (and safetensors files hold).
_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Conversion(NamedTuple):
    """What ``convert_checkpoint`` did: the source format ("hf" or "torch_reformer") and the class
    names read from the source and written to the destination."""

    source_format: str
    source_architecture: str
    target_architecture: str


# ---------------------------------------------------------------------------- names and configs


def hf_parameter_name(name: str) -> str:
    """HF's state-dict name for one of our state-dict names (trunk-only or head model)."""
    prefix = _TRUNK_PREFIX if name.startswith(_TRUNK_PREFIX) else ""
    if not prefix and name.startswith(_HEAD_PREFIXES):
        return name
    inner = name[len(prefix):]
    for pattern, replacement in _TRUNK_RENAMES:
        renamed, count = pattern.subn(replacement, inner)
        if count:
            return prefix + renamed
    return name


def hf_state_to_ours(
    hf_state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], source: str = "HF state dict"
) -> dict[str, torch.Tensor]:
    """Rename an HF state dict for a model of ours whose tensor shapes are ``expected`` (name -> shape).

    Raises ``CheckpointError`` unless every HF tensor maps to one of ours (mask constants and the
    legacy bias alias aside) and every one of ours is present with its shape and a floating dtype.
    """
    hf_state = _fold_legacy_bias(dict(hf_state), source)
    our_name_for = {hf_parameter_name(name): name for name in expected}
    ignored = {name for name in hf_state if _HF_MASK_CONSTANT.search(name)}
    _check_names(set(our_name_for), set(hf_state) - ignored, source, "HF")
    state = {our_name_for[hf_name]: tensor for hf_name, tensor in hf_state.items() if hf_name not in ignored}
    _check_shapes(state, expected, source)
    _check_dtypes(state, source)
    return state


def our_state_to_hf(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """Rename our state dict to HF's names after checking it against ``expected`` (name -> shape) and
    checking that every tensor is floating."""
    _check_names(set(expected), set(state), source, "torch_reformer")
    _check_shapes(state, expected, source)
    _check_dtypes(state, source)
    return {hf_parameter_name(name): tensor for name, tensor in state.items()}


def config_from_hf(hf_config) -> ReformerConfig:
    """Our config from a ``transformers.ReformerConfig`` (or its ``to_dict()``).

    ``num_labels`` comes from HF's ``id2label``, and the label names are kept (HF's default names
    "LABEL_0", ... as None); ``axial_pos_embds=False`` selects learned position embeddings; HF's
    bookkeeping keys are dropped.
    """
    values = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    return ReformerConfig.from_dict(dict(values))


def hf_config_dict(config: ReformerConfig, architecture: str | None = None) -> dict:
    """The fields of a ``transformers.ReformerConfig`` equivalent to ``config`` (JSON-ready).

    Raises ``ValueError`` for what HF cannot express: "full" attention layers and models
    without position embeddings.
    """
    if "full" in config.attn_layers:
        raise ValueError(
            f"attn_layers {list(config.attn_layers)} contains 'full', which transformers' Reformer does not "
            "support: only 'lsh' and 'local' layers can be converted"
        )
    if config.position_embedding_type == "none":
        raise ValueError(
            "transformers' Reformer always has position embeddings: a model with "
            "position_embedding_type='none' cannot be converted"
        )
    values = {name: value for name, value in config.to_dict().items() if name not in _OUR_ONLY_FIELDS}
    values["axial_pos_embds"] = config.position_embedding_type == "axial"
    for name in ("id2label", "label2id"):
        if values[name] is None:  # HF then derives its default names from num_labels
            del values[name]
    if architecture is not None:
        values["architectures"] = [architecture]
    return values


# ---------------------------------------------------------------------------- models


def from_hf(hf_model, cls: type[ReformerPreTrainedModel] | None = None) -> ReformerPreTrainedModel:
    """Our model with the weights of a ``transformers`` Reformer model.

    ``cls=None`` (or the base class) picks the head matching ``hf_model``'s class:
    ReformerModel -> ReformerModel, ReformerModelWithLMHead -> ReformerLM, ReformerForMaskedLM ->
    ReformerForMaskedLM, ReformerForSequenceClassification -> ReformerForSequenceClassification.
    ``cls=ReformerModel`` also takes the trunk out of any HF head model. The result has copies of
    ``hf_model``'s tensors (same dtypes and device) and its train/eval mode; the global RNG is
    left as it was.
    """
    _import_transformers()
    hf_class_name = type(hf_model).__name__
    if hf_class_name not in OUR_CLASS_FOR_HF or not isinstance(hf_model, torch.nn.Module):
        raise TypeError(
            f"expected a transformers Reformer model ({', '.join(OUR_CLASS_FOR_HF)}), got {hf_class_name}"
        )
    natural = OUR_CLASS_FOR_HF[hf_class_name]
    cls = natural if cls in (None, ReformerPreTrainedModel) else cls
    hf_state = hf_model.state_dict()
    if cls is ReformerModel and natural is not ReformerModel:
        hf_state = _strip_prefix(hf_state, _TRUNK_PREFIX)
    elif not (isinstance(cls, type) and issubclass(cls, natural)):
        raise TypeError(
            f"a transformers {hf_class_name} converts to {natural.__name__} (or ReformerModel for its trunk), "
            f"not to {getattr(cls, '__name__', cls)!r}"
        )
    config = config_from_hf(hf_model.config)
    state = hf_state_to_ours(hf_state, _shapes_of(cls, config), f"transformers {hf_class_name}")
    state = {name: tensor.detach().clone() for name, tensor in state.items()}  # share no storage with HF
    return _model_holding(cls, config, state).train(hf_model.training)


def to_hf(model: ReformerPreTrainedModel):
    """The ``transformers`` Reformer model equivalent to ``model``, with identical weights.

    Class: ReformerModel -> ReformerModel, ReformerLM -> ReformerModelWithLMHead, and the masked
    LM and classifier under their own names. Same dtype, device and train/eval mode as ``model``.
    """
    transformers = _import_transformers()
    our_name = _our_class_name(model)
    hf_class = getattr(transformers, HF_CLASS_NAMES[our_name])
    hf_config = transformers.ReformerConfig(**hf_config_dict(model.config, hf_class.__name__))
    with torch.random.fork_rng(devices=[]):
        hf_model = hf_class(hf_config)
    reference = next(model.parameters())
    hf_model.to(device=reference.device, dtype=reference.dtype)
    hf_model.load_state_dict(our_state_to_hf(model.state_dict(), _shapes(model)), strict=True)
    return hf_model.train(model.training)


# ---------------------------------------------------------------------------- checkpoints


def convert_checkpoint(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> Conversion:
    """Convert a directory saved by HF ``save_pretrained`` into ours, or ours into HF's.

    The direction comes from ``src_dir/config.json``: HF writes ``"model_type": "reformer"``, we
    write ``memory_mode``. The class comes from its ``architectures`` (for an HF file without it,
    from the tensor names). HF weights are read from ``model.safetensors`` (or its shards), else
    from ``pytorch_model.bin`` (loaded with ``weights_only=True``); ours are read and written as
    safetensors. A training checkpoint (``OUT/checkpoints/step-N``) is first checked against its
    ``manifest.json``. ``dst_dir`` must be new or empty; everything is read and checked before it
    is created, and if writing fails, what this call created is removed again. Raises
    ``CheckpointError`` for anything missing, corrupt or inconsistent.
    """
    src_dir, dst_dir = os.fspath(src_dir), os.fspath(dst_dir)
    if os.path.abspath(src_dir) == os.path.abspath(dst_dir):
        raise ValueError(f"source and destination are the same folder {src_dir!r}: pass another destination")
    if os.path.exists(dst_dir) and (not os.path.isdir(dst_dir) or os.listdir(dst_dir)):
        raise ValueError(f"destination {dst_dir!r} already exists and is not an empty folder; converting would "
                         "overwrite what it holds (a model, a run, a checkpoint): pass a new or empty folder")
    if os.path.isdir(os.path.join(src_dir, CHECKPOINT_DIR)) and not os.path.isfile(os.path.join(src_dir, WEIGHTS_NAME)):
        raise CheckpointError(f"{src_dir} is a training run folder: convert one of its checkpoints, e.g. "
                              f"{os.path.join(src_dir, CHECKPOINT_DIR, 'step-N')}")
    config_dict = _read_json(os.path.join(src_dir, CONFIG_NAME))
    if _is_hf_config(config_dict):
        return _convert_hf_to_ours(src_dir, dst_dir, config_dict)
    if os.path.isfile(os.path.join(src_dir, MANIFEST)):  # one of our training checkpoints: its files carry checksums
        verify_checkpoint(src_dir)
    return _convert_ours_to_hf(src_dir, dst_dir, config_dict)


def _convert_hf_to_ours(src_dir: str, dst_dir: str, config_dict: dict) -> Conversion:
    hf_state = load_hf_weights(src_dir)
    fits = HF_CLASS_NAMES[_class_the_weights_fit(hf_state, config_dict)]
    hf_class_name = _architecture(config_dict, OUR_CLASS_FOR_HF, src_dir, fits) or fits
    cls = OUR_CLASS_FOR_HF[hf_class_name]
    config = config_from_hf(config_dict)
    state = hf_state_to_ours(hf_state, _shapes_of(cls, config), f"HF checkpoint {src_dir}")
    model = _model_holding(cls, config, state)
    with output_folder(dst_dir):
        model.save_pretrained(dst_dir)
    return Conversion("hf", hf_class_name, cls.__name__)


def _convert_ours_to_hf(src_dir: str, dst_dir: str, config_dict: dict) -> Conversion:
    config = ReformerConfig.from_dict(config_dict)
    state = load_safetensors(os.path.join(src_dir, WEIGHTS_NAME))
    fits = _class_the_weights_fit(state, config_dict)
    our_name = _architecture(config_dict, OUR_CLASSES, src_dir, fits)
    if our_name is None:
        raise CheckpointError(
            f"{src_dir}/{CONFIG_NAME} names no architecture: expected one of {sorted(OUR_CLASSES)} in its "
            f"'architectures' field (its weights fit {fits}: set \"architectures\": [\"{fits}\"] and convert again)"
        )
    hf_class_name = HF_CLASS_NAMES[our_name]
    hf_config = {**hf_config_dict(config, hf_class_name), "model_type": "reformer"}
    hf_state = our_state_to_hf(state, _shapes_of(OUR_CLASSES[our_name], config), source=f"checkpoint {src_dir}")
    weights = safetensors_chunks(hf_state, metadata={"format": "pt"})
    text = json.dumps(hf_config, indent=2, sort_keys=True) + "\n"
    with output_folder(dst_dir):
        atomic_write_files({
            os.path.join(dst_dir, "model.safetensors"): weights,
            os.path.join(dst_dir, CONFIG_NAME): [text.encode("utf-8")],
        })
    return Conversion("torch_reformer", our_name, hf_class_name)


# ---------------------------------------------------------------------------- helpers


def _import_transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "Hugging Face interop needs the `transformers` package: pip install torch-reformer[hf]"
        ) from error
    return transformers


def _our_class_name(model) -> str:
    # Heads first: every head is also a ReformerPreTrainedModel, but none is a ReformerModel.
    for name, cls in OUR_CLASSES.items():
        if isinstance(model, cls):
            return name
    raise TypeError(f"expected a torch_reformer model ({', '.join(OUR_CLASSES)}), got {type(model).__name__}")


def _shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def _shapes_of(cls: type[ReformerPreTrainedModel], config: ReformerConfig) -> dict[str, torch.Size]:
    """The state-dict shapes of ``cls(config)``, from a weightless (meta) instance."""
    with torch.device("meta"):
        return _shapes(cls(config))


def _model_holding(
    cls: type[ReformerPreTrainedModel], config: ReformerConfig, state: Mapping[str, torch.Tensor]
) -> ReformerPreTrainedModel:
    """``cls(config)`` whose tensors are exactly ``state`` (their dtypes and device included).

    Built weightless and then given ``state``, so no time or global RNG draws go into an
    initialisation that would be overwritten.
    """
    with torch.device("meta"):
        model = cls(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:  # e.g. a tensor that cannot be a parameter; callers check dtypes first
        raise CheckpointError(f"the weights do not fit {cls.__name__}: {' '.join(str(error).split())}") from None
    if any(tensor.is_meta for tensor in (*model.parameters(), *model.buffers())):
        raise RuntimeError(f"{cls.__name__} holds a tensor outside its state dict, which conversion cannot fill")
    return model


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix``, with it removed (a head model's trunk)."""
    return {name[len(prefix):]: tensor for name, tensor in state.items() if name.startswith(prefix)}


def _fold_legacy_bias(hf_state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Merge the legacy ``lm_head.decoder.bias`` name into ``lm_head.bias`` (they must agree)."""
    if _HF_LEGACY_BIAS not in hf_state:
        return hf_state
    legacy = hf_state.pop(_HF_LEGACY_BIAS)
    current = hf_state.setdefault(_LM_BIAS, legacy)
    if current.shape != legacy.shape or not torch.equal(current, legacy):
        raise CheckpointError(
            f"{source} holds both {_LM_BIAS} and {_HF_LEGACY_BIAS} with different values: "
            "cannot tell which LM-head bias is meant"
        )
    return hf_state


def _check_names(expected: set[str], present: set[str], source: str, naming: str) -> None:
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit the model ({naming} names): missing {_first(missing)}, unexpected "
            f"{_first(unexpected)} (was it saved from another model class or config?)"
        )


def _check_shapes(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], source: str) -> None:
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name]):
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected[name])} (config and weights disagree)"
            )


def _check_dtypes(state: Mapping[str, torch.Tensor], source: str) -> None:
    for name, tensor in state.items():
        if tensor.dtype not in _WEIGHT_DTYPES:
            raise CheckpointError(
                f"{source}: tensor {name} has dtype {tensor.dtype}, but Reformer weights are float32, float16, "
                "bfloat16 or float64: the file is damaged or holds other weights (cast them to float32 and save again)"
            )


def _first(names: list[str], count: int = 5) -> str:
    return str(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "")


def _read_json(path: str) -> dict:
    return read_json_object(path, f"{path} does not exist: the folder is not a saved Reformer model")


def _is_hf_config(config_dict: dict) -> bool:
    model_type = config_dict.get("model_type")
    if model_type is not None and model_type != "reformer":
        raise CheckpointError(f"the checkpoint is a {model_type!r} model, not a Reformer: it cannot be converted")
    if model_type == "reformer":
        return True
    if "memory_mode" in config_dict:
        return False
    raise CheckpointError(
        "cannot tell who wrote this config.json: HF writes \"model_type\": \"reformer\", torch_reformer writes "
        "\"memory_mode\", and it has neither"
    )


def _architecture(config_dict: dict, known: Iterable[str], src_dir: str, fits: str) -> str | None:
    """The one known class named in ``architectures`` (None when the field is absent or empty).

    Any other name (a user's subclass, another head) is refused with a hint naming ``fits``, the
    class the weights fit: a subclass that adds no weights converts as that class.
    """
    names = config_dict.get("architectures") or []
    if isinstance(names, str):
        names = [names]
    matches = [name for name in names if name in known]
    if names and not matches:
        raise CheckpointError(
            f"{src_dir}/{CONFIG_NAME} names architectures {names}, none of which can be converted: expected one of "
            f"{sorted(known)}. Its weights fit {fits}: if {names[0]} is a subclass of {fits} that adds no weights, "
            f"set \"architectures\": [\"{fits}\"] in {CONFIG_NAME} and convert again"
        )
    return matches[0] if matches else None


def _class_the_weights_fit(state: Mapping[str, torch.Tensor], config_dict: dict) -> str:
    """Our class implied by the tensor names (HF's and ours agree on the heads' names) and, for an LM
    head, ``is_decoder``: used when ``architectures`` is missing (HF) and in hints."""
    if any(name.startswith("classifier.") for name in state):
        return "ReformerForSequenceClassification"
    if any(name.startswith("lm_head.") for name in state):
        return "ReformerLM" if config_dict.get("is_decoder") else "ReformerForMaskedLM"
    return "ReformerModel"
