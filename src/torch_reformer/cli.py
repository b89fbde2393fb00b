"""The ``reformer`` command: ``train``, ``generate`` and ``tokenizer train``.

Each subcommand is one ``_add_<name>(subcommands)`` function that declares its flags and sets
``run=`` to the function doing the work; ``SUBCOMMANDS`` lists them, so a new subcommand (``convert``,
``bench``) is one more function and one more entry. This module only parses arguments and calls the
library; heavy imports (torch, the model) happen inside the functions that need them.

Errors a user can cause (missing files, empty or non-UTF-8 text, lengths that do not fit the config,
corrupt or incompatible checkpoints, token ids out of range, a diverged run, bad flag values) end as
one line on stderr and a non-zero exit status: 2 for bad flags, 1 for everything else. Warnings are
printed as one line too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

from .arguments import NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, OneLineArgumentParser, number_type

# The default duplication-task model: the paper's Table 2 setting at reduced size (one LSH layer, 2 hash
# rounds, 128 tokens in chunks of 16). On 2 busy CPU cores it passed 99.8% eval accuracy by step 100 for
# seeds 0-3. Positions use a learned table: with axial embeddings at HF's init (std 1.0) small models
# stayed at chance on this task, and at std 0.02 shared-QK LSH still missed the one position pair
# (k + 1, L/2 + k) that the axial factorisation does not map like the others (93% at length 32).
DEFAULTS = dict(seq_len=128, vocab_size=64, layers=1, hidden_size=128, heads=4, chunk_length=16, num_hashes=2,
                steps=200, batch_size=16, lr=3e-3, eval_every=50, eval_size=256)


# ------------------------------------------------------------------------------------------------ train


def _add_train(subcommands) -> None:
    parser = subcommands.add_parser(
        "train", help="train a causal Reformer LM (default: the duplication task)",
        description="Train a causal Reformer LM. Without --data it runs the Reformer paper's duplication "
                    "task (sequences 0 w 0 w) with a small LSH model; with --data, a byte-level (or --tokenizer "
                    "BPE) language model on text. --batch-size is global (split over torchrun processes).")
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="PATH", help="a UTF-8 text file or a directory of them")
    data.add_argument("--tokenizer", metavar="PATH", help="a BPE tokenizer JSON (from `reformer tokenizer train`)")
    data.add_argument("--raw-bytes", action="store_true", help="accept files that are not UTF-8 (byte-level only)")
    data.add_argument("--seq-len", type=POSITIVE_INT, help=f"sequence length (default {DEFAULTS['seq_len']})")
    data.add_argument("--vocab-size", type=number_type(int, 3), help="duplication task: symbols incl. 0 "
                      f"(default {DEFAULTS['vocab_size']})")
    data.add_argument("--eval-size", type=POSITIVE_INT, help="held-out sequences per evaluation")
    model = parser.add_argument_group("model")
    model.add_argument("--config", metavar="PRESET_OR_JSON", help="a config preset name or a config JSON file")
    model.add_argument("--attn", choices=("lsh", "local", "full", "mixed"), help="attention of every layer "
                       "(mixed: local and LSH alternating)")
    model.add_argument("--layers", type=POSITIVE_INT, help=f"layers (default {DEFAULTS['layers']})")
    model.add_argument("--num-hashes", type=POSITIVE_INT, help="LSH hash rounds in training")
    model.add_argument("--eval-hashes", type=POSITIVE_INT, help="LSH hash rounds in evaluation")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--steps", type=POSITIVE_INT, help=f"optimizer steps (default {DEFAULTS['steps']})")
    opt.add_argument("--batch-size", type=POSITIVE_INT, help=f"global batch (default {DEFAULTS['batch_size']})")
    opt.add_argument("--grad-accum", type=POSITIVE_INT, default=1, help="micro-steps per optimizer step")
    opt.add_argument("--lr", type=POSITIVE_FLOAT, help=f"peak learning rate (default {DEFAULTS['lr']})")
    opt.add_argument("--warmup", type=NON_NEGATIVE_INT, help="warmup steps (default: 10%% of --steps)")
    opt.add_argument("--schedule", choices=("cosine", "rsqrt", "constant"), default="cosine")
    opt.add_argument("--weight-decay", type=number_type(float, 0.0), default=0.0)
    opt.add_argument("--clip", type=number_type(float, 0.0, inclusive=False, allow_none_word=True), default=1.0,
                     help="gradient-norm clipping ('none' disables)")
    opt.add_argument("--bf16", action="store_true", help="bf16 autocast")
    opt.add_argument("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and optimizer "
                     "state over the processes (FSDP2) instead of replicating them (DDP)")
    opt.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    run = parser.add_argument_group("run")
    run.add_argument("--out", metavar="DIR", help="run folder (default runs/duplication or runs/<data name>)")
    run.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    run.add_argument("--save-every", type=NON_NEGATIVE_INT, default=0, help="steps between checkpoints (0: at the end)")
    run.add_argument("--keep", type=POSITIVE_INT, default=3, help="checkpoints kept")
    run.add_argument("--eval-every", type=NON_NEGATIVE_INT,
                     help=f"steps between evaluations (default {DEFAULTS['eval_every']})")
    run.add_argument("--log-every", type=POSITIVE_INT, default=10, help="steps between log rows")
    run.add_argument("--threads", type=POSITIVE_INT, help="CPU threads per process (default: torch's choice; "
                     "1 is often faster for small models on a busy machine)")
    parser.set_defaults(run=_run_train)


def _attention_layers(kind: str, layers: int) -> tuple[str, ...]:
    if kind == "mixed":
        return tuple("local" if i % 2 == 0 else "lsh" for i in range(layers))
    return (kind,) * layers


def build_config(args, seq_len: int, vocab_size: int, pad_token_id: int, eos_token_id: int | None):
    """The model config of ``reformer train``: ``--config`` (preset or JSON) or the default small model,
    with the vocabulary and special ids of the data and the model flags applied on top."""
    from .config import PRESETS, ReformerConfig

    overrides = dict(vocab_size=vocab_size, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                     bos_token_id=None, is_decoder=True, lsh_num_chunks_after=0, local_num_chunks_after=0)
    if args.num_hashes is not None:
        overrides["num_hashes"] = args.num_hashes
    if args.config is None:
        width, chunk = DEFAULTS["hidden_size"], DEFAULTS["chunk_length"]
        base = dict(
            attn_layers=_attention_layers(args.attn or "lsh", args.layers or DEFAULTS["layers"]),
            hidden_size=width, num_attention_heads=DEFAULTS["heads"], attention_head_size=width // DEFAULTS["heads"],
            feed_forward_size=2 * width, lsh_attn_chunk_length=chunk, local_attn_chunk_length=chunk,
            num_hashes=DEFAULTS["num_hashes"], position_embedding_type="learned", max_position_embeddings=seq_len,
            hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
        )
        return ReformerConfig(**{**base, **overrides})
    config = _load_config_source(args.config, PRESETS, ReformerConfig)
    if args.attn is not None or args.layers is not None:
        layers = args.layers or len(config.attn_layers)
        overrides["attn_layers"] = _attention_layers(args.attn or "lsh", layers)
    return ReformerConfig.from_dict(config.to_dict(), **overrides)


def _load_config_source(source: str, presets, config_class):
    if source in presets:
        return config_class.from_preset(source)
    path = Path(source)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        return config_class.from_json_file(path)
    raise ValueError(f"--config {source!r} is neither a preset ({', '.join(sorted(presets))}) nor a JSON file")


def _check_seq_len_fits_config(args) -> None:
    """Refuse a --seq-len beyond the --config's positional embedding before any data is built for it."""
    from .config import PRESETS, ReformerConfig

    if args.config is None or args.seq_len is None:
        return  # the default model's learned positions are sized to --seq-len
    capacity = _load_config_source(args.config, PRESETS, ReformerConfig).max_length
    if capacity is not None and args.seq_len > capacity:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the positional embedding of --config {args.config} "
                         f"covers ({capacity} positions): use a shorter --seq-len or a config that covers it")


