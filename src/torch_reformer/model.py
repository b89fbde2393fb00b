"""Reformer models: the shared trunk and its language-modelling and classification heads.

Layout (SPEC §7, the same computation and parameters as Hugging Face's Reformer):

    emb = dropout(word_emb(ids)) + pos_emb(positions)                 # (B, L, H)
    x1 = x2 = emb
    per layer i:  x1 = x1 + Dropout(W_o · Attn_i(LayerNorm(x2)))      # f: "lsh", "local" or "full"
                  x2 = x2 + FeedForward_i(x1)                          # g: LayerNorm inside, chunked
    out = Dropout(LayerNorm_{2H}(concat[x1, x2]))                     # (B, L, 2H)

The layers run through the reversible engine (`reversible.reversible_forward`), so in the default
``memory_mode="reversible"`` training stores only the last layer's two streams: activation memory
does not grow with depth. The top ``kept_graph_layers`` layers (default 1) keep their autograd
graph instead: backward needs them first, so keeping them costs one layer's activations and saves
re-running them. LSH layers store their bucket ids with the engine in the forward pass and
reuse them in the backward recomputation.

Any sequence length is accepted. When a length is not a multiple of the attention chunk lengths
(their least common multiple), the trunk pads with ``pad_token_id`` and a zero attention mask and
slices the padding off again, in training and in evaluation alike. It pads exactly when Hugging
Face does (length above the smallest chunk length), so outputs match HF's.

Shapes: B batch, L sequence length, H ``hidden_size``, V ``vocab_size``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention.lsh import LSHSelfAttention
from .blocks import ReformerEmbeddings, ReformerLayer
from .config import CONFIG_NAME, ReformerConfig
from .layers import AxialPositionalEmbedding, LMHead, check_class_labels, mean_token_cross_entropy
from .model_inputs import check_inputs, pad_inputs
from .outputs import ReformerModelOutput, ReformerOutput
from .reversible import reversible_forward
from .serialization import CheckpointError, atomic_write_files, load_safetensors, read_json_object, safetensors_chunks

WEIGHTS_NAME = "model.safetensors"
# Rows of the LM head processed at once when the loss is requested without logits and the config
# sets no chunk size: bounds the transient (rows, V) block whatever the sequence length.
DEFAULT_LOSS_CHUNK_ROWS = 1024


class ReformerPreTrainedModel(nn.Module):
    """Weight initialisation, save/load and helpers shared by the trunk and every head.

    A model keeps its own copy of the config (a head and its trunk share one), so models built from
    one config do not change each other. The layers take their sizes, attention settings and
    dropout rates from it at construction; ``set_num_hashes`` changes the hash rounds of the layers
    and the config together. ``memory_mode`` and ``kept_graph_layers`` are read on every call.
    """

    def __init__(self, config: ReformerConfig):
        super().__init__()
        if not isinstance(config, ReformerConfig):
            raise TypeError(f"expected a ReformerConfig, got {type(config).__name__}")
        self.config = copy.deepcopy(config)
        self.config.validate()  # fields may have been changed since the config was constructed

    def init_weights(self) -> None:
        """HF's initialisation: normal(0, initializer_range) for linear/embedding weights, zero biases,
        unit LayerNorms, normal(0, axial_norm_std) for axial embedding weights."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, AxialPositionalEmbedding):
                for weight in module.weights:
                    nn.init.normal_(weight, std=self.config.axial_norm_std)
            elif isinstance(module, LMHead):
                nn.init.zeros_(module.bias)

    @classmethod
    def from_hf(cls, hf_model):
        """Build this class from a `transformers` Reformer model with identical weights
        (needs the ``hf`` extra; see ``torch_reformer.interop.hf``)."""
        from .interop.hf import from_hf

        return from_hf(hf_model, cls)

    def to_hf(self):
        """The equivalent `transformers` Reformer model with identical weights (``hf`` extra)."""
        from .interop.hf import to_hf

        return to_hf(self)

    def get_input_embeddings(self) -> nn.Embedding:
        """The (V, H) token embedding table, as HF's accessor of the same name returns it."""
        trunk = self if isinstance(self, ReformerModel) else self.reformer
        return trunk.embeddings.word_embeddings

    def get_output_embeddings(self) -> nn.Linear | None:
        """The LM head's (V, 2H) projection (its bias is ``lm_head.bias``), or None without an LM head."""
        head = getattr(self, "lm_head", None)
        return None if head is None else head.decoder

    def lsh_layers(self) -> list[LSHSelfAttention]:
        return [m for m in self.modules() if isinstance(m, LSHSelfAttention)]

    def set_num_hashes(self, num_hashes: int) -> None:
        """Change the number of hash rounds of every LSH layer (e.g. evaluate with more than trained)."""
        if not isinstance(num_hashes, int) or num_hashes < 1:
            raise ValueError(f"num_hashes must be a positive integer, got {num_hashes!r}")
        for layer in self.lsh_layers():
            layer.num_hashes = num_hashes
        self.config.num_hashes = num_hashes

    def num_parameters(self, only_trainable: bool = False) -> int:
        """How many parameter values the model holds (those that require grad with ``only_trainable``),
        a method as in HF."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` (no pickle) into ``directory``; ``state_dict``
        replaces the model's own (e.g. a sharded model's tensors gathered whole)."""
        os.makedirs(directory, exist_ok=True)
        config = self.config.to_dict()
        config["architectures"] = [_built_class(type(self)).__name__]
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        atomic_write_files({  # both or neither: never weights of one save beside the config of another
            os.path.join(directory, WEIGHTS_NAME): safetensors_chunks(
                self.state_dict() if state_dict is None else state_dict, metadata={"format": "pt"}),
            os.path.join(directory, CONFIG_NAME): [text.encode("utf-8")],
        })

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, dtype: torch.dtype | None = None, **config_overrides):
        """Load a model saved by ``save_pretrained``.

        ``config_overrides`` replace config fields (e.g. ``memory_mode="checkpoint"``). Floating
        weights keep the dtype they were saved in unless ``dtype`` names another. Called on a head
        class, the checkpoint must hold that head; ``ReformerModel.from_pretrained`` also takes the
        trunk out of any head's checkpoint, and ``ReformerPreTrainedModel.from_pretrained`` builds
        whichever class was saved. Raises ``CheckpointError`` on a missing, corrupt or mismatched
        checkpoint.
        """
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
        config_dict = _read_config(directory)
        if "transformers_version" in config_dict:  # written by transformers' save_pretrained
            raise CheckpointError(_transformers_folder_hint(directory, cls))
        saved_class = _saved_class_name(config_dict)
        target = cls
        if cls not in MODEL_CLASSES.values():  # a base class: build what was saved
            if saved_class is None:
                raise CheckpointError(
                    f"{directory}/{CONFIG_NAME} names no model class in 'architectures': load it with the class "
                    f"it was saved from, e.g. ReformerLM.from_pretrained"
                )
            target = MODEL_CLASSES[saved_class]
        elif saved_class not in (None, cls.__name__) and cls is not ReformerModel:
            raise CheckpointError(
                f"{directory} holds a {saved_class}, not a {cls.__name__}: load it with "
                f"{saved_class}.from_pretrained (or ReformerModel.from_pretrained for the trunk alone)"
            )
        config_dict.update(config_overrides)
        config = ReformerConfig.from_dict(config_dict)
        state = load_safetensors(os.path.join(directory, WEIGHTS_NAME))
        if target is ReformerModel and saved_class not in (None, "ReformerModel"):
            state = {name[len(TRUNK_PREFIX):]: t for name, t in state.items() if name.startswith(TRUNK_PREFIX)}
        model = target(config)
        dtype = dtype or _saved_float_dtype(state)
        if dtype is not None:
            model.to(dtype)
        model.load_weights(state, source=str(directory))
        return model

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Strictly load ``state``; a missing, unexpected or mis-shaped tensor raises ``CheckpointError``."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if any(name.startswith(("encoder.", f"{TRUNK_PREFIX}encoder.")) for name in unexpected):
            raise CheckpointError(_transformers_folder_hint(source, type(self)))
        if missing or unexpected:
            raise CheckpointError(
                f"{source} does not fit {type(self).__name__}: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{'...' if len(unexpected) > 5 else ''} (was it saved from another model class or config?)"
            )
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise CheckpointError(
                    f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the model expects "
                    f"{tuple(own[name].shape)} (config and weights disagree)"
                )
        self.load_state_dict(state, strict=True)


