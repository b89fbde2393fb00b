"""Reformer models: memory modes agree, any length works, heads, save/load, bad input."""

import json
import warnings

import pytest
import torch
from torch import nn

from torch_reformer.config import ReformerConfig
from torch_reformer.model import (
    ReformerForMaskedLM,
    ReformerForSequenceClassification,
    ReformerLM,
    ReformerModel,
    ReformerPreTrainedModel,
)
from torch_reformer.outputs import ReformerModelOutput
from torch_reformer.serialization import CheckpointError


def tiny(**overrides) -> ReformerConfig:
    return ReformerConfig.from_preset("tiny", **overrides)


def _ids(config, batch=2, length=40, seed=1):
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def _grads_after_step(config, ids, dtype=torch.float64, rng_seed=5):
    torch.manual_seed(0)
    model = ReformerLM(config).to(dtype)
    torch.manual_seed(rng_seed)
    out = model(ids, labels=ids, return_logits=False)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # local + lsh, fixed hash seed
        dict(hash_seed=None, hidden_dropout_prob=0.1, local_attention_probs_dropout_prob=0.1,
             lsh_attention_probs_dropout_prob=0.1),  # every random draw replayed
        dict(attn_layers=("lsh", "full", "local"), chunk_size_feed_forward=8),
        dict(hidden_dropout_prob=0.1, chunk_size_feed_forward=6),  # chunks do not divide the length
    ],
    ids=["seeded", "dropout-and-random-rotations", "mixed-chunked-ff", "dropout-chunked-ff"],
)
def test_memory_modes_give_autograd_gradients_fp64(overrides):
    ids = _ids(tiny())
    results = {
        mode: _grads_after_step(tiny(is_decoder=True, memory_mode=mode, **overrides), ids)
        for mode in ("autograd", "reversible", "checkpoint")
    }
    ref_loss, ref_grads = results["autograd"]
    for mode in ("reversible", "checkpoint"):
        loss, grads = results[mode]
        assert torch.equal(loss, ref_loss)
        for name, grad in grads.items():
            scale = ref_grads[name].abs().max().clamp_min(1e-30)
            assert ((grad - ref_grads[name]).abs().max() / scale) < 1e-10, (mode, name)


@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
@pytest.mark.parametrize("kept", [0, 2, 3])
def test_kept_graph_layers_give_autograd_gradients_fp64(mode, kept):
    """Keeping the top layers' graphs (0 = rebuild every layer; 3 > the layers = plain autograd)
    changes no value, with dropout and random rotations drawn in both parts."""
    overrides = dict(attn_layers=("local", "lsh", "local"), hash_seed=None, hidden_dropout_prob=0.1,
                     lsh_attention_probs_dropout_prob=0.1, chunk_size_feed_forward=8)
    ids = _ids(tiny())
    ref_loss, ref_grads = _grads_after_step(tiny(is_decoder=True, memory_mode="autograd", **overrides), ids)
    loss, grads = _grads_after_step(tiny(is_decoder=True, memory_mode=mode, kept_graph_layers=kept, **overrides), ids)
    assert torch.equal(loss, ref_loss)
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().clamp_min(1e-30)
        assert ((grad - ref_grads[name]).abs().max() / scale) < 1e-10, name


def test_only_layers_below_the_kept_ones_are_re_run():
    config = tiny(is_decoder=True, attn_layers=("local", "local", "local"), kept_graph_layers=1)
    model = ReformerLM(config)
    calls = [0] * len(model.reformer.layers)

    def counter(index):
        def count(module, args):
            calls[index] += 1
        return count

    for index, layer in enumerate(model.reformer.layers):
        layer.attention.register_forward_pre_hook(counter(index))
    ids = _ids(config)
    loss = model(ids, labels=ids, return_logits=False).loss
    assert calls == [1, 1, 1]
    loss.backward()
    assert calls == [2, 2, 1]  # the top layer's graph was kept