def _build_dataset(args, out_dir: Path):
    from . import data

    seed = args.seed
    if args.data is None:
        if args.tokenizer is not None:
            raise ValueError("--tokenizer needs --data (the duplication task has no text to tokenise)")
        return data.DuplicationTask(args.seq_len or DEFAULTS["seq_len"], args.vocab_size or DEFAULTS["vocab_size"],
                                    seed=seed, eval_size=args.eval_size or DEFAULTS["eval_size"])
    if args.vocab_size is not None:
        raise ValueError("--vocab-size applies to the duplication task only: with --data the vocabulary is "
                         "the bytes or the --tokenizer's")
    seq_len, eval_size = args.seq_len or 256, args.eval_size or 64
    if args.tokenizer is None:
        return data.byte_text_dataset(args.data, seq_len, seed=seed, eval_size=eval_size, allow_binary=args.raw_bytes)
    if args.raw_bytes:
        raise ValueError("--raw-bytes applies to byte-level training only: a BPE tokenizer needs UTF-8 text")
    from . import bpe

    return bpe.bpe_text_dataset(args.data, args.tokenizer, seq_len, cache_dir=out_dir / "cache",
                                 seed=seed, eval_size=eval_size)


@contextlib.contextmanager
def _removed_on_failure(out_dir: Path):
    """Remove what the block adds to ``out_dir`` (the folder itself if it is new, else new entries of
    its ``cache/``) when the block raises: a refused run leaves the folder as it was."""
    cache = out_dir / "cache"
    existed = out_dir.exists()
    cached_before = set(cache.iterdir()) if cache.is_dir() else None
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(out_dir, ignore_errors=True)
        elif cached_before is None:
            shutil.rmtree(cache, ignore_errors=True)
        elif cache.is_dir():
            for entry in set(cache.iterdir()) - cached_before:
                entry.unlink(missing_ok=True)
        raise


