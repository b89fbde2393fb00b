"""Trainer: schedules, learning, evaluation, checkpoints (atomic, pruned, verified), exact resume after
SIGKILL, divergence handling, gradient accumulation and 2-process DDP parity."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torch_reformer import checkpoints, data, run_guards, training
from torch_reformer.config import ReformerConfig
from torch_reformer.model import ReformerLM
from torch_reformer.serialization import CheckpointError, load_safetensors
from torch_reformer.training import Trainer, TrainingArguments

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = dict(
    attn_layers=("lsh", "local"), hidden_size=32, num_attention_heads=2, attention_head_size=16,
    feed_forward_size=64, lsh_attn_chunk_length=4, local_attn_chunk_length=4, num_hashes=2,
    axial_pos_shape=(4, 8), axial_pos_embds_dim=(8, 24), is_decoder=True, pad_token_id=0, eos_token_id=None,
    hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds overhead on a shared machine
    yield
    torch.set_num_threads(threads)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return ReformerLM(ReformerConfig(**{**TINY, "vocab_size": 16, **overrides}))


def tiny_args(out_dir, **overrides):
    base = dict(out_dir=str(out_dir), steps=6, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=3,
                log_every=1, eval_batch_size=16)
    return TrainingArguments(**{**base, **overrides})


def quiet():
    class Silent(training.LineReporter):
        def message(self, text):
            pass

    return Silent()


def read_csv(path):
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------------------------- schedule


def test_learning_rate_schedules():
    cosine = TrainingArguments(lr=1.0, steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert training.learning_rate(5, cosine) == pytest.approx(0.5)
    assert training.learning_rate(10, cosine) == pytest.approx(1.0)
    assert training.learning_rate(60, cosine) == pytest.approx(0.1 + 0.9 * 0.5)
    assert training.learning_rate(110, cosine) == pytest.approx(0.1)
    rsqrt = TrainingArguments(lr=1.0, steps=110, warmup_steps=10, schedule="rsqrt")
    assert training.learning_rate(40, rsqrt) == pytest.approx(0.5)
    constant = TrainingArguments(lr=2.0, warmup_steps=0, schedule="constant")
    assert training.learning_rate(1, constant) == training.learning_rate(999, constant) == 2.0


def test_optimizer_decays_matrices_only():
    model = tiny_model()
    optimizer = training.build_optimizer(model, TrainingArguments(weight_decay=0.1))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("bad", [dict(steps=0), dict(batch_size=-1), dict(lr=0.0), dict(schedule="linear"),
                                 dict(clip_grad_norm=0.0), dict(eval_every=-1), dict(lr=float("nan"))])
def test_bad_arguments_are_rejected(bad):
    with pytest.raises(ValueError):
        TrainingArguments(**bad).validate()


# ------------------------------------------------------------------------------------- evaluate / learn


def test_evaluation_matches_a_direct_computation(tmp_path):
    model = tiny_model()
    task = data.DuplicationTask(16, 16, seed=0, eval_size=20)
    trainer = Trainer(model, tiny_args(tmp_path, eval_batch_size=8, eval_num_hashes=3), task, reporter=quiet())
    metrics = trainer.evaluate()
    assert model.config.num_hashes == 2 and {layer.num_hashes for layer in model.lsh_layers()} == {2}
    # Reference: one forward over the whole eval set with 3 hash rounds, under the same RNG seed.
    input_ids, labels = next(task.eval_batches(20))
    model.set_num_hashes(3)
    model.eval()
    logits = []
    with torch.random.fork_rng(), torch.no_grad():
        for index, start in enumerate(range(0, 20, 8)):
            torch.manual_seed(data.derive_seed(trainer.args.seed, "eval", index))
            logits.append(model(input_ids[start : start + 8]).logits)
    logits = torch.cat(logits)
    targets, scored = labels[:, 1:], labels[:, 1:] != -100
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0][scored]
    assert metrics["eval_loss"] == pytest.approx(float(nll.mean()), rel=1e-5)
    accuracy = (logits[:, :-1].argmax(-1) == targets)[scored].float().mean()
    assert metrics["eval_accuracy"] == pytest.approx(float(accuracy), abs=1e-9)


def test_tiny_duplication_run_learns_the_task(tmp_path):
    # One LSH layer over 32 tokens in chunks of 8: attention really goes through hashing and sorting.
    model = tiny_model(attn_layers=("lsh",), lsh_attn_chunk_length=8, position_embedding_type="learned",
                       max_position_embeddings=32)
    task = data.DuplicationTask(32, 16, seed=0, eval_size=128)
    args = tiny_args(tmp_path, steps=80, batch_size=16, lr=1e-2, warmup_steps=10, eval_every=80, log_every=40)
    metrics = Trainer(model, args, task, reporter=quiet()).train()
    # Chance is 1/15 on the copied half; the model must have learned to copy.
    assert metrics["eval_accuracy"] > 0.95, metrics
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["step"] == 80 and on_disk["status"] == "finished"
    assert on_disk["eval_accuracy"] == metrics["eval_accuracy"] and "train_loss" in on_disk and "eval_loss" in on_disk


def test_tiny_text_run_lowers_bits_per_character(tmp_path):
    text = ("the cat sat on the mat. " * 8 + "a dog ran in the fog. " * 8) * 6
    (tmp_path / "corpus.txt").write_text(text)
    dataset = data.byte_text_dataset(tmp_path / "corpus.txt", seq_len=32, eval_fraction=0.1, eval_size=16)
    model = tiny_model(vocab_size=data.BYTE_VOCAB_SIZE, eos_token_id=data.BYTE_EOS_ID)
    trainer = Trainer(model, tiny_args(tmp_path / "run", steps=60, batch_size=16, lr=1e-2, warmup_steps=5,
                                       eval_every=60), dataset, reporter=quiet())
    before = trainer.evaluate()["eval_bpc"]
    after = trainer.train()["eval_bpc"]
    assert before > 7.0  # an untrained model spreads its mass over 258 ids
    assert after < 0.5 * before, (before, after)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["eval_bpc"] == after


# ---------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_complete_pruned_and_verified(tmp_path):
    stale = tmp_path / "checkpoints" / ".tmp-step-9-123"
    stale.mkdir(parents=True)
    seen = []
    trainer = Trainer(tiny_model(), tiny_args(tmp_path, save_every=2, keep_checkpoints=2),
                      data.DuplicationTask(16, 16), reporter=quiet(), on_checkpoint=lambda s, p: seen.append(s))
    trainer.train()
    assert seen == [2, 4, 6]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4", "step-6"]
    newest = tmp_path / "checkpoints" / "step-6"
    state = checkpoints.verify_checkpoint(newest)
    assert state["step"] == 6 and state["world_size"] == 1
    assert {"config.json", "model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors",
            "trainer_state.json", "manifest.json"} == {p.name for p in newest.iterdir()}
    reloaded = ReformerLM.from_pretrained(newest)
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name])
    assert json.loads((tmp_path / "config.json").read_text()) == trainer.model.config.to_dict()
    with pytest.raises(ValueError, match="--resume"):
        Trainer(tiny_model(), tiny_args(tmp_path), data.DuplicationTask(16, 16), reporter=quiet()).train()


def test_corrupt_checkpoint_is_reported_and_resume_falls_back(tmp_path):
    Trainer(tiny_model(), tiny_args(tmp_path, save_every=2), data.DuplicationTask(16, 16), reporter=quiet()).train()
    newest = tmp_path / "checkpoints" / "step-6"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoints.verify_checkpoint(newest)
    optimizer_file = tmp_path / "checkpoints" / "step-4" / "optimizer.safetensors"
    blob = bytearray(optimizer_file.read_bytes())
    blob[-1] ^= 0xFF  # same size, damaged content
    optimizer_file.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="checksum"):
        checkpoints.verify_checkpoint(optimizer_file.parent)
    with pytest.warns(UserWarning, match="trying an older checkpoint"):
        assert checkpoints.newest_valid_checkpoint(tmp_path / "checkpoints").name == "step-2"
    trainer = Trainer(tiny_model(seed=5), tiny_args(tmp_path, steps=8, resume=True), data.DuplicationTask(16, 16),
                      reporter=quiet())
    with pytest.warns(UserWarning):
        trainer.train()
    assert checkpoints.verify_checkpoint(tmp_path / "checkpoints" / "step-8")["step"] == 8
    steps_logged = [int(row["step"]) for row in read_csv(tmp_path / "log.csv")]
    assert steps_logged == list(range(1, 9))  # rows after step 2 were logged again, once
    # The damaged step-4 and step-6 were dropped when the run continued from step 2.
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "checkpoints")] == ["step-8", "step-2"]
    (tmp_path / "checkpoints" / "step-8" / "manifest.json").unlink()
    (tmp_path / "checkpoints" / "step-2" / "rng.safetensors").unlink()
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no usable checkpoint"):
        checkpoints.newest_valid_checkpoint(tmp_path / "checkpoints")


@pytest.mark.parametrize("files", [[], {"model.safetensors": 5}, {}, "all"])
def test_a_malformed_manifest_is_a_damaged_checkpoint(tmp_path, files):
    """Hand-edited manifests (a list, a bare size, no entries) are damage like any other: the
    checkpoint fails to verify with a CheckpointError, so resuming falls back to an older one."""
    Trainer(tiny_model(), tiny_args(tmp_path, steps=2, save_every=1), data.DuplicationTask(16, 16),
            reporter=quiet()).train()
    manifest_path = tmp_path / "checkpoints" / "step-2" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if files == "all":  # every entry but one present and well formed
        del manifest["files"]["trainer_state.json"]
    else:
        manifest["files"] = files
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="corrupt manifest.json"):
        checkpoints.verify_checkpoint(manifest_path.parent)
    with pytest.warns(UserWarning, match="trying an older checkpoint"):
        assert checkpoints.newest_valid_checkpoint(tmp_path / "checkpoints").name == "step-1"


def test_resume_warns_when_the_data_order_cannot_continue(tmp_path):
    Trainer(tiny_model(), tiny_args(tmp_path, steps=2), data.DuplicationTask(16, 16), reporter=quiet()).train()
    trainer = Trainer(tiny_model(), tiny_args(tmp_path, steps=3, resume=True, batch_size=4),
                      data.DuplicationTask(16, 16, seed=5), reporter=quiet())
    with pytest.warns(UserWarning, match="batch_size, data_seed"):
        trainer.train()


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    losses = {}
    for bf16 in (False, True):
        trainer = Trainer(tiny_model(hash_seed=3), tiny_args(tmp_path / str(bf16), steps=3, bf16=bf16, eval_every=0),
                          data.DuplicationTask(16, 16), reporter=quiet())
        trainer.train()
        losses[bf16] = [float(row["train_loss"]) for row in read_csv(tmp_path / str(bf16) / "log.csv")]
    assert losses[True] != losses[False]  # autocast really ran in bf16
    assert losses[True] == pytest.approx(losses[False], abs=2e-2)


def test_resume_with_another_model_config_is_refused(tmp_path):
    Trainer(tiny_model(), tiny_args(tmp_path, steps=2), data.DuplicationTask(16, 16), reporter=quiet()).train()
    wider = tiny_model(hidden_size=48, axial_pos_embds_dim=(24, 24))
    trainer = Trainer(wider, tiny_args(tmp_path, steps=4, resume=True), data.DuplicationTask(16, 16), reporter=quiet())
    with pytest.raises(CheckpointError, match="hidden_size"):
        trainer.train()


def test_refused_resume_leaves_the_run_folder_as_it_was(tmp_path):
    Trainer(tiny_model(), tiny_args(tmp_path, steps=2), data.DuplicationTask(16, 16), reporter=quiet()).train()
    before = {name: (tmp_path / name).read_bytes() for name in ("config.json", "data.json")}
    wider = tiny_model(hidden_size=48, axial_pos_embds_dim=(24, 24))
    trainer = Trainer(wider, tiny_args(tmp_path, steps=4, resume=True), data.DuplicationTask(16, 16, seed=3),
                      reporter=quiet())
    with pytest.raises(CheckpointError, match="hidden_size"):
        trainer.train()
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


class TaskWithTokenizer(data.DuplicationTask):
    """A dataset that names a tokenizer, as a BPE text dataset does."""

    def __init__(self, tokenizer: bytes):
        super().__init__(16, 16)
        self.tokenizer = tokenizer

    def describe(self):
        return {**super().describe(), "tokenizer_sha256": hashlib.sha256(self.tokenizer).hexdigest()}

    def run_files(self):
        return {"tokenizer.json": self.tokenizer}


def test_run_folder_gets_the_tokenizer_and_resume_refuses_another(tmp_path):
    Trainer(tiny_model(), tiny_args(tmp_path, steps=2), TaskWithTokenizer(b"first"), reporter=quiet()).train()
    assert (tmp_path / "tokenizer.json").read_bytes() == b"first"
    trainer = Trainer(tiny_model(), tiny_args(tmp_path, steps=4, resume=True), TaskWithTokenizer(b"second"),
                      reporter=quiet())
    with pytest.raises(CheckpointError, match="another tokenizer"):
        trainer.train()
    assert (tmp_path / "tokenizer.json").read_bytes() == b"first"
    trainer = Trainer(tiny_model(), tiny_args(tmp_path, steps=4), TaskWithTokenizer(b"second"), reporter=quiet())
    with pytest.raises(ValueError, match="already holds checkpoints"):
        trainer.train()
    assert (tmp_path / "tokenizer.json").read_bytes() == b"first"


def test_sigint_checkpoints_the_step_and_resume_continues_exactly(tmp_path):
    class InterruptAtStep4(training.LineReporter):
        def message(self, text):
            pass

        def step(self, step, loss, tokens_per_second):
            if step == 4:
                os.kill(os.getpid(), signal.SIGINT)

    def run(out_dir, reporter, resume=False):
        model = tiny_model(hidden_dropout_prob=0.1, hash_seed=None)
        args = tiny_args(out_dir, steps=8, eval_every=4, resume=resume)
        return Trainer(model, args, data.DuplicationTask(16, 16, seed=1), reporter=reporter).train()

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(training.TrainingInterrupted, match="after step 4"):
        run(tmp_path / "a", InterruptAtStep4())
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert [p.name for p in (tmp_path / "a" / "checkpoints").iterdir()] == ["step-4"]
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert (metrics["status"], metrics["step"]) == ("interrupted", 4)
    resumed = run(tmp_path / "a", quiet(), resume=True)
    straight = run(tmp_path / "b", quiet())
    assert resumed["status"] == "finished"
    assert abs(resumed["train_loss"] - straight["train_loss"]) <= 1e-6
    assert resumed["history"] == straight["history"]


RESUME_SCRIPT = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from test_training import resume_run
torch.set_num_threads(1)
resume_run(sys.argv[1], kill_at=3)
"""