def test_global_rng_advances_as_without_recomputation():
    config = tiny(is_decoder=True, hash_seed=None, hidden_dropout_prob=0.1)
    ids = _ids(config)
    after = {}
    for mode in ("autograd", "reversible"):
        torch.manual_seed(0)
        model = ReformerLM(tiny(is_decoder=True, hash_seed=None, hidden_dropout_prob=0.1, memory_mode=mode))
        torch.manual_seed(3)
        model(ids, labels=ids).loss.backward()
        after[mode] = torch.rand(3)
    assert torch.equal(after["autograd"], after["reversible"])


@pytest.mark.parametrize("length", [1, 7, 8, 9, 23, 40])
def test_any_length_causal_outputs_ignore_internal_padding(length):
    """A causal model's output at position t depends on tokens <= t only through local/full layers;
    with LSH in eval and a fixed hash seed the padded run must equal the run on a chunk multiple
    cut back to the same prefix for local-only models."""
    config = tiny(is_decoder=True, attn_layers=("local", "local"))
    torch.manual_seed(0)
    model = ReformerLM(config).eval()
    ids = _ids(config, length=48)
    full = model(ids).logits  # 48 is a chunk multiple: no padding
    cut = model(ids[:, :length]).logits  # padded internally when length is not a multiple of 8
    assert cut.shape == (2, length, config.vocab_size)
    torch.testing.assert_close(cut, full[:, :length], atol=1e-5, rtol=1e-5)


def test_padding_mask_and_training_any_length():
    config = tiny(is_decoder=True)
    torch.manual_seed(0)
    model = ReformerLM(config)
    ids = _ids(config, length=37)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    out = model(ids, attention_mask=mask, labels=ids)
    assert out.logits.shape == (2, 37, config.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_chunked_loss_equals_logits_loss():
    config = tiny(is_decoder=True, chunk_size_lm_head=5)
    ids = _ids(config, length=40)
    labels = ids.clone()
    labels[:, :10] = -100
    torch.manual_seed(0)
    model = ReformerLM(config).double()
    with_logits = model(ids, labels=labels)
    reference = torch.nn.functional.cross_entropy(
        with_logits.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
    )
    without = model(ids, labels=labels, return_logits=False)
    assert without.logits is None
    torch.testing.assert_close(with_logits.loss, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(without.loss, reference, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(with_logits.loss, list(model.parameters()))
    grads_chunked = torch.autograd.grad(without.loss, list(model.parameters()))
    for a, b in zip(grads, grads_chunked):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_lm_head_bias_is_applied():
    config = tiny(is_decoder=True)
    model = ReformerLM(config).eval()
    ids = _ids(config, length=8)
    before = model(ids).logits
    with torch.no_grad():
        model.lm_head.bias.fill_(0.5)
    torch.testing.assert_close(model(ids).logits, before + 0.5)


def test_masked_lm_and_classifier_heads():
    config = tiny(num_labels=3)
    torch.manual_seed(0)
    ids = _ids(config, length=24)
    mlm = ReformerForMaskedLM(config)
    labels = torch.full_like(ids, -100)
    labels[:, 5] = ids[:, 5]
    out = mlm(ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[:, 5], ids[:, 5])
    torch.testing.assert_close(out.loss, expected)
    classifier = ReformerForSequenceClassification(config)
    out = classifier(ids, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2])))
    regressor = ReformerForSequenceClassification(tiny(num_labels=1))
    out = regressor(ids, labels=torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), torch.tensor([0.5, -1.0])))


def test_head_config_checks():
    with pytest.raises(ValueError, match="is_decoder=True"):
        ReformerLM(tiny())
    with pytest.raises(ValueError, match="is_decoder=False"):
        ReformerForMaskedLM(tiny(is_decoder=True))


def test_save_load_round_trip(tmp_path):
    config = tiny(is_decoder=True)
    torch.manual_seed(0)
    model = ReformerLM(config).eval()
    with torch.no_grad():
        model.lm_head.bias.normal_()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = ReformerLM.from_pretrained(tmp_path / "m").eval()
    ids = _ids(config, length=19)
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.config == model.config