def _run_train(args) -> int:
    import torch

    from .model import ReformerLM
    from .training import Trainer, TrainingArguments

    default_out = "runs/duplication" if args.data is None else f"runs/{Path(args.data).resolve().name or 'text'}"
    out_dir = Path(args.out or default_out)
    if args.data is not None and Path(args.data).is_dir() and out_dir.resolve().is_relative_to(Path(args.data).resolve()):
        raise ValueError(f"the run folder {out_dir} is inside the data folder {args.data}, so the run's own files would "
                         "be read as training text: pass --out outside it")
    _check_seq_len_fits_config(args)
    steps = args.steps or DEFAULTS["steps"]
    training_args = TrainingArguments(
        out_dir=str(out_dir), steps=steps, batch_size=args.batch_size or DEFAULTS["batch_size"],
        grad_accum=args.grad_accum, lr=args.lr or DEFAULTS["lr"],
        warmup_steps=args.warmup if args.warmup is not None else steps // 10, schedule=args.schedule,
        weight_decay=args.weight_decay, clip_grad_norm=args.clip, bf16=args.bf16, seed=args.seed,
        eval_every=args.eval_every if args.eval_every is not None else DEFAULTS["eval_every"],
        eval_num_hashes=args.eval_hashes, save_every=args.save_every, keep_checkpoints=args.keep,
        resume=args.resume, log_every=args.log_every, fsdp=args.fsdp,
    )
    training_args.validate()  # cheap checks before the data is read (a BPE corpus is tokenised first)
    training_args.check_batch_split(int(os.environ.get("WORLD_SIZE", "1")))
    with _removed_on_failure(out_dir):  # what a refused run created (a BPE token cache) does not stay behind
        dataset = _build_dataset(args, out_dir)
        config = build_config(args, dataset.seq_len, dataset.vocab_size, dataset.pad_token_id, dataset.eos_token_id)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        model = ReformerLM(config)
        reporter = ProgressBar() if sys.stdout.isatty() else None
        trainer = Trainer(model, training_args, dataset, reporter=reporter)
        trainer.prepare()  # a refused --resume stops here, before the banner and with the run's files untouched
    if args.tokenizer is not None:
        from .bpe import prune_token_cache

        prune_token_cache(dataset)
    if trainer.context.is_main:
        lsh = f", {config.num_hashes} hash round(s)" if "lsh" in config.attn_layers else ""
        print(f"training {model.num_parameters():,} parameters ({'/'.join(config.attn_layers)}{lsh}) on "
              f"{dataset.describe()['task']} data, seq-len {dataset.seq_len}, into {out_dir}", flush=True)
    try:
        metrics = trainer.train()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if trainer.context.is_main:
        key = "eval_accuracy" if "eval_accuracy" in metrics else "eval_bpc"
        print(f"done: step {metrics['step']}, eval_loss {metrics.get('eval_loss', float('nan')):.4f}, "
              f"{key} {metrics.get(key, float('nan')):.4f}; metrics in {out_dir / 'metrics.json'}", flush=True)
    return 0