def resume_run(out_dir, kill_at=None, resume=False):
    """8 steps with dropout and RNG-drawn rotations, a checkpoint every 3, optionally SIGKILLed after one."""
    import signal

    def kill(step, path):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    model = tiny_model(hidden_dropout_prob=0.1, hash_seed=None)
    args = tiny_args(out_dir, steps=8, save_every=3, eval_every=4, resume=resume)
    return Trainer(model, args, data.DuplicationTask(16, 16, seed=1), reporter=quiet(), on_checkpoint=kill).train()


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT.format(tests=str(Path(__file__).parent)))
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "a")], capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert [p.name for p in (tmp_path / "a" / "checkpoints").iterdir()] == ["step-3"]
    resumed = resume_run(tmp_path / "a", resume=True)
    straight = resume_run(tmp_path / "b")
    assert abs(resumed["train_loss"] - straight["train_loss"]) <= 1e-6
    assert abs(resumed["eval_loss"] - straight["eval_loss"]) <= 1e-6
    assert resumed["history"] == straight["history"]


# ------------------------------------------------------------------------------------------- failures


def poisoned_model(call: int):
    """A tiny model whose ``call``-th trunk forward (a training step, when eval runs no earlier) gives NaN."""
    model = tiny_model()
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        if calls["n"] == call and module.training:
            output.last_hidden_state = output.last_hidden_state * float("nan")
        return output

    model.reformer.register_forward_hook(poison)
    return model


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = poisoned_model(5)
    trainer = Trainer(model, tiny_args(tmp_path, steps=8, save_every=2, eval_every=0), data.DuplicationTask(16, 16),
                      reporter=quiet())
    with pytest.raises(training.TrainingDiverged, match="step 5.*diverged-step-4.*last good checkpoint is .*step-2"):
        trainer.train()
    # The weights of step 4 gave the non-finite loss: their checkpoint is moved aside, not resumed from.
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "checkpoints")] == ["step-2"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved = ReformerLM.from_pretrained(tmp_path / "checkpoints" / "diverged-step-4").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())  # step 5 never updated
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "diverged"


