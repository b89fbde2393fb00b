"""Text generation for ``ReformerLM``: greedy, sampling, beam search, with per-layer caches.

Legend: B batch (prompts), N rows being decoded (B, or B * K in beam search), K beams,
L prompt width, n real prompt length, T new tokens, V vocabulary, H hidden size.

Plain functions over an explicit state, in the spirit of gpt-fast. The decoding strategies
(logits processors, picks, ``sample_tokens`` and ``beam_search``) live in ``decoding.py`` and
take any next-token source with the interface ``start(prompt) -> logits``, ``advance(tokens) ->
logits``, ``reorder(rows)``. This module provides the sources for a ``ReformerLM``:
``CachedSteps`` runs ``prefill`` once and then ``decode_step`` per token over a ``DecodeCache``
(one cache per layer and the current position); ``UncachedSteps`` re-runs the full forward pass
on the whole sequence every step (the reference the cached path must reproduce token for token).
``generate`` checks the arguments and ties it together.

The cached decode step is the model's forward for one new position:

    x1 = x2 = word_emb(token) + pos_emb(position)                          # (N, 1, H)
    per layer:  x1 += Dropout(W_o · Attn.decode_step(LayerNorm(x2)))      # reads/extends the cache
                x2 += FeedForward(x1)
    logits = lm_head(LayerNorm_{2H}(concat[x1, x2]))                       # (N, V)

Why rows are decoded in groups of equal real length. LSH and local attention are not padding
invariant: local chunks are cut at fixed offsets, and LSH rounds are laid end to end with the
padding sorted to the end of each round, so the wrap-around windows change with the amount of
padding. A padded batch would therefore not give each prompt the continuation it gets alone.
``generate`` takes each row's real tokens (``attention_mask``), decodes the rows of equal
length together (no padding inside a group, positions 0..n-1 as for the prompt alone), and
puts each continuation right after the row's last real token.

What the cache reproduces. Each layer's decode step gives the new position exactly what the
layer's forward over all positions so far would give it (same padding as the model, same
hashing), from the cached states of earlier positions. Those states are frozen when their
position is decoded. With local and full attention they never change anyway (causal, padding
masked), so cached decoding equals the full forward pass; an LSH layer is different: a new token
shifts the bucket-sorted chunks of earlier tokens and so their outputs. The states an LSH layer
passes on to a later layer therefore differ between the cached path (frozen, as in Hugging Face's
and Trax's cached decoding) and ``use_cache=False`` (recomputed from the whole sequence, as in
training). Both paths agree exactly when no LSH layer feeds another layer (e.g. LSH only in the
last layer) or while the sequence fits in one LSH chunk; otherwise they may pick different tokens.

Why hashing is fixed for the whole generation. LSH layers without ``hash_seed`` draw new
rotations per forward pass, and with ``num_buckets=None`` choose the bucket count from the
current length. Both would make consecutive steps hash the same prefix differently, and the
cached path (which keeps the bucket ids of past tokens) could never agree with the uncached
one. ``fixed_hashing`` chooses one bucket count and one set of rotations per LSH layer for the
whole call, in the calling thread only (the layers are not modified); both paths use them. The
automatic count is the one for the model's ``max_length``: a count that followed the request
would make the tokens depend on ``max_new_tokens`` and on the other prompts in the batch.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .attention.checks import require_binary_mask
from .attention.lsh import LSHSelfAttention, fixed_hashing_settings, hashing_fixed_in_this_thread
from .decoding import (
    DecodingOptions,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    beam_search,
    greedy_pick,
    sample_pick,
    sample_tokens,
)
from .model import ReformerLM

__all__ = [
    "CachedSteps", "DecodeCache", "DecodingOptions", "UncachedSteps", "apply_repetition_penalty", "apply_temperature",
    "apply_top_k", "apply_top_p", "beam_search", "decode_step", "fixed_hashing", "generate",
    "greedy_pick", "padded_length", "prefill", "sample_pick", "sample_tokens",
]


# ---------------------------------------------------------------------------------------- options


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _caller_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel of the first frame outside this package (the user's call,
    whether it came through ``generate`` or ``ReformerLM.generate``)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("torch_reformer"):
        frame, level = frame.f_back, level + 1
    return level


def _token_ids(name: str, value, vocab_size: int) -> tuple[int, ...]:
    ids = () if value is None else (value,) if _is_int(value) else value
    if not isinstance(ids, (tuple, list)) or not all(_is_int(token) and 0 <= token < vocab_size for token in ids):
        raise ValueError(f"{name}={value!r} must be token ids in [0, {vocab_size}) (or None)")
    return tuple(ids)


def _decoding_options(model: ReformerLM, **settings) -> DecodingOptions:
    """Check every decoding setting and resolve the padding id; raises with a fix."""
    vocab = model.config.vocab_size
    if not isinstance(settings["do_sample"], bool):
        raise TypeError(f"do_sample must be True or False, got {settings['do_sample']!r}")
    for name in ("temperature", "repetition_penalty"):
        if not _is_number(settings[name]) or settings[name] <= 0:
            raise ValueError(f"{name} must be a number > 0, got {settings[name]!r} (1.0 leaves logits unchanged)")
    if not _is_number(settings["length_penalty"]):
        raise ValueError(f"length_penalty must be a finite number, got {settings['length_penalty']!r}")
    top_k, top_p, num_beams = settings["top_k"], settings["top_p"], settings["num_beams"]
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}: e.g. 0.9 keeps the 90% most likely mass")
    if not _is_int(num_beams) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive int, got {num_beams!r}")
    if num_beams > 1 and settings["do_sample"]:
        raise ValueError("beam search does not sample: pass do_sample=False with num_beams > 1, or num_beams=1")
    ignored = [f"{name}={settings[name]!r}" for name, default in (("temperature", 1.0), ("top_k", None), ("top_p", None))
               if settings[name] != default]
    if ignored and not settings["do_sample"]:
        warnings.warn(f"{', '.join(ignored)} only shape sampling, and do_sample is False: decoding is "
                      f"{'beam search' if num_beams > 1 else 'greedy'} and ignores them (pass do_sample=True to sample)",
                      UserWarning, stacklevel=_caller_stacklevel())
    eos = _token_ids("eos_token_id", settings["eos_token_id"], vocab)
    pad = settings["pad_token_id"]
    if pad is None:
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else (eos[0] if eos else 0)
    _token_ids("pad_token_id", pad, vocab)
    return DecodingOptions(
        do_sample=settings["do_sample"], temperature=float(settings["temperature"]), top_k=top_k,
        top_p=None if top_p is None else float(top_p), num_beams=num_beams,
        repetition_penalty=float(settings["repetition_penalty"]),
        length_penalty=float(settings["length_penalty"]), eos_token_ids=eos, pad_token_id=pad,
    )


def _new_token_count(input_ids, max_new_tokens, max_length) -> int:
    """``max_new_tokens``, or transformers' ``max_length`` (prompt width + new tokens) turned into it."""
    if (max_new_tokens is None) == (max_length is None):
        raise TypeError("give max_new_tokens (the tokens to add) or max_length (prompt width + tokens to add, as "
                        "in transformers): one of the two")
    if max_length is None:
        return max_new_tokens
    width = input_ids.shape[-1] if torch.is_tensor(input_ids) else 0
    if not _is_int(max_length) or max_length < width:
        raise ValueError(f"max_length must be an int at least the prompt width {width}, got {max_length!r}")
    return max_length - width