def test_a_save_that_fails_leaves_the_previous_model_whole(tmp_path, monkeypatch):
    """Weights and config are written together: a failure in between must not leave one save's
    weights beside another's config (same shapes, so it would load without a word)."""
    import torch_reformer.serialization as serialization

    first = ReformerLM(tiny(is_decoder=True, num_hashes=4, hash_seed=7))
    first.save_pretrained(tmp_path)
    second = ReformerLM(tiny(is_decoder=True, num_hashes=2, hash_seed=42))
    synced = []

    def fsync_failing_on_the_second_file(fd):  # the weights are written, the config is not
        synced.append(fd)
        if len(synced) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(serialization.os, "fsync", fsync_failing_on_the_second_file)
    with pytest.raises(OSError, match="disk full"):
        second.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = ReformerLM.from_pretrained(tmp_path)
    assert (loaded.config.num_hashes, loaded.config.hash_seed) == (4, 7)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in first.state_dict().items())


def test_corrupt_or_mismatched_checkpoint_errors(tmp_path):
    config = tiny(is_decoder=True)
    ReformerLM(config).save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        ReformerLM.from_pretrained(tmp_path / "m")
    ReformerLM(config).save_pretrained(tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["feed_forward_size"] = 48
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        ReformerLM.from_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="holds a ReformerLM, not a ReformerForSequenceClassification"):
        ReformerForSequenceClassification.from_pretrained(tmp_path / "m", is_decoder=False, feed_forward_size=64)
    with pytest.raises(CheckpointError, match="holds a ReformerLM, not a ReformerForMaskedLM"):
        ReformerForMaskedLM.from_pretrained(tmp_path / "m")
    del cfg["architectures"]  # without the record of its class, the weights' names tell
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing"):
        ReformerForSequenceClassification.from_pretrained(tmp_path / "m", is_decoder=False, feed_forward_size=64)
    with pytest.raises(CheckpointError, match="names no model class"):
        ReformerPreTrainedModel.from_pretrained(tmp_path / "m")
    cfg_path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        ReformerLM.from_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="no config.json"):
        ReformerLM.from_pretrained(tmp_path / "nothing")


def test_from_pretrained_keeps_the_saved_dtype_or_casts(tmp_path):
    config = tiny(is_decoder=True)
    model = ReformerLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    loaded = ReformerLM.from_pretrained(tmp_path / "m")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    as_float = ReformerLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert {p.dtype for p in as_float.parameters()} == {torch.float32}
    torch.testing.assert_close(as_float.lm_head.decoder.weight, model.lm_head.decoder.weight.float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="floating torch.dtype"):
        ReformerLM.from_pretrained(tmp_path / "m", dtype=torch.int64)


def test_from_pretrained_trunk_of_a_head_and_class_from_the_checkpoint(tmp_path):
    config = tiny(is_decoder=True)
    torch.manual_seed(0)
    model = ReformerLM(config).eval()
    model.save_pretrained(tmp_path / "m")
    ids = _ids(config, length=19)
    trunk = ReformerModel.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(trunk(ids).last_hidden_state, model.reformer(ids).last_hidden_state)
    rebuilt = ReformerPreTrainedModel.from_pretrained(tmp_path / "m").eval()
    assert type(rebuilt) is ReformerLM
    assert torch.equal(rebuilt(ids).logits, model(ids).logits)


def test_bad_inputs_raise_clear_errors():
    config = tiny(is_decoder=True)
    model = ReformerLM(config)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 64\)"):
        model(torch.tensor([[1, 2, 64]]))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="beyond what the positional embedding covers"):
        model(torch.zeros(1, 129, dtype=torch.long))  # axial (8, 16) covers 128 positions
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="labels must have the shape"):
        model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="batch size 0"):
        model(torch.zeros(0, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="1/True for real tokens"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 2, 1]]))
    with pytest.raises(TypeError, match="position_ids must be an integer tensor"):
        model(torch.tensor([[1, 2, 3]]), position_ids=torch.tensor([0.0, 1.5, 2.0]))
    with pytest.raises(ValueError, match="position_ids must be >= 0"):
        model(torch.tensor([[1, 2, 3]]), position_ids=torch.tensor([-1, 0, 1]))


