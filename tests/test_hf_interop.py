"""Hugging Face interop: converted models compute what transformers computes, weights round-trip,
checkpoints convert both ways, and HF's defects (SPEC §8) are not reproduced.

Every model is a small randomly initialised transformers Reformer (hidden 32, 2 heads x 16,
chunks 4 (local) and 8 (LSH)), converted to ours; transformers is the reference.
"""

import fractions
import json
import re
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torch_reformer.interop import hf as interop  # noqa: E402
from torch_reformer.model import (  # noqa: E402
    ReformerForMaskedLM,
    ReformerForSequenceClassification,
    ReformerLM,
    ReformerModel,
    ReformerPreTrainedModel,
)
from torch_reformer.serialization import CheckpointError, load_safetensors, save_safetensors  # noqa: E402

VOCAB = 61
BASE = dict(
    hidden_size=32,
    num_attention_heads=2,
    attention_head_size=16,
    feed_forward_size=64,
    vocab_size=VOCAB,
    attn_layers=["local", "lsh"],
    axial_pos_shape=(4, 8),
    axial_pos_embds_dim=(16, 16),
    max_position_embeddings=32,
    local_attn_chunk_length=4,
    lsh_attn_chunk_length=8,
    num_buckets=4,
    num_hashes=1,
    hash_seed=3,  # fixes HF's rotations, so LSH layers can agree
    hidden_dropout_prob=0.0,
    local_attention_probs_dropout_prob=0.0,
    lsh_attention_probs_dropout_prob=0.0,
)
HF_CLASSES = {
    "model": "ReformerModel",
    "lm": "ReformerModelWithLMHead",
    "mlm": "ReformerForMaskedLM",
    "cls": "ReformerForSequenceClassification",
}
OUR_CLASSES = {
    "model": ReformerModel,
    "lm": ReformerLM,
    "mlm": ReformerForMaskedLM,
    "cls": ReformerForSequenceClassification,
}
# Eval logits agree to ~1e-7 except in causal models with several hash rounds: where a token sees
# only itself in every round, HF weighs the rounds by exp(lse - logsumexp(lse)) with lse ~ -1e5, and
# the fp32 rounding of that logsumexp leaves the weights summing to ~0.998 (we normalise exactly).
LOGITS_ATOL = 1e-4