class ReformerModel(ReformerPreTrainedModel):
    """The Reformer trunk: token ids (B, L) -> hidden states (B, L, 2H)."""

    def __init__(self, config: ReformerConfig):
        super().__init__(config)
        self.embeddings = ReformerEmbeddings(config)
        self.layers = nn.ModuleList(ReformerLayer(config, kind) for kind in config.attn_layers)
        self.layer_norm = nn.LayerNorm(2 * config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        chunk_lengths = [self._chunk_length(kind) for kind in config.attn_layers if kind != "full"]
        self.pad_multiple = config.pad_multiple
        self.min_chunk_length = min(chunk_lengths) if chunk_lengths else 1
        self.init_weights()

    def _chunk_length(self, kind: str) -> int:
        if kind == "lsh":
            return self.config.lsh_attn_chunk_length
        return self.config.local_attn_chunk_length

    def blocks(self) -> list[nn.Module]:
        """The engine's block list: f0, g0, f1, g1, ..."""
        return [block for layer in self.layers for block in (layer.attention, layer.feed_forward)]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> ReformerModelOutput:
        """input_ids (B, L) long; attention_mask (B, L) 1/True = real token; position_ids (B, L) or (L,).

        Returns a ``ReformerModelOutput`` whose ``last_hidden_state`` is (B, L, 2H)."""
        input_ids, attention_mask, position_ids = check_inputs(self.config, input_ids, attention_mask, position_ids)
        length = input_ids.shape[1]
        input_ids, attention_mask, position_ids = pad_inputs(
            self.config, input_ids, attention_mask, position_ids, self.padded_length(length))
        hidden = self.embeddings(input_ids, position_ids)  # (B, L_pad, H)
        x1, x2 = reversible_forward(
            hidden, hidden, self.blocks(), memory_mode=self.config.memory_mode,
            block_kwargs={"attention_mask": attention_mask}, autograd_tail=2 * self.config.kept_graph_layers,
        )
        out = self.dropout(self.layer_norm(torch.cat([x1, x2], dim=-1)))  # (B, L_pad, 2H)
        return ReformerModelOutput(out[:, :length] if out.shape[1] != length else out)

    def padded_length(self, length: int) -> int:
        """The length the layers run on for ``length`` tokens: the next multiple of the chunk
        lengths' lcm, unless ``length`` already is one or fits in the smallest chunk (HF's rule)."""
        if length % self.pad_multiple == 0 or length <= self.min_chunk_length:
            return length
        return -(-length // self.pad_multiple) * self.pad_multiple


class _ModelWithTrunk(ReformerPreTrainedModel):
    def __init__(self, config: ReformerConfig):
        super().__init__(config)
        self.reformer = ReformerModel(self.config)
        self.reformer.config = self.config  # one config for the head and its trunk


class ReformerLM(_ModelWithTrunk):
    """Causal language model (``config.is_decoder`` must be True)."""

    def __init__(self, config: ReformerConfig):
        if not config.is_decoder:
            raise ValueError("ReformerLM is a causal model: set is_decoder=True in its config")
        if "lsh" in config.attn_layers and config.lsh_num_chunks_after != 0:
            raise ValueError("a causal model cannot look ahead: set lsh_num_chunks_after=0")
        if "local" in config.attn_layers and config.local_num_chunks_after != 0:
            raise ValueError("a causal model cannot look ahead: set local_num_chunks_after=0")
        super().__init__(config)
        self.lm_head = LMHead(2 * config.hidden_size, config.vocab_size)
        self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> ReformerOutput:
        """Logits (B, L, V): ``logits[:, t]`` predicts token ``t + 1``. ``labels`` (B, L) are aligned
        with ``input_ids`` (the model shifts them); ``-100`` is ignored. With ``return_logits=False``
        the loss is computed chunk-wise and the (B, L, V) logits never exist."""
        hidden = self.reformer(input_ids, attention_mask, position_ids).last_hidden_state  # (B, L, 2H)
        shifted = None
        if labels is not None:
            _check_labels(labels, input_ids, self.config.vocab_size)
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t is scored on token t + 1
        return _lm_output(self, hidden, shifted, return_logits)

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        num_beams: int = 1,
        repetition_penalty: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        seed: int | None = None,
        *,
        pad_token_id: int | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
        length_penalty: float = 1.0,
        max_length: int | None = None,
    ) -> torch.Tensor:
        """Decode continuations of ``input_ids`` (B, L) -> (B, L + T): greedy, sampling or beam
        search. See ``torch_reformer.generation.generate`` for what each option does."""
        from .generation import generate

        return generate(
            self, input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, num_beams, repetition_penalty,
            eos_token_id, seed, pad_token_id=pad_token_id, attention_mask=attention_mask, use_cache=use_cache,
            length_penalty=length_penalty, max_length=max_length,
        )


class ReformerForMaskedLM(_ModelWithTrunk):
    """Masked language model (bidirectional: ``config.is_decoder`` must be False)."""

    def __init__(self, config: ReformerConfig):
        if config.is_decoder:
            raise ValueError("ReformerForMaskedLM attends in both directions: set is_decoder=False in its config")
        super().__init__(config)
        self.lm_head = LMHead(2 * config.hidden_size, config.vocab_size)
        self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> ReformerOutput:
        """Logits (B, L, V) for every position; ``labels`` (B, L) with ``-100`` where not scored."""
        hidden = self.reformer(input_ids, attention_mask, position_ids).last_hidden_state
        if labels is not None:
            _check_labels(labels, input_ids, self.config.vocab_size)
        return _lm_output(self, hidden, labels, return_logits)


class ReformerClassificationHead(nn.Module):
    """HF's head: first position -> dropout -> dense -> tanh -> dropout -> out_proj."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dense = nn.Linear(2 * config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        first = self.dropout(hidden_states[:, 0])  # (B, 2H)
        return self.out_proj(self.dropout(torch.tanh(self.dense(first))))  # (B, num_labels)


class ReformerForSequenceClassification(_ModelWithTrunk):
    """Classifier or regressor on the first position's hidden state.

    The loss follows ``config.problem_type`` as in HF: ``"regression"`` (MSE), ``"single_label_classification"``
    (cross-entropy over integer labels (B,); -100 leaves a sequence unscored), ``"multi_label_classification"`` (BCE with logits over float
    labels (B, num_labels)). When it is None it is inferred per call (never written back to the config):
    regression for ``num_labels == 1``, single-label for integer labels, multi-label otherwise.
    """

    def __init__(self, config: ReformerConfig):
        super().__init__(config)
        self.classifier = ReformerClassificationHead(config)
        self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> ReformerOutput:
        hidden = self.reformer(input_ids, attention_mask, position_ids).last_hidden_state
        logits = self.classifier(hidden)  # (B, num_labels)
        loss = None if labels is None else self._loss(logits, labels)
        return ReformerOutput(loss=loss, logits=logits, hidden_states=hidden)


    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        num_labels = self.config.num_labels
        problem = self.config.problem_type
        if problem is None:
            if num_labels == 1:
                problem = "regression"
            elif not labels.dtype.is_floating_point:
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            if labels.numel() != logits.numel():
                raise ValueError(
                    f"regression needs {logits.shape[1]} target value(s) per sequence, labels of shape "
                    f"{tuple(logits.shape)}; got shape {tuple(labels.shape)}"
                )
            target = labels.to(logits.dtype)
            if num_labels == 1:
                return F.mse_loss(logits.reshape(-1), target.reshape(-1))
            return F.mse_loss(logits, target.reshape(logits.shape))
        if problem == "single_label_classification":
            if labels.dtype.is_floating_point:
                raise ValueError("single-label classification needs integer class labels, got floating labels")
            labels = labels.reshape(-1)
            if labels.numel() != logits.shape[0]:
                raise ValueError(f"expected one class label per sequence ({logits.shape[0]}), got {labels.numel()}")
            check_class_labels(labels, num_labels)
            # -100 marks a sequence that is not scored, as in HF; with none scored the loss is 0, not NaN.
            per_sequence = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
            return per_sequence.sum() / (labels != -100).sum().clamp(min=1)
        if tuple(labels.shape) != tuple(logits.shape):
            raise ValueError(
                f"multi-label classification needs labels of shape {tuple(logits.shape)} (0/1 per class), "
                f"got {tuple(labels.shape)}"
            )
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def _check_labels(labels: torch.Tensor, input_ids: torch.Tensor, vocab_size: int) -> None:
    """Token labels: the shape of ``input_ids``, integers in [0, vocab_size) or -100."""
    if not torch.is_tensor(labels) or tuple(labels.shape) != tuple(input_ids.shape):
        got = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {got}")
    check_class_labels(labels, vocab_size)


def _lm_output(model, hidden: torch.Tensor, labels: torch.Tensor | None, return_logits: bool) -> ReformerOutput:
    """Logits and/or the mean cross-entropy of (already aligned) ``labels``."""
    logits = model.lm_head(hidden) if return_logits else None
    loss = None
    if labels is not None:
        if logits is not None:
            loss = mean_token_cross_entropy(logits, labels)  # 0 (not NaN) with no token scored, as the chunked path
        else:
            chunk = model.config.chunk_size_lm_head or DEFAULT_LOSS_CHUNK_ROWS
            loss = model.lm_head.loss(hidden, labels, chunk_size=chunk)
    return ReformerOutput(loss=loss, logits=logits, hidden_states=hidden)


MODEL_CLASSES = {model_class.__name__: model_class for model_class in (
    ReformerModel, ReformerLM, ReformerForMaskedLM, ReformerForSequenceClassification)}
TRUNK_PREFIX = "reformer."  # the trunk's parameter names inside every head


def _built_class(cls: type) -> type:
    """The class a model was built as: FSDP's ``fully_shard`` swaps in ``FSDP<Name>``, a subclass of
    ``FSDPModule`` and the model's class; other subclasses (a user's own) are themselves."""
    for candidate in cls.__mro__:
        if candidate.__name__ != "FSDPModule" and "FSDPModule" not in (base.__name__ for base in candidate.__bases__):
            return candidate
    return cls


def _read_config(directory) -> dict:
    """The config.json of a saved model as a dict, or ``CheckpointError``."""
    return read_json_object(os.path.join(directory, CONFIG_NAME),
                            f"{directory} holds no {CONFIG_NAME}: it is not a saved torch-reformer model")


def _transformers_folder_hint(source, cls: type) -> str:
    return (f"{source} holds a transformers checkpoint, whose weights are named differently: convert it once with "
            f"`reformer convert {source} OUT` (or torch_reformer.interop.convert_checkpoint; transformers need not be "
            f"installed) and load OUT, or build the model from a loaded transformers model with {cls.__name__}.from_hf")


def _saved_class_name(config_dict: dict) -> str | None:
    """The model class ``save_pretrained`` recorded in 'architectures', if it is one of ours."""
    names = config_dict.get("architectures")
    if isinstance(names, list) and len(names) == 1 and names[0] in MODEL_CLASSES:
        return names[0]
    return None


def _saved_float_dtype(state: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The one floating dtype of a state dict's tensors; None if there are none or several."""
    dtypes = {t.dtype for t in state.values() if t.dtype.is_floating_point}
    return dtypes.pop() if len(dtypes) == 1 else None