def test_divergence_keeps_a_good_checkpoint_whatever_keep_says(tmp_path):
    """With --keep 1 the checkpoint before the newest is pruned only once the newest one's weights
    have given a finite loss, so when they do not, a good checkpoint is still there to resume from."""
    model = poisoned_model(4)
    args = tiny_args(tmp_path, steps=6, save_every=1, eval_every=0, keep_checkpoints=1)
    with pytest.raises(training.TrainingDiverged, match="step 4.*last good checkpoint is .*step-2"):
        Trainer(model, args, data.DuplicationTask(16, 16), reporter=quiet()).train()
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "checkpoints")] == ["step-2"]
    assert (tmp_path / "checkpoints" / "diverged-step-3").is_dir()


def test_weights_that_give_a_non_finite_evaluation_loss_are_not_saved(tmp_path):
    """A learning rate this large makes the first update overflow the next forward pass: the final
    evaluation is NaN, so the run stops as diverged instead of finishing with a NaN checkpoint."""
    args = tiny_args(tmp_path, steps=1, lr=1e30, warmup_steps=0, clip_grad_norm=None)
    with pytest.raises(training.TrainingDiverged, match="evaluation loss at step 1 is nan.*no good checkpoint"):
        Trainer(tiny_model(), args, data.DuplicationTask(16, 16), reporter=quiet()).train()
    assert checkpoints.list_checkpoints(tmp_path / "checkpoints") == []
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "diverged"


