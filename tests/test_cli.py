"""The `reformer` command: train/generate/tokenizer end to end on tiny settings, and every bad input of
SPEC §10 ending as one line on stderr with a non-zero exit status."""

import io
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from torch_reformer import cli
from torch_reformer.config import ReformerConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# A duplication run small enough for the test suite (seconds): 16 tokens, one LSH and one local layer.
TINY_TRAIN = ["train", "--seq-len", "16", "--vocab-size", "8", "--steps", "4", "--batch-size", "4",
              "--eval-every", "2", "--eval-size", "8", "--log-every", "1", "--threads", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared machine
    yield
    torch.set_num_threads(threads)


def run(argv, capsys):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err):
    assert code not in (0, None)
    lines = [line for line in err.splitlines() if line.strip() and "warning" not in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error" in lines[0]


def trained_run(tmp_path, capsys, *extra):
    out = tmp_path / "run"
    code, stdout, err = run([*TINY_TRAIN, "--out", out, *extra], capsys)
    assert code == 0, err
    return out, stdout


# ------------------------------------------------------------------------------------------------ train


def test_train_duplication_writes_the_run_folder(tmp_path, capsys):
    out, stdout = trained_run(tmp_path, capsys, "--attn", "mixed", "--layers", "2", "--save-every", "2", "--keep", "1")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["status"] == "finished"
    for key in ("train_loss", "eval_loss", "eval_accuracy"):
        assert isinstance(metrics[key], float)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    config = ReformerConfig.from_json_file(out / "config.json")
    assert config.attn_layers == ("local", "lsh") and config.vocab_size == 8 and config.is_decoder
    assert config.max_length >= 16
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-4"]
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 5
    assert "\r" not in stdout and "step 4/4" in stdout and "done: step 4" in stdout  # plain lines off a terminal


def test_train_resume_continues_to_more_steps(tmp_path, capsys):
    out, _ = trained_run(tmp_path, capsys)
    code, stdout, err = run([*TINY_TRAIN, "--out", out, "--resume", "--steps", "6"], capsys)
    assert code == 0, err
    assert "resumed from" in stdout and json.loads((out / "metrics.json").read_text())["step"] == 6


def test_train_on_text_reports_bits_per_character(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Some text to model, byte by byte. " * 30)
    code, _, err = run([*TINY_TRAIN[:1], "--data", corpus, "--seq-len", "32", "--steps", "3", "--batch-size", "4",
                        "--eval-every", "3", "--out", tmp_path / "text"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "text" / "metrics.json").read_text())
    assert metrics["eval_bpc"] > 0 and "eval_accuracy" not in metrics
    assert json.loads((tmp_path / "text" / "data.json").read_text())["task"] == "bytes"
    assert ReformerConfig.from_json_file(tmp_path / "text" / "config.json").vocab_size == 258
    # A corpus that grew since the checkpoint is noticed when resuming.
    corpus.write_text("Some text to model, byte by byte. " * 31)
    with pytest.warns(UserWarning, match="data_bytes"):
        code, _, err = run([*TINY_TRAIN[:1], "--data", corpus, "--seq-len", "32", "--steps", "4", "--batch-size", "4",
                            "--eval-every", "4", "--out", tmp_path / "text", "--resume"], capsys)
    assert code == 0, err


def test_a_run_folder_inside_the_data_folder_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "corpus.txt").write_text("Some text to model, byte by byte. " * 30)
    monkeypatch.chdir(tmp_path)
    code, _, err = run([*TINY_TRAIN[:1], "--data", ".", "--seq-len", "32", "--steps", "2", "--batch-size", "4"], capsys)
    assert_one_line_error(code, err)
    assert "inside the data folder" in err and not (tmp_path / "runs").exists()


def test_tokenizer_train_then_train_with_it(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the tokenizer learns merges from this line of text.\n" * 100)
    tokenizer = tmp_path / "tok.json"
    code, stdout, err = run(["tokenizer", "train", "--data", corpus, "--vocab-size", "280", "--out", tokenizer], capsys)
    assert code == 0 and tokenizer.is_file() and "280 tokens" in stdout, err
    code, _, err = run(["train", "--data", corpus, "--tokenizer", tokenizer, "--seq-len", "16", "--steps", "2",
                        "--batch-size", "2", "--out", tmp_path / "bpe"], capsys)
    assert code == 0, err
    assert (tmp_path / "bpe" / "tokenizer.json").read_bytes() == tokenizer.read_bytes()
    assert json.loads((tmp_path / "bpe" / "metrics.json").read_text())["eval_bpc"] > 0
    # Refused runs leave nothing behind: a new folder is removed with the token cache it got, and a
    # refused resume of an existing run keeps its cache as it was.
    bad_split = ["--batch-size", "3", "--grad-accum", "2"]
    for refused, folder in ((bad_split, "split"), (["--seq-len", "100000"], "long"), (["--resume", "--layers", "3"], "bpe")):
        before = sorted(p.name for p in (tmp_path / folder).rglob("*")) if (tmp_path / folder).exists() else None
        code, _, err = run(["train", "--data", corpus, "--tokenizer", tokenizer, "--seq-len", "16", "--steps", "1",
                            "--batch-size", "2", *refused, "--out", tmp_path / folder], capsys)
        assert_one_line_error(code, err)
        after = sorted(p.name for p in (tmp_path / folder).rglob("*")) if (tmp_path / folder).exists() else None
        assert after == before, (refused, err)


def test_default_config_and_flags():
    args = SimpleNamespace(config=None, attn=None, layers=None, num_hashes=None)
    config = cli.build_config(args, 128, 64, 0, None)
    assert config.attn_layers == ("lsh",) * cli.DEFAULTS["layers"] and config.max_length >= 128
    assert config.num_hashes == cli.DEFAULTS["num_hashes"] and config.is_decoder
    args = SimpleNamespace(config="tiny", attn="mixed", layers=4, num_hashes=3)
    config = cli.build_config(args, 64, 258, 0, 1)
    assert config.attn_layers == ("local", "lsh", "local", "lsh") and config.num_hashes == 3
    assert (config.vocab_size, config.pad_token_id, config.eos_token_id) == (258, 0, 1)
    assert config.hidden_size == ReformerConfig.from_preset("tiny").hidden_size


def test_progress_bar_shows_loss_speed_and_eta():
    stream = io.StringIO()
    bar = cli.ProgressBar(stream=stream)
    bar.start(0, 10)
    bar.step(10, 1.25, 12345.0)
    bar.update({"step": 10, "eval_accuracy": 0.5})
    bar.close()
    text = stream.getvalue()
    assert "10/10" in text and "loss 1.2500" in text and "12,345 tok/s" in text and "ETA 0:00" in text
    assert "eval_accuracy 0.5000" in text


# --------------------------------------------------------------------------------------------- generate


def test_generate_continues_a_duplication_prompt(tmp_path, capsys):
    from torch_reformer.model import ReformerLM

    if not hasattr(ReformerLM, "generate"):
        pytest.skip("model.generate is not available")
    pytest.importorskip("torch_reformer.generation")
    out, _ = trained_run(tmp_path, capsys)
    code, stdout, err = run(["generate", "--checkpoint", out, "--prompt", "0 3 4 5", "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    tokens = stdout.split()
    assert len(tokens) == 3 and all(0 <= int(t) < 8 for t in tokens)


# ------------------------------------------------------------------------------------------- bad inputs


def bad_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1") * 50)
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    return {
        "missing data": ["train", "--data", tmp_path / "nope.txt"],
        "empty text": ["train", "--data", empty],
        "non-UTF-8 text": ["train", "--data", latin],
        "too little text": ["train", "--data", short, "--seq-len", "64"],
        "odd duplication length": ["train", "--seq-len", "15"],
        "length beyond the config": ["train", "--config", "tiny", "--seq-len", "256"],
        "unknown preset": ["train", "--config", "huge"],
        "missing config file": ["train", "--config", tmp_path / "none.json"],
        "missing tokenizer": ["train", "--data", latin, "--tokenizer", tmp_path / "none.json"],
        "tokenizer without data": ["train", "--tokenizer", tmp_path / "none.json"],
        "batch not divisible": ["train", "--batch-size", "6", "--grad-accum", "4"],
        "bad steps": ["train", "--steps", "0"],
        "bad number": ["train", "--lr", "fast"],
        "bad choice": ["train", "--attn", "sparse"],
        "missing checkpoint": ["generate", "--checkpoint", tmp_path / "none", "--prompt", "hi"],
        "not a checkpoint": ["generate", "--checkpoint", tmp_path, "--prompt", "hi"],
        "no subcommand": [],
        "tokenizer vocab too small": ["tokenizer", "train", "--data", short, "--vocab-size", "5",
                                      "--out", tmp_path / "t"],
        "tokenizer vocab too large": ["tokenizer", "train", "--data", short, "--vocab-size", "99999999999999999999",
                                      "--out", tmp_path / "t"],
        "tokenizer out is a folder": ["tokenizer", "train", "--data", short, "--vocab-size", "300",
                                      "--out", tmp_path],
        "length beyond a preset, before its data is built": ["train", "--config", "enwik8", "--seq-len", "100000000"],
        "top-p above 1": ["generate", "--checkpoint", tmp_path, "--prompt", "hi", "--top-p", "1.5"],
        "eval hashes without LSH layers": ["train", "--attn", "local", "--eval-hashes", "2"],
    }


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    for name, argv in bad_inputs(tmp_path).items():
        code, _, err = run([*argv, "--out", tmp_path / "out"] if argv[:1] == ["train"] else argv, capsys)
        try:
            assert_one_line_error(code, err)
        except AssertionError:
            raise AssertionError(f"{name}: exit {code}, stderr {err!r}") from None


def test_checkpoint_problems_give_one_line_errors(tmp_path, capsys):
    out, _ = trained_run(tmp_path, capsys)
    code, _, err = run([*TINY_TRAIN, "--out", out], capsys)  # would overwrite a run
    assert_one_line_error(code, err)
    assert "--resume" in err
    code, stdout, err = run([*TINY_TRAIN, "--out", out, "--resume", "--layers", "3"], capsys)  # incompatible
    assert_one_line_error(code, err)
    assert "another model config" in err
    assert "training" not in stdout  # refused before the run is announced
    weights = out / "checkpoints" / "step-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, and the only checkpoint
    code, _, err = run([*TINY_TRAIN, "--out", out, "--resume", "--steps", "6"], capsys)
    assert_one_line_error(code, err)
    assert "truncated" in err
    code, _, err = run(["generate", "--checkpoint", out, "--prompt", "0 1"], capsys)
    assert_one_line_error(code, err)
    code, _, err = run(["generate", "--checkpoint", out / "checkpoints" / "step-4", "--prompt", "0 1"], capsys)
    assert_one_line_error(code, err)


def test_generate_is_reproducible_by_default_and_points_hf_folders_to_convert(tmp_path, capsys):
    out, _ = trained_run(tmp_path, capsys)
    argv = ["generate", "--checkpoint", out, "--prompt", "0 3 4 5", "--max-new-tokens", "3", "--do-sample"]
    first, second = run(argv, capsys), run(argv, capsys)
    assert first[0] == 0 and first[1] == second[1]
    hf_like = tmp_path / "hf"
    hf_like.mkdir()
    (hf_like / "config.json").write_text(json.dumps({"model_type": "reformer"}))
    code, _, err = run(["generate", "--checkpoint", hf_like, "--prompt", "hi"], capsys)
    assert_one_line_error(code, err)
    assert "reformer convert" in err
    # A checkpoint copied out of its run still knows its task from its trainer_state.json.
    copied = tmp_path / "copied"
    shutil.copytree(next((out / "checkpoints").iterdir()), copied)
    greedy = ["--prompt", "0 3 4 5", "--max-new-tokens", "3"]
    from_run = run(["generate", "--checkpoint", out, *greedy], capsys)
    from_copy = run(["generate", "--checkpoint", copied, *greedy], capsys)
    assert from_run[0] == from_copy[0] == 0 and from_run[1] == from_copy[1]
    assert all(token.isdigit() for token in from_copy[1].split())


def test_generate_rejects_out_of_range_and_too_long_prompts(tmp_path, capsys):
    out, _ = trained_run(tmp_path, capsys)
    for prompt, extra in (("0 99", []), ("zero one", []), ("", []), ("0 1", ["--max-new-tokens", "100"])):
        code, _, err = run(["generate", "--checkpoint", out, "--prompt", prompt, *extra], capsys)
        assert_one_line_error(code, err)


def test_nan_loss_gives_one_line_error(tmp_path, capsys):
    code, _, err = run([*TINY_TRAIN, "--out", tmp_path / "nan", "--lr", "1e30", "--warmup", "0", "--clip", "none",
                        "--steps", "20"], capsys)
    assert_one_line_error(code, err)
    assert "diverged" in err
    assert json.loads((tmp_path / "nan" / "metrics.json").read_text())["status"] == "diverged"


def test_convert_round_trips_through_hf_format(tmp_path, capsys):
    pytest.importorskip("transformers")
    from torch_reformer.model import ReformerLM

    config = ReformerConfig.from_preset("tiny", is_decoder=True)
    model = ReformerLM(config).eval()
    model.save_pretrained(tmp_path / "ours")
    code, out, err = run(["convert", str(tmp_path / "ours"), str(tmp_path / "hf")], capsys)
    assert code == 0 and "-> ReformerModelWithLMHead" in out, err
    code, out, err = run(["convert", str(tmp_path / "hf"), str(tmp_path / "back")], capsys)
    assert code == 0 and "-> ReformerLM" in out, err
    back = ReformerLM.from_pretrained(tmp_path / "back")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name
    code, _, err = run(["convert", str(tmp_path / "missing"), str(tmp_path / "x")], capsys)
    assert_one_line_error(code, err)
    run_folder, _ = trained_run(tmp_path, capsys)
    code, _, err = run(["convert", str(run_folder), str(tmp_path / "y")], capsys)
    assert_one_line_error(code, err)
    assert "training run folder" in err
    # A destination that holds anything (here the run folder) is refused and left as it was.
    before = sorted((p.relative_to(run_folder), p.stat().st_mtime_ns) for p in run_folder.rglob("*"))
    code, _, err = run(["convert", str(tmp_path / "hf"), str(run_folder)], capsys)
    assert_one_line_error(code, err)
    assert "not an empty folder" in err
    assert sorted((p.relative_to(run_folder), p.stat().st_mtime_ns) for p in run_folder.rglob("*")) == before
    (tmp_path / "empty").mkdir()
    code, out, err = run(["convert", str(tmp_path / "hf"), str(tmp_path / "empty")], capsys)
    assert code == 0 and "-> ReformerLM" in out, err


def training_checkpoint(tmp_path):
    from torch_reformer.checkpoints import capture_rng_states, save_checkpoint
    from torch_reformer.model import ReformerLM

    model = ReformerLM(ReformerConfig.from_preset("tiny", is_decoder=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return save_checkpoint(tmp_path / "run" / "checkpoints", 3, model, optimizer, [capture_rng_states()], {"step": 3})


def test_convert_checks_a_training_checkpoint_against_its_manifest(tmp_path, capsys):
    checkpoint = training_checkpoint(tmp_path)
    code, out, err = run(["convert", checkpoint, tmp_path / "good"], capsys)
    assert code == 0 and "ReformerLM -> ReformerModelWithLMHead" in out, err
    weights = checkpoint / "model.safetensors"
    saved = weights.read_bytes()
    damaged = bytearray(saved)
    damaged[-5] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(damaged))
    code, _, err = run(["convert", checkpoint, tmp_path / "bad"], capsys)
    assert_one_line_error(code, err)
    assert "model.safetensors does not match its checksum" in err
    assert not (tmp_path / "bad").exists()
    weights.write_bytes(saved)
    config = checkpoint / "config.json"
    config.write_text(config.read_text().replace('"vocab_size": 64', '"vocab_size": 65'))  # still valid JSON
    code, _, err = run(["convert", checkpoint, tmp_path / "bad"], capsys)
    assert_one_line_error(code, err)
    assert "config.json does not match its checksum" in err


def test_convert_refuses_damaged_weights_in_one_line_and_leaves_no_folder(tmp_path, capsys):
    from torch_reformer.model import ReformerLM
    from torch_reformer.serialization import load_safetensors, save_safetensors

    ReformerLM(ReformerConfig.from_preset("tiny", is_decoder=True)).save_pretrained(tmp_path / "ours")
    assert run(["convert", tmp_path / "ours", tmp_path / "hf"], capsys)[0] == 0  # an HF folder, no transformers needed
    hf_state = load_safetensors(tmp_path / "hf" / "model.safetensors")
    our_state = load_safetensors(tmp_path / "ours" / "model.safetensors")

    def hf_folder(name, file_name, write):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(tmp_path / "hf" / "config.json", folder)
        write(folder / file_name)
        return folder

    int_bias = {**hf_state, "lm_head.bias": hf_state["lm_head.bias"].long()}
    float8_bias = {**hf_state, "lm_head.bias": hf_state["lm_head.bias"].to(torch.float8_e4m3fn)}
    int_embedding = {**our_state, "reformer.embeddings.word_embeddings.weight": torch.zeros(64, 32, dtype=torch.long)}
    shutil.copytree(tmp_path / "ours", tmp_path / "ours_int")
    save_safetensors(int_embedding, tmp_path / "ours_int" / "model.safetensors")
    cases = {
        "int_bias": (hf_folder("int_bias", "model.safetensors", lambda p: save_safetensors(int_bias, p)),
                     "tensor lm_head.bias has dtype torch.int64"),
        "float8_bin": (hf_folder("float8_bin", "pytorch_model.bin", lambda p: torch.save(float8_bias, p)),
                       "tensor lm_head.bias has dtype torch.float8_e4m3fn"),
        "int_embedding": (tmp_path / "ours_int", "word_embeddings.weight has dtype torch.int64"),
        "list_index": (hf_folder("list_index", "model.safetensors.index.json", lambda p: p.write_text(
            json.dumps({"weight_map": ["a"]}))), "'weight_map' must be an object mapping each tensor name"),
        "garbage_bin": (hf_folder("garbage_bin", "pytorch_model.bin", lambda p: p.write_bytes(b"garbage" * 100)),
                        "pytorch_model.bin is damaged or is not a plain PyTorch state dict of tensors"),
    }
    for name, (source, message) in cases.items():
        destination = tmp_path / "new" / name
        code, out, err = run(["convert", source, destination], capsys)
        assert_one_line_error(code, err)
        assert message in err and "weights_only=False" not in err, name
        assert not (tmp_path / "new").exists(), name  # neither the destination nor its new parent


def test_convert_of_a_subclass_says_how_to_convert_it_as_its_base_class(tmp_path, capsys):
    from torch_reformer.model import ReformerLM

    class MyLM(ReformerLM):
        pass

    MyLM(ReformerConfig.from_preset("tiny", is_decoder=True)).save_pretrained(tmp_path / "mine")
    code, _, err = run(["convert", tmp_path / "mine", tmp_path / "hf"], capsys)
    assert_one_line_error(code, err)
    assert "if MyLM is a subclass of ReformerLM that adds no weights, set \"architectures\": [\"ReformerLM\"]" in err
    config_path = tmp_path / "mine" / "config.json"
    config_path.write_text(config_path.read_text().replace('"MyLM"', '"ReformerLM"'))  # doing what it says
    code, out, err = run(["convert", tmp_path / "mine", tmp_path / "hf"], capsys)
    assert code == 0 and "ReformerLM -> ReformerModelWithLMHead" in out, err


def test_bench_subcommand_forwards_its_own_options(capsys, monkeypatch):
    import torch_reformer.bench as bench

    seen = []
    monkeypatch.setattr(bench, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["bench", "--help-like", "memory"]) == 0
    assert seen == [["--help-like", "memory"]]