@pytest.mark.parametrize("return_logits", [True, False])
def test_bad_token_labels_raise_the_same_errors_in_both_loss_paths(return_logits):
    config = tiny(is_decoder=True)
    model = ReformerLM(config)
    ids = torch.tensor([[1, 2, 3, 4]])
    for bad in (torch.tensor([[1, 2, 64, 4]]), torch.tensor([[1, -5, 3, 4]])):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 64\)"):
            model(ids, labels=bad, return_logits=return_logits)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        model(ids, labels=ids.float(), return_logits=return_logits)


def test_small_integer_token_ids_are_accepted():
    config = tiny(is_decoder=True)
    model = ReformerLM(config).eval()
    ids = _ids(config, length=19)
    expected = model(ids).logits
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert torch.equal(model(ids.to(dtype)).logits, expected)


def test_position_ids_offsets_select_embeddings():
    config = tiny(is_decoder=True, attn_layers=("local", "local"))
    model = ReformerModel(config).eval()
    ids = _ids(config, batch=1, length=8)
    shifted = model(ids, position_ids=torch.arange(8, 16)).last_hidden_state
    plain = model(ids).last_hidden_state
    assert not torch.allclose(shifted, plain)
    emb = model.embeddings.position_embeddings
    torch.testing.assert_close(emb(torch.arange(8, 16)), emb(torch.arange(16))[8:])


def _compiled_matches_eager(config, backend):
    torch.manual_seed(0)
    model = ReformerLM(config)
    ids = _ids(config, length=16)
    expected = model(ids, labels=ids)
    expected.loss.backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    out = torch.compile(model, backend=backend)(ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.loss, expected.loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], msg=name)


@pytest.mark.parametrize("attn_layers, memory_mode", [(("local", "lsh"), "reversible"), (("full", "local"), "reversible"),
                                                      (("local", "lsh"), "checkpoint")])
def test_torch_compile_traces_forward_and_backward(attn_layers, memory_mode):
    # aot_eager runs AOTAutograd's tracing of forward and backward (where saved tensors and
    # version counters behave differently from eager) without a C++ compiler.
    _compiled_matches_eager(tiny(is_decoder=True, attn_layers=attn_layers, memory_mode=memory_mode), "aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor_tiny_model():
    _compiled_matches_eager(tiny(is_decoder=True), "inductor")


def test_all_ignored_labels_give_zero_loss_in_both_paths():
    config = tiny(is_decoder=True)
    model = ReformerLM(config)
    ids = _ids(config, length=16)
    labels = torch.full_like(ids, -100)
    assert model(ids, labels=labels).loss.item() == 0.0
    assert model(ids, labels=labels, return_logits=False).loss.item() == 0.0


def test_outputs_index_like_transformers():
    config = tiny(is_decoder=True)
    model = ReformerLM(config)
    ids = _ids(config, length=16)
    with_loss = model(ids, labels=ids)
    assert with_loss[0] is with_loss.loss and with_loss[1] is with_loss.logits
    assert with_loss["logits"] is with_loss.logits and len(with_loss.to_tuple()) == 3
    loss_only = model(ids, labels=ids, return_logits=False)
    assert loss_only[0] is loss_only.loss and loss_only[1] is loss_only.hidden_states
    assert model(ids)[0] is not None and model(ids)[0].shape == (2, 16, config.vocab_size)
    with pytest.raises(KeyError, match="ReformerOutput has the fields"):
        with_loss["last_hidden_state"]
    model.eval()
    torch.manual_seed(0)
    trunk_out = model.reformer(ids)
    torch.manual_seed(0)
    with_loss = model(ids, labels=ids)
    assert isinstance(trunk_out, ReformerModelOutput) and trunk_out[0] is trunk_out.last_hidden_state
    assert trunk_out["last_hidden_state"].shape == (2, 16, 2 * config.hidden_size)
    torch.testing.assert_close(trunk_out.last_hidden_state, with_loss.hidden_states, rtol=0, atol=0)


def test_classifier_loss_follows_problem_type():
    ids = _ids(tiny(), length=16)
    torch.manual_seed(0)
    model = ReformerForSequenceClassification(tiny(num_labels=3, problem_type="regression"))
    targets = torch.tensor([[0.5, 1.0, -1.0], [0.0, 2.0, 1.0]])
    out = model(ids, labels=targets)
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits, targets))
    model.config.problem_type = "multi_label_classification"
    multi = torch.tensor([[1, 0, 1], [0, 0, 1]])
    out = model(ids, labels=multi)
    torch.testing.assert_close(
        out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, multi.float())
    )
    with pytest.raises(ValueError, match="labels of shape"):
        model(ids, labels=torch.tensor([1, 2]))
    model.config.problem_type = "single_label_classification"
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        model(ids, labels=torch.tensor([1, 3]))
    # -100 leaves a sequence out of the loss (HF's ignore_index); none scored gives 0, not NaN.
    out = model(ids, labels=torch.tensor([2, -100]))
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits[:1], torch.tensor([2])))
    assert model(ids, labels=torch.tensor([-100, -100])).loss.item() == 0.0
    model.config.problem_type = "regression"
    with pytest.raises(ValueError, match="regression needs 3 target value"):
        model(ids, labels=torch.tensor([0.5, 1.0]))
    model.config.problem_type = "single_label_classification"
    assert model.config.problem_type == "single_label_classification"


