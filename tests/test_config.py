"""ReformerConfig: HF defaults, validation messages, JSON round trip, presets, derived values."""

import dataclasses
import json
import warnings

import pytest

from torch_reformer.config import ACTIVATION_NAMES, PRESETS, ReformerConfig

OUR_OWN_FIELDS = {"memory_mode", "kept_graph_layers", "position_embedding_type"}
LABEL_MAPS = {"id2label", "label2id"}  # None here: the default names HF derives from num_labels


def _as_plain(value):
    return list(value) if isinstance(value, tuple) else value


def test_defaults_equal_hf_defaults_for_every_shared_field():
    transformers = pytest.importorskip("transformers")
    ours = ReformerConfig()
    theirs = transformers.ReformerConfig()
    shared = [f.name for f in dataclasses.fields(ours) if f.name not in OUR_OWN_FIELDS]
    for name in set(shared) - LABEL_MAPS:
        assert _as_plain(getattr(ours, name)) == _as_plain(getattr(theirs, name)), name
    # None stands for the label names HF derives from num_labels
    assert ours.id2label is None and theirs.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    assert ours.label2id is None and theirs.label2id == {"LABEL_0": 0, "LABEL_1": 1}
    # every Reformer-specific HF field exists here
    hf_own_fields = set(transformers.ReformerConfig.__annotations__) - {"model_type", "keys_to_ignore_at_inference",
                                                                        "attribute_map"}
    assert hf_own_fields <= set(shared)


