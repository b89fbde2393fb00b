"""Safetensors files without the `safetensors` dependency, written atomically.

The format is small and fully specified: an 8-byte little-endian header length ``N``, ``N`` bytes
of JSON mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
into the data section, plus an optional ``"__metadata__"`` string map), then the raw row-major,
little-endian tensor bytes. Files written here load with the `safetensors` package and with
Hugging Face, and files written by them load here.

Why our own: checkpoints must never be pickles (loading a pickle runs code), and the core library
depends on torch and numpy only.

Writes go to a temporary file in the target folder that is renamed over the destination once
complete, so an interrupted save never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping

import torch

_DTYPE_TO_NAME = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_NAME_TO_DTYPE = {name: dtype for dtype, name in _DTYPE_TO_NAME.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not fit the model."""


def atomic_write_bytes(path: str | os.PathLike, chunks) -> None:
    """Write an iterable of byte strings to ``path`` through a temporary file and a rename."""
    atomic_write_files({path: chunks})


def atomic_write_files(files: Mapping[str | os.PathLike, object]) -> None:
    """Write several files (``path -> iterable of byte strings``) that belong together.

    Every file is written in full to a temporary name first; only then are they renamed into
    place, back to back. So a failure while writing (a full disk, an exception) leaves every
    destination as it was, rather than a new file beside an old one (weights of one save with
    the config of another); only a crash between the renames themselves could still mix them.
    """
    pending: list[tuple[str, str]] = []
    try:
        for path, chunks in files.items():
            path = os.fspath(path)
            fd, tmp_path = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
            pending.append((tmp_path, path))
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
        while pending:
            tmp_path, path = pending[0]
            os.replace(tmp_path, path)
            pending.pop(0)
    except BaseException:
        for tmp_path, _ in pending:
            if os.path.exists(tmp_path):
                os.unlink(tmp_path)
        raise


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Save a flat ``name -> tensor`` mapping to ``path`` in the safetensors format."""
    atomic_write_bytes(path, safetensors_chunks(tensors, metadata))


def safetensors_chunks(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> list[bytes]:
    """The bytes of a safetensors file holding ``tensors``, as chunks to write one after another."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    payloads = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.dtype not in _DTYPE_TO_NAME:
            raise TypeError(f"cannot save tensor {name!r} of dtype {tensor.dtype} in safetensors")
        data = tensor.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
        header[name] = {
            "dtype": _DTYPE_TO_NAME[data.dtype],
            "shape": list(data.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        payloads.append(raw)
        offset += len(raw)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # align the data section to 8 bytes
    return [struct.pack("<Q", len(header_bytes)), header_bytes, *payloads]


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file; raise ``CheckpointError`` on a damaged file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    with open(path, "rb") as handle:
        blob = handle.read()
    if len(blob) < 8:
        raise CheckpointError(f"{path} is truncated ({len(blob)} bytes): it is not a safetensors file")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > min(_MAX_HEADER_BYTES, len(blob) - 8):
        raise CheckpointError(f"{path} is truncated or corrupt: its header claims {header_len} bytes")
    try:
        header = json.loads(blob[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} has a corrupt header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt header: expected a JSON object, got {type(header).__name__}")
    data = memoryview(blob)[8 + header_len :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_from_entry(path, name, info, data)
    return tensors


def _tensor_from_entry(path: str, name: str, info: dict, data: memoryview) -> torch.Tensor:
    try:
        dtype = _NAME_TO_DTYPE[info["dtype"]]
        shape = [int(s) for s in info["shape"]]
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: entry {name!r} is malformed ({info!r})") from None
    if any(size < 0 for size in shape):
        raise CheckpointError(f"{path}: entry {name!r} has a negative size in its shape {shape}")
    numel = 1
    for size in shape:
        numel *= size
    expected = numel * torch.empty((), dtype=dtype).element_size()
    if end - begin != expected or end > len(data) or begin < 0:
        raise CheckpointError(
            f"{path} is truncated or corrupt: tensor {name!r} needs bytes [{begin}, {end}) "
            f"({expected} expected) but the data section holds {len(data)} bytes"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(data[begin:end]), dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


def read_json_object(path: str | os.PathLike, missing: str) -> dict:
    """The JSON object in ``path``; ``CheckpointError`` if it is missing (``missing`` says why that
    matters), unreadable or not an object."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(missing)
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value
