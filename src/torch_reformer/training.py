"""The training loop: optimisation, evaluation, logging, crash-safe checkpoints, distributed data parallel.

``Trainer(model, args, dataset).train()`` trains a causal LM (a ``ReformerLM`` or anything with its call
signature) on a dataset of ``torch_reformer.data`` and returns the final metrics.

Batches. ``args.batch_size`` is the *global* number of sequences per optimizer step. It is split over the
processes of a ``torchrun`` job and then over ``args.grad_accum`` micro-steps, so the same arguments
give the same updates whatever the process count: rank ``r`` takes rows ``[r * B/W, (r + 1) * B/W)`` of
the global batch that the dataset derives from ``(seed, step)``. Each micro-step's mean loss is
weighted ``1 / grad_accum`` and DDP averages over ranks, which equals the mean over the global batch
because every sequence of our datasets has the same number of scored tokens. All ranks share one RNG
seed, and LSH layers hash all micro-batches of a step, on every rank, with rotations drawn once from
``(seed, step)``, so the split does not change them either. The model
is replicated with DistributedDataParallel, or with ``args.fsdp`` sharded as a whole with FSDP2
(parameters, gradients and optimizer state split over the ranks between steps); a sharded run's
checkpoints hold the tensors gathered whole, so any process count can resume them.

Checkpoints (``OUT/checkpoints/step-N``; see ``checkpoints.py``) hold the weights
(``config.json`` + ``model.safetensors``), the optimizer state (``optimizer.safetensors`` + JSON), every
rank's torch RNG states (``rng.safetensors``), and ``trainer_state.json`` (step, arguments, eval
history; the learning-rate schedule and the data order are pure functions of the step, so the step is
their whole state). No pickles. A ``manifest.json`` with each file's size and SHA-256 is written last;
the folder is assembled under a temporary name and renamed into place, so a crash never leaves a
half-written ``step-N``. Resuming verifies the manifest and falls back, with a warning, to the newest
checkpoint that verifies.

A non-finite loss or gradient norm stops training before the optimizer step, with ``TrainingDiverged``,
and so does a non-finite evaluation loss. A checkpoint counts as good once a later loss computed with
its weights is finite: when the weights of the newest checkpoint give the non-finite loss, that
checkpoint is moved aside to ``checkpoints/diverged-step-N`` (rename it back to use it), so
``--resume`` starts from the last good one, and old checkpoints are pruned (``--keep``) only once the
newest is confirmed, so a divergence never leaves only bad ones. SIGINT (Ctrl-C) or SIGTERM
stops training at the end of the current step: the step is checkpointed, ``metrics.json`` says
``"status": "interrupted"`` and ``TrainingInterrupted`` is raised; ``resume`` continues from there. A
second signal (Ctrl-C or SIGTERM) interrupts at once.

The run folder's ``config.json``, ``data.json`` and the dataset's own files (a BPE run's
``tokenizer.json``) are written only once the arguments are checked and a resumed checkpoint fits, so
a refused resume leaves the folder as it was. Resuming with another tokenizer is refused.
``train`` seeds the global torch RNG with ``args.seed`` (dropout and LSH rotations draw from it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from .attention.lsh import LSHSelfAttention, fixed_hashing_settings, hashing_fixed_in_this_thread
from .data import derive_seed
from .checkpoints import (
    CHECKPOINT_DIR,
    capture_rng_states,
    list_checkpoints,
    newest_valid_checkpoint,
    read_checkpoint,
    refuse_another_run,
    restore_rng_states,
    save_checkpoint,
    write_json,
)
from .distributed import (
    DistributedContext,
    all_reduce_sum,
    full_tensor,
    gather_sharded_state,
    init_distributed,
    shard_model,
    shard_model_state,
    shard_optimizer_state,
)
from .run_guards import StopOnSignal, check_memory_floor
from .run_log import LineReporter, RunLog
from .training_arguments import TrainingArguments, build_optimizer, learning_rate
from .serialization import CheckpointError, atomic_write_bytes


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the evaluation loss became NaN/inf; the weights were not updated
    further, and a checkpoint of the weights that gave it was moved aside (see the module docstring)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM at the end of a step, after checkpointing that step."""


