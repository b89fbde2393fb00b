"""Generation: processors against hand-computed values, decoding loops against plain references,
cached decoding against the full forward pass, batching with padding, seeds, errors."""

import itertools
import math
import threading

import pytest
import torch

from torch_reformer.attention.hashing import auto_num_buckets
from torch_reformer.config import ReformerConfig
from torch_reformer.generation import (
    CachedSteps,
    DecodingOptions,
    UncachedSteps,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    beam_search,
    fixed_hashing,
    generate,
    sample_pick,
)
from torch_reformer.model import ReformerLM

NEG_INF = float("-inf")


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # The models here are tiny: one thread is faster than two contending ones on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_lm(seed: int = 0, **overrides) -> ReformerLM:
    """A tiny causal model whose next token depends strongly on the prompt (large init)."""
    settings = dict(is_decoder=True, initializer_range=1.0, axial_norm_std=0.3)
    settings.update(overrides)
    torch.manual_seed(seed)
    return ReformerLM(ReformerConfig.from_preset("tiny", **settings)).eval()


def random_ids(model: ReformerLM, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)


@torch.no_grad()
def reference_greedy(model: ReformerLM, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding from the definition: full logits of the whole sequence, argmax of the last row."""
    for _ in range(max_new_tokens):
        next_token = model(ids).logits[:, -1].argmax(dim=-1)
        ids = torch.cat([ids, next_token[:, None]], dim=1)
    return ids


# ---------------------------------------------------------------------------------------- processors


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0], [2.0, -1.0, 0.5, -3.0]])
    history = torch.tensor([[0, 1, 1], [3, 3, 3]])
    expected = torch.tensor([[1.0, -2.0, 0.5, -3.0], [2.0, -1.0, 0.5, -6.0]])
    assert torch.equal(apply_repetition_penalty(logits, history, 2.0), expected)
    assert torch.equal(apply_repetition_penalty(logits, history, 1.0), logits)


def test_temperature_and_top_k():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.equal(apply_temperature(logits, 0.5), torch.tensor([[2.0, 6.0, 4.0, 0.0]]))
    assert torch.equal(apply_top_k(logits, 2), torch.tensor([[NEG_INF, 3.0, 2.0, NEG_INF]]))
    assert torch.equal(apply_top_k(logits, 4), logits)


def test_sampling_at_a_tiny_temperature_picks_the_largest_logit():
    """logits / 1e-45 would overflow to +inf; the warp shifts each row by its maximum first, so the
    sampling distribution is the softmax's limit (the largest logits) instead of NaN."""
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.5, 0.5, 0.0, -2.0]])
    generator = torch.Generator().manual_seed(0)
    options = DecodingOptions(do_sample=True, temperature=1e-45)
    picks = [sample_pick(options.warp(logits), generator).tolist() for _ in range(20)]
    assert all(row[0] == 1 for row in picks)
    assert {row[1] for row in picks} == {0, 1}  # tied maxima share the probability


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    kept = {top_p: torch.isfinite(apply_top_p(logits, top_p))[0].tolist() for top_p in (0.4, 0.79, 0.81, 0.97, 1.0)}
    assert kept[0.4] == [False, True, False, False]
    assert kept[0.79] == [False, True, False, True]
    assert kept[0.81] == [True, True, False, True]
    assert kept[0.97] == [True, True, True, True]
    assert kept[1.0] == [True, True, True, True]
    # Kept logits are unchanged.
    assert torch.equal(apply_top_p(logits, 0.81)[0, [0, 1, 3]], logits[0, [0, 1, 3]])