class ProgressBar:
    """A self-rewriting terminal line (step, smoothed loss, tokens/s, ETA); log rows printed above it."""

    def __init__(self, stream=None, width: int = 24):
        self.stream, self.width = stream or sys.stdout, width
        self.loss, self.line, self.last_draw = None, "", 0.0

    def start(self, first_step: int, total_steps: int) -> None:
        self.first, self.total, self.started = first_step, total_steps, time.perf_counter()

    def step(self, step: int, loss: float, tokens_per_second: float) -> None:
        self.loss = loss if self.loss is None else 0.9 * self.loss + 0.1 * loss
        now = time.perf_counter()
        if now - self.last_draw < 0.1 and step < self.total:
            return
        self.last_draw = now
        eta = (now - self.started) / max(step - self.first, 1) * (self.total - step)
        filled = int(self.width * step / self.total)
        self.line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {step}/{self.total} loss {self.loss:.4f} "
                     f"{tokens_per_second:,.0f} tok/s ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        self.stream.write("\r\033[K" + self.line)
        self.stream.flush()

    def update(self, record: dict) -> None:
        evals = [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("eval_") and v is not None]
        if evals:
            self.message(f"step {record['step']}: " + ", ".join(evals))

    def message(self, text: str) -> None:
        self.stream.write(f"\r\033[K{text}\n{self.line}")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


# --------------------------------------------------------------------------------------------- generate


def _add_generate(subcommands) -> None:
    parser = subcommands.add_parser(
        "generate", help="continue a prompt with a trained model",
        description="Print the continuation of --prompt. --checkpoint is a run folder (its newest valid "
                    "checkpoint is used) or one checkpoint folder. Duplication-task prompts are token ids "
                    "separated by spaces.")
    parser.add_argument("--checkpoint", required=True, metavar="DIR")
    parser.add_argument("--prompt", required=True, metavar="TEXT")
    parser.add_argument("--max-new-tokens", type=POSITIVE_INT, default=100)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy/beam decoding")
    parser.add_argument("--temperature", type=POSITIVE_FLOAT, default=1.0)
    parser.add_argument("--top-k", type=POSITIVE_INT)
    parser.add_argument("--top-p", type=number_type(float, 0.0, inclusive=False, maximum=1.0))
    parser.add_argument("--num-beams", type=POSITIVE_INT, default=1)
    parser.add_argument("--repetition-penalty", type=POSITIVE_FLOAT, default=1.0)
    parser.add_argument("--seed", type=NON_NEGATIVE_INT, default=0,
                        help="seed of the sampling and of LSH layers' random rotations (default 0, so the same "
                             "arguments give the same text; vary it for other samples)")
    parser.set_defaults(run=_run_generate)


def _resolve_checkpoint(path: Path) -> tuple[Path, Path]:
    """(model folder, run folder) for a run folder or a checkpoint/model folder."""
    from .checkpoints import CHECKPOINT_DIR, MANIFEST, newest_valid_checkpoint, verify_checkpoint

    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if _is_hf_folder(path):
        raise ValueError(f"{path} is a Hugging Face checkpoint: convert it first with `reformer convert {path} DST` "
                         "and generate from DST")
    if (path / "model.safetensors").exists():
        if (path / MANIFEST).exists():
            verify_checkpoint(path)
        run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path
        return path, run_dir
    if (path / CHECKPOINT_DIR).is_dir():
        newest = newest_valid_checkpoint(path / CHECKPOINT_DIR)
        if newest is not None:
            return newest, path
    raise ValueError(f"{path} holds no model: give a run folder with checkpoints, or a checkpoint folder")


def _is_hf_folder(path: Path) -> bool:
    """A folder saved by transformers: its config.json names the model type, ours never does."""
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and "model_type" in config


def _trained_task(model_dir: Path, run_dir: Path) -> str:
    """The task the model was trained on: from the run's data.json, else from the checkpoint's own
    trainer_state.json (a checkpoint copied out of its run), else bytes (a plain saved model)."""
    import json

    for path, read in ((run_dir / "data.json", lambda d: d), (model_dir / "trainer_state.json", lambda d: d["data"])):
        if path.is_file():
            try:
                return str(read(json.loads(path.read_text(encoding="utf-8"))).get("task", "bytes"))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ValueError(f"{path} is not a readable run description: is the folder damaged?") from None
    return "bytes"


def _prompt_codec(model_dir: Path, run_dir: Path):
    """(encode, decode, eos id) for the run's data: duplication ids, bytes or the saved BPE tokenizer."""
    from . import bpe, data

    task = _trained_task(model_dir, run_dir)
    if task == "bpe":
        found = [folder / "tokenizer.json" for folder in (run_dir, model_dir) if (folder / "tokenizer.json").is_file()]
        if not found:
            raise ValueError(f"{model_dir} was trained on BPE tokens, and its tokenizer.json (a file of the run folder) "
                             "is not next to it: generate from the run folder, or copy the run's tokenizer.json into "
                             f"{model_dir}")
        tokenizer = bpe.BPETokenizer(found[0])
        return tokenizer.encode, tokenizer.decode, tokenizer.eos_token_id
    if task == "duplication":
        def encode(text):
            try:
                return [int(token) for token in text.split()]
            except ValueError:
                raise ValueError(f"a duplication-task prompt is token ids separated by spaces, got {text!r}") from None
        return encode, lambda ids: " ".join(str(int(i)) for i in ids), None
    tokenizer = data.ByteTokenizer()
    return tokenizer.encode, tokenizer.decode, tokenizer.eos_token_id


def _run_generate(args) -> int:
    import torch

    from .model import ReformerLM

    model_dir, run_dir = _resolve_checkpoint(Path(args.checkpoint))
    model = ReformerLM.from_pretrained(model_dir).eval()
    encode, decode, eos_token_id = _prompt_codec(model_dir, run_dir)
    prompt_ids = encode(args.prompt)
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    vocab_size = model.config.vocab_size
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:
        raise ValueError(f"prompt token ids must lie in [0, {vocab_size}) for this model, got "
                         f"{min(prompt_ids)}..{max(prompt_ids)}")
    total = len(prompt_ids) + args.max_new_tokens
    if model.config.max_length is not None and total > model.config.max_length:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the "
                         f"model's maximum length {model.config.max_length}: shorten one of them")
    output = model.generate(
        torch.tensor([prompt_ids]), args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams, repetition_penalty=args.repetition_penalty,
        eos_token_id=eos_token_id, seed=args.seed,
    )
    print(decode(output[0, len(prompt_ids) :].tolist()))
    return 0