def test_config_mapping_both_ways():
    hf_config = transformers.ReformerConfig(
        **{**BASE, "num_labels": 3, "problem_type": "multi_label_classification", "axial_pos_embds": False,
           "num_buckets": [2, 4], "is_decoder": True}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # HF's bookkeeping keys are known, not "unknown keys"
        config = interop.config_from_hf(hf_config)
    assert config.num_labels == 3 and config.problem_type == "multi_label_classification"
    assert config.position_embedding_type == "learned" and config.num_buckets == (2, 4) and config.is_decoder
    assert config.hash_seed == BASE["hash_seed"] and config.attn_layers == tuple(BASE["attn_layers"])
    back = transformers.ReformerConfig(**interop.hf_config_dict(config))
    assert back.to_dict() == hf_config.to_dict()


def hf_model(head: str, seed: int = 0, **overrides):
    config = transformers.ReformerConfig(**{**BASE, "is_decoder": head == "lm", **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, HF_CLASSES[head])(config)


def hf_output(model, ids, mask=None, labels=None):
    """Logits (or the trunk's hidden states) and the loss of a transformers model."""
    kwargs = dict(attention_mask=mask, labels=labels)
    if isinstance(model, transformers.ReformerModel):
        return model(ids, attention_mask=mask, use_cache=False).last_hidden_state, None
    if isinstance(model, transformers.ReformerModelWithLMHead):
        kwargs["use_cache"] = False
    out = model(ids, **kwargs)
    return out.logits, out.loss


def our_output(model, ids, mask=None, labels=None):
    if isinstance(model, ReformerModel):
        return model(ids, attention_mask=mask).last_hidden_state, None
    out = model(ids, attention_mask=mask, labels=labels)
    return out.logits, out.loss


def random_ids(batch, length, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def random_mask(batch, length, seed=2):
    mask = torch.rand(batch, length, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask[:, 0] = True  # the classifier reads position 0
    return mask.long()


EVAL_CASES = {
    "local-lm-padded": ("lm", dict(attn_layers=["local", "local"]), 27, False),
    "lsh-lm-2-hashes-mask-padded": ("lm", dict(attn_layers=["lsh", "lsh"], num_hashes=2), 29, True),
    "mixed-mlm-factorised-3-hashes-mask-chunked-head": (  # HF needs lm-head chunks that divide the length
        "mlm",
        dict(attn_layers=["local", "lsh", "local"], num_buckets=[2, 4], num_hashes=3, chunk_size_lm_head=8),
        32,
        True,
    ),
    "lsh-classifier-4-hashes-mask-padded": (
        "cls", dict(attn_layers=["lsh", "lsh"], num_hashes=4, num_labels=3), 21, True,
    ),
    "mixed-trunk-learned-positions-chunked-ff": (
        "model", dict(attn_layers=["lsh", "local"], axial_pos_embds=False, chunk_size_feed_forward=4), 30, False,
    ),
    "lsh-mlm-automatic-buckets": ("mlm", dict(attn_layers=["lsh"], num_buckets=None, num_hashes=2), 32, False),
    "mixed-lm-one-chunk": ("lm", dict(attn_layers=["lsh", "local"], num_hashes=2), 3, False),
    "local-mlm-laplace-activation": ("mlm", dict(attn_layers=["local"], hidden_act="laplace"), 16, False),
}


@pytest.mark.parametrize("case", EVAL_CASES, ids=list(EVAL_CASES))
def test_eval_outputs_match_transformers(case):
    head, overrides, length, masked = EVAL_CASES[case]
    reference = hf_model(head, **overrides).eval()
    model = interop.from_hf(reference)
    assert type(model) is OUR_CLASSES[head] and not model.training
    ids = random_ids(2, length)
    mask = random_mask(2, length) if masked else None
    with torch.no_grad():
        expected, _ = hf_output(reference, ids, mask)
        got, _ = our_output(model, ids, mask)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=LOGITS_ATOL, rtol=0)


def test_padding_whose_window_holds_no_real_token_is_where_outputs_may_differ():
    # A padded query whose local window is all padding: transformers' attention weights sum to the
    # window size there (interop module docstring); real positions must still match.
    reference = hf_model("mlm", attn_layers=["local", "lsh"]).eval()
    model = interop.from_hf(reference)
    ids = random_ids(2, 27)
    mask = torch.ones(2, 27, dtype=torch.long)
    mask[1, 20:] = 0
    with torch.no_grad():
        expected, _ = hf_output(reference, ids, mask)
        got, _ = our_output(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=LOGITS_ATOL, rtol=0)
    assert torch.isfinite(got).all()


TRAIN_CASES = {
    "lm-mixed-factorised-2-hashes-chunked-ff": (
        "lm", dict(num_buckets=[2, 2], num_hashes=2, chunk_size_feed_forward=8), False,
    ),
    "mlm-lsh-4-hashes-learned-positions-mask": (
        "mlm", dict(attn_layers=["lsh", "lsh"], num_hashes=4, axial_pos_embds=False), True,
    ),
    "classifier-local": ("cls", dict(attn_layers=["local", "local", "local"]), True),
}


@pytest.mark.parametrize("case", TRAIN_CASES, ids=list(TRAIN_CASES))
def test_training_loss_and_embedding_gradients_match_transformers(case):
    head, overrides, masked = TRAIN_CASES[case]
    reference = hf_model(head, **overrides).train()
    model = interop.from_hf(reference)
    assert model.training
    length = 32  # HF trains only on multiples of the chunk lcm, with axial shapes that multiply to the length
    ids = random_ids(2, length)
    mask = random_mask(2, length) if masked else None
    if head == "cls":
        labels = torch.tensor([1, 0])
    else:
        labels = ids.clone()
        labels[:, ::3] = -100
    _, expected_loss = hf_output(reference, ids, mask, labels)
    _, loss = our_output(model, ids, mask, labels)
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-6)
    expected_loss.backward()
    loss.backward()
    expected_grad = reference.reformer.embeddings.word_embeddings.weight.grad
    grad = model.reformer.embeddings.word_embeddings.weight.grad
    assert expected_grad.abs().max() > 0
    torch.testing.assert_close(grad, expected_grad, atol=1e-4 * float(expected_grad.abs().max()), rtol=0)


@pytest.mark.parametrize("head", list(HF_CLASSES))
def test_round_trip_gives_identical_state_dicts_and_outputs(head):
    reference = hf_model(head, attn_layers=["lsh", "local"], num_hashes=2, num_labels=3).eval()
    model = interop.from_hf(reference)
    back = interop.to_hf(model)
    assert type(back) is type(reference) and not back.training
    expected_state, state = reference.state_dict(), back.state_dict()
    assert list(state) == list(expected_state)
    assert all(torch.equal(state[name], tensor) for name, tensor in expected_state.items())
    ids = random_ids(2, 24)
    with torch.no_grad():
        assert torch.equal(hf_output(back, ids)[0], hf_output(reference, ids)[0])
    assert interop.from_hf(back).config == model.config
    with torch.no_grad():  # the converted model owns its tensors
        next(model.parameters()).add_(1.0)
    assert torch.equal(next(reference.parameters()), next(back.parameters()))


def test_label_names_survive_both_ways(tmp_path):
    names = {0: "negative", 1: "positive"}
    reference = hf_model("cls", attn_layers=["local"], id2label=names, label2id={"negative": 0, "positive": 1})
    model = ReformerForSequenceClassification.from_hf(reference)
    assert model.config.id2label == names and model.config.label2id == {"negative": 0, "positive": 1}
    back = model.to_hf()
    assert back.config.id2label == names and back.config.label2id == {"negative": 0, "positive": 1}
    reference.save_pretrained(tmp_path / "hf")
    interop.convert_checkpoint(tmp_path / "hf", tmp_path / "ours")
    assert ReformerForSequenceClassification.from_pretrained(tmp_path / "ours").config.id2label == names
    interop.convert_checkpoint(tmp_path / "ours", tmp_path / "back")
    loaded = transformers.ReformerForSequenceClassification.from_pretrained(tmp_path / "back")
    assert loaded.config.id2label == names and loaded.config.label2id == {"negative": 0, "positive": 1}
    plain = interop.to_hf(ReformerForSequenceClassification.from_hf(hf_model("cls", attn_layers=["local"])))
    assert plain.config.id2label == {0: "LABEL_0", 1: "LABEL_1"}  # HF's defaults stay HF's defaults


def test_from_hf_keeps_dtype_and_takes_the_trunk_of_a_head_model():
    reference = hf_model("mlm").double().eval()
    assert type(ReformerPreTrainedModel.from_hf(reference)) is ReformerForMaskedLM  # the base class picks the head
    trunk = ReformerModel.from_hf(reference)
    assert type(trunk) is ReformerModel and next(trunk.parameters()).dtype == torch.float64
    ids = random_ids(1, 16)
    with torch.no_grad():
        expected = reference.reformer(ids).last_hidden_state
        torch.testing.assert_close(trunk(ids).last_hidden_state, expected, atol=1e-12, rtol=0)


def test_lm_head_bias_is_applied_unlike_transformers():
    """HF 5.x keeps lm_head.bias but never adds it; ours adds it: logits differ by exactly the bias."""
    reference = hf_model("lm").eval()
    with torch.no_grad():
        reference.lm_head.bias.normal_(generator=torch.Generator().manual_seed(4))
    model = ReformerLM.from_hf(reference)
    torch.testing.assert_close(model.lm_head.bias, reference.lm_head.bias, atol=0, rtol=0)
    ids = random_ids(2, 16)
    with torch.no_grad():
        difference = our_output(model, ids)[0] - hf_output(reference, ids)[0]
    torch.testing.assert_close(difference, reference.lm_head.bias.expand_as(difference), atol=1e-5, rtol=0)
    assert torch.equal(interop.to_hf(model).lm_head.bias, reference.lm_head.bias)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_hash_seed_and_conversion_leave_the_global_rng_alone(training):
    reference = hf_model("lm", attn_layers=["lsh", "lsh"], num_hashes=2).train(training)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model = interop.from_hf(reference)
    ids = random_ids(2, 32)
    first, _ = our_output(model, ids)
    if training:
        first.sum().backward()
    second, _ = our_output(model, ids)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(first, second)  # the seed, not the global state, fixes the rotations


def test_eval_with_a_three_axis_axial_shape():
    """HF crashes in eval with a 3-D axial shape; its training mode (dropout 0) is the reference."""
    overrides = dict(attn_layers=["local", "local"], axial_pos_shape=(2, 4, 4), axial_pos_embds_dim=(8, 8, 16))
    reference = hf_model("lm", **overrides).train()
    model = interop.from_hf(reference).eval()
    ids = random_ids(2, 32)
    with torch.no_grad():
        expected, _ = hf_output(reference, ids)
        full, _ = our_output(model, ids)
        prefix, _ = our_output(model, ids[:, :13])  # shorter than the grid and not a chunk multiple
    torch.testing.assert_close(full, expected, atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(prefix, full[:, :13], atol=1e-5, rtol=0)  # causal and local: a prefix is a prefix


def test_position_ids_with_automatic_padding():
    """HF crashes when position_ids meet its automatic padding; the reference pads by hand."""
    reference = hf_model("mlm", attn_layers=["local", "lsh"], num_hashes=2).eval()
    model = interop.from_hf(reference)
    length, padded, offset = 13, 16, 7
    ids = random_ids(2, length)
    position_ids = torch.arange(offset, offset + length).expand(2, length)
    padded_ids = torch.nn.functional.pad(ids, (0, padded - length), value=0)
    padded_mask = (torch.arange(padded) < length).long().expand(2, padded)
    padded_positions = torch.arange(offset, offset + padded).expand(2, padded)
    with torch.no_grad():
        expected = reference(padded_ids, attention_mask=padded_mask, position_ids=padded_positions).logits
        got = model(ids, position_ids=position_ids).logits
    torch.testing.assert_close(got, expected[:, :length], atol=LOGITS_ATOL, rtol=0)


def test_convert_checkpoint_both_ways(tmp_path):
    reference = hf_model("lm", attn_layers=["lsh", "local"], num_hashes=2, chunk_size_lm_head=4).eval()
    reference.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()  # sharded: read through the index
    done = interop.convert_checkpoint(tmp_path / "hf", tmp_path / "ours")
    assert done == interop.Conversion("hf", "ReformerModelWithLMHead", "ReformerLM")
    model = ReformerLM.from_pretrained(tmp_path / "ours").eval()
    ids = random_ids(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(our_output(model, ids)[0], hf_output(reference, ids)[0], atol=LOGITS_ATOL, rtol=0)

    done = interop.convert_checkpoint(tmp_path / "ours", tmp_path / "back")
    assert done == interop.Conversion("torch_reformer", "ReformerLM", "ReformerModelWithLMHead")
    back = transformers.ReformerModelWithLMHead.from_pretrained(tmp_path / "back").eval()
    expected_state, state = reference.state_dict(), back.state_dict()
    assert set(state) == set(expected_state)
    assert all(torch.equal(state[name], tensor) for name, tensor in expected_state.items())
    for field in ("attn_layers", "num_hashes", "hash_seed", "chunk_size_lm_head", "is_decoder", "axial_pos_shape"):
        assert getattr(back.config, field) == getattr(reference.config, field), field


def test_a_manifest_is_checked_only_in_our_checkpoints(tmp_path):
    hf_model("model", attn_layers=["local"]).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "manifest.json").write_text(json.dumps({"files": ["a list of someone else's"]}))
    assert interop.convert_checkpoint(tmp_path / "hf", tmp_path / "ours").source_format == "hf"
    (tmp_path / "ours" / "manifest.json").write_text(json.dumps({"files": {}}))
    with pytest.raises(CheckpointError, match="corrupt manifest.json: it does not list config.json"):
        interop.convert_checkpoint(tmp_path / "ours", tmp_path / "back")


def test_convert_legacy_pytorch_bin_with_old_key_names(tmp_path):
    """Older transformers saved pickled weights, mask constants and a tied lm_head.decoder.bias."""
    reference = hf_model("mlm", attn_layers=["local", "lsh"]).eval()
    with torch.no_grad():
        reference.lm_head.bias.uniform_(-1, 1, generator=torch.Generator().manual_seed(5))
    folder = tmp_path / "legacy"
    folder.mkdir()
    state = dict(reference.state_dict())
    state["lm_head.decoder.bias"] = state["lm_head.bias"].clone()
    state["encoder.layers.1.attention.self_attention.self_mask_value_float32"] = torch.tensor(-1e5)
    state = {"reformer." + name if name.startswith("encoder.") else name: tensor for name, tensor in state.items()}
    torch.save(state, folder / "pytorch_model.bin")
    config = reference.config.to_dict()
    del config["architectures"]  # the class then comes from the tensor names
    (folder / "config.json").write_text(json.dumps(config))
    assert interop.convert_checkpoint(folder, tmp_path / "ours").target_architecture == "ReformerForMaskedLM"
    model = ReformerForMaskedLM.from_pretrained(tmp_path / "ours")
    assert torch.equal(model.lm_head.bias, reference.lm_head.bias)
    assert torch.equal(
        model.reformer.layers[1].attention.self_attention.output.weight,
        reference.reformer.encoder.layers[1].attention.output.dense.weight,
    )


def test_every_tensor_is_accounted_for(tmp_path):
    reference = hf_model("cls", attn_layers=["local"])
    reference.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_safetensors(weights)
    save_safetensors({**state, "classifier.extra.weight": torch.zeros(2)}, weights)
    with pytest.raises(CheckpointError, match=r"unexpected \['classifier.extra.weight'\]"):
        interop.convert_checkpoint(tmp_path / "hf", tmp_path / "ours")
    del state["reformer.encoder.layer_norm.bias"]
    save_safetensors(state, weights)
    with pytest.raises(CheckpointError, match=r"missing \['reformer.encoder.layer_norm.bias'\]"):
        interop.convert_checkpoint(tmp_path / "hf", tmp_path / "ours")
    trunk = ReformerModel(interop.config_from_hf(reference.config))
    shapes = {name: tensor.shape for name, tensor in trunk.state_dict().items()}
    bad = {interop.hf_parameter_name(name): torch.zeros(shape) for name, shape in shapes.items()}
    bad["embeddings.word_embeddings.weight"] = torch.zeros(3, 32)
    with pytest.raises(CheckpointError, match="embeddings.word_embeddings.weight has shape"):
        interop.hf_state_to_ours(bad, shapes)


def test_tensors_of_a_wrong_dtype_are_refused_both_ways():
    trunk = ReformerModel(interop.config_from_hf(hf_model("model").config))
    shapes = {name: tensor.shape for name, tensor in trunk.state_dict().items()}
    ours = {name: tensor.clone() for name, tensor in trunk.state_dict().items()}
    ours["embeddings.word_embeddings.weight"] = ours["embeddings.word_embeddings.weight"].long()
    with pytest.raises(CheckpointError, match="embeddings.word_embeddings.weight has dtype torch.int64"):
        interop.our_state_to_hf(ours, shapes)
    hf_state = {interop.hf_parameter_name(name): tensor for name, tensor in ours.items()}
    with pytest.raises(CheckpointError, match="embeddings.word_embeddings.weight has dtype torch.int64"):
        interop.hf_state_to_ours(hf_state, shapes)
    mixed = {name: tensor.to(torch.bfloat16 if "embeddings" in name else torch.float64) for name, tensor in
             trunk.state_dict().items()}  # floating dtypes, even mixed, are kept as they are
    assert interop.our_state_to_hf(mixed, shapes)["embeddings.word_embeddings.weight"].dtype == torch.bfloat16


def test_a_failed_write_removes_what_the_conversion_created(tmp_path, monkeypatch):
    reference = hf_model("lm", attn_layers=["local"])
    ReformerLM.from_hf(reference).save_pretrained(tmp_path / "ours")

    def disk_full(files):
        first = next(iter(files))
        open(first, "wb").close()  # something was written before the failure
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(interop, "atomic_write_files", disk_full)
    with pytest.raises(OSError, match="No space left"):
        interop.convert_checkpoint(tmp_path / "ours", tmp_path / "new" / "hf")
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()  # a folder the user had is kept, as it was
    with pytest.raises(OSError, match="No space left"):
        interop.convert_checkpoint(tmp_path / "ours", tmp_path / "empty")
    assert (tmp_path / "empty").is_dir() and not list((tmp_path / "empty").iterdir())


def test_malformed_sharded_indexes_and_pickles_are_refused(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    index = folder / "model.safetensors.index.json"
    for weight_map, message in [(["a"], "'weight_map' must be an object"), ({"x": 3}, "'weight_map' must be an object"),
                                ({}, "lists no weight files"), ({"x": "../other.safetensors"}, "outside its folder")]:
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CheckpointError, match=message):
            interop.load_hf_weights(folder)
    save_safetensors({"a": torch.zeros(2)}, folder / "one.safetensors")
    save_safetensors({"a": torch.ones(2)}, folder / "two.safetensors")
    index.write_text(json.dumps({"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}))
    with pytest.raises(CheckpointError, match="tensor a is in more than one of the shards"):
        interop.load_hf_weights(folder)
    index.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"garbage" * 100)
    with pytest.raises(CheckpointError, match=r"is damaged or is not a plain PyTorch state dict of tensors "
                                              r"\(Unsupported operand 103\)") as error:
        interop.load_hf_weights(folder)
    assert "weights_only" not in str(error.value)
    torch.save({"a": torch.zeros(2), "step": fractions.Fraction(1, 3)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="Unsupported global: GLOBAL fractions.Fraction") as error:
        interop.load_hf_weights(folder)
    assert "weights_only" not in str(error.value)


def test_bad_input_errors(tmp_path, monkeypatch):
    reference = hf_model("lm")
    with pytest.raises(TypeError, match="converts to ReformerLM"):
        ReformerForMaskedLM.from_hf(reference)
    with pytest.raises(TypeError, match="expected a transformers Reformer model"):
        interop.from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="'full'"):
        interop.to_hf(ReformerLM(interop.config_from_hf(reference.config.to_dict() | {"attn_layers": ["full"]})))
    with pytest.raises(ValueError, match="same folder"):
        interop.convert_checkpoint(tmp_path, tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        interop.convert_checkpoint(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="not a Reformer"):
        interop.convert_checkpoint(tmp_path / "bert", tmp_path / "out")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"torch-reformer\[hf\]"):
        interop.to_hf(ReformerLM(interop.config_from_hf(reference.config)))


def test_from_pretrained_on_a_transformers_folder_says_to_convert_it(tmp_path):
    reference = hf_model("lm")
    reference.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="holds a transformers checkpoint.*reformer convert"):
        ReformerLM.from_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["transformers_version"]  # still recognised by its weight names
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="holds a transformers checkpoint"):
        ReformerLM.from_pretrained(tmp_path / "hf")
    interop.convert_checkpoint(tmp_path / "hf", tmp_path / "ours")
    assert type(ReformerLM.from_pretrained(tmp_path / "ours")) is ReformerLM


def test_the_conversion_function_the_hint_names_is_importable(tmp_path):
    import importlib

    import torch_reformer.interop

    hf_model("lm").save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError) as error:
        ReformerLM.from_pretrained(tmp_path / "hf")
    module_name, _, function_name = re.search(r"torch_reformer\.interop\.\w+", str(error.value))[0].rpartition(".")
    assert getattr(importlib.import_module(module_name), function_name) is interop.convert_checkpoint
    for name in torch_reformer.interop.__all__:
        assert getattr(torch_reformer.interop, name) is getattr(interop, name)