def _check_prompt(model: ReformerLM, input_ids, attention_mask, max_new_tokens) -> tuple[Tensor, Tensor]:
    """Validate the prompt; returns the ids as int64/int32 (B, L) and the (B, L) bool mask of real tokens."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or 0 in input_ids.shape:
        got = tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor, got {got} (use ids[None] for one)")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dtype not in (torch.int32, torch.int64):
        input_ids = input_ids.long()  # the embedding takes int32/int64; smaller ints convert losslessly
    if attention_mask is None:
        real = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if not torch.is_tensor(attention_mask) or tuple(attention_mask.shape) != tuple(input_ids.shape):
            got = tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {got}")
        require_binary_mask(attention_mask)
        real = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        if not bool(real.any(dim=1).all()):
            raise ValueError("every row of attention_mask needs at least one real token (a 1)")
    vocab, tokens = model.config.vocab_size, input_ids[real]  # padding slots are never read
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab}), got values in [{low}, {high}]: check the tokenizer")
    capacity = model.config.max_length
    longest = int(real.sum(dim=1).max()) + max_new_tokens
    if capacity is not None and longest > capacity:
        raise ValueError(
            f"the longest prompt plus max_new_tokens is {longest} tokens, but the positional embedding covers "
            f"{capacity}: shorten the prompt or max_new_tokens, or use a model with a longer max_length"
        )
    return input_ids, real


# ---------------------------------------------------------------------------------------- hashing


def padded_length(model: ReformerLM, length: int) -> int:
    """The length the model's layers run on for ``length`` tokens (the forward pads to chunk multiples)."""
    return model.reformer.padded_length(length)