@pytest.mark.parametrize("memory_mode", ["reversible", "checkpoint", "autograd"])
def test_inference_mode_gives_the_no_grad_outputs(memory_mode):
    """Tensors made under torch.inference_mode have no version counter; the engine's and the
    attention cores' in-place guards must not need one."""
    config = tiny(is_decoder=True, hash_seed=3, memory_mode=memory_mode, chunk_size_feed_forward=8,
                  chunk_size_lm_head=8)
    model = ReformerLM(config).eval()
    ids = _ids(config)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, labels=ids)
        expected_loss = model(ids, labels=ids, return_logits=False).loss
    with torch.inference_mode():
        got = model(ids, attention_mask=mask, labels=ids)
        got_loss = model(ids, labels=ids, return_logits=False).loss
        generated = model.generate(ids[:1, :10], 3)
    assert torch.equal(got.logits, expected.logits) and torch.equal(got.loss, expected.loss)
    assert torch.equal(got_loss, expected_loss)
    assert generated.shape == (1, 13)


def test_functional_call_is_refused_clearly_where_recomputation_would_use_other_weights():
    """torch.func.functional_call swaps parameters in for the forward pass only; a rebuilt or
    recomputed block would run with the module's own weights, so both modes that rebuild refuse
    rather than return gradients of the wrong tensors. memory_mode='autograd' rebuilds nothing and gives the usual gradients."""
    ids = _ids(tiny(), length=16)
    for mode in ("reversible", "checkpoint", "autograd"):
        torch.manual_seed(0)
        model = ReformerLM(tiny(is_decoder=True, hash_seed=3, memory_mode=mode)).double()
        params = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
        loss = torch.func.functional_call(model, params, (ids,), {"labels": ids}).loss
        if mode != "autograd":
            with pytest.raises(RuntimeError, match="functional_call"):
                torch.autograd.grad(loss, list(params.values()))
            continue
        swapped = torch.autograd.grad(loss, list(params.values()))
        direct = torch.autograd.grad(model(ids, labels=ids).loss, list(model.parameters()))
        assert all(torch.equal(a, b) for a, b in zip(swapped, direct))


def test_num_parameters_counts_all_or_only_trainable():
    model = ReformerLM(tiny(is_decoder=True))
    total = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == total
    model.reformer.requires_grad_(False)
    assert model.num_parameters(only_trainable=True) == sum(p.numel() for p in model.lm_head.parameters()) < total