def test_hf_config_dict_loads_without_warnings():
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.ReformerConfig(
        attn_layers=["lsh", "local", "lsh"],
        num_buckets=[4, 8],
        axial_pos_embds=False,
        hidden_size=64,
        is_decoder=True,
        id2label={0: "a", 1: "b", 2: "c"},
        hash_seed=7,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = ReformerConfig.from_dict(json.loads(hf_config.to_json_string()))
    assert ours.attn_layers == ("lsh", "local", "lsh")
    assert ours.num_buckets == (4, 8)
    assert ours.position_embedding_type == "learned" and ours.axial_pos_embds is False
    assert ours.num_labels == 3
    assert (ours.hidden_size, ours.is_decoder, ours.hash_seed) == (64, True, 7)


def test_legacy_keys_of_released_configs_load_without_warning():
    # Google's released Reformer config.json files still carry these keys; HF ignores them.
    written = ReformerConfig.from_preset("crime-and-punishment").to_dict()
    written.update(intermediate_size=512, num_chunks_after=0, num_chunks_before=1, architectures=["ReformerModelWithLMHead"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ReformerConfig.from_dict(written) == ReformerConfig.from_preset("crime-and-punishment")


def test_our_dict_builds_an_equal_hf_config():
    transformers = pytest.importorskip("transformers")
    ours = ReformerConfig.from_preset("crime-and-punishment")
    shared = {k: v for k, v in ours.to_dict().items() if k not in OUR_OWN_FIELDS}
    theirs = transformers.ReformerConfig(**shared)
    for name, value in shared.items():
        if name not in LABEL_MAPS:
            assert _as_plain(getattr(theirs, name)) == value, name
    assert ReformerConfig.from_dict(theirs.to_dict()) == ours  # HF's default label names read back as None


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip_is_exact(name, tmp_path):
    config = ReformerConfig.from_preset(name, memory_mode="checkpoint")
    assert ReformerConfig.from_dict(json.loads(config.to_json_string())) == config
    path = tmp_path / "config.json"
    config.to_json_file(path)
    assert ReformerConfig.from_json_file(path) == config
    written = json.loads(path.read_text())
    assert isinstance(written["attn_layers"], list) and isinstance(written["axial_pos_shape"], list)


def test_numpy_numbers_become_python_numbers():
    np = pytest.importorskip("numpy")
    config = ReformerConfig(hidden_size=np.int64(64), num_attention_heads=np.int32(2), attention_head_size=32,
                            axial_pos_embds_dim=[np.int64(32), np.int64(32)], hidden_dropout_prob=np.float32(0.25))
    assert type(config.hidden_size) is int and config.axial_pos_embds_dim == (32, 32)
    assert type(config.axial_pos_embds_dim[0]) is int and config.hidden_dropout_prob == 0.25
    assert ReformerConfig.from_dict(json.loads(config.to_json_string())) == config


def test_lists_are_stored_as_tuples():
    config = ReformerConfig(attn_layers=["local", "lsh"], num_buckets=[4, 8], eos_token_id=[1, 2])
    assert config.attn_layers == ("local", "lsh")
    assert config.num_buckets == (4, 8)
    assert config.eos_token_id == (1, 2)
    assert config == ReformerConfig(attn_layers=("local", "lsh"), num_buckets=(4, 8), eos_token_id=(1, 2))


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(attn_layers=["local", "global"]), ValueError, r"unknown attention type.*'global'.*use only"),
        (dict(attn_layers=[]), ValueError, "attn_layers is empty"),
        (dict(attn_layers="lsh"), TypeError, "list or tuple of str"),
        (dict(hidden_size=128), ValueError, r"sums to 256 but hidden_size is 128.*choose per-axis widths"),
        (dict(axial_pos_shape=(8, 8, 8)), ValueError, "equal length"),
        (dict(axial_pos_shape=(0, 8)), ValueError, "positive integers"),
        (dict(num_buckets=7), ValueError, r"odd or too small value 7.*even integer"),
        (dict(num_buckets=[8, 3]), ValueError, r"odd or too small value 3"),
        (dict(num_buckets=[]), ValueError, "empty sequence"),
        (dict(num_buckets=8.0), TypeError, "num_buckets must be an int"),
        (dict(feed_forward_size=0), ValueError, r"feed_forward_size must be >= 1.*positive integer, e\.g\. 512 \("),
        (dict(num_hashes=-1), ValueError, "num_hashes must be >= 1"),
        (dict(chunk_size_lm_head=-1), ValueError, r"chunk_size_lm_head must be >= 0.*e\.g\. 0 \(the default\)"),
        (dict(hidden_dropout_prob=1.0), ValueError, r"hidden_dropout_prob must lie in \[0, 1\)"),
        (dict(lsh_attention_probs_dropout_prob=-0.1), ValueError, "must lie in"),
        (dict(classifier_dropout=1.5), ValueError, "classifier_dropout must lie in"),
        (dict(hidden_act="gelu2"), ValueError, r"hidden_act 'gelu2' is not supported: choose one of"),
        (dict(memory_mode="fast"), ValueError, r"memory_mode 'fast' is not known: choose one of"),
        (dict(kept_graph_layers=-1), ValueError, r"kept_graph_layers must be >= 0.*e\.g\. 1 \(the default\)"),
        (dict(local_num_chunks_before=-1), ValueError, r"e\.g\. 1 \(the default\)"),
        (dict(num_labels=0), ValueError, r"num_labels must be >= 1.*e\.g\. 2 \(the default\)"),
        (dict(kept_graph_layers=1.5), TypeError, "kept_graph_layers must be an int"),
        (dict(position_embedding_type="rotary"), ValueError, "position_embedding_type must be one of"),
        (dict(problem_type="ranking"), ValueError, "problem_type 'ranking' is not known"),
        (dict(layer_norm_eps=0.0), ValueError, "layer_norm_eps must be a finite number > 0"),
        (dict(layer_norm_eps=float("inf")), ValueError, "layer_norm_eps must be a finite number > 0"),
        (dict(initializer_range=-1.0), ValueError, "must be a finite number >= 0"),
        (dict(initializer_range=float("nan")), ValueError, "must be a finite number >= 0"),
        (dict(eos_token_id=[]), ValueError, "eos_token_id is an empty list: pass None"),
        (dict(pad_token_id=320), ValueError, r"pad_token_id=320 is outside the vocabulary \[0, 320\)"),
        (dict(eos_token_id=[2, -1]), ValueError, r"eos_token_id=\(2, -1\) holds the negative id -1"),
        (dict(hidden_act="prelu"), ValueError, "hidden_act 'prelu' has learned parameters"),
        (dict(hash_seed=2**70), ValueError, r"hash_seed=1180591620717411303424 is outside.*pass a smaller seed"),
        (dict(hash_seed=-(2**63) - 1), ValueError, "hash_seed=-9223372036854775809 is outside"),
        (dict(hidden_size="256"), TypeError, "hidden_size must be an int"),
        (dict(num_hashes=True), TypeError, "num_hashes must be an int"),
        (dict(is_decoder=1), TypeError, "is_decoder must be True or False"),
        (dict(hidden_dropout_prob="0.1"), TypeError, "hidden_dropout_prob must be a number"),
        (dict(axial_pos_shape=(64.0, 64)), TypeError, "must hold only int"),
    ],
)
def test_bad_values_raise_with_a_fix(overrides, error, message):
    with pytest.raises(error, match=message):
        ReformerConfig(**overrides)