def _lsh_layers(model: ReformerLM) -> list[LSHSelfAttention]:
    return [module for module in model.modules() if isinstance(module, LSHSelfAttention)]


@contextlib.contextmanager
def fixed_hashing(model: ReformerLM, max_length: int, generator: torch.Generator | None = None) -> Iterator[None]:
    """Fix every LSH layer's bucket count and rotations while generating.

    The bucket count is the configured one, or (``num_buckets=None``) the automatic choice for
    the padded ``max_length`` (``generate`` passes the model's position capacity, so the count
    does not depend on how many tokens are asked for or which prompts share the batch). Rotations come from the layer's ``hash_seed`` when it has one (the
    numbers every forward pass would draw), else from ``generator`` (the global RNG when None).
    The setting holds in the calling thread only (``hashing_fixed_in_this_thread``): the layers
    are not modified, so other threads using the same model are unaffected.
    """
    weight = next(model.parameters())
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    settings = fixed_hashing_settings(_lsh_layers(model), padded_length(model, max_length), device=weight.device,
                                      dtype=dtype, generator=generator)
    with hashing_fixed_in_this_thread(settings):
        yield


# ---------------------------------------------------------------------------------------- cached steps


class DecodeCache:
    """One attention cache per layer (room for ``max_length`` positions) and the next position."""

    def __init__(self, model: ReformerLM, batch_size: int, max_length: int):
        weight = next(model.parameters())
        self.layers = [
            layer.attention.self_attention.init_cache(batch_size, max_length, device=weight.device, dtype=weight.dtype)
            for layer in model.reformer.layers
        ]
        self.position = 0  # positions stored so far = position of the next token

    def reorder(self, rows: Tensor) -> None:
        """Keep, duplicate or permute batch rows: row i becomes old row ``rows[i]`` (beam search)."""
        for layer_cache in self.layers:
            layer_cache.reorder(rows)


def _through_layers(model: ReformerLM, input_ids: Tensor, cache: DecodeCache, attend: str) -> Tensor:
    """Embed ``input_ids`` (N, t) at the cache's next positions and run every layer, its attention
    through ``attend`` ("prefill" or "decode_step"); logits of the token after them (N, V)."""
    rows, count = input_ids.shape
    positions = torch.arange(cache.position, cache.position + count, device=input_ids.device).expand(rows, count)
    x1 = x2 = model.reformer.embeddings(input_ids, positions)  # (N, t, H)
    padded = padded_length(model, cache.position + count)
    for layer, layer_cache in zip(model.reformer.layers, cache.layers):
        block = layer.attention
        attention_step = getattr(block.self_attention, attend)
        x1 = x1 + block.dropout(attention_step(block.layer_norm(x2), layer_cache, padded_length=padded))
        x2 = x2 + layer.feed_forward(x1)
    cache.position += count
    hidden = model.reformer.layer_norm(torch.cat([x1[:, -1], x2[:, -1]], dim=-1))  # (N, 2H)
    return model.lm_head(hidden)


