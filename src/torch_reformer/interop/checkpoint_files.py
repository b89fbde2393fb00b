"""The files of a conversion: reading the weights of a folder saved by HF, creating the output folder.

HF saves ``model.safetensors`` (or shards listed in ``model.safetensors.index.json``), or, in
older versions, ``pytorch_model.bin`` (or its shards), a pickle read here with
``torch.load(weights_only=True)`` so that loading it runs no code from the file. Damage is
reported as ``CheckpointError`` in one line. ``output_folder`` creates the destination only when
the conversion is ready to write, and removes what it created if writing fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator

import torch

from ..serialization import CheckpointError, load_safetensors, read_json_object

_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def load_hf_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of an HF checkpoint folder: safetensors (single or sharded) first, else
    ``pytorch_model.bin`` (single or sharded) through ``torch.load(weights_only=True)``."""
    directory = os.fspath(directory)
    for filename in _HF_WEIGHT_FILES:
        index_path = os.path.join(directory, filename + ".index.json")
        if os.path.isfile(os.path.join(directory, filename)):
            return _load_weight_file(os.path.join(directory, filename))
        if os.path.isfile(index_path):
            state: dict[str, torch.Tensor] = {}
            for shard in _shard_files(index_path):
                for name, tensor in _load_weight_file(os.path.join(directory, shard)).items():
                    if state.setdefault(name, tensor) is not tensor:
                        raise CheckpointError(f"{directory}: tensor {name} is in more than one of the shards "
                                              f"{os.path.basename(index_path)} lists")
            return state
    raise CheckpointError(
        f"{directory} holds no HF weights: expected model.safetensors or pytorch_model.bin (or their sharded index)"
    )


def _shard_files(index_path: str) -> list[str]:
    """The weight files a sharded checkpoint's index lists (relative to its folder), checked."""
    weight_map = read_json_object(index_path, f"{index_path} does not exist").get("weight_map")
    if weight_map == {}:
        raise CheckpointError(f"{index_path} lists no weight files in its 'weight_map'")
    if not isinstance(weight_map, dict) or not all(
            isinstance(name, str) and isinstance(shard, str) and shard for name, shard in weight_map.items()):
        raise CheckpointError(f"{index_path} is malformed: its 'weight_map' must be an object mapping each tensor "
                              f"name to the file holding it, got {json.dumps(weight_map)[:100]}")
    shards = sorted(set(weight_map.values()))
    outside = [shard for shard in shards if os.path.isabs(shard) or ".." in re.split(r"[\\/]", shard)]
    if outside:
        raise CheckpointError(f"{index_path} names weight files outside its folder: {outside[:5]}")
    return shards


def _load_weight_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a damaged or unsafe file
        raise CheckpointError(
            f"{path} is damaged or is not a plain PyTorch state dict of tensors ({_torch_load_reason(error)}): "
            "save the weights again, e.g. as model.safetensors"
        ) from None
    if not isinstance(state, dict) or not all(torch.is_tensor(value) for value in state.values()):
        raise CheckpointError(f"{path} does not hold a flat name -> tensor state dict")
    return state


def _torch_load_reason(error: Exception) -> str:
    """The gist of a ``torch.load`` failure, without torch's advice to load with ``weights_only=False``
    (which runs code from the file, and would not help a damaged one)."""
    text = str(error).split("WeightsUnpickler error:", 1)[-1].split("Check the documentation of torch.load", 1)[0]
    gist = " ".join(text.split()).split(". ", 1)[0].rstrip(".")
    return gist or type(error).__name__


@contextlib.contextmanager
def output_folder(dst_dir: str) -> Iterator[None]:
    """Create ``dst_dir`` (and its missing parents) around the writing; if that fails, remove what was
    created here. A folder that existed before (empty) is kept, emptied again."""
    created = []  # folders that do not exist yet, innermost first
    path = os.path.abspath(dst_dir)
    while not os.path.exists(path):
        created.append(path)
        path = os.path.dirname(path)
    try:
        os.makedirs(dst_dir, exist_ok=True)
        yield
    except BaseException:
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)
        else:
            for name in os.listdir(dst_dir):
                entry = os.path.join(dst_dir, name)
                shutil.rmtree(entry) if os.path.isdir(entry) else os.remove(entry)
        raise