def test_every_size_hint_names_that_fields_own_default():
    from torch_reformer.config import _NON_NEGATIVE_INTS, _POSITIVE_INTS

    defaults = {field.name: field.default for field in dataclasses.fields(ReformerConfig)}
    for name in _POSITIVE_INTS + _NON_NEGATIVE_INTS:
        with pytest.raises(ValueError, match=rf"{name} must be >= .*e\.g\. {defaults[name]} \(the default\)$"):
            ReformerConfig(**{name: -1})


def test_from_dict_rejects_wrong_types_and_warns_on_unknown_keys(tmp_path):
    with pytest.raises(TypeError, match="must be an int"):
        ReformerConfig.from_dict({"vocab_size": "320"})
    with pytest.raises(TypeError, match="must be a dict"):
        ReformerConfig.from_dict([("vocab_size", 320)])
    with pytest.warns(UserWarning, match="hiden_size"):
        config = ReformerConfig.from_dict({"hiden_size": 3, "model_type": "reformer", "architectures": None})
    assert config == ReformerConfig()
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        ReformerConfig.from_json_file(bad)


def test_position_embedding_type_and_axial_flag_agree():
    assert ReformerConfig(axial_pos_embds=False).position_embedding_type == "learned"
    learned = ReformerConfig(position_embedding_type="learned")
    assert learned.axial_pos_embds is False
    none = ReformerConfig(position_embedding_type="none", hidden_size=64)  # axial widths not checked
    assert none.axial_pos_embds is False and none.max_length is None
    assert ReformerConfig().axial_pos_embds is True


def test_the_position_field_set_last_wins_and_axial_can_come_back():
    learned = ReformerConfig(position_embedding_type="learned")
    assert (learned.position_embedding_type, learned.axial_pos_embds) == ("learned", False)
    mutated = ReformerConfig(position_embedding_type="learned")
    mutated.position_embedding_type = "axial"
    mutated.validate()
    assert (mutated.position_embedding_type, mutated.axial_pos_embds) == ("axial", True)
    flagged = ReformerConfig(position_embedding_type="learned")
    flagged.axial_pos_embds = True
    flagged.validate()
    assert (flagged.position_embedding_type, flagged.axial_pos_embds) == ("axial", True)
    flagged.axial_pos_embds = False  # and back again through HF's flag
    flagged.validate()
    assert (flagged.position_embedding_type, flagged.axial_pos_embds) == ("learned", False)
    replaced = dataclasses.replace(learned, position_embedding_type="axial")
    assert (replaced.position_embedding_type, replaced.axial_pos_embds) == ("axial", True)
    assert dataclasses.replace(learned, axial_pos_embds=True).position_embedding_type == "axial"
    assert dataclasses.replace(ReformerConfig(), axial_pos_embds=False).position_embedding_type == "learned"
    assert dataclasses.replace(learned, hidden_dropout_prob=0.1).position_embedding_type == "learned"
    from_dict = ReformerConfig.from_dict({**learned.to_dict(), "position_embedding_type": "axial"})
    assert (from_dict.position_embedding_type, from_dict.axial_pos_embds) == ("axial", True)
    assert ReformerConfig.from_dict(learned.to_dict(), axial_pos_embds=True).position_embedding_type == "axial"
    none = ReformerConfig(position_embedding_type="none", hidden_size=64)
    assert ReformerConfig.from_dict(none.to_dict(), axial_pos_embds=False).position_embedding_type == "none"
    # A fresh config given both: the explicit position_embedding_type wins; None follows the flag (HF files).
    assert ReformerConfig(position_embedding_type="axial", axial_pos_embds=False).axial_pos_embds is True
    assert ReformerConfig(position_embedding_type=None, axial_pos_embds=False).position_embedding_type == "learned"
    assert ReformerConfig.from_dict({"axial_pos_embds": False}).position_embedding_type == "learned"
    assert mutated == ReformerConfig() and "_validated" not in repr(mutated)  # the memory is no field