def prefill(model: ReformerLM, input_ids: Tensor, cache: DecodeCache) -> Tensor:
    """Run the prompt (N, n) through the model into an empty ``cache``; logits of the next token (N, V)."""
    return _through_layers(model, input_ids, cache, "prefill")


def decode_step(model: ReformerLM, tokens: Tensor, cache: DecodeCache) -> Tensor:
    """Append ``tokens`` (N,) at ``cache.position``; logits of the token after them (N, V)."""
    return _through_layers(model, tokens[:, None], cache, "decode_step")


class CachedSteps:
    """Next-token logits from per-layer caches: one prefill, then one position per step."""

    def __init__(self, model: ReformerLM, max_length: int):
        self.model, self.max_length, self.cache = model, max_length, None

    def start(self, prompt: Tensor) -> Tensor:
        self.cache = DecodeCache(self.model, prompt.shape[0], self.max_length)
        return prefill(self.model, prompt, self.cache)

    def advance(self, tokens: Tensor) -> Tensor:
        return decode_step(self.model, tokens, self.cache)

    def reorder(self, rows: Tensor) -> None:
        self.cache.reorder(rows)


class UncachedSteps:
    """Next-token logits from a full forward pass over the whole sequence at every step."""

    def __init__(self, model: ReformerLM):
        self.model, self.tokens = model, None

    def start(self, prompt: Tensor) -> Tensor:
        self.tokens = prompt
        return self._last_logits()

    def advance(self, tokens: Tensor) -> Tensor:
        self.tokens = torch.cat([self.tokens, tokens[:, None]], dim=1)  # (N, t + 1)
        return self._last_logits()

    def reorder(self, rows: Tensor) -> None:
        self.tokens = self.tokens.index_select(0, rows)

    def _last_logits(self) -> Tensor:
        hidden = self.model.reformer(self.tokens).last_hidden_state  # (N, t, 2H)
        return self.model.lm_head(hidden[:, -1])  # (N, V)


# ---------------------------------------------------------------------------------------- entry point


def _place_continuations(input_ids: Tensor, real: Tensor, new_tokens: Tensor) -> Tensor:
    """(B, L + T): each row's input with its new tokens inserted right after its last real token.

    Left padding stays in front; trailing (right) padding moves behind the continuation.
    """
    width, new = input_ids.shape[1], new_tokens.shape[1]
    last_real = width - 1 - real.flip(1).int().argmax(dim=1, keepdim=True)  # (B, 1)
    slots = torch.arange(width + new, device=input_ids.device)[None]  # (1, L + T)
    from_new = (slots > last_real) & (slots <= last_real + new)
    input_slot = torch.where(slots > last_real + new, slots - new, slots).clamp(max=width - 1)
    new_slot = (slots - last_real - 1).clamp(0, new - 1)
    return torch.where(from_new, new_tokens.gather(1, new_slot), input_ids.gather(1, input_slot.expand_as(from_new)))


def _decode_group(model, prompt, max_new_tokens, options, use_cache, generator) -> Tensor:
    """Continuations (G, T) of G unpadded prompts of one length."""
    total = prompt.shape[1] + max_new_tokens
    steps = CachedSteps(model, total) if use_cache else UncachedSteps(model)
    if options.num_beams > 1:
        return beam_search(steps, prompt, max_new_tokens, options)
    return sample_tokens(steps, prompt, max_new_tokens, options, generator)


