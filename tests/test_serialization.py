"""Our safetensors reader/writer: exact round trips, interchange with the `safetensors` package,
and clear errors on damaged files."""

import os

import pytest
import torch

from torch_reformer.serialization import CheckpointError, atomic_write_files, load_safetensors, save_safetensors


def _sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=g),
        "b.bias": torch.randn(7, generator=g, dtype=torch.float64),
        "half": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
    }


def test_round_trip_is_exact(tmp_path):
    tensors = _sample_tensors()
    path = tmp_path / "m.safetensors"
    save_safetensors(tensors, path)
    loaded = load_safetensors(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name], tensor), name


def test_interchange_with_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {k: v for k, v in _sample_tensors().items() if k != "empty"}
    ours = tmp_path / "ours.safetensors"
    theirs = tmp_path / "theirs.safetensors"
    save_safetensors(tensors, ours)
    st.save_file(tensors, str(theirs))
    for name, tensor in st.load_file(str(ours)).items():
        assert torch.equal(tensor, tensors[name])
    for name, tensor in load_safetensors(theirs).items():
        assert torch.equal(tensor, tensors[name])


def test_non_contiguous_tensor_saved_by_value(tmp_path):
    tensor = torch.arange(12.0).reshape(3, 4).t()
    save_safetensors({"t": tensor}, tmp_path / "t.safetensors")
    assert torch.equal(load_safetensors(tmp_path / "t.safetensors")["t"], tensor)


def test_truncated_file_raises_clear_error(tmp_path):
    path = tmp_path / "m.safetensors"
    save_safetensors(_sample_tensors(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointError, match="truncated"):
        load_safetensors(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_safetensors(path)


def test_garbage_and_missing_files_raise(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((16).to_bytes(8, "little") + b"{not json at all" + b"\0" * 32)
    with pytest.raises(CheckpointError, match="corrupt header"):
        load_safetensors(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_safetensors(tmp_path / "nope.safetensors")


def _file_with_header(path, header_text: str, data: bytes = b"") -> None:
    header = header_text.encode("utf-8")
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


@pytest.mark.parametrize("header, message", [
    ("[1, 2]", "expected a JSON object"),
    ('{"w": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 0]}}', "negative size"),
    ('{"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}', "malformed"),
    ('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', "truncated or corrupt"),
])
def test_malformed_headers_raise_checkpoint_error(tmp_path, header, message):
    path = tmp_path / "bad.safetensors"
    _file_with_header(path, header, b"\0" * 8)
    with pytest.raises(CheckpointError, match=message):
        load_safetensors(path)


def test_failed_write_leaves_previous_file_intact(tmp_path):
    path = tmp_path / "m.safetensors"
    save_safetensors({"x": torch.ones(2)}, path)

    class Unsavable:
        dtype = torch.complex64

    with pytest.raises(TypeError):
        save_safetensors({"x": torch.zeros(2), "y": Unsavable()}, path)
    assert torch.equal(load_safetensors(path)["x"], torch.ones(2))
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")] == []


def test_files_written_together_are_all_replaced_or_none(tmp_path):
    (tmp_path / "a").write_bytes(b"old a")
    (tmp_path / "b").write_bytes(b"old b")

    def failing_chunks():
        yield b"new b, half"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_files({tmp_path / "a": [b"new a"], tmp_path / "b": failing_chunks()})
    assert (tmp_path / "a").read_bytes() == b"old a" and (tmp_path / "b").read_bytes() == b"old b"
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]
    atomic_write_files({tmp_path / "a": [b"new ", b"a"], tmp_path / "b": [b"new b"]})
    assert (tmp_path / "a").read_bytes() == b"new a" and (tmp_path / "b").read_bytes() == b"new b"