# -------------------------------------------------------------------------------------------- tokenizer


def _add_tokenizer(subcommands) -> None:
    parser = subcommands.add_parser("tokenizer", help="tokenizer tools", description="Tokenizer tools.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = actions.add_parser("train", help="train a byte-level BPE tokenizer (needs the tokenizers package)",
                               description="Train a byte-level BPE on UTF-8 text and save it as one JSON file.")
    train.add_argument("--data", required=True, metavar="PATH", help="a text file or a directory of them")
    train.add_argument("--vocab-size", required=True, type=POSITIVE_INT)
    train.add_argument("--out", required=True, metavar="FILE")
    train.set_defaults(run=_run_tokenizer_train)


def _run_tokenizer_train(args) -> int:
    from .bpe import BPETokenizer, train_bpe_tokenizer

    path = train_bpe_tokenizer(args.data, args.vocab_size, args.out)
    print(f"wrote {path} ({BPETokenizer(path).vocab_size} tokens)")
    return 0


# ---------------------------------------------------------------------------------------------- convert


def _add_convert(subcommands) -> None:
    parser = subcommands.add_parser(
        "convert", help="convert a checkpoint between Hugging Face and torch-reformer",
        description="Convert a folder saved by transformers' save_pretrained into ours, or ours into HF's. "
                    "The direction is read from SRC/config.json.",
    )
    parser.add_argument("src", metavar="SRC", help="folder holding config.json and the weights")
    parser.add_argument("dst", metavar="DST", help="folder to write (created; must differ from SRC)")
    parser.set_defaults(run=_run_convert)