def test_a_model_of_ones_own_trains_and_checkpoints(tmp_path):
    """The Trainer takes any causal LM with ReformerLM's call signature and a save_pretrained(directory)."""

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_model()
            self.config = self.inner.config

        def forward(self, input_ids, labels=None, return_logits=True):
            return self.inner(input_ids, labels=labels, return_logits=return_logits)

        def save_pretrained(self, directory):
            self.inner.save_pretrained(directory)

    Trainer(Wrapper(), tiny_args(tmp_path, steps=2), data.DuplicationTask(16, 16), reporter=quiet()).train()
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "checkpoints")] == ["step-2"]


def test_an_unexpected_error_marks_the_run_failed(tmp_path):
    class BrokenData(data.DuplicationTask):
        def train_batch(self, step, batch_size, rows=None):
            if step == 3:  # the batch of optimizer step 4 (batches are indexed from 0)
                raise OSError(24, "Too many open files")
            return super().train_batch(step, batch_size, rows)

    with pytest.raises(OSError, match="Too many open files"):
        Trainer(tiny_model(), tiny_args(tmp_path, steps=6), BrokenData(16, 16), reporter=quiet()).train()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "OSError" in metrics["error"] and metrics["step"] == 3


def test_learning_rate_settings_that_cannot_train_are_refused_or_warned_about(tmp_path):
    for overrides, message in (({"lr": 1e40}, "lr must be a positive number below"),
                               ({"min_lr_ratio": -5.0}, "min_lr_ratio"), ({"min_lr_ratio": 2.0}, "min_lr_ratio")):
        with pytest.raises(ValueError, match=message):
            tiny_args(tmp_path, **overrides).validate()
    with pytest.warns(UserWarning, match="never reaches lr"):
        tiny_args(tmp_path, steps=200, warmup_steps=1000).warn_about_warmup()