def test_embedding_accessors_name_the_tables_as_hf_does():
    lm = ReformerLM(tiny(is_decoder=True))
    assert lm.get_input_embeddings() is lm.reformer.embeddings.word_embeddings
    assert lm.get_output_embeddings() is lm.lm_head.decoder
    assert lm.get_output_embeddings().weight.shape == (lm.config.vocab_size, 2 * lm.config.hidden_size)
    trunk = ReformerModel(tiny())
    assert trunk.get_input_embeddings() is trunk.embeddings.word_embeddings and trunk.get_output_embeddings() is None
    classifier = ReformerForSequenceClassification(tiny(num_labels=3))
    assert classifier.get_output_embeddings() is None


class _LowRankAdapter(nn.Module):
    """A LoRA-style wrapper: base(x) + x A^T B^T, with .weight/.bias read through to the base."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.down = nn.Parameter(torch.randn(rank, base.in_features, dtype=base.weight.dtype) * 0.1)
        self.up = nn.Parameter(torch.randn(base.out_features, rank, dtype=base.weight.dtype) * 0.1)

    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)

    def forward(self, x):
        return self.base(x) + x @ self.down.T @ self.up.T


def _with_adapters(mode):
    torch.manual_seed(0)
    config = tiny(is_decoder=True, hash_seed=3, memory_mode=mode, chunk_size_feed_forward=8, chunk_size_lm_head=8)
    model = ReformerLM(config).double()
    plain = ReformerLM(config).double()
    plain.load_state_dict(model.state_dict())
    for layer in model.reformer.layers:
        layer.feed_forward.dense = _LowRankAdapter(layer.feed_forward.dense)
        attention = layer.attention.self_attention
        attention.value = _LowRankAdapter(attention.value)
    model.lm_head.decoder = _LowRankAdapter(model.lm_head.decoder)
    return model, plain


def test_replaced_or_hooked_submodules_take_part_in_every_path():
    """The fused paths read the submodules' weights; an adapter, a quantised layer or a hook put on
    a submodule must still run (it used to be bypassed silently), with exact gradients."""
    ids = _ids(tiny(), length=24)
    grads = {}
    for mode in ("reversible", "autograd"):
        model, plain = _with_adapters(mode)
        loss = model(ids, labels=ids, return_logits=False).loss
        assert not torch.allclose(loss, plain(ids, labels=ids, return_logits=False).loss)
        with_logits = model(ids, labels=ids)
        torch.testing.assert_close(with_logits.loss, loss, rtol=1e-12, atol=1e-12)
        loss.backward()
        grads[mode] = [p.grad for p in model.parameters()]
        assert all(g is not None for g in grads[mode])
    for got, expected in zip(grads["reversible"], grads["autograd"]):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    model = ReformerLM(tiny(is_decoder=True)).eval()
    seen = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)):
            module.register_forward_hook(lambda mod, args, out, name=name: seen.append(name))
    with torch.no_grad():
        model(ids)
    assert {name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.LayerNorm))} == set(seen)


def test_models_built_from_one_config_do_not_change_each_other(tmp_path):
    config = tiny(is_decoder=True)
    teacher, student = ReformerLM(config), ReformerLM(config)
    teacher.set_num_hashes(4)
    assert teacher.config.num_hashes == 4 and teacher.reformer.config is teacher.config
    assert config.num_hashes == student.config.num_hashes == 2
    assert {layer.num_hashes for layer in student.lsh_layers()} == {2}
    student.save_pretrained(tmp_path / "student")
    assert ReformerLM.from_pretrained(tmp_path / "student").config.num_hashes == 2


def _hook_adding_one(module, inputs, output):
    return output + 1


def _scale_in_place(weight):
    with torch.no_grad():
        weight.mul_(2)  # what an optimizer step or weight clipping does


_CHANGES_BETWEEN_FORWARD_AND_BACKWARD = {
    "eval": (lambda model, hook: model.eval(), "switched between train and eval"),
    "num_hashes": (lambda model, hook: model.set_num_hashes(4), "LSH layer settings changed"),
    "hook added": (lambda model, hook: model.reformer.layers[0].feed_forward.register_forward_hook(_hook_adding_one),
                   "forward hooks of a block were added or removed"),
    "hook removed": (lambda model, hook: hook.remove(), "forward hooks of a block were added or removed"),
    "weight changed in place": (lambda model, hook: _scale_in_place(model.reformer.layers[0].feed_forward.dense.weight),
                                "changed in place after the forward pass"),
    "weight frozen": (lambda model, hook: model.reformer.layers[0].attention.requires_grad_(False),
                      "requires_grad of a block's parameter changed"),
}


@pytest.mark.parametrize("memory_mode", ["reversible", "checkpoint"])
@pytest.mark.parametrize("change", sorted(_CHANGES_BETWEEN_FORWARD_AND_BACKWARD))
def test_changes_between_forward_and_backward_are_refused(memory_mode, change):
    """A rebuild runs the layers again as they are at backward time. Switching train/eval, the hash
    rounds, the forward hooks, a parameter's values or its requires_grad in between would rebuild
    something else and give wrong gradients without a word; each is refused, and the message warns
    that .grad may already hold part of this backward pass."""
    model = ReformerLM(tiny(is_decoder=True, memory_mode=memory_mode, kept_graph_layers=0)).train()
    hook = model.reformer.layers[1].attention.register_forward_hook(_hook_adding_one)
    ids = _ids(model.config)
    loss = model(ids, labels=ids).loss
    make_change, message = _CHANGES_BETWEEN_FORWARD_AND_BACKWARD[change]
    make_change(model, hook)
    with pytest.raises(RuntimeError, match=message) as refused:
        loss.backward()
    assert "zero them before running it again" in str(refused.value)


@pytest.mark.parametrize("memory_mode", ["reversible", "checkpoint"])
def test_a_block_that_constrains_its_weights_in_forward_matches_autograd(memory_mode):
    """Changes a block makes to its own parameters while it runs are part of its forward: only
    changes after the forward call are refused. A feed-forward whose pre-hook clamps its weight in
    place gets autograd's gradients."""
    def clamp_weight(module, inputs):
        with torch.no_grad():
            module.dense.weight.clamp_(-0.01, 0.01)

    ids = _ids(tiny())
    grads = {}
    for mode in (memory_mode, "autograd"):
        torch.manual_seed(0)
        model = ReformerLM(tiny(is_decoder=True, hash_seed=3, memory_mode=mode, kept_graph_layers=0)).double()
        model.reformer.layers[0].feed_forward.register_forward_pre_hook(clamp_weight)
        model(ids, labels=ids).loss.backward()
        grads[mode] = [p.grad for p in model.parameters()]
    for ours, reference in zip(grads[memory_mode], grads["autograd"]):
        torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-12)


