"""Incremental decoding: each cached step equals the last row of a forward pass over the prefix."""

import pytest
import torch

from torch_reformer.attention.full import FullSelfAttention
from torch_reformer.attention.local import LocalSelfAttention
from torch_reformer.attention.lsh import LSHSelfAttention

LAYERS = {
    "lsh-1-hash": lambda: LSHSelfAttention(16, 2, 8, num_hashes=1, num_buckets=4, chunk_length=4, causal=True),
    "lsh-2-hashes-chunk-8": lambda: LSHSelfAttention(16, 2, 8, num_hashes=2, num_buckets=8, chunk_length=8, causal=True),
    "lsh-4-hashes-factorised": lambda: LSHSelfAttention(16, 2, 8, num_hashes=4, num_buckets=[2, 4], chunk_length=4,
                                                        causal=True),
    "lsh-wide-window": lambda: LSHSelfAttention(16, 2, 8, num_hashes=3, num_buckets=4, chunk_length=4,
                                                num_chunks_before=2, num_chunks_after=1, causal=True),
    "lsh-window-past-the-chunk-count": lambda: LSHSelfAttention(16, 2, 8, num_hashes=2, num_buckets=4, chunk_length=4,
                                                                num_chunks_before=9, num_chunks_after=2, causal=True),
    "local": lambda: LocalSelfAttention(16, 2, 8, chunk_length=4, causal=True),
    "local-window-past-the-chunk-count": lambda: LocalSelfAttention(16, 2, 8, chunk_length=4, num_chunks_before=5,
                                                                    num_chunks_after=6, causal=True),
    "local-look-ahead-wraps": lambda: LocalSelfAttention(16, 2, 8, chunk_length=4, num_chunks_before=1,
                                                         num_chunks_after=1, causal=True),
    "full": lambda: FullSelfAttention(16, 2, 8, causal=True),
}


def forward_kwargs(layer, rotations):
    return dict(rotations=rotations) if isinstance(layer, LSHSelfAttention) else {}


def make(name, length):
    torch.manual_seed(0)
    layer = LAYERS[name]().eval()
    rotations = layer.draw_rotations(length) if isinstance(layer, LSHSelfAttention) else None
    return layer, rotations


@pytest.mark.parametrize("name", LAYERS)
def test_each_step_equals_the_forward_pass_over_its_prefix(name):
    total, prompt = 30, 3
    layer, rotations = make(name, total)
    hidden = torch.randn(2, total, 16)
    cache_kwargs = {} if rotations is None else dict(rotations=rotations)
    cache = layer.init_cache(2, total, **cache_kwargs)
    with torch.no_grad():
        prefilled = layer.prefill(hidden[:, :prompt], cache)
        assert (prefilled - layer(hidden[:, :prompt], **forward_kwargs(layer, rotations))).abs().max() <= 1e-5
        for t in range(prompt, total):  # crosses from one chunk (exact path) to several chunks
            step = layer.decode_step(hidden[:, t : t + 1], cache)
            expected = layer(hidden[:, : t + 1], **forward_kwargs(layer, rotations))[:, -1:]
            assert (step - expected).abs().max() <= 1e-5, t


