"""`reformer bench quality`: what LSH attention costs in quality.

(a) ``duplication``: the Reformer paper's Table 2 at reduced size. A 1-layer causal model (d 256,
    4 heads, learned positions) learns the duplication task (``0 w 0 w``, accuracy on the second ``w``) with LSH
    attention of 1, 2 or 4 hashes or with full attention, and each trained model is evaluated with
    LSH of 1, 2, 4 and 8 hashes and with full attention. As in the paper, "full" is shared-QK
    attention over the whole sequence, so the same weights run either way: it is an LSH layer
    whose chunk is the whole sequence (the exact path, no hashing).
(b) ``bpc``: bits per character on held-out text of byte-level models of equal size trained for
    the same steps with LSH, local or full (SDPA) attention in every layer. The corpus exists on
    every machine: the first ``.py`` files of the running Python's standard library in sorted
    order, ``sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))``, skipping files that
    are not UTF-8, until ``corpus_bytes`` bytes; the last 10 % of that byte stream is held out.
    The exact list (Python version, file count, first and last names, bytes) is recorded.

Each training runs in a fresh process through the harness, with the project's ``Trainer`` and
datasets (``torch_reformer.training``, ``torch_reformer.data``).
"""

from __future__ import annotations

import io
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from .harness import Experiment, Point, Profile, Series, View

TRAIN_MODES = ("lsh-1", "lsh-2", "lsh-4", "full")
EVAL_MODES = ("lsh-1", "lsh-2", "lsh-4", "lsh-8", "full")
BPC_ATTENTION = ("lsh", "local", "full")
HELD_OUT_FRACTION = 0.1


def mode_label(mode: str) -> str:
    """"lsh-2" -> "LSH-2", "full" -> "full"."""
    return mode.upper() if mode.startswith("lsh") else mode


def stdlib_corpus(corpus_bytes: int) -> list[Path]:
    """The first UTF-8 ``*.py`` files of the standard library (sorted by name) holding ``corpus_bytes``."""
    from torch_reformer.data import find_invalid_utf8

    files, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        size = path.stat().st_size
        if size == 0 or find_invalid_utf8(path) is not None:
            continue
        files.append(path)
        total += size
        if total >= corpus_bytes:
            break
    return files


def describe_corpus(files: list[Path]) -> str:
    total = sum(f.stat().st_size for f in files)
    return (f"Python {sys.version.split()[0]} standard library {files[0].parent}: the first {len(files)} "
            f"*.py files in sorted order ({files[0].name} ... {files[-1].name}), {total:,} bytes")


def duplication_plan(profile: Profile) -> Experiment:
    settings = profile.duplication
    series = [
        Series(label=f"trained with {mode_label(mode)}", key=mode, impl="ours",
               points=[Point("eval", dict(task="duplication", impl="ours", train_mode=mode, settings=settings,
                                          device=profile.device, dtype=profile.dtype))])
        for mode in TRAIN_MODES
    ]
    return Experiment(
        key="duplication", title="Duplication task accuracy by train / eval attention (paper Table 2, reduced)",
        x_name="evaluated with", series=series, views=[View("cells", "eval accuracy on the second half")],
        notes=[f"1 layer, d {settings['hidden']}, {settings['heads']} heads, ff {2 * settings['hidden']}, learned "
               f"positions (axial ones at HF's initialisation keep small models at chance here), length "
               f"{settings['length']}, {settings['vocab'] - 1} symbols, LSH chunk {settings['chunk']} (buckets chosen "
               f"from the length), batch {settings['batch']}, {settings['steps']} steps of AdamW (lr "
               f"{settings['lr']}), eval on {settings['eval_size']} held-out sequences. \"full\" = shared-QK "
               "attention over the whole sequence (an LSH layer whose chunk is the whole sequence)."],
        plot_metric="cells", timeout_s=profile.long_timeout_s,
    )


def bpc_plan(profile: Profile) -> Experiment:
    settings = profile.bpc
    series = [
        Series(label=f"{attention}{' (SDPA)' if attention == 'full' else ''}", key=attention, impl="ours",
               points=[Point("text", dict(task="bpc", impl="ours", attention=attention, settings=settings,
                                          device=profile.device, dtype=profile.dtype))])
        for attention in BPC_ATTENTION
    ]
    return Experiment(
        key="bpc", title="Bits per character on held-out Python source (byte-level LM)",
        x_name="measure", series=series, views=[View("cells", "held-out bits per character and training cost")],
        notes=[f"{settings['layers']} layers of the same attention type, d {settings['hidden']}, {settings['heads']} "
               f"heads, ff {2 * settings['hidden']}, learned positions, chunk {settings['chunk']} (LSH: 2 hashes), length "
               f"{settings['seq_len']}, batch {settings['batch']}, {settings['steps']} steps, dropout 0. "
               f"Corpus: {describe_corpus(stdlib_corpus(settings['corpus_bytes']))}; the last "
               f"{HELD_OUT_FRACTION:.0%} held out.",
               "A budget this short is early training for these models (a separate run of the full-attention model, "
               "1,000 steps at lr 5e-3, was at 3.51 held-out bpc at step 300 and 3.02 at step 1,000): the table ranks "
               "how soon each attention type becomes useful, not the quality each would converge to."],
        plot_metric="cells", timeout_s=profile.long_timeout_s,
    )