def test_a_step_that_cannot_fit_in_memory_is_refused_before_it_starts(tmp_path, monkeypatch):
    """The floor is 4 fp32 (rows, seq_len, hidden) tensors: a micro-batch above the available memory
    is a clear error at construction instead of the kernel killing the process mid-step."""
    args = tiny_args(tmp_path, batch_size=8, grad_accum=2)
    hidden = tiny_model().config.hidden_size
    floor = 4 * (8 // 2) * 16 * hidden * 4
    monkeypatch.setattr(run_guards, "available_memory", lambda device: floor - 1)
    with pytest.raises(ValueError, match=f"4 fp32 tensors of 4 x 16 x {hidden}.*--grad-accum"):
        Trainer(tiny_model(), args, data.DuplicationTask(16, 16), reporter=quiet())
    monkeypatch.setattr(run_guards, "available_memory", lambda device: floor)
    Trainer(tiny_model(), args, data.DuplicationTask(16, 16), reporter=quiet())


def test_inputs_that_do_not_fit_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="multiple of 4"):
        Trainer(tiny_model(), tiny_args(tmp_path, batch_size=6, grad_accum=4), data.DuplicationTask(16, 16))
    with pytest.raises(ValueError, match="--seq-len 64"):
        Trainer(tiny_model(), tiny_args(tmp_path), data.DuplicationTask(64, 16))
    with pytest.raises(ValueError, match="vocab_size"):
        Trainer(tiny_model(), tiny_args(tmp_path), data.DuplicationTask(16, 32))


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """LSH rotations are drawn per optimizer step (not per micro-batch), so without a hash_seed too the
    micro-steps of a step hash as one forward pass over the whole batch would."""
    losses = []
    for accum in (1, 4):
        trainer = Trainer(tiny_model(), tiny_args(tmp_path / str(accum), grad_accum=accum, eval_every=0),
                          data.DuplicationTask(16, 16), reporter=quiet())
        trainer.train()
        losses.append([float(row["train_loss"]) for row in read_csv(tmp_path / str(accum) / "log.csv")])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_training import ddp_run