@pytest.mark.parametrize("name", ["lsh-2-hashes-chunk-8", "local-look-ahead-wraps", "full"])
def test_steps_follow_a_model_padding_to_a_larger_multiple(name):
    # A model with chunk lengths 4 and 8 pads every prefix to a multiple of 8 (and 12 to 16, ...).
    total = 21
    layer, rotations = make(name, total)
    hidden = torch.randn(1, total, 16)
    cache = layer.init_cache(1, total, **({} if rotations is None else dict(rotations=rotations)))
    with torch.no_grad():
        layer.prefill(hidden[:, :5], cache, padded_length=8)
        for t in range(5, total):
            padded = -(-(t + 1) // 8) * 8
            step = layer.decode_step(hidden[:, t : t + 1], cache, padded_length=padded)
            inputs = torch.nn.functional.pad(hidden[:, : t + 1], (0, 0, 0, padded - t - 1))
            mask = torch.arange(padded)[None, :] <= t
            expected = layer(inputs, mask, **forward_kwargs(layer, rotations))[:, t : t + 1]
            assert (step - expected).abs().max() <= 1e-5, t


@pytest.mark.parametrize("name", ["lsh-4-hashes-factorised", "local", "full"])
def test_padded_prompts_and_reordered_rows(name):
    total = 20
    layer, rotations = make(name, total)
    hidden = torch.randn(2, total, 16)
    mask = torch.ones(2, total, dtype=torch.bool)
    mask[1, :2] = False  # a left-padded prompt
    cache = layer.init_cache(2, total, **({} if rotations is None else dict(rotations=rotations)))
    with torch.no_grad():
        layer.prefill(hidden[:, :6], cache, mask[:, :6])
        for t in range(6, 12):
            layer.decode_step(hidden[:, t : t + 1], cache)
        cache.reorder(torch.tensor([1, 1]))  # both rows now continue row 1
        for t in range(12, total):
            step = layer.decode_step(hidden[1:, t : t + 1].expand(2, 1, 16), cache)
            expected = layer(hidden[1:, : t + 1], mask[1:, : t + 1], **forward_kwargs(layer, rotations))[:, -1:]
            assert (step - expected).abs().max() <= 1e-5, t


@pytest.mark.parametrize("name", ["lsh-2-hashes-chunk-8", "local-look-ahead-wraps"])
def test_bfloat16_steps_attend_in_float32_like_the_forward_pass(name):
    total = 24
    layer, rotations = make(name, total)
    layer = layer.to(torch.bfloat16)
    hidden = (torch.randn(1, total, 16) * 8).to(torch.bfloat16)  # logits large enough for bfloat16 scores to err
    cache = layer.init_cache(1, total, **({} if rotations is None else dict(rotations=rotations)))
    with torch.no_grad():
        layer.prefill(hidden[:, :3], cache)
        for t in range(3, total):
            step = layer.decode_step(hidden[:, t : t + 1], cache)
            expected = layer(hidden[:, : t + 1], **forward_kwargs(layer, rotations))[:, -1:]
            assert step.dtype == torch.bfloat16
            tolerance = torch.finfo(torch.bfloat16).eps * expected.abs().max() / 2  # half an ulp of the largest
            assert (step.float() - expected.float()).abs().max() <= tolerance, t


def test_lsh_decoding_hashes_with_its_fixed_rotations_only():
    layer, _ = make("lsh-2-hashes-chunk-8", 16)
    layer.fixed_rotations = layer.draw_rotations(16)
    hidden = torch.randn(1, 16, 16)
    cache = layer.init_cache(1, 16)
    assert torch.equal(cache.rotations, layer.fixed_rotations)
    state = torch.get_rng_state()
    with torch.no_grad():
        layer.prefill(hidden[:, :4], cache)
        steps = [layer.decode_step(hidden[:, t : t + 1], cache) for t in range(4, 16)]
        assert torch.equal(torch.get_rng_state(), state)  # nothing re-drawn
        assert (steps[-1] - layer(hidden)[:, -1:]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["lsh-2-hashes-chunk-8", "local", "full"])
def test_a_cache_of_another_batch_size_is_refused(name):
    layer, _ = make(name, 16)
    cache = layer.init_cache(2, 16)
    with torch.no_grad():
        for inputs in (torch.randn(1, 5, 16), torch.randn(3, 5, 16)):
            with pytest.raises(ValueError, match="holds 2 batch rows but the inputs have"):
                layer.prefill(inputs, cache)
        layer.prefill(torch.randn(2, 5, 16), cache)
        with pytest.raises(ValueError, match=r"init_cache\(1, max_length\)"):
            layer.decode_step(torch.randn(1, 1, 16), cache)
    assert cache.length == 5


@pytest.mark.parametrize("name", ["lsh-1-hash", "local"])
def test_a_padded_length_that_is_no_chunk_multiple_is_refused(name):
    layer, _ = make(name, 16)  # chunk length 4
    cache = layer.init_cache(1, 16)
    with torch.no_grad():
        layer.prefill(torch.randn(1, 5, 16), cache, padded_length=8)
        with pytest.raises(ValueError, match="padded_length=10 is not a multiple of chunk_length=4"):
            layer.decode_step(torch.randn(1, 1, 16), cache, padded_length=10)
        assert cache.length == 5  # nothing was stored
        layer.decode_step(torch.randn(1, 1, 16), cache, padded_length=8)
        with pytest.raises(ValueError, match="shorter"):
            layer.decode_step(torch.randn(1, 1, 16), cache, padded_length=4)
        assert cache.length == 6


@pytest.mark.parametrize("name", ["lsh-2-hashes-chunk-8", "local", "full"])
def test_an_empty_batch_decodes(name):
    layer, _ = make(name, 16)
    cache = layer.init_cache(0, 16)
    with torch.no_grad():
        assert layer.prefill(torch.randn(0, 9, 16), cache).shape == (0, 9, 16)
        assert layer.decode_step(torch.randn(0, 1, 16), cache).shape == (0, 1, 16)


def test_local_cache_without_look_ahead_keeps_only_its_window():
    torch.manual_seed(0)
    layer = LocalSelfAttention(16, 2, 8, chunk_length=4, num_chunks_before=2, causal=True).eval()
    cache = layer.init_cache(2, 4000)
    assert cache.keys.shape == cache.values.shape == (2, 2, 12, 8) and cache.key_mask.shape == (2, 12)
    hidden = torch.randn(2, 41, 16)
    mask = torch.ones(2, 41, dtype=torch.bool)
    mask[1, :3] = False  # a left-padded prompt longer than the window
    with torch.no_grad():
        layer.prefill(hidden[:, :17], cache, mask[:, :17], padded_length=24)
        for t in range(17, 41):  # the ring wraps around several times; padding as a model with chunks 4 and 8
            padded = -(-(t + 1) // 8) * 8
            step = layer.decode_step(hidden[:, t : t + 1], cache, padded_length=padded)
            inputs = torch.nn.functional.pad(hidden[:, : t + 1], (0, 0, 0, padded - t - 1))
            expected = layer(inputs, torch.nn.functional.pad(mask[:, : t + 1], (0, padded - t - 1)))[:, t : t + 1]
            assert (step - expected).abs().max() <= 1e-5, t
    look_ahead = LocalSelfAttention(16, 2, 8, chunk_length=4, num_chunks_after=1, causal=True)
    assert look_ahead.init_cache(1, 50).keys.shape[2] == 50  # the last chunks see the first ones
    layer.num_chunks_before = 3  # a wider window than the cache keeps
    with pytest.raises(ValueError, match="keeps the latest 12 positions"):
        layer.decode_step(torch.randn(2, 1, 16), cache)
    assert cache.length == 41  # refused before anything was stored


def test_decoding_errors_are_clear():
    for layer in (LSHSelfAttention(8, 2, 4, num_buckets=4, chunk_length=4), LocalSelfAttention(8, 2, 4),
                  FullSelfAttention(8, 2, 4)):
        with pytest.raises(ValueError, match="causal"):
            layer.init_cache(1, 8)
    layer = LocalSelfAttention(8, 2, 4, chunk_length=4, causal=True)
    cache = layer.init_cache(1, 4)
    with pytest.raises(ValueError, match="one new position"):
        layer.decode_step(torch.randn(1, 2, 8), cache)
    layer.prefill(torch.randn(1, 4, 8), cache)
    with pytest.raises(ValueError, match="max_length"):
        layer.decode_step(torch.randn(1, 1, 8), cache)
    lsh = LSHSelfAttention(8, 2, 4, num_buckets=4, chunk_length=4, causal=True)
    cache = lsh.init_cache(1, 8)
    lsh.prefill(torch.randn(1, 5, 8), cache)
    with pytest.raises(ValueError, match="padded_length"):
        lsh.decode_step(torch.randn(1, 1, 8), cache, padded_length=4)


@pytest.mark.parametrize("name", ["lsh-2-hashes-chunk-8", "local"])
def test_decode_attention_ignores_autocast_as_the_forward_pass_does(name):
    from torch_reformer.attention.local import local_decode_attention
    from torch_reformer.attention.lsh import lsh_decode_attention

    layer, rotations = make(name, 20)
    cache = layer.init_cache(1, 20, **({} if rotations is None else dict(rotations=rotations)))
    with torch.no_grad():
        layer.prefill(torch.randn(1, 19, 16), cache)
        query = torch.randn(1, 2, 1, 8)
        cache.append(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.ones(1, 1, dtype=torch.bool),
                     None if cache.bucket_ids is None else torch.zeros(1, 2, 2, 1, dtype=torch.long))
        attend = lsh_decode_attention if rotations is not None else local_decode_attention
        settings = dict(padded_length=24, chunk_length=layer.chunk_length, num_chunks_before=1, num_chunks_after=0)
        plain = attend(query, cache, **settings)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(attend(query, cache, **settings), plain)