def test_double_backward_is_refused_in_every_memory_mode():
    for mode in ("reversible", "checkpoint", "autograd"):
        model = ReformerLM(tiny(is_decoder=True, memory_mode=mode))
        ids = _ids(model.config)
        embeddings = model.get_input_embeddings().weight
        with pytest.raises(RuntimeError, match="differentiable once only"):
            torch.autograd.grad(model(ids, labels=ids).loss, embeddings, create_graph=True)


def test_bf16_rebuild_of_large_streams_warns_and_ordinary_training_does_not():
    """A bf16 model whose weights are 10x their initial scale makes residual streams so large that
    x = y - f cancels most of x's bits at every rebuilt layer (measured: 0.6 relative drift at 12
    layers); the engine warns. At the initial scale the drift is bf16 rounding (about 3e-3)."""
    config = tiny(attn_layers=("local", "lsh") * 4, kept_graph_layers=0, is_decoder=True)
    ids = _ids(config, length=64)
    torch.manual_seed(0)
    model = ReformerLM(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(10)
    model.to(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="rebuilt its input with a relative error"):
        model(ids, labels=ids).loss.backward()


def test_a_subclass_saves_under_its_own_name(tmp_path):
    class MyLM(ReformerLM):
        pass

    MyLM(tiny(is_decoder=True)).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["MyLM"]


def test_a_config_changed_after_construction_is_checked_when_a_model_is_built():
    config = tiny(is_decoder=True)
    config.attn_layers = ("lsh", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        ReformerLM(config)