def test_label_names_are_kept_and_read_back_with_int_keys(tmp_path):
    config = ReformerConfig(num_labels=2, id2label={0: "negative", 1: "positive"},
                            label2id={"negative": 0, "positive": 1})
    config.to_json_file(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["id2label"] == {"0": "negative", "1": "positive"}  # JSON keys are strings
    loaded = ReformerConfig.from_json_file(tmp_path / "config.json")
    assert loaded == config and loaded.id2label == {0: "negative", 1: "positive"}
    assert loaded.to_dict() == saved  # what the file holds, e.g. for comparing a resumed run's config
    assert loaded.label2id == {"negative": 0, "positive": 1}
    # num_labels follows id2label when not given, as HF's config.json files have it
    three = ReformerConfig.from_dict({"id2label": {"0": "a", "1": "b", "2": "c"}})
    assert (three.num_labels, three.id2label, three.label2id) == (3, {0: "a", 1: "b", 2: "c"}, None)
    with pytest.warns(UserWarning, match="num_labels=5 disagrees with the 2 names"):
        assert ReformerConfig.from_dict({"num_labels": 5, "id2label": {"0": "a", "1": "b"}}).num_labels == 2
    # an overridden num_labels replaces names that no longer fit; names that fit are kept
    assert ReformerConfig.from_dict(three.to_dict(), num_labels=2).id2label is None
    assert ReformerConfig.from_dict(three.to_dict(), num_labels=3).id2label == {0: "a", 1: "b", 2: "c"}
    # HF's default names are what None means
    default = ReformerConfig(num_labels=3, id2label={i: f"LABEL_{i}" for i in range(3)},
                             label2id={f"LABEL_{i}": i for i in range(3)})
    assert default.id2label is None and default.label2id is None and default == ReformerConfig(num_labels=3)
    names = {0: "a"}
    single = ReformerConfig(num_labels=1, id2label=names)
    names[1] = "b"
    assert single.id2label == {0: "a"} and single.to_dict()["id2label"] is not single.id2label
    with pytest.raises(ValueError, match="id2label names 2 labels but num_labels is 3: give one name per label"):
        ReformerConfig(num_labels=3, id2label={0: "a", 1: "b"})
    with pytest.raises(TypeError, match="id2label must map int keys to str values, got 'x'"):
        ReformerConfig(id2label={"x": "a", 1: "b"})
    with pytest.raises(TypeError, match="label2id must map str keys to int values"):
        ReformerConfig(label2id={"a": "0"})
    with pytest.raises(TypeError, match="id2label must be a dict or None"):
        ReformerConfig(id2label=["a", "b"])


def test_derived_values():
    config = ReformerConfig(attn_layers=["local", "lsh", "full"], local_attn_chunk_length=6, lsh_attn_chunk_length=4)
    assert config.num_layers == 3
    assert config.pad_multiple == 12
    assert ReformerConfig(attn_layers=["full", "full"]).pad_multiple == 1
    assert ReformerConfig(attn_layers=["lsh"], lsh_attn_chunk_length=32).pad_multiple == 32
    assert ReformerConfig(axial_pos_shape=(8, 16, 4), axial_pos_embds_dim=(64, 64, 128)).max_length == 512
    assert ReformerConfig(axial_pos_embds=False, max_position_embeddings=100).max_length == 100


def test_presets():
    tiny = ReformerConfig.from_preset("tiny")
    assert tiny.attn_layers == ("local", "lsh") and tiny.hidden_size == 32 and tiny.hash_seed is not None
    assert tiny.hidden_dropout_prob == tiny.local_attention_probs_dropout_prob == 0.0
    enwik8 = ReformerConfig.from_preset("enwik8")
    assert enwik8.attn_layers == ("local", "local", "lsh", "local") * 3
    assert (enwik8.hidden_size, enwik8.feed_forward_size, enwik8.num_attention_heads) == (1024, 4096, 8)
    assert (enwik8.attention_head_size, enwik8.lsh_attn_chunk_length, enwik8.local_attn_chunk_length) == (128, 256, 128)
    assert (enwik8.num_buckets, enwik8.num_hashes, enwik8.max_length) == (512, 4, 65536)
    assert enwik8.is_decoder and enwik8.vocab_size == 258
    crime = ReformerConfig.from_preset("crime-and-punishment", memory_mode="autograd")
    assert crime.attn_layers == ("local", "lsh") * 3 and crime.num_buckets == (64, 128)
    assert (crime.axial_pos_shape, crime.axial_pos_embds_dim, crime.max_length) == ((512, 1024), (64, 192), 524288)
    assert crime.memory_mode == "autograd"
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ReformerConfig.from_preset("huge")
    with pytest.raises(ValueError, match="sums to"):
        ReformerConfig.from_preset("tiny", hidden_size=48)


def test_hf_configs_with_any_fixed_activation_or_an_eos_id_past_the_vocabulary_load():
    transformers = pytest.importorskip("transformers")
    for name in ("gelu_python", "gelu_accurate", "gelu_10", "gelu_python_tanh", "relu6", "relu2", "hardswish",
                 "laplace"):
        assert ReformerConfig.from_dict(transformers.ReformerConfig(hidden_act=name).to_dict()).hidden_act == name
    # HF's default eos_token_id=2 beside a two-token vocabulary: only generation would use it
    assert ReformerConfig.from_dict(transformers.ReformerConfig(vocab_size=2).to_dict()).eos_token_id == 2
    assert ReformerConfig(vocab_size=2, eos_token_id=[2, 70]).eos_token_id == (2, 70)


def test_generation_refuses_an_eos_id_outside_the_vocabulary():
    import torch

    from torch_reformer.generation import generate
    from torch_reformer.model import ReformerLM

    config = ReformerConfig.from_preset("tiny", vocab_size=2, eos_token_id=2, is_decoder=True, attn_layers=["local"])
    model = ReformerLM(config)
    prompt = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"eos_token_id=2 must be token ids in \[0, 2\)"):
        generate(model, prompt, max_new_tokens=2, eos_token_id=config.eos_token_id)
    assert generate(model, prompt, max_new_tokens=2).shape == (1, 5)  # never stops early without one