ddp_run(sys.argv[1], steps=int(sys.argv[2]), fsdp=sys.argv[3] == "fsdp", resume=sys.argv[4] == "resume")
torch.distributed.destroy_process_group()
"""


def ddp_run(out_dir, steps=4, fsdp=False, resume=False):
    # Micro-batches of 2 rows whatever the process count (the same shapes, so the same rounding), and more
    # than one per step, so gradient synchronisation is skipped on all but the last.
    grad_accum = 4 // int(os.environ.get("WORLD_SIZE", "1"))
    args = tiny_args(out_dir, steps=steps, eval_every=2, grad_accum=grad_accum, save_every=2, fsdp=fsdp,
                     resume=resume, warmup_steps=2, schedule="constant")
    Trainer(tiny_model(), args, data.DuplicationTask(16, 16, seed=2), reporter=quiet()).train()


def _two_processes(tmp_path, out_dir, steps=4, mode="ddp", resume=""):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(out_dir), str(steps), mode, resume or "fresh"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr


def _assert_same_log(one_dir, two_dir, steps):
    one, two = read_csv(one_dir / "log.csv"), read_csv(two_dir / "log.csv")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [str(s) for s in range(1, steps + 1)]
    for key in ("train_loss", "grad_norm", "eval_loss", "eval_accuracy"):
        first = [float(r[key]) for r in one if r[key]]
        second = [float(r[key]) for r in two if r[key]]
        assert len(first) == len(second) > 0 and first == pytest.approx(second, abs=1e-5), key
    assert not math.isnan(float(one[-1]["train_loss"]))


def test_two_processes_match_one_process(tmp_path):
    _two_processes(tmp_path, tmp_path / "two")
    ddp_run(tmp_path / "one")
    _assert_same_log(tmp_path / "one", tmp_path / "two", 4)
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["world_size"] == 2


def test_two_sharded_processes_match_one_process_and_resume_either_way(tmp_path):
    """FSDP2 (--fsdp): the same losses as one process; its checkpoints hold whole tensors, so a sharded
    run resumes in one process, and a sharded run resumes a sharded checkpoint, continuing exactly."""
    ddp_run(tmp_path / "one", steps=6)
    _two_processes(tmp_path, tmp_path / "sharded", steps=6, mode="fsdp")
    _assert_same_log(tmp_path / "one", tmp_path / "sharded", 6)
    weights = load_safetensors(tmp_path / "sharded" / "checkpoints" / "step-6" / "model.safetensors")
    reference = load_safetensors(tmp_path / "one" / "checkpoints" / "step-6" / "model.safetensors")
    assert weights.keys() == reference.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5)
    for resumed, two in (("sharded-then-one", False), ("sharded-then-sharded", True)):
        _two_processes(tmp_path, tmp_path / resumed, steps=4, mode="fsdp")
        if two:
            _two_processes(tmp_path, tmp_path / resumed, steps=6, mode="fsdp", resume="resume")
        else:
            ddp_run(tmp_path / resumed, steps=6, resume=True)
        _assert_same_log(tmp_path / "one", tmp_path / resumed, 6)