def generate(
    model: ReformerLM,
    input_ids: Tensor,
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
    attention_mask: Tensor | None = None,
    use_cache: bool = True,
    length_penalty: float = 1.0,
    max_length: int | None = None,
) -> Tensor:
    """Continue each prompt of ``input_ids`` (B, L) by ``max_new_tokens`` tokens; returns (B, L + T).
    ``max_length`` (L + T, as in transformers) may be given instead of ``max_new_tokens``.

    Greedy decoding by default; ``do_sample=True`` samples after ``temperature``, ``top_k`` and
    ``top_p`` (nucleus) filtering; ``num_beams > 1`` runs beam search (scores divided by the
    generated length ** ``length_penalty``). ``repetition_penalty`` > 1 discourages tokens already
    in the sequence. A row that emits one of ``eos_token_id`` stops and is filled with
    ``pad_token_id`` (default: the config's, else the eos id); ``eos_token_id=None`` never stops
    early. ``attention_mask`` (B, L) marks real tokens (1) and padding (0), left or right: each
    row is computed exactly as its real tokens would be alone, so greedy decoding and beam search
    continue it as they would alone, and the new tokens follow its last real token. Rows are
    decoded in groups of equal real length, so a batch of k different lengths costs about k
    batches (see the module docstring). Sampling
    draws every row from one generator, so a sampled row also depends on the rows decoded with it
    (the same ``seed`` and batch give the same tokens). ``seed`` makes sampling (and LSH rotations without ``hash_seed``) reproducible
    through a private generator; the global RNG is never used for sampling. ``use_cache=False``
    recomputes the whole sequence at every step: much slower, the same tokens unless an LSH layer
    feeds a later layer (see the module docstring). LSH layers with ``num_buckets=None`` hash with
    the bucket count chosen for the model's ``max_length`` for the whole call, while a forward pass
    chooses it for its own length: set ``num_buckets`` for decoding that equals re-running the model.
    The model runs in eval mode under ``torch.no_grad``; each module's training flag is restored.
    Sampling settings (temperature, top-k, top-p) without ``do_sample=True`` warn and are ignored.
    """
    if not isinstance(model, ReformerLM):
        raise TypeError(f"generate needs a ReformerLM (a causal model), got {type(model).__name__}")
    options = _decoding_options(
        model, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams,
        repetition_penalty=repetition_penalty, length_penalty=length_penalty, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    if not isinstance(use_cache, bool) or (seed is not None and not _is_int(seed)):
        raise TypeError(f"use_cache must be a bool and seed an int or None, got {use_cache!r} and {seed!r}")
    max_new_tokens = _new_token_count(input_ids, max_new_tokens, max_length)
    input_ids, real = _check_prompt(model, input_ids, attention_mask, max_new_tokens)
    if max_new_tokens == 0:
        return input_ids.clone()
    generator = torch.Generator(device=input_ids.device)
    if seed is None:
        generator.seed()  # fresh entropy, without touching the global RNG
    else:
        generator.manual_seed(seed)
    with _evaluating(model):
        new_tokens = _decode_by_length(model, input_ids, real, max_new_tokens, options, use_cache, generator, seed)
    return _place_continuations(input_ids, real, new_tokens)


@contextlib.contextmanager
def _evaluating(model: ReformerLM) -> Iterator[None]:
    """Eval mode and no autograd inside; every module's training flag as it was afterwards."""
    training_flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in training_flags:
            module.training = training


def _decode_by_length(model, input_ids, real, max_new_tokens, options, use_cache, generator, seed) -> Tensor:
    """New tokens (B, T) for every row, decoding the rows of each real length together, unpadded."""
    lengths = real.sum(dim=1)  # (B,)
    new_tokens = input_ids.new_empty((input_ids.shape[0], max_new_tokens))
    # The automatic LSH bucket count is chosen for the model's whole position range (for the longest
    # row when the model has no position limit): see fixed_hashing.
    hashing_length = model.config.max_length or int(lengths.max()) + max_new_tokens
    with fixed_hashing(model, hashing_length, None if seed is None else generator):
        for length in lengths.unique().tolist():
            rows = (lengths == length).nonzero().squeeze(1)  # (G,)
            prompt = input_ids[rows][real[rows]].view(len(rows), length)  # real tokens, in order
            new_tokens[rows] = _decode_group(model, prompt, max_new_tokens, options, use_cache, generator)
    return new_tokens