def test_sample_pick_follows_the_distribution_and_the_generator():
    logits = torch.tensor([[NEG_INF, 0.0, NEG_INF], [0.0, NEG_INF, NEG_INF]])
    assert sample_pick(logits, torch.Generator().manual_seed(0)).tolist() == [1, 0]
    flat = torch.zeros(1, 50)
    draws = [sample_pick(flat, torch.Generator().manual_seed(seed)).item() for seed in (3, 3, 4)]
    assert draws[0] == draws[1]
    one_to_three = torch.tensor([[0.0, math.log(3.0)]]).expand(4000, 2)
    share_of_second = sample_pick(one_to_three, torch.Generator().manual_seed(0)).float().mean().item()
    assert abs(share_of_second - 0.75) < 0.03


# ---------------------------------------------------------------------------------------- decoding loops


def test_uncached_greedy_equals_the_definition():
    model = tiny_lm()
    ids = random_ids(model, 2, 11)
    expected = reference_greedy(model, ids, 12)
    assert torch.equal(generate(model, ids, 12, use_cache=False), expected)


def test_top_k_one_sampling_equals_greedy():
    model = tiny_lm()
    ids = random_ids(model, 2, 9)
    greedy = generate(model, ids, 10, use_cache=False)
    sampled = generate(model, ids, 10, do_sample=True, top_k=1, temperature=0.7, seed=5, use_cache=False)
    assert torch.equal(sampled, greedy)


def test_sampling_is_reproducible_by_seed_and_leaves_the_global_rng_alone():
    model = tiny_lm()
    ids = random_ids(model, 2, 9)
    rng_before = torch.get_rng_state()
    first = generate(model, ids, 16, do_sample=True, temperature=2.0, seed=11, use_cache=False)
    again = generate(model, ids, 16, do_sample=True, temperature=2.0, seed=11, use_cache=False)
    other = generate(model, ids, 16, do_sample=True, temperature=2.0, seed=12, use_cache=False)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(first[:, :9], ids)


