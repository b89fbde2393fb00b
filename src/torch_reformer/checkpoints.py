"""Crash-safe training checkpoints: atomic folders with a checksummed manifest, no pickles.

A checkpoint ``OUT/checkpoints/step-N`` (N = optimizer steps done) holds the weights (``config.json``
+ ``model.safetensors``), the optimizer state (``optimizer.safetensors`` + ``optimizer.json``), every
rank's torch RNG states (``rng.safetensors``) and ``trainer_state.json``. ``manifest.json``, with each
file's size and SHA-256, is written last; the folder is assembled under a temporary name and renamed
into place, so a crash never leaves a half-written ``step-N``, and ``verify_checkpoint`` tells a
damaged one from a good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from .serialization import CheckpointError, atomic_write_bytes, load_safetensors, save_safetensors

CHECKPOINT_DIR = "checkpoints"
MANIFEST = "manifest.json"
# What every checkpoint holds besides its manifest.
CHECKPOINT_FILES = ("config.json", "model.safetensors", "optimizer.json", "optimizer.safetensors", "rng.safetensors",
                    "trainer_state.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, payload: dict) -> None:
    atomic_write_bytes(path, [(json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8")])


def _optimizer_to_files(state: dict) -> tuple[dict, dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-ready values."""
    tensors, scalars = {}, {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            target = tensors if torch.is_tensor(value) else scalars
            target[f"{param_id}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def capture_rng_states() -> dict[str, torch.Tensor]:
    """This process's torch RNG states: the CPU generator and every CUDA device's."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def restore_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda_states = [states[k] for k in sorted(k for k in states if k.startswith("cuda"))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)


def save_checkpoint(checkpoints_dir: Path, step: int, model, optimizer, rng_by_rank: list[dict],
                    trainer_state: dict, *, weights: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Write ``checkpoints_dir/step-{step}`` atomically (assembled in a temporary folder, then renamed).

    ``weights`` and ``optimizer_state`` replace ``model.state_dict()`` and ``optimizer.state_dict()``
    (a sharded model's gathered whole, so a checkpoint does not depend on how the run was sharded)."""
    final = checkpoints_dir / f"step-{step}"
    tmp = checkpoints_dir / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if weights is None:
        model.save_pretrained(tmp)
    else:
        model.save_pretrained(tmp, state_dict=weights)
    opt_tensors, opt_meta = _optimizer_to_files(optimizer_state if optimizer_state is not None else optimizer.state_dict())
    save_safetensors(opt_tensors, tmp / "optimizer.safetensors")
    write_json(tmp / "optimizer.json", opt_meta)
    rng = {f"rank{r}.{name}": state for r, states in enumerate(rng_by_rank) for name, state in states.items()}
    save_safetensors(rng, tmp / "rng.safetensors")
    write_json(tmp / "trainer_state.json", trainer_state)
    files = sorted(p.name for p in tmp.iterdir())
    manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in files}
    write_json(tmp / MANIFEST, {"step": step, "files": manifest})
    if final.exists():  # a rerun over the same step: the new folder replaces the old one
        stale = checkpoints_dir / f".stale-step-{step}-{os.getpid()}"
        os.replace(final, stale)
        shutil.rmtree(stale)
    os.replace(tmp, final)
    return final


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check every file of a checkpoint against its manifest; return ``trainer_state``, or raise
    ``CheckpointError`` saying what is missing or damaged."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it is incomplete or not a training checkpoint")
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} has a corrupt {MANIFEST} ({err})") from None
    well_formed = isinstance(files, dict) and all(
        isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
        for entry in files.values()
    )
    if not well_formed:
        raise CheckpointError(f"checkpoint {path} has a corrupt {MANIFEST}: 'files' must map each file name to its "
                              "'bytes' and 'sha256'")
    unlisted = sorted(set(CHECKPOINT_FILES) - set(files))
    if unlisted:
        raise CheckpointError(f"checkpoint {path} has a corrupt {MANIFEST}: it does not list {', '.join(unlisted)}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint {path} is truncated: {name} has {size} bytes, expected {expected['bytes']}"
            )
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its checksum")
    return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Verify and read a checkpoint into memory: weights, optimizer state, RNG states, trainer state."""
    path = Path(path)
    trainer_state = verify_checkpoint(path)
    optimizer_meta = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
    rng_by_rank: dict[int, dict] = {}
    for name, tensor in load_safetensors(path / "rng.safetensors").items():
        rank, key = name.split(".", 1)
        rng_by_rank.setdefault(int(rank.removeprefix("rank")), {})[key] = tensor
    return {
        "path": path,
        "config": json.loads((path / "config.json").read_text(encoding="utf-8")),
        "weights": load_safetensors(path / "model.safetensors"),
        "optimizer": _optimizer_from_files(load_safetensors(path / "optimizer.safetensors"), optimizer_meta),
        "rng": rng_by_rank,
        "trainer_state": trainer_state,
    }


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """``step-N`` folders of ``checkpoints_dir``, newest (largest N) first."""
    root = Path(checkpoints_dir)
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def newest_valid_checkpoint(checkpoints_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint that verifies (older ones are tried after a warning), or None if none exist."""
    candidates = list_checkpoints(checkpoints_dir)
    problems = []
    for candidate in candidates:
        try:
            verify_checkpoint(candidate)
            return candidate
        except CheckpointError as err:
            problems.append(str(err))
            warnings.warn(f"{err}; trying an older checkpoint", stacklevel=2)
    if candidates:
        raise CheckpointError(f"no usable checkpoint in {checkpoints_dir}: {'; '.join(problems)}")
    return None


def _config_differences(saved: dict, current: dict) -> list[str]:
    ignored = {"architectures"}
    keys = sorted((set(saved) | set(current)) - ignored)
    return [
        f"{key}: checkpoint {saved.get(key)!r} vs now {current.get(key)!r}"
        for key in keys
        if saved.get(key) != current.get(key)
    ]


def refuse_another_run(loaded: dict, path: Path, config: dict, data_description: dict) -> None:
    """Raise CheckpointError when the checkpoint ``loaded`` from ``path`` was trained with another
    model config or another tokenizer than the run resuming it (``config``: the model's
    ``to_dict()``; ``data_description``: the dataset's ``describe()``)."""
    differences = _config_differences(loaded["config"], config)
    if differences:
        raise CheckpointError(
            f"checkpoint {path} was trained with another model config ({'; '.join(differences[:4])}): "
            "resume with the same --config and model flags, or train into a fresh --out"
        )
    saved_tokenizer = loaded["trainer_state"].get("data", {}).get("tokenizer_sha256")
    tokenizer = data_description.get("tokenizer_sha256")
    if saved_tokenizer is not None and tokenizer != saved_tokenizer:
        raise CheckpointError(
            f"checkpoint {path} was trained with another tokenizer (sha256 {saved_tokenizer[:12]}…, now "
            f"{str(tokenizer)[:12]}…): resume with the run's tokenizer.json, or train into a fresh --out"
        )