def _run_convert(args) -> int:
    from .interop.hf import convert_checkpoint

    done = convert_checkpoint(args.src, args.dst)
    print(f"converted {done.source_format} {done.source_architecture} -> {done.target_architecture} in {args.dst}")
    return 0


# ------------------------------------------------------------------------------------------------ bench


def _add_bench(subcommands) -> None:
    # Listed for `reformer --help` only: main() hands `reformer bench ...` to the benchmark's own
    # parser before this one runs (argparse cannot forward options such as `--quick`).
    subcommands.add_parser(
        "bench", add_help=False, help="memory, speed and quality benchmarks against the peers",
        description="Run `reformer bench --help` for the benchmark options.",
    )


# ------------------------------------------------------------------------------------------------- main

SUBCOMMANDS = [_add_train, _add_generate, _add_tokenizer, _add_convert, _add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="reformer", description="Reformer language models: train, generate, convert and benchmark.")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subcommands)
    return parser


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """Run the ``reformer`` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark has its own parser, options included (argparse cannot forward them)
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    from .training import TrainingDiverged

    format_warning = warnings.formatwarning
    warnings.formatwarning = lambda message, *rest, **kw: f"reformer: warning: {_one_line(message)}\n"
    try:
        return args.run(args)
    except KeyboardInterrupt as interruption:
        print(f"\nreformer: interrupted{': ' + _one_line(interruption) if str(interruption) else ''}", file=sys.stderr)
        return 130
    except (OSError, ValueError, TypeError, ImportError, OverflowError, TrainingDiverged) as error:
        print(f"reformer {args.command}: error: {_one_line(error) or type(error).__name__}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as error:
        if not isinstance(error, MemoryError) and "can't allocate memory" not in str(error):
            raise  # a bug: keep its traceback
        print(f"reformer {args.command}: error: out of memory ({_one_line(error)[:200]}): use a shorter --seq-len, "
              "a smaller --batch-size or a smaller model", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = format_warning


if __name__ == "__main__":
    sys.exit(main())
