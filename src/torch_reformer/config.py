"""ReformerConfig: every hyper-parameter of a Reformer model, checked when it is built.

Field names and defaults follow Hugging Face's ``ReformerConfig`` (including the generic
``chunk_size_feed_forward``, ``num_labels``, ``id2label``/``label2id`` and ``problem_type`` it
inherits) so a ``config.json`` written by ``transformers`` loads here unchanged and users keep
the names they know. Three fields are our own: ``memory_mode`` (how the layer stack trades memory for
compute), ``kept_graph_layers`` (how many top layers keep their autograd graph instead of
being rebuilt in backward) and ``position_embedding_type`` ("axial", "learned" or "none"; HF
only has the ``axial_pos_embds`` bool, and the two are kept consistent).

Which of ``position_embedding_type`` and ``axial_pos_embds`` wins when they disagree. On a
config already validated (a field set by hand before ``validate()``, or
``dataclasses.replace``), the one changed since that validation wins: True selects "axial" and
False "learned". In a fresh construction (``ReformerConfig(...)``, ``from_dict``) a
``position_embedding_type`` that is given wins; left at None (the default) it follows
``axial_pos_embds``, as HF's files do. ``from_dict``/``from_pretrained`` overrides win over the
saved value of the other field. Afterwards ``axial_pos_embds`` is True exactly for "axial".

Sequence-valued fields (``attn_layers``, ``axial_pos_shape``, ``axial_pos_embds_dim``,
factorised ``num_buckets``, a list ``eos_token_id``) are stored as tuples, whatever was
passed, so configs compare equal after a JSON round trip (JSON writes them as lists).

Validation runs at construction (``__post_init__`` calls ``validate()``): a wrong type
raises ``TypeError``, a wrong value ``ValueError``, and each message says how to fix it.
Call ``validate()`` again after mutating a field by hand. An ``eos_token_id`` may lie outside
the vocabulary (HF's default 2 beside a smaller one): only generation uses it, and refuses it there.

Length limits. With axial embeddings the longest sequence is the product of
``axial_pos_shape`` (the table's capacity), as in HF; ``max_position_embeddings`` then only
documents the intended length and is not checked against that product, because released HF
configs are consistent by convention only and must load as they are. With learned
embeddings the limit is ``max_position_embeddings``; with none there is no limit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import InitVar, dataclass
from typing import Any

from .config_values import int_or_int_tuple, label_map, plain_numbers, require_float, require_int, require_sequence

CONFIG_NAME = "config.json"  # the config file inside a saved model folder

ATTENTION_TYPES = ("lsh", "local", "full")
MEMORY_MODES = ("reversible", "checkpoint", "autograd")
POSITION_EMBEDDING_TYPES = ("axial", "learned", "none")
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")
# Activation names understood by ``torch_reformer.layers.get_activation``: every one of HF's ACT2FN
# without learned parameters. Those with parameters, which a Reformer checkpoint does not hold:
ACTIVATION_NAMES = (
    "relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_python", "gelu_accurate", "gelu_10",
    "gelu_python_tanh", "quick_gelu", "silu", "swish", "tanh", "sigmoid", "mish", "leaky_relu", "relu6", "relu2",
    "hardswish", "laplace", "sqrtsoftplus", "linear",
)
_LEARNED_ACTIVATIONS = ("prelu", "xielu")

# Keys that HF writes into config.json and that have no meaning here; dropped silently.
_HF_BOOKKEEPING_KEYS = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "num_hidden_layers",
    "dtype", "torch_dtype", "return_dict", "output_hidden_states",
    "output_attentions", "output_past", "is_encoder_decoder", "task_specific_params",
    "attention_probs_dropout_prob", "finetuning_task", "tokenizer_class", "prefix", "pruned_heads",
    "sep_token_id", "decoder_start_token_id", "add_cross_attention", "tie_encoder_decoder",
    "cross_attention_hidden_size", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "chunk_size", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    # Legacy keys of the configs Google released with its Reformer checkpoints; HF ignores them too.
    "intermediate_size", "num_chunks_after", "num_chunks_before",
})

_POSITIVE_INTS = (
    "attention_head_size", "feed_forward_size", "hidden_size", "local_attn_chunk_length",
    "lsh_attn_chunk_length", "max_position_embeddings", "num_attention_heads", "num_hashes",
    "vocab_size", "num_labels",
)
_NON_NEGATIVE_INTS = (
    "chunk_size_lm_head", "chunk_size_feed_forward", "local_num_chunks_before",
    "local_num_chunks_after", "lsh_num_chunks_before", "lsh_num_chunks_after", "kept_graph_layers",
)
# What torch.Generator.manual_seed accepts (a seed is read as a signed or unsigned 64-bit integer).
_SEED_RANGE = (-(2**63), 2**64 - 1)
_PROBABILITIES = ("hidden_dropout_prob", "local_attention_probs_dropout_prob", "lsh_attention_probs_dropout_prob")
_BOOLS = ("axial_pos_embds", "is_decoder", "tie_word_embeddings", "use_cache")


@dataclass
class ReformerConfig:
    """Hyper-parameters of a Reformer model (HF ``ReformerConfig`` names and defaults)."""

    attention_head_size: int = 64  # width of each head's query/key/value vectors
    # one attention type per layer: "lsh" | "local" | "full"
    attn_layers: tuple[str, ...] = ("local", "lsh", "local", "lsh", "local", "lsh")
    axial_norm_std: float = 1.0  # std of the normal init of the axial position weights
    axial_pos_embds: bool = True  # HF's switch: axial (True) or learned (False) position embeddings
    axial_pos_shape: tuple[int, ...] = (64, 64)  # axial factorisation of the positions; product = longest sequence
    axial_pos_embds_dim: tuple[int, ...] = (64, 192)  # per-axis embedding widths; must sum to hidden_size
    chunk_size_lm_head: int = 0  # rows per chunk of the LM head + loss; 0 = unchunked
    chunk_size_feed_forward: int = 0  # positions per chunk of the feed-forward; 0 = unchunked
    eos_token_id: int | tuple[int, ...] | None = 2  # end-of-sequence token(s); checked by generation, not here
    feed_forward_size: int = 512  # inner width of the feed-forward
    hash_seed: int | None = None  # fixes the LSH rotations (private generator); None = fresh per call
    hidden_act: str = "relu"  # feed-forward activation, one of ACTIVATION_NAMES
    hidden_dropout_prob: float = 0.05  # dropout on embeddings, block outputs and feed-forward
    hidden_size: int = 256  # model width (each reversible stream); the final output is 2 * hidden_size
    initializer_range: float = 0.02  # std of the normal init of linear and embedding weights
    is_decoder: bool = False  # causal attention (language modelling)
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon
    local_num_chunks_before: int = 1  # local attention: chunks of look-back
    local_num_chunks_after: int = 0  # local attention: chunks of look-ahead
    local_attention_probs_dropout_prob: float = 0.05  # dropout on local attention probabilities
    local_attn_chunk_length: int = 64  # local attention chunk length
    lsh_attn_chunk_length: int = 64  # LSH attention chunk length (in sorted order)
    lsh_attention_probs_dropout_prob: float = 0.0  # dropout on LSH attention probabilities
    lsh_num_chunks_before: int = 1  # LSH attention: chunks of look-back
    lsh_num_chunks_after: int = 0  # LSH attention: chunks of look-ahead
    max_position_embeddings: int = 4096  # size of the learned position table (see module docstring)
    num_attention_heads: int = 12  # heads per attention layer
    num_buckets: int | tuple[int, ...] | None = None  # even int, tuple of even factors, or None = chosen per call
    num_hashes: int = 1  # LSH hashing rounds
    vocab_size: int = 320  # token vocabulary
    tie_word_embeddings: bool = False  # kept for HF files; the (V, 2H) LM head cannot share the (V, H) embedding
    use_cache: bool = True  # generation keeps per-layer caches
    classifier_dropout: float | None = None  # classifier head dropout; None = hidden_dropout_prob
    bos_token_id: int | None = None  # beginning-of-sequence token
    pad_token_id: int | None = 0  # padding token
    num_labels: int = 2  # classifier outputs (HF derives it from id2label)
    # classifier label names by index and indices by name, as in HF; None = HF's defaults "LABEL_0", ...
    # (JSON keys are strings: id2label's are read back as ints, as HF does)
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    # classifier loss: None (inferred from labels) or one of PROBLEM_TYPES
    problem_type: str | None = None
    # Our own fields.
    memory_mode: str = "reversible"  # "reversible" (O(1) activations in depth) | "checkpoint" | "autograd"
    # "reversible"/"checkpoint": the last layers that keep their autograd graph rather than being
    # rebuilt and re-run in backward (one layer's activations each; 0 = least memory)
    kept_graph_layers: int = 1
    # "axial" | "learned" | "none"; None (the default) follows axial_pos_embds (see the module docstring)
    position_embedding_type: str | None = None
    # The position embedding type the last validation settled on, kept as an instance attribute of
    # the same name, so that the next validation can tell which of the two position fields was
    # changed. An InitVar because dataclasses.replace reads it back from the instance and passes it
    # on; never a field (not saved, not compared).
    _validated_position_embedding_type: InitVar[str | None] = None

    def __post_init__(self, _validated_position_embedding_type: str | None = None) -> None:
        self._validated_position_embedding_type = _validated_position_embedding_type
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Normalise sequence fields to tuples and check every field; raise with a fix."""
        self._check_types()
        self._reconcile_position_embedding_type()
        self._check_values()

    def _check_types(self) -> None:
        for field in dataclasses.fields(self):  # e.g. numpy integers, so JSON and the checks see ints
            setattr(self, field.name, plain_numbers(getattr(self, field.name)))
        for name in _POSITIVE_INTS + _NON_NEGATIVE_INTS:
            require_int(name, getattr(self, name))
        for name in ("hash_seed", "bos_token_id", "pad_token_id"):
            if getattr(self, name) is not None:
                require_int(name, getattr(self, name))
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in _PROBABILITIES + ("axial_norm_std", "initializer_range", "layer_norm_eps"):
            setattr(self, name, require_float(name, getattr(self, name)))
        if self.classifier_dropout is not None:
            self.classifier_dropout = require_float("classifier_dropout", self.classifier_dropout)
        for name in ("hidden_act", "memory_mode"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.position_embedding_type, (str, type(None))):
            raise TypeError(f"position_embedding_type must be a string or None, got {self.position_embedding_type!r}")
        self.attn_layers = require_sequence("attn_layers", self.attn_layers, str)
        self.axial_pos_shape = require_sequence("axial_pos_shape", self.axial_pos_shape, int)
        self.axial_pos_embds_dim = require_sequence("axial_pos_embds_dim", self.axial_pos_embds_dim, int)
        self.num_buckets = int_or_int_tuple("num_buckets", self.num_buckets)
        self.eos_token_id = int_or_int_tuple("eos_token_id", self.eos_token_id)
        self.id2label = label_map("id2label", self.id2label, int, str)
        self.label2id = label_map("label2id", self.label2id, str, int)

    def _reconcile_position_embedding_type(self) -> None:
        # HF's bool says axial (True) or learned (False); our string adds "none". The rule for
        # disagreements is in the module docstring; afterwards the two agree.
        kind = self.position_embedding_type
        if kind is not None and kind not in POSITION_EMBEDDING_TYPES:
            raise ValueError(f"position_embedding_type must be one of {POSITION_EMBEDDING_TYPES} (or None to follow "
                             f"axial_pos_embds), got {kind!r}")
        only_the_flag_changed = kind == self._validated_position_embedding_type
        if kind is None or (only_the_flag_changed and (kind == "axial") != self.axial_pos_embds):
            kind = "axial" if self.axial_pos_embds else "learned"
        self.position_embedding_type, self.axial_pos_embds = kind, kind == "axial"
        self._validated_position_embedding_type = kind

    def _check_values(self) -> None:
        for names, least, kind in ((_POSITIVE_INTS, 1, "positive"), (_NON_NEGATIVE_INTS, 0, "non-negative")):
            for name in names:
                if getattr(self, name) < least:
                    raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}: pass a {kind} integer, "
                                     f"e.g. {_FIELD_DEFAULTS[name]} (the default)")
        for name in _PROBABILITIES + ("classifier_dropout",):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {value}: pass e.g. 0.0 (no dropout) or 0.1")
        for name in ("axial_norm_std", "initializer_range"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} is a standard deviation and must be a finite number >= 0, got "
                                 f"{getattr(self, name)}")
        if not 0 < self.layer_norm_eps < math.inf:
            raise ValueError(f"layer_norm_eps must be a finite number > 0, got {self.layer_norm_eps}: pass e.g. 1e-12")
        if self.hash_seed is not None and not _SEED_RANGE[0] <= self.hash_seed <= _SEED_RANGE[1]:
            raise ValueError(
                f"hash_seed={self.hash_seed} is outside the range a torch generator can be seeded with "
                f"[-2**63, 2**64 - 1]: pass a smaller seed (e.g. hash_seed % 2**63), or None for fresh rotations"
            )
        if self.eos_token_id == ():
            raise ValueError("eos_token_id is an empty list: pass None for no end-of-sequence token")
        self._check_choices()
        self._check_labels()
        self._check_attention()
        if self.position_embedding_type == "axial":
            self._check_axial()
        self._check_token_ids()

    def _check_choices(self) -> None:
        if self.hidden_act in _LEARNED_ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} has learned parameters, which a Reformer feed-forward "
                             f"does not hold: choose a fixed activation, one of {ACTIVATION_NAMES}")
        if self.hidden_act not in ACTIVATION_NAMES:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported: choose one of {ACTIVATION_NAMES}")
        if self.memory_mode not in MEMORY_MODES:
            raise ValueError(f"memory_mode {self.memory_mode!r} is not known: choose one of {MEMORY_MODES}")
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type {self.problem_type!r} is not known: choose one of {PROBLEM_TYPES}")

    def _check_labels(self) -> None:
        if self.id2label is not None and len(self.id2label) != self.num_labels:
            raise ValueError(
                f"id2label names {len(self.id2label)} labels but num_labels is {self.num_labels}: give one name per "
                "label, or set id2label and label2id to None for the default names LABEL_0, LABEL_1, ..."
            )
        default_names = {index: f"LABEL_{index}" for index in range(self.num_labels)}
        if self.id2label == default_names and self.label2id in (None, {n: i for i, n in default_names.items()}):
            self.id2label = self.label2id = None  # HF's defaults, which it derives from num_labels

    def _check_attention(self) -> None:
        if not self.attn_layers:
            raise ValueError('attn_layers is empty: give one entry per layer, e.g. ["local", "lsh"]')
        unknown = sorted(set(self.attn_layers) - set(ATTENTION_TYPES))
        if unknown:
            raise ValueError(
                f"attn_layers contains unknown attention type(s) {unknown}: use only {ATTENTION_TYPES}"
            )
        buckets = self.num_buckets
        factors = () if buckets is None else (buckets,) if isinstance(buckets, int) else buckets
        if buckets is not None and not factors:
            raise ValueError("num_buckets is an empty sequence: pass an even int, even factors, or None")
        for factor in factors:
            if factor < 2 or factor % 2:
                raise ValueError(
                    f"num_buckets {buckets} has the odd or too small value {factor}: every bucket count "
                    "(or factor) must be an even integer >= 2, e.g. 64 or (32, 64); or pass None to choose it "
                    "from the sequence length"
                )

    def _check_axial(self) -> None:
        shape, dims = self.axial_pos_shape, self.axial_pos_embds_dim
        if not shape or len(shape) != len(dims):
            raise ValueError(
                f"axial_pos_shape {shape} and axial_pos_embds_dim {dims} must be non-empty and of equal "
                "length (one embedding width per axis)"
            )
        if min(shape) < 1 or min(dims) < 1:
            raise ValueError(
                f"axial_pos_shape {shape} and axial_pos_embds_dim {dims} must hold positive integers"
            )
        if sum(dims) != self.hidden_size:
            raise ValueError(
                f"axial_pos_embds_dim {dims} sums to {sum(dims)} but hidden_size is {self.hidden_size}: "
                "choose per-axis widths that sum to hidden_size, or set position_embedding_type='learned'"
            )

    def _check_token_ids(self) -> None:
        for name, token in (("bos_token_id", self.bos_token_id), ("pad_token_id", self.pad_token_id)):
            if token is not None and not 0 <= token < self.vocab_size:
                raise ValueError(
                    f"{name}={token} is outside the vocabulary [0, {self.vocab_size}): "
                    "pass a token id below vocab_size, or None"
                )
        # End-of-sequence ids matter only to generation, which refuses one outside the vocabulary when
        # asked to stop at it; HF's default 2 must load beside a smaller vocabulary.
        eos = self.eos_token_id
        for token in (eos,) if isinstance(eos, int) else eos or ():
            if token < 0:
                raise ValueError(f"eos_token_id={eos!r} holds the negative id {token}: pass token ids >= 0, or None")

    # ------------------------------------------------------------------ derived values
    @property
    def num_layers(self) -> int:
        """Number of layers (one per ``attn_layers`` entry)."""
        return len(self.attn_layers)

    @property
    def pad_multiple(self) -> int:
        """Least common multiple of the chunk lengths in use; inputs are padded to it (1 if only "full")."""
        chunk_lengths = {"lsh": self.lsh_attn_chunk_length, "local": self.local_attn_chunk_length}
        return math.lcm(1, *(chunk_lengths[kind] for kind in set(self.attn_layers) if kind != "full"))

    @property
    def max_length(self) -> int | None:
        """Longest sequence the position embedding covers (None: no position embedding, no limit)."""
        if self.position_embedding_type == "axial":
            return math.prod(self.axial_pos_shape)
        if self.position_embedding_type == "learned":
            return self.max_position_embeddings
        return None

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Every field as ``config.json`` holds it: tuples as lists, label maps' keys as strings (so a
        saved config's JSON compares equal to the ``to_dict()`` of the config it was loaded into)."""
        return {f.name: _to_json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **overrides: Any) -> ReformerConfig:
        """Build a config from a dict such as HF's ``config.json``.

        HF bookkeeping keys (``architectures``, ``model_type``, ``transformers_version``, ...) are
        dropped silently; ``num_labels`` follows HF's ``id2label`` (as in HF, a ``num_labels`` that
        disagrees with it is ignored with a warning); other unknown keys are dropped with a warning.
        Wrong types raise ``TypeError``. An override of ``axial_pos_embds`` or ``num_labels`` replaces
        a saved ``position_embedding_type`` or ``id2label``/``label2id`` that disagrees with it.
        """
        if not isinstance(config_dict, dict):
            raise TypeError(f"a config must be a dict of field values, got {type(config_dict).__name__}")
        merged = {**config_dict, **overrides}
        flag = overrides.get("axial_pos_embds")
        if "position_embedding_type" not in overrides and flag is not None and flag != (
                merged.get("position_embedding_type") == "axial"):
            merged.pop("position_embedding_type", None)  # it then follows the overridden flag
        names = {f.name for f in dataclasses.fields(cls)}
        _labels_follow(merged, overrides)
        unknown = sorted(set(merged) - names - _HF_BOOKKEEPING_KEYS)
        if unknown:
            warnings.warn(f"ReformerConfig ignores unknown keys {unknown}", stacklevel=2)
        return cls(**{key: value for key, value in merged.items() if key in names})

    def to_json_string(self) -> str:
        """The config as indented JSON with sorted keys and a trailing newline."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write ``to_json_string()`` to ``path``."""
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ReformerConfig:
        """Read a config written by ``to_json_file`` or by HF's ``save_pretrained``."""
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        try:
            config_dict = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"config file {os.fspath(path)!r} is not valid JSON: {error}") from None
        return cls.from_dict(config_dict)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` into ``directory`` (created when missing), as a saved model holds it."""
        os.makedirs(directory, exist_ok=True)
        self.to_json_file(os.path.join(directory, CONFIG_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides: Any) -> ReformerConfig:
        """The config of a saved model folder (ours or HF's ``save_pretrained``), any field overridden by
        keyword; a path to a JSON file is read as it is."""
        path = directory if os.path.isfile(directory) else os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{os.fspath(directory)} holds no {CONFIG_NAME}: pass a folder written by "
                                    "save_pretrained or a config JSON file")
        config = cls.from_json_file(path)
        return config if not overrides else cls.from_dict(config.to_dict(), **overrides)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ReformerConfig:
        """A named configuration from ``PRESETS``, with any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_FIELD_DEFAULTS = {field.name: field.default for field in dataclasses.fields(ReformerConfig)}


def _labels_follow(merged: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Make ``num_labels`` follow ``id2label`` in ``merged`` (HF's rule), unless it is overridden."""
    id2label = merged.get("id2label")
    if not isinstance(id2label, dict):
        return
    if merged.get("num_labels", len(id2label)) != len(id2label):
        if "num_labels" in overrides and "id2label" not in overrides:
            del merged["id2label"]  # the saved names do not fit the overridden count
            merged.pop("label2id", None)
            return
        warnings.warn(f"num_labels={merged['num_labels']!r} disagrees with the {len(id2label)} names in id2label: "
                      f"using num_labels={len(id2label)}, as transformers does", stacklevel=3)
    merged["num_labels"] = len(id2label)


def _to_json_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): item for key, item in value.items()}  # a copy, with JSON's string keys
    return list(value) if isinstance(value, tuple) else value


PRESETS: dict[str, dict[str, Any]] = {
    # Small and deterministic, for tests: a local and an LSH layer, fixed rotations, no dropout.
    "tiny": dict(
        attn_layers=("local", "lsh"),
        hidden_size=32,
        num_attention_heads=2,
        attention_head_size=16,
        feed_forward_size=64,
        vocab_size=64,
        local_attn_chunk_length=8,
        lsh_attn_chunk_length=8,
        num_buckets=4,
        num_hashes=2,
        axial_pos_shape=(8, 16),
        axial_pos_embds_dim=(16, 16),
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0,
        hash_seed=42,
    ),
    # Trax's enwik8 ReformerLM (reformer_enwik8.gin, "more memory" settings) with 4 hashing rounds:
    # bytes shifted by 2 (0 = pad, 1 = EOS), sequences of 64K = 128 * 512.
    "enwik8": dict(
        attn_layers=("local", "local", "lsh", "local") * 3,
        hidden_size=1024,
        feed_forward_size=4096,
        num_attention_heads=8,
        attention_head_size=128,
        lsh_attn_chunk_length=256,
        num_buckets=512,
        num_hashes=4,
        local_attn_chunk_length=128,
        axial_pos_shape=(128, 512),
        axial_pos_embds_dim=(256, 768),
        max_position_embeddings=65536,
        vocab_size=258,
        pad_token_id=0,
        eos_token_id=1,
        is_decoder=True,
        hidden_dropout_prob=0.2,
        local_attention_probs_dropout_prob=0.2,
        lsh_attention_probs_dropout_prob=0.2,
    ),
    # HF's google/reformer-crime-and-punishment: sequences up to 512 * 1024 = 524,288 tokens.
    "crime-and-punishment": dict(
        attn_layers=("local", "lsh") * 3,
        hidden_size=256,
        num_attention_heads=2,
        attention_head_size=64,
        feed_forward_size=512,
        num_buckets=(64, 128),
        num_hashes=1,
        local_attn_chunk_length=64,
        lsh_attn_chunk_length=64,
        axial_pos_shape=(512, 1024),
        axial_pos_embds_dim=(64, 192),
        max_position_embeddings=524288,
        vocab_size=320,
        is_decoder=True,
    ),
}