def plan(profile: Profile) -> list[Experiment]:
    experiments = [duplication_plan(profile), bpc_plan(profile)]
    return [e for e in experiments if profile.wants(e.key)]


# ------------------------------------------------------------------------------------ child-side tasks


def duplication_config(settings: dict, mode: str) -> dict:
    """The 1-layer model of the duplication table for ``mode`` ("lsh-N" or "full")."""
    hidden, length = settings["hidden"], settings["length"]
    hashes = int(mode.split("-")[1]) if mode.startswith("lsh") else 1
    return dict(
        attn_layers=["lsh"] * settings.get("layers", 1), vocab_size=settings["vocab"], hidden_size=hidden, num_attention_heads=settings["heads"],
        attention_head_size=hidden // settings["heads"], feed_forward_size=2 * hidden, num_hashes=hashes,
        lsh_attn_chunk_length=length if mode == "full" else settings["chunk"], is_decoder=True,
        hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
        position_embedding_type="learned", max_position_embeddings=length, pad_token_id=0, eos_token_id=None,
    )


def _train(model, dataset, settings: dict, device: str, dtype: str):
    """Train ``model`` with the project's Trainer in a scratch folder; return (trainer, metrics, seconds)."""
    from torch_reformer.training import LineReporter, Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            out_dir=scratch, steps=settings["steps"], batch_size=settings["batch"], lr=settings["lr"],
            warmup_steps=max(1, settings["steps"] // 10), eval_every=0, log_every=settings["steps"],
            eval_batch_size=settings["batch"], bf16=dtype == "bfloat16", progress=False,
        )
        trainer = Trainer(model.to(device), args, dataset, reporter=LineReporter(io.StringIO()))
        started = time.perf_counter()
        metrics = trainer.train()
        return trainer, metrics, time.perf_counter() - started


def duplication_task(spec: dict) -> dict:
    """Train with ``spec["train_mode"]``, then evaluate the same weights in every eval mode."""
    import torch

    from torch_reformer.config import ReformerConfig
    from torch_reformer.data import DuplicationTask
    from torch_reformer.model import ReformerLM
    from torch_reformer.training import LineReporter, Trainer

    settings = spec["settings"]
    torch.manual_seed(0)
    dataset = DuplicationTask(settings["length"], settings["vocab"], seed=0, eval_size=settings["eval_size"])
    model = ReformerLM(ReformerConfig(**duplication_config(settings, spec["train_mode"])))
    trainer, metrics, seconds = _train(model, dataset, settings, spec["device"], spec["dtype"])
    cells = {}
    for mode in EVAL_MODES:
        evaluated = ReformerLM(ReformerConfig(**duplication_config(settings, mode)))
        evaluated.load_state_dict(model.state_dict())  # LSH and shared-QK full attention share their weights
        evaluator = Trainer(evaluated, trainer.args, dataset, reporter=LineReporter(io.StringIO()))
        cells[mode_label(mode)] = evaluator.evaluate()["eval_accuracy"]
    return {"cells": cells, "train_seconds": seconds, "final_train_loss": metrics.get("train_loss")}


def bpc_config(settings: dict, attention: str) -> dict:
    from torch_reformer.data import BYTE_EOS_ID, BYTE_PAD_ID, BYTE_VOCAB_SIZE

    hidden, length, chunk = settings["hidden"], settings["seq_len"], settings["chunk"]
    return dict(
        attn_layers=[attention] * settings["layers"], vocab_size=BYTE_VOCAB_SIZE, hidden_size=hidden,
        num_attention_heads=settings["heads"], attention_head_size=hidden // settings["heads"],
        feed_forward_size=2 * hidden, num_hashes=2, lsh_attn_chunk_length=chunk, local_attn_chunk_length=chunk,
        is_decoder=True, hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0, position_embedding_type="learned", max_position_embeddings=length,
        pad_token_id=BYTE_PAD_ID, eos_token_id=BYTE_EOS_ID,
    )


def bpc_task(spec: dict) -> dict:
    """Train a byte-level LM with ``spec["attention"]`` in every layer; held-out bits per character."""
    import torch

    from torch_reformer.config import ReformerConfig
    from torch_reformer.data import BYTE_VOCAB_SIZE, ByteSource, TextDataset, byte_characters_per_token
    from torch_reformer.model import ReformerLM

    settings = spec["settings"]
    files = stdlib_corpus(settings["corpus_bytes"])
    dataset = TextDataset(ByteSource(files), settings["seq_len"], BYTE_VOCAB_SIZE, byte_characters_per_token(),
                          seed=0, eval_fraction=HELD_OUT_FRACTION, eval_size=settings["eval_size"],
                          description={"task": "bytes", "data": describe_corpus(files)})
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig(**bpc_config(settings, spec["attention"])))
    _, metrics, seconds = _train(model, dataset, settings, spec["device"], spec["dtype"])
    cells = {"eval bpc": metrics["eval_bpc"], "eval loss (nats)": metrics["eval_loss"],
             "train seconds": seconds, "parameters": model.num_parameters()}
    return {"cells": cells, "corpus": describe_corpus(files), "files": [f.name for f in files]}