# ---------------------------------------------------------------------------------------------- trainer


class Trainer:
    """Trains ``model`` on ``dataset`` as ``args`` say; see the module docstring.

    ``reporter`` shows progress on rank 0 (default: ``LineReporter``); ``on_checkpoint(step, path)`` is
    called on rank 0 after each checkpoint is in place.
    """

    def __init__(self, model: torch.nn.Module, args: TrainingArguments, dataset, reporter=None,
                 on_checkpoint: Callable[[int, Path], None] | None = None):
        args.validate()
        args.warn_about_warmup()
        self.args, self.dataset, self.on_checkpoint = args, dataset, on_checkpoint
        self.context = init_distributed()
        ctx = self.context
        args.check_batch_split(ctx.world_size)
        shards = ctx.world_size * args.grad_accum
        config = model.config
        if args.eval_num_hashes is not None and "lsh" not in config.attn_layers:
            raise ValueError("eval_num_hashes (--eval-hashes) sets the hash rounds of LSH layers, and this model has "
                             "none: leave it unset")
        if config.max_length is not None and dataset.seq_len > config.max_length:
            raise ValueError(
                f"--seq-len {dataset.seq_len} is longer than the model's positional embedding covers "
                f"({config.max_length} positions): use a shorter --seq-len, or a config whose axial_pos_shape "
                "(or max_position_embeddings, for learned positions) covers it"
            )
        if dataset.vocab_size > config.vocab_size:
            raise ValueError(f"the data has {dataset.vocab_size} token ids but the model's vocab_size is "
                             f"{config.vocab_size}: raise vocab_size in the config")
        check_memory_floor(config.hidden_size, args.batch_size // shards, dataset.seq_len, ctx)
        self.model = model.to(ctx.device)
        self.train_model = self.model
        self.sharded = ctx.active and args.fsdp
        if self.sharded:
            shard_model(self.model)
        elif ctx.active:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=device_ids)
        self.optimizer = build_optimizer(self.model, args)
        self.out_dir = Path(args.out_dir)
        self.checkpoints_dir = self.out_dir / CHECKPOINT_DIR
        self.reporter = (reporter or LineReporter()) if ctx.is_main else None
        self.step, self.history, self.last_checkpoint = 0, [], None
        self.saved_step: int | None = None  # the step of the newest checkpoint this process wrote or loaded
        # A checkpoint is unconfirmed until a later loss computed with its weights is finite; old
        # checkpoints are pruned only once the newest one is confirmed.
        self.unconfirmed_checkpoint: Path | None = None
        self._prepared = False

    # ---------------------------------------------------------------- one step
    def _autocast(self):
        if not self.args.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.context.device.type, dtype=torch.bfloat16)

    def _micro_rows(self) -> list[range]:
        ctx, args = self.context, self.args
        per_rank = args.batch_size // ctx.world_size
        per_micro = per_rank // args.grad_accum
        first = ctx.rank * per_rank
        return [range(first + m * per_micro, first + (m + 1) * per_micro) for m in range(args.grad_accum)]

    def _train_step(self, step: int) -> tuple[float, float]:
        """Forward/backward over this rank's micro-batches of global batch ``step - 1``, then one update.
        Returns (mean loss over the global batch, gradient norm before clipping)."""
        args, ctx = self.args, self.context
        micro_rows = self._micro_rows()
        loss_sum = torch.zeros((), dtype=torch.float64)
        with self._step_hashing(step):
            for index, rows in enumerate(micro_rows):
                input_ids, labels = self.dataset.train_batch(step - 1, args.batch_size, rows)
                last = index == len(micro_rows) - 1
                with self._gradient_sync(last or not ctx.active), self._autocast():
                    out = self.train_model(input_ids.to(ctx.device), labels=labels.to(ctx.device), return_logits=False)
                (out.loss / args.grad_accum).backward()
                loss_sum += out.loss.detach().double().cpu()
        loss = float(all_reduce_sum(loss_sum, ctx)) / (args.grad_accum * ctx.world_size)
        max_norm = args.clip_grad_norm if args.clip_grad_norm is not None else math.inf
        grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise self._diverged(f"training diverged at step {step} (loss {loss}, gradient norm {grad_norm})")
        self._confirm_checkpoint()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def _step_hashing(self, step: int):
        """LSH layers hash every micro-batch of optimizer step ``step``, on every process, with the same
        rotations, drawn from ``(seed, step)``: a step's update then does not depend on how its batch is
        split over processes and micro-steps, as with one forward pass over the whole batch."""
        layers = [module for module in self.model.modules() if isinstance(module, LSHSelfAttention)]
        trunk = getattr(self.model, "reformer", None)
        if not layers or not hasattr(trunk, "padded_length"):
            return nullcontext()
        device = self.context.device
        weight = next(self.model.parameters())
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        generator = torch.Generator(device=device).manual_seed(derive_seed(self.args.seed, "lsh rotations", step))
        settings = fixed_hashing_settings(layers, trunk.padded_length(self.dataset.seq_len), device=device,
                                          dtype=dtype, generator=generator)
        return hashing_fixed_in_this_thread(settings)

    @contextmanager
    def _gradient_sync(self, enabled: bool):
        """Gradients are reduced across processes only on a step's last micro-batch."""
        if enabled:
            yield
        elif self.sharded:
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        else:
            with self.train_model.no_sync():
                yield

    def _diverged(self, what: str) -> TrainingDiverged:
        """The error for weights that gave a non-finite loss or gradient. A checkpoint of those weights
        (written after the previous step) is moved aside to ``diverged-step-N``, so ``--resume`` starts
        from the last good one."""
        moved = ""
        if self.unconfirmed_checkpoint is not None:
            aside = self.unconfirmed_checkpoint.with_name(f"diverged-{self.unconfirmed_checkpoint.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(self.unconfirmed_checkpoint, aside)
            moved = f"; its checkpoint holds those weights and was moved to {aside}"
            self.unconfirmed_checkpoint = None
            self.last_checkpoint = next(iter(list_checkpoints(self.checkpoints_dir)), None)
        if not self.context.is_main:  # rank 0 writes, moves and names the checkpoints
            where = "rank 0 names the last good checkpoint"
        elif self.last_checkpoint is None:
            where = "no good checkpoint was written"
        else:
            where = f"the last good checkpoint is {self.last_checkpoint}"
        return TrainingDiverged(
            f"{what}: the weights after step {self.step} give non-finite values{moved}; the weights were not "
            f"updated further and {where}: train again (or --resume) with a lower --lr or with --clip"
        )

    def _confirm_checkpoint(self) -> None:
        """The newest checkpoint's weights just gave a finite loss: prune the checkpoints beyond --keep."""
        if self.unconfirmed_checkpoint is None:
            return
        self.unconfirmed_checkpoint = None
        for old in list_checkpoints(self.checkpoints_dir)[self.args.keep_checkpoints :]:
            shutil.rmtree(old)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        """Held-out loss and accuracy (duplication) or bits per character (text), over all ranks.

        Runs under a forked RNG, reseeded for each eval batch from ``(args.seed, batch index)``: LSH
        rotations drawn in evaluation are the same every time and for any process count, and how often
        evaluation runs never changes the training run's random stream."""
        devices = [self.context.device] if self.context.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            return self._evaluate()

    def _evaluate(self) -> dict:
        args, ctx, model = self.args, self.context, self.model
        was_training, trained_hashes = model.training, model.config.num_hashes
        model.eval()
        if args.eval_num_hashes is not None:
            model.set_num_hashes(args.eval_num_hashes)
        totals = torch.zeros(4, dtype=torch.float64)  # loss * tokens, scored tokens, correct, characters
        want_accuracy = self.dataset.metric == "accuracy"
        try:
            batches = self.dataset.eval_batches(args.eval_batch_size or args.batch_size, ctx.rank, ctx.world_size)
            for local_index, (input_ids, labels) in enumerate(batches):
                torch.manual_seed(derive_seed(args.seed, "eval", local_index * ctx.world_size + ctx.rank))
                input_ids, labels = input_ids.to(ctx.device), labels.to(ctx.device)
                with self._autocast():
                    out = model(input_ids, labels=labels, return_logits=want_accuracy)
                targets = labels[:, 1:]  # (b, L - 1): logits[:, t] predicts token t + 1
                scored = targets != -100
                count = int(scored.sum())
                totals[0] += float(out.loss) * count
                totals[1] += count
                if want_accuracy:
                    predictions = out.logits[:, :-1].argmax(dim=-1)  # (b, L - 1)
                    totals[2] += int((predictions == targets)[scored].sum())
                else:
                    totals[3] += self.dataset.count_characters(labels)
        finally:
            if args.eval_num_hashes is not None:
                model.set_num_hashes(trained_hashes)
            model.train(was_training)
        totals = all_reduce_sum(totals, ctx)
        metrics = {"eval_loss": float(totals[0] / totals[1])}
        if want_accuracy:
            metrics["eval_accuracy"] = float(totals[2] / totals[1])
        else:
            metrics["eval_bpc"] = float(totals[0] / math.log(2) / totals[3])
        return metrics

    def _stop_requested(self, stop: StopOnSignal) -> bool:
        """Whether any process got a stop signal (all of them must stop at the same step)."""
        requested = stop.requested is not None
        if self.context.active:
            flag = torch.tensor([float(requested)], device=self.context.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
            if requested and stop.requested is None:
                stop.requested = signal.SIGTERM  # another process was told to stop
        return requested

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, confirmed: bool = False) -> Path | None:
        """Checkpoint the current step (every rank's RNG state included); rank 0 writes it. Old checkpoints
        beyond ``keep_checkpoints`` are pruned once this one is ``confirmed`` (its weights gave a finite
        evaluation loss) or the next step's loss is finite, so a divergence never leaves only bad ones."""
        ctx = self.context
        rng_by_rank = [capture_rng_states()]
        if ctx.active:
            gathered = [None] * ctx.world_size
            dist.all_gather_object(gathered, rng_by_rank[0])
            rng_by_rank = gathered
        path = None
        # A sharded model's tensors are gathered whole (every process takes part), so the checkpoint
        # is the same as an unsharded run's.
        whole = gather_sharded_state(self.model, self.optimizer) if self.sharded else (None, None)
        if ctx.is_main:
            state = {"format_version": 1, "step": self.step, "world_size": ctx.world_size,
                     "args": dataclasses.asdict(self.args), "data": self.dataset.describe(), "history": self.history}
            path = save_checkpoint(self.checkpoints_dir, self.step, self.model, self.optimizer, rng_by_rank, state,
                                   weights=whole[0], optimizer_state=whole[1])
            self.last_checkpoint = self.unconfirmed_checkpoint = path
            if confirmed:
                self._confirm_checkpoint()
            if self.on_checkpoint is not None:
                self.on_checkpoint(self.step, path)
        self.saved_step = self.step
        if ctx.active:
            dist.barrier()
        return path

    def _resume(self) -> None:
        """Load the newest valid checkpoint (rank 0 chooses; every rank reads it) into model, optimizer, RNG."""
        ctx = self.context
        choice: list = [None]
        if ctx.is_main:
            try:
                choice = [("ok", newest_valid_checkpoint(self.checkpoints_dir))]
            except CheckpointError as err:
                choice = [("error", str(err))]
        if ctx.active:
            dist.broadcast_object_list(choice, src=0)
        status, value = choice[0]
        if status == "error":
            raise CheckpointError(value)
        if value is None:
            if self.reporter:
                self.reporter.message(f"no checkpoint in {self.checkpoints_dir}: starting from step 0")
            return
        loaded = read_checkpoint(value)
        refuse_another_run(loaded, value, self.model.config.to_dict(), self.dataset.describe())
        weights, optimizer_state = loaded["weights"], loaded["optimizer"]
        if self.sharded:
            weights = shard_model_state(self.model, weights)
            optimizer_state = shard_optimizer_state(self.optimizer, optimizer_state)
        try:
            self.model.load_state_dict(weights, strict=True)
            self.optimizer.load_state_dict(optimizer_state)
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {value} does not fit this model ({str(err).splitlines()[0]})") from None
        restore_rng_states(loaded["rng"].get(ctx.rank, loaded["rng"][0]))
        self._warn_about_changed_data(loaded["trainer_state"])
        self.step = loaded["trainer_state"]["step"]
        self.history = loaded["trainer_state"]["history"]
        self.last_checkpoint, self.saved_step = value, self.step
        self.unconfirmed_checkpoint = value if ctx.is_main else None  # until a step shows its weights are good
        if ctx.is_main:  # newer checkpoints failed to verify; the continued run rewrites those steps
            for unusable in list_checkpoints(self.checkpoints_dir):
                if int(unusable.name[5:]) > self.step:
                    shutil.rmtree(unusable)
        if self.reporter:
            self.reporter.message(f"resumed from {value} (step {self.step})")

    def _warn_about_changed_data(self, saved: dict) -> None:
        now = {f"data_{k}": v for k, v in self.dataset.describe().items()}
        now["batch_size"] = self.args.batch_size
        before = {f"data_{k}": v for k, v in saved.get("data", {}).items()}
        before["batch_size"] = saved["args"]["batch_size"]
        # A key the saved run did not record (written by an older version) is not a change.
        changed = sorted(key for key in now if key in before and before[key] != now[key])
        if changed:
            warnings.warn(f"resuming with a different {', '.join(changed)} than the checkpoint's run: "
                          "the data order will not continue the original one", stacklevel=3)

    # ---------------------------------------------------------------- the loop
    def _prepare_out_dir(self) -> None:
        ctx = self.context
        if not self.args.resume and list_checkpoints(self.checkpoints_dir):
            raise ValueError(f"{self.out_dir} already holds checkpoints of an earlier run: pass --resume to "
                             "continue it, or choose another --out")
        if ctx.is_main:
            self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.checkpoints_dir.glob(".tmp-step-*"):  # left by a process killed mid-save
                shutil.rmtree(stale, ignore_errors=True)
        if ctx.active:
            dist.barrier()

    def _write_run_files(self) -> None:
        """config.json, data.json and the dataset's files (e.g. tokenizer.json), once the run may go on."""
        if not self.context.is_main:
            return
        write_json(self.out_dir / "config.json", self.model.config.to_dict())
        write_json(self.out_dir / "data.json", self.dataset.describe())
        run_files = getattr(self.dataset, "run_files", dict)()
        for name, content in run_files.items():
            atomic_write_bytes(self.out_dir / name, [content])

    def prepare(self) -> None:
        """Check ``out_dir``, load the checkpoint when ``args.resume`` and write the run's files.

        ``train`` calls it when it has not been called; calling it first lets a caller report the
        run only once a resume has been accepted (a refused one raises here, before any run file is written)."""
        if self._prepared:
            return
        self._prepare_out_dir()
        torch.manual_seed(self.args.seed)
        if self.args.resume:
            self._resume()
        self._write_run_files()
        self._prepared = True

    def train(self) -> dict:
        """Train to ``args.steps`` (continuing a checkpoint when ``args.resume``); return the final metrics."""
        self.prepare()

        def announce(name: str) -> None:
            if self.reporter:
                when = (f"after step {self.step + 1} once it is checkpointed" if self.step < self.args.steps
                        else "once the final evaluation and checkpoint are written")
                self.reporter.message(f"{name}: stopping {when} (Ctrl-C again, or a second {name}, to stop at once)")

        with StopOnSignal(on_request=announce) as stop:
            return self._train_loop(stop)

    def _train_loop(self, stop: StopOnSignal) -> dict:
        args, ctx = self.args, self.context
        run_log = RunLog(self.out_dir, self.step) if ctx.is_main else None
        if self.reporter:
            self.reporter.start(self.step, args.steps)
        status = "finished" if self.step >= args.steps else "running"
        metrics = {"step": self.step, "status": status, **(self.history[-1] if self.history else {})}
        tokens_per_step = args.batch_size * self.dataset.seq_len
        started, window_seconds, window_steps = time.perf_counter(), 0.0, 0
        with self._recording_end(run_log, metrics):
            while self.step < args.steps:
                step_started = time.perf_counter()
                loss, grad_norm = self._train_step(self.step + 1)
                self.step += 1
                window_seconds += time.perf_counter() - step_started
                window_steps += 1
                tokens_per_second = tokens_per_step * window_steps / max(window_seconds, 1e-9)
                if self.reporter:
                    self.reporter.step(self.step, loss, tokens_per_second)
                final = self.step == args.steps
                record = {"step": self.step, "lr": learning_rate(self.step, args), "train_loss": loss,
                          "grad_norm": grad_norm, "tokens_per_second": tokens_per_second,
                          "elapsed_seconds": time.perf_counter() - started}
                evaluated = (args.eval_every and self.step % args.eval_every == 0) or final
                if evaluated:
                    record.update(self.evaluate())
                    if not math.isfinite(record["eval_loss"]):
                        raise self._diverged(f"the evaluation loss at step {self.step} is {record['eval_loss']}")
                    evaluation = {k: v for k, v in record.items() if k.startswith("eval")}
                    self.history.append({"step": self.step, **evaluation})
                if "eval_loss" in record or self.step % args.log_every == 0 or final:
                    metrics.update(record, status="finished" if final else "running",
                                   eval_num_hashes=args.eval_num_hashes, history=self.history)
                    window_seconds, window_steps = 0.0, 0
                    if ctx.is_main:
                        run_log.row(record)
                        run_log.write_metrics(metrics)
                        self.reporter.update(record)
                if (args.save_every and self.step % args.save_every == 0) or final:
                    self.save_checkpoint(confirmed=bool(evaluated))
                if not final and self._stop_requested(stop):
                    if self.saved_step != self.step:
                        self.save_checkpoint()
                    name = signal.Signals(stop.requested or signal.SIGINT).name
                    raise TrainingInterrupted(f"stopped on {name} after step {self.step}, which is checkpointed "
                                              f"in {self.checkpoints_dir}: continue with --resume")
        return metrics

    @contextmanager
    def _recording_end(self, run_log: RunLog | None, metrics: dict):
        """Records in metrics.json how the loop ended, so it never goes on saying "running" after a
        divergence, an interruption or an error; closes the run log and the reporter in every case."""
        def write_status(status: str, **extra) -> None:
            if run_log is not None:
                run_log.write_metrics({**metrics, "step": self.step, "status": status, **extra})

        try:
            yield
        except TrainingDiverged as err:
            write_status("diverged", error=str(err))
            raise
        except KeyboardInterrupt:
            write_status("interrupted")
            raise
        except Exception as err:
            write_status("failed", error=f"{type(err).__name__}: {err}")
            raise
        finally:
            if run_log is not None:
                run_log.close()
            if self.reporter:
                self.reporter.close()