def test_hash_seeds_at_the_ends_of_the_generator_range_are_accepted():
    import torch

    for seed in (-(2**63), 2**64 - 1):
        assert ReformerConfig(hash_seed=seed).hash_seed == seed
        torch.Generator().manual_seed(seed)  # the range is the generator's own


def test_activation_names_match_the_layers():
    from torch_reformer.layers import get_activation

    for name in ACTIVATION_NAMES:
        assert callable(get_activation(name))


def test_config_save_and_from_pretrained_folders(tmp_path):
    config = ReformerConfig.from_preset("tiny", is_decoder=True, num_hashes=3)
    config.save_pretrained(tmp_path / "run")
    assert ReformerConfig.from_pretrained(tmp_path / "run") == config
    assert ReformerConfig.from_pretrained(tmp_path / "run" / "config.json") == config  # a file is read as it is
    assert ReformerConfig.from_pretrained(tmp_path / "run", num_hashes=1).num_hashes == 1
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        ReformerConfig.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError):
        ReformerConfig.from_pretrained(tmp_path / "run", num_hashes=0)  # overrides are validated
    # an override wins over the saved fields that follow from it
    ReformerConfig(position_embedding_type="learned", num_labels=2, id2label={0: "a", 1: "b"}).save_pretrained(
        tmp_path / "learned")
    assert ReformerConfig.from_pretrained(tmp_path / "learned", axial_pos_embds=True).position_embedding_type == "axial"
    relabelled = ReformerConfig.from_pretrained(tmp_path / "learned", num_labels=3)
    assert (relabelled.num_labels, relabelled.id2label) == (3, None)