def _sequence_log_prob(model, prompt: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        log_probs = model(ids).logits[0].log_softmax(dim=-1)
    start = len(prompt) - 1
    return sum(log_probs[start + i, token].item() for i, token in enumerate(continuation))


def _brute_force_best(model, prompt, vocab, eos, max_new_tokens, length_penalty):
    """Score every possible continuation: ending at eos, or reaching max_new_tokens without it."""
    best = None
    for length in range(1, max_new_tokens + 1):
        for tokens in itertools.product(range(vocab), repeat=length):
            if eos in tokens[:-1] or (length < max_new_tokens and tokens[-1] != eos):
                continue
            score = _sequence_log_prob(model, prompt, list(tokens)) / length**length_penalty
            if best is None or score > best[0]:
                best = (score, list(tokens))
    return best[1] + [0] * (max_new_tokens - len(best[1]))


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_exhaustive_beam_search_equals_brute_force(length_penalty):
    vocab, eos, max_new_tokens = 3, 2, 3
    model = tiny_lm(seed=3, vocab_size=vocab, eos_token_id=eos)
    prompts = torch.tensor([[0, 1, 1, 0, 2], [1, 1, 0, 2, 0]])
    expected = [_brute_force_best(model, row, vocab, eos, max_new_tokens, length_penalty) for row in prompts.tolist()]
    options = DecodingOptions(num_beams=vocab**max_new_tokens, eos_token_ids=(eos,), pad_token_id=0,
                              length_penalty=length_penalty)
    with torch.no_grad():
        found = beam_search(UncachedSteps(model), prompts, max_new_tokens, options)
    assert found.tolist() == expected


@pytest.mark.parametrize("eos_token_id", [None, "from-greedy"])
def test_beam_search_with_one_beam_equals_greedy(eos_token_id):
    model = tiny_lm()
    ids = random_ids(model, 2, 7)
    greedy = generate(model, ids, 10, use_cache=False)
    eos = () if eos_token_id is None else (greedy[0, 7 + 3].item(),)
    options = DecodingOptions(num_beams=1, eos_token_ids=eos, pad_token_id=0, length_penalty=0.0)
    with torch.no_grad():
        found = beam_search(UncachedSteps(model), ids, 10, options)
    expected = generate(model, ids, 10, eos_token_id=eos[0] if eos else None, pad_token_id=0, use_cache=False)
    assert torch.equal(found, expected[:, 7:])


def test_eos_stops_a_row_which_then_emits_padding():
    model = tiny_lm()
    ids = random_ids(model, 2, 8, seed=4)
    free = generate(model, ids, 10, use_cache=False)
    eos = free[0, 8 + 2].item()
    assert eos not in free[1, 8:].tolist(), "pick prompts whose second row never emits the eos token"
    stopped = generate(model, ids, 10, eos_token_id=eos, pad_token_id=63, use_cache=False)
    first_eos = free[0, 8:].tolist().index(eos)
    assert torch.equal(stopped[0, : 9 + first_eos], free[0, : 9 + first_eos])
    assert stopped[0, 9 + first_eos :].tolist() == [63] * (9 - first_eos)
    assert torch.equal(stopped[1], free[1])


# ---------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("use_cache", [False, True], ids=["uncached", "cached"])
def test_padded_batches_continue_each_prompt_as_alone(use_cache):
    if use_cache:
        _require_cached_decoding()
    model = tiny_lm()
    prompts = [random_ids(model, 1, length, seed=length)[0] for length in (5, 13, 9)]
    alone = [generate(model, prompt[None], 6, use_cache=use_cache)[0, len(prompt):] for prompt in prompts]
    width, pad = 13, -1  # padding slots are never read: any value is accepted and kept
    left = torch.stack([torch.cat([torch.full((width - len(p),), pad), p]) for p in prompts])
    right = torch.stack([torch.cat([p, torch.full((width - len(p),), pad)]) for p in prompts])
    mask_left = torch.stack([torch.arange(width) >= width - len(p) for p in prompts]).long()
    mask_right = torch.stack([torch.arange(width) < len(p) for p in prompts]).long()
    out_left = generate(model, left, 6, attention_mask=mask_left, use_cache=use_cache)
    out_right = generate(model, right, 6, attention_mask=mask_right, use_cache=use_cache)
    for row, prompt in enumerate(prompts):
        assert torch.equal(out_left[row], torch.cat([left[row], alone[row]]))
        padding = torch.full((width - len(prompt),), pad)
        assert torch.equal(out_right[row], torch.cat([prompt, alone[row], padding]))


# ---------------------------------------------------------------------------------------- cached decoding


def _require_cached_decoding():
    from torch_reformer.attention.full import FullSelfAttention
    from torch_reformer.attention.local import LocalSelfAttention
    from torch_reformer.attention.lsh import LSHSelfAttention

    if not all(hasattr(layer, "decode_step") for layer in (FullSelfAttention, LocalSelfAttention, LSHSelfAttention)):
        pytest.skip("the attention layers have no incremental decoding yet")


# Exact equality with the full forward needs the states of past positions to stay what they were
# when those positions were decoded. Local and full attention guarantee it; an LSH layer does not
# (a new token changes the bucket-sorted chunks of earlier ones), so only the last attention layer
# may be LSH, unless the whole sequence fits in one LSH chunk (no hashing).
EXACT_CACHE_CONFIGS = {
    "lsh-1-hash-last": dict(attn_layers=("local", "lsh"), num_hashes=1, lsh_attn_chunk_length=4,
                            local_attn_chunk_length=4),
    "lsh-only-2-hashes-random-rotations": dict(attn_layers=("lsh",), num_hashes=2, lsh_attn_chunk_length=4,
                                               hash_seed=None, num_buckets=None),
    "lsh-4-hashes-factorised": dict(attn_layers=("full", "lsh"), num_hashes=4, lsh_attn_chunk_length=4,
                                    num_buckets=(2, 4)),
    "mixed-unequal-chunks": dict(attn_layers=("local", "full", "lsh"), local_attn_chunk_length=8,
                                 lsh_attn_chunk_length=4, num_hashes=3),
    "lsh-stack-within-one-chunk": dict(attn_layers=("lsh", "local", "lsh"), lsh_attn_chunk_length=64,
                                       local_attn_chunk_length=64),
    "local": dict(attn_layers=("local", "local"), local_attn_chunk_length=4),
    "full": dict(attn_layers=("full", "full")),
}


@torch.no_grad()
def stepwise_logits(steps, tokens: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Teacher-forced next-token logits (B, T + 1, V) after the prompt and after each later token."""
    logits = [steps.start(tokens[:, :prompt_length])]
    for position in range(prompt_length, tokens.shape[1]):
        logits.append(steps.advance(tokens[:, position]))
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("overrides", EXACT_CACHE_CONFIGS.values(), ids=EXACT_CACHE_CONFIGS.keys())
def test_cached_decoding_equals_the_full_forward(overrides):
    _require_cached_decoding()
    model = tiny_lm(**overrides)
    # A prompt shorter than a chunk: decoding crosses from the exact path to hashing and padding.
    tokens = random_ids(model, 2, 33)
    ids = tokens[:, :3]
    assert torch.equal(generate(model, ids, 30, seed=7), generate(model, ids, 30, seed=7, use_cache=False))
    model.double()  # logits compared in fp64, where rounding cannot hide a wrong window or position
    with fixed_hashing(model, 33, torch.Generator().manual_seed(7)):
        cached = stepwise_logits(CachedSteps(model, 33), tokens, 3)
        uncached = stepwise_logits(UncachedSteps(model), tokens, 3)
    torch.testing.assert_close(cached, uncached, rtol=1e-9, atol=1e-9)


def _model_padded_length(config: ReformerConfig, length: int) -> int:
    chunks = [config.lsh_attn_chunk_length if kind == "lsh" else config.local_attn_chunk_length
              for kind in config.attn_layers if kind != "full"]
    if not chunks or length <= min(chunks) or length % config.pad_multiple == 0:
        return length
    return -(-length // config.pad_multiple) * config.pad_multiple


def _attend_to_stored(block, stored: torch.Tensor, config: ReformerConfig) -> torch.Tensor:
    """The attention block's forward over the stored inputs (B, t, H), padded as the model pads."""
    length = stored.shape[1]
    padded = _model_padded_length(config, length)
    mask = (torch.arange(padded) < length).expand(stored.shape[0], padded)
    inputs = torch.nn.functional.pad(stored, (0, 0, 0, padded - length))
    return block.dropout(block.self_attention(inputs, mask))[:, :length]  # LSH: the generation's fixed hashing


@torch.no_grad()
def frozen_prefix_logits(model: ReformerLM, tokens: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Teacher-forced logits (B, T + 1, V) from the definition of incremental decoding: the prompt's
    states come from one forward over the prompt; every later position's states are computed once,
    when it is the newest token, by each layer attending from it over the stored inputs so far."""
    trunk, config = model.reformer, model.config
    stored = [None] * len(trunk.layers)  # per layer: attention inputs LayerNorm(x2) of every position
    logits, ends = [], range(prompt_length, tokens.shape[1] + 1)
    for start, end in zip([0, *ends], ends):
        new = tokens[:, start:end]
        x1 = x2 = trunk.embeddings(new, torch.arange(start, end).expand_as(new))
        for index, layer in enumerate(trunk.layers):
            normed = layer.attention.layer_norm(x2)
            stored[index] = normed if stored[index] is None else torch.cat([stored[index], normed], dim=1)
            x1 = x1 + _attend_to_stored(layer.attention, stored[index], config)[:, start:]
            x2 = x2 + layer.feed_forward(x1)
        logits.append(model.lm_head(trunk.layer_norm(torch.cat([x1[:, -1], x2[:, -1]], dim=-1))))
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("attn_layers", [("lsh", "lsh"), ("lsh", "local", "lsh")])
def test_cached_lsh_stacks_follow_the_definition_of_incremental_decoding(attn_layers):
    _require_cached_decoding()
    model = tiny_lm(attn_layers=attn_layers, lsh_attn_chunk_length=4, local_attn_chunk_length=8, num_hashes=2)
    model.double()
    tokens = random_ids(model, 2, 30)
    with fixed_hashing(model, 30):
        cached = stepwise_logits(CachedSteps(model, 30), tokens, 6)
        expected = frozen_prefix_logits(model, tokens, 6)
    torch.testing.assert_close(cached, expected, rtol=1e-9, atol=1e-9)


def test_cached_beam_search_and_sampling_equal_uncached():
    _require_cached_decoding()
    model = tiny_lm(attn_layers=("local", "lsh"), lsh_attn_chunk_length=4, local_attn_chunk_length=4)
    ids = random_ids(model, 2, 6)
    for settings in (dict(num_beams=3, eos_token_id=5), dict(do_sample=True, top_p=0.9, seed=3)):
        assert torch.equal(generate(model, ids, 12, **settings), generate(model, ids, 12, use_cache=False, **settings))


# ---------------------------------------------------------------------------------------- hashing


def test_fixed_hashing_holds_in_the_calling_thread_and_leaves_the_layers_alone():
    model = tiny_lm(attn_layers=("lsh",), hash_seed=None, num_buckets=None, lsh_attn_chunk_length=4)
    layer = model.reformer.layers[0].attention.self_attention
    seen_elsewhere = []

    def other_thread():
        seen_elsewhere.append((layer.bucket_spec(8), layer._rotations(None)))

    with fixed_hashing(model, 40, torch.Generator().manual_seed(0)):
        # Chosen once from the longest length (40 tokens, 10 chunks: 16 buckets as 4 x 4), for every length.
        assert layer.bucket_spec(8) == auto_num_buckets(40, 4) == [4, 4]
        first = layer._rotations(None).clone()
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    with fixed_hashing(model, 40, torch.Generator().manual_seed(0)):
        assert torch.equal(layer._rotations(None), first)
    assert seen_elsewhere == [(auto_num_buckets(8, 4), None)]  # another thread hashes as without generation
    assert layer.num_buckets is None and layer.fixed_rotations is None and layer._rotations(None) is None
    assert first.shape == (2, 16, 2, 4)  # (heads, head size, hashes, 4/2 + 4/2)


def test_generation_restores_the_training_flag():
    model = tiny_lm().train()
    generate(model, random_ids(model, 1, 4), 2, use_cache=False)
    assert model.training
    model.eval()
    model.reformer.layers[0].train()  # a mix of modes comes back as it was, module by module
    before = [module.training for module in model.modules()]
    generate(model, random_ids(model, 1, 4), 2)
    assert [module.training for module in model.modules()] == before


@pytest.mark.parametrize("hash_seed", [42, None])
def test_automatic_bucket_counts_do_not_depend_on_the_request(hash_seed):
    """With num_buckets=None the count is chosen for the model's max_length, not for the tokens asked
    for or the rows decoded alongside: a shorter request is a prefix of a longer one, and a row
    decodes as it does alone."""
    model = tiny_lm(num_buckets=None, hash_seed=hash_seed, lsh_attn_chunk_length=4, local_attn_chunk_length=4)
    prompt = random_ids(model, 1, 12, seed=3)
    longer = generate(model, prompt, 100, seed=0)  # 112 tokens: 28 chunks of 4
    assert torch.equal(generate(model, prompt, 20, seed=0), longer[:, :32])
    other = random_ids(model, 1, 60, seed=4)
    batch = torch.cat([torch.cat([prompt, torch.zeros(1, 48, dtype=torch.long)], dim=1), other])
    mask = torch.cat([torch.cat([torch.ones(1, 12), torch.zeros(1, 48)], dim=1), torch.ones(1, 60)])
    together = generate(model, batch, 20, attention_mask=mask, seed=0)
    assert torch.equal(together[0, :32], longer[0, :32])


def test_sampling_settings_without_do_sample_warn_and_are_ignored():
    model = tiny_lm()
    prompt = random_ids(model, 1, 4)
    with pytest.warns(UserWarning, match=r"temperature=5\.0, top_k=3 only shape sampling.*greedy") as caught:
        ignored = model.generate(prompt, 5, temperature=5.0, top_k=3)
    assert caught[0].filename == __file__  # it points at the caller, not at the library
    assert torch.equal(ignored, generate(model, prompt, 5))


def test_a_temperature_below_float32_range_samples_the_largest_logit():
    logits = torch.tensor([[1.0, 3.0, 0.0]])
    warped = DecodingOptions(do_sample=True, temperature=1e-50).warp(logits)
    assert torch.equal(warped.softmax(dim=-1), torch.tensor([[0.0, 1.0, 0.0]]))
    model = tiny_lm()
    prompt = random_ids(model, 2, 4)
    assert torch.equal(generate(model, prompt, 6, do_sample=True, temperature=1e-300, seed=0), generate(model, prompt, 6))


def test_narrow_integer_prompts_decode_as_int64():
    model = tiny_lm()
    prompt = random_ids(model, 2, 4)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        assert torch.equal(generate(model, prompt.to(dtype), 3), generate(model, prompt, 3))


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=200), "positional embedding covers"),
        (dict(num_beams=2, do_sample=True), "beam search does not sample"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(eos_token_id=64), "eos_token_id"),
        (dict(input_ids=torch.tensor([[1, 64]])), "token ids must lie in"),
        (dict(input_ids=torch.tensor([[1, -1]])), "token ids must lie in"),
        (dict(input_ids=torch.tensor([1, 2])), "(batch, length)"),
        (dict(attention_mask=torch.ones(1, 3)), "attention_mask"),
        (dict(attention_mask=torch.tensor([[0, 0]])), "at least one real token"),
        (dict(attention_mask=torch.tensor([[1, 2]])), "attention_mask must hold 1/True"),
        (dict(input_ids=torch.zeros(0, 2, dtype=torch.long)), "non-empty (batch, length)"),
        (dict(max_new_tokens=None, max_length=1), "at least the prompt width 2"),
    ],
)
def test_bad_requests_raise_clear_errors(kwargs, message):
    model = tiny_lm()
    request = dict(input_ids=torch.tensor([[1, 2]]), max_new_tokens=3)
    request.update(kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        generate(model, **request)


def test_max_length_counts_the_prompt_as_in_transformers():
    model = tiny_lm()
    prompt = torch.tensor([[1, 2, 3]])
    by_length = generate(model, prompt, max_length=7, seed=0)
    assert torch.equal(by_length, generate(model, prompt, 4, seed=0)) and by_length.shape == (1, 7)
    assert torch.equal(model.generate(prompt, max_length=3), prompt)
    for both_or_neither in (dict(max_new_tokens=2, max_length=5), dict()):
        with pytest.raises(TypeError, match="one of the two"):
            generate(model, prompt, **both_or_neither)


def test_generate_takes_its_options_by_position_in_the_documented_order():
    model = tiny_lm()
    ids = random_ids(model, batch=1, length=6)
    # (input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, num_beams, repetition_penalty,
    #  eos_token_id, seed)
    by_position = model.generate(ids, 5, True, 0.7, 4, 0.9, 1, 1.3, None, 3)
    by_keyword = model.generate(ids, max_new_tokens=5, do_sample=True, temperature=0.7, top_k=4, top_p=0.9,
                                repetition_penalty=1.3, eos_token_id=None, seed=3)
    assert torch.equal(by_position, by_keyword)
    assert not torch.equal(by_position, model.generate(ids, 5, True, 0.7, 4, 0.9, 1, 1.3, None, 4))  # seed counts
