"""Training data: the duplication task of the Reformer paper and text (byte-level here, BPE in ``bpe.py``).

Every dataset here gives the Trainer the same things:

* ``train_batch(step, batch_size, rows=None)`` -> ``(input_ids, labels)``, both (b, L) long: rows ``rows``
  (default: all) of the *global* batch of optimizer step ``step``. A batch is a pure function of
  ``(seed, step)``, so a resumed run sees exactly the data an uninterrupted one would, with no generator
  state to save, and each distributed rank cuts its own slice of the same global batch.
* ``eval_batches(batch_size, rank=0, world_size=1)`` -> the fixed held-out set, batch by batch (a rank
  gets every ``world_size``-th batch).
* ``metric`` (``"accuracy"`` or ``"bpc"``), ``vocab_size``, ``pad_token_id``, ``eos_token_id`` and, for
  text, ``count_characters(labels)``.

Labels are aligned with ``input_ids`` (``labels[:, t]`` is the token at ``t``; the model scores it from
positions ``< t``); ``-100`` marks positions that are not scored.

Duplication task: sequences ``0 w 0 w`` of length L, ``w`` (length L/2 - 1) drawn uniformly from the
symbols ``1 .. vocab_size - 1``; only the second ``w`` is scored, since the first is unpredictable.

Text: the files of a path (a file, or a directory walked recursively in sorted order) form one token
stream with an end-of-sequence token after each file. The stream is cut into contiguous windows of L
tokens; the last ``eval_fraction`` of the stream is held out, so train and eval windows never overlap.
Files are read through ``numpy.memmap`` window by window: a multi-GB corpus is never loaded whole.

Byte-level policy: bytes are consumed as bytes, shifted by two to make room for the special ids
(Trax's enwik8 convention, as in the ``enwik8`` config preset): ``PAD = 0``, ``EOS = 1``, byte ``b`` is
id ``b + 2``, vocab 258. Files must be UTF-8 text by default, because a
binary file passed by mistake would silently train a useless model; ``allow_binary=True`` accepts any
bytes. In a directory, non-UTF-8 and empty files are skipped with a warning; a single file that is
empty or not UTF-8 is an error.

BPE-tokenised text (the optional ``tokenizers`` package) lives in ``bpe.py``; its token file is windowed
like bytes, by the same ``TextDataset``.

Bits per character: eval loss in bits divided by the number of characters the scored tokens decode to
(a token's characters are the UTF-8 lead bytes among its bytes), so byte and BPE models compare
directly. For ASCII text this equals bits per byte.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch


IGNORE_INDEX = -100
BYTE_PAD_ID, BYTE_EOS_ID, BYTE_OFFSET = 0, 1, 2  # byte b is id b + BYTE_OFFSET
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET
BPE_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: the config's default pad/eos ids
_READ_BLOCK = 1 << 20


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed mixed from ``seed`` and ``keys``: independent streams from one user seed."""
    digest = hashlib.blake2b(repr((int(seed), keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _generator(seed: int, *keys) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def _rows_of(batch_size: int, rows: range | None) -> range:
    rows = range(batch_size) if rows is None else rows
    if rows.start < 0 or rows.stop > batch_size or rows.step != 1:
        raise ValueError(f"rows {rows} must be a contiguous slice of the global batch of {batch_size}")
    return rows


# ----------------------------------------------------------------------------------------- duplication


def duplication_batch(generator: torch.Generator, batch_size: int, seq_len: int, vocab_size: int):
    """``0 w 0 w`` sequences and their labels (only the second ``w`` is scored): two (B, L) long tensors."""
    half = seq_len // 2
    symbols = torch.randint(1, vocab_size, (batch_size, half - 1), generator=generator)  # (B, L/2 - 1)
    zeros = torch.zeros(batch_size, 1, dtype=torch.long)
    input_ids = torch.cat([zeros, symbols, zeros, symbols], dim=1)  # (B, L)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, half + 1 :] = symbols
    return input_ids, labels


class DuplicationTask:
    """The Reformer paper's duplication task: an infinite training stream and a fixed eval set."""

    metric = "accuracy"

    def __init__(self, seq_len: int, vocab_size: int = 128, seed: int = 0, eval_size: int = 256):
        if not isinstance(seq_len, int) or seq_len < 4 or seq_len % 2:
            raise ValueError(f"the duplication task needs an even sequence length >= 4, got {seq_len!r}")
        if not isinstance(vocab_size, int) or vocab_size < 3:
            raise ValueError(
                f"the duplication task needs vocab_size >= 3 (symbol 0 plus two or more), got {vocab_size!r}"
            )
        if not isinstance(eval_size, int) or eval_size < 1:
            raise ValueError(f"eval_size must be a positive number of sequences, got {eval_size!r}")
        self.seq_len, self.vocab_size, self.seed = seq_len, vocab_size, int(seed)
        self.pad_token_id, self.eos_token_id = 0, None
        self._eval_set = duplication_batch(_generator(self.seed, "eval"), eval_size, seq_len, vocab_size)
        self._cached_step: tuple[int, int, tuple] | None = None

    def describe(self) -> dict:
        return {"task": "duplication", "seq_len": self.seq_len, "vocab_size": self.vocab_size, "seed": self.seed}

    def train_batch(self, step: int, batch_size: int, rows: range | None = None):
        rows = _rows_of(batch_size, rows)
        # The whole global batch is drawn (cheap) so that every rank slices the same one.
        if self._cached_step is None or self._cached_step[:2] != (step, batch_size):
            batch = duplication_batch(_generator(self.seed, "train", step), batch_size, self.seq_len, self.vocab_size)
            self._cached_step = (step, batch_size, batch)
        input_ids, labels = self._cached_step[2]
        return input_ids[rows.start : rows.stop], labels[rows.start : rows.stop]

    def eval_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[tuple]:
        input_ids, labels = self._eval_set
        for index, start in enumerate(range(0, len(input_ids), batch_size)):
            if index % world_size == rank:
                yield input_ids[start : start + batch_size], labels[start : start + batch_size]


# ------------------------------------------------------------------------------------------ text files


def find_invalid_utf8(path: str | os.PathLike) -> int | None:
    """Byte offset (approximate within a character) of the first invalid UTF-8 sequence, or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        while block := handle.read(_READ_BLOCK):
            try:
                decoder.decode(block, final=False)
            except UnicodeDecodeError as err:
                return offset + err.start
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return offset - 1
    return None


def collect_text_files(path: str | os.PathLike, allow_binary: bool = False) -> list[Path]:
    """The files of ``path``: a file, or a directory walked recursively (links to files, and to
    folders outside it, followed; each folder once), sorted by path, hidden entries skipped."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data path {root} does not exist")
    if root.is_file():
        _check_text_file(root, allow_binary, strict=True)
        return [root]
    files = []
    for candidate in sorted(_walk_files(root)):
        hidden = any(part.startswith(".") for part in candidate.relative_to(root).parts)
        if candidate.is_file() and not hidden and _check_text_file(candidate, allow_binary, strict=False):
            files.append(candidate)
    if not files:
        raise ValueError(f"no non-empty text files under {root}")
    return files


def _walk_files(root: Path) -> Iterator[Path]:
    """Every file below ``root``, through links to folders outside it too; a folder reached twice (a
    link loop, two links to one folder) is walked once, and a link to a folder inside the tree is
    skipped, since the folder is walked by its own path (so the file list does not depend on links)."""
    real_root = os.path.realpath(root)
    seen = {real_root}
    for folder, subfolders, names in os.walk(root, followlinks=True):
        unseen = []
        for name in sorted(subfolders):
            path = os.path.join(folder, name)
            real = os.path.realpath(path)
            inside = os.path.commonpath([real, real_root]) == real_root
            if real in seen or (os.path.islink(path) and inside):  # a link into the tree: walked by its own path
                continue
            seen.add(real)
            unseen.append(name)
        subfolders[:] = unseen
        yield from (Path(folder) / name for name in names)


def _check_text_file(path: Path, allow_binary: bool, strict: bool) -> bool:
    """True when ``path`` is usable; raise (strict) or warn and return False otherwise."""
    problem = None
    if path.stat().st_size == 0:
        problem = f"{path} is empty: give a file with some text"
    elif not allow_binary and (offset := find_invalid_utf8(path)) is not None:
        problem = (
            f"{path} is not UTF-8 text (invalid byte near offset {offset}): convert it to UTF-8 "
            "(byte-level training also accepts raw bytes: --raw-bytes, allow_binary=True)"
        )
    if problem is None:
        return True
    if strict:
        raise ValueError(problem)
    warnings.warn(f"skipping {problem}", stacklevel=3)
    return False


class ByteSource:
    """The bytes of several files as one id stream, with ``BYTE_EOS_ID`` after each file; read by offset."""

    MAX_OPEN_MAPS = 64

    def __init__(self, files: Sequence[str | os.PathLike]):
        self.files = [Path(f) for f in files]
        sizes = np.array([f.stat().st_size for f in self.files], dtype=np.int64)
        if len(sizes) == 0 or (sizes == 0).any():
            raise ValueError("ByteSource needs one or more non-empty files")
        self.starts = np.concatenate([[0], np.cumsum(sizes + 1)])  # each file is followed by one EOS
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()  # the most recently read last

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _map(self, index: int) -> np.memmap:
        """File ``index`` mapped; at most ``MAX_OPEN_MAPS`` stay open (each holds a file descriptor)."""
        if index in self._maps:
            self._maps.move_to_end(index)
        else:
            if len(self._maps) >= self.MAX_OPEN_MAPS:
                self._maps.popitem(last=False)
            self._maps[index] = np.memmap(self.files[index], dtype=np.uint8, mode="r")
        return self._maps[index]

    def read(self, start: int, length: int) -> np.ndarray:
        """Ids ``[start, start + length)`` of the stream as int64 (length,)."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"read [{start}, {start + length}) outside the stream of {len(self)} ids")
        out = np.empty(length, dtype=np.int64)
        filled, position = 0, start
        index = int(np.searchsorted(self.starts, position, side="right")) - 1
        while filled < length:
            offset = position - int(self.starts[index])
            data = self._map(index)
            take = min(len(data) - offset, length - filled)
            if take > 0:
                out[filled : filled + take] = data[offset : offset + take]
                out[filled : filled + take] += BYTE_OFFSET
            else:  # the file's trailing EOS
                out[filled], take = BYTE_EOS_ID, 1
            filled, position = filled + take, position + take
            if position >= self.starts[index + 1]:
                index += 1
        return out


class TokenFileSource:
    """A token file (raw little-endian uint16/uint32 ids) as a memory-mapped id stream."""

    def __init__(self, path: str | os.PathLike, dtype: str):
        self.path = Path(path)
        self.tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")

    def __len__(self) -> int:
        return len(self.tokens)

    def read(self, start: int, length: int) -> np.ndarray:
        if start < 0 or start + length > len(self):
            raise IndexError(f"read [{start}, {start + length}) outside the stream of {len(self)} ids")
        return self.tokens[start : start + length].astype(np.int64)


def byte_characters_per_token() -> np.ndarray:
    """(258,) characters per byte id: 1 for ASCII and UTF-8 lead bytes, 0 for continuations and specials."""
    counts = np.zeros(BYTE_VOCAB_SIZE, dtype=np.int64)
    byte_values = np.arange(256)
    counts[BYTE_OFFSET:] = (byte_values < 0x80) | (byte_values >= 0xC0)
    return counts


class TextDataset:
    """Contiguous windows of ``seq_len`` ids over a source; the last ``eval_fraction`` held out.

    Training windows are visited in a fresh random order each epoch (a permutation seeded by
    ``(seed, epoch)``); sample ``j`` of the run is window ``perm[j // n](j % n)``, and the global batch of
    step ``s`` holds samples ``s * B .. s * B + B - 1``.
    """

    metric = "bpc"

    def __init__(self, source, seq_len: int, vocab_size: int, characters_per_token: np.ndarray,
                 seed: int = 0, eval_fraction: float = 0.05, eval_size: int = 64,
                 pad_token_id: int = BYTE_PAD_ID, eos_token_id: int = BYTE_EOS_ID, description: dict | None = None,
                 run_files: dict[str, bytes] | None = None):
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must lie strictly between 0 and 1, got {eval_fraction!r}")
        self.source, self.seq_len, self.vocab_size, self.seed = source, seq_len, vocab_size, int(seed)
        self.characters_per_token = torch.as_tensor(characters_per_token, dtype=torch.long)
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        total = len(source)
        split = int(total * (1.0 - eval_fraction))
        self.num_train_windows = split // seq_len
        self.eval_offset = split
        num_eval_windows = (total - split) // seq_len
        if self.num_train_windows < 1 or num_eval_windows < 1:
            needed = int(np.ceil(seq_len / min(eval_fraction, 1.0 - eval_fraction))) + seq_len
            raise ValueError(
                f"the data has {total} tokens, too few for windows of --seq-len {seq_len} with "
                f"{eval_fraction:.0%} held out (about {needed} needed): use more text or a shorter --seq-len"
            )
        # Evenly spaced held-out windows, so a capped eval set still covers the whole held-out split.
        picks = np.linspace(0, num_eval_windows - 1, num=min(eval_size, num_eval_windows)).round().astype(np.int64)
        self.eval_windows = np.unique(picks)
        self._description = dict(description or {}, seq_len=seq_len, vocab_size=vocab_size, seed=self.seed)
        self._run_files = dict(run_files or {})
        self._permutations: dict[int, torch.Tensor] = {}

    def describe(self) -> dict:
        return dict(self._description)

    def run_files(self) -> dict[str, bytes]:
        """Files a run folder needs to use the model later (the BPE tokenizer), by name."""
        return dict(self._run_files)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            generator = _generator(self.seed, "epoch", epoch)
            self._permutations[epoch] = torch.randperm(self.num_train_windows, generator=generator)
        return self._permutations[epoch]

    def _windows(self, offsets) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.from_numpy(np.stack([self.source.read(int(o), self.seq_len) for o in offsets]))  # (b, L)
        return input_ids, input_ids.clone()

    def train_batch(self, step: int, batch_size: int, rows: range | None = None):
        rows = _rows_of(batch_size, rows)
        samples = [step * batch_size + row for row in rows]
        windows = [int(self._permutation(j // self.num_train_windows)[j % self.num_train_windows]) for j in samples]
        return self._windows([w * self.seq_len for w in windows])

    def eval_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[tuple]:
        for index, start in enumerate(range(0, len(self.eval_windows), batch_size)):
            if index % world_size == rank:
                picked = self.eval_windows[start : start + batch_size]
                yield self._windows(self.eval_offset + picked * self.seq_len)

    def count_characters(self, labels: torch.Tensor) -> int:
        """Characters decoded from the scored tokens of ``labels`` (B, L); position 0 is never scored."""
        scored = labels[:, 1:]
        scored = scored[scored != IGNORE_INDEX]
        return int(self.characters_per_token[scored.cpu()].sum())


def byte_text_dataset(path: str | os.PathLike, seq_len: int, seed: int = 0, eval_fraction: float = 0.05,
                      eval_size: int = 64, allow_binary: bool = False) -> TextDataset:
    """A byte-level ``TextDataset`` over the files of ``path`` (vocab ``BYTE_VOCAB_SIZE``)."""
    files = collect_text_files(path, allow_binary)
    return TextDataset(
        ByteSource(files), seq_len, BYTE_VOCAB_SIZE, byte_characters_per_token(), seed=seed,
        eval_fraction=eval_fraction, eval_size=eval_size, pad_token_id=BYTE_PAD_ID, eos_token_id=BYTE_EOS_ID,
        description={"task": "bytes", "data": os.path.abspath(path),
                     "bytes": sum(os.path.getsize(file) for file in files)},  # resuming notices a changed corpus
    )


class ByteTokenizer:
    """Text <-> byte ids (UTF-8 byte ``b`` is id ``b + 2``); the byte-level model's tokenizer."""

    vocab_size = BYTE_VOCAB_SIZE
    pad_token_id, bos_token_id, eos_token_id = BYTE_PAD_ID, None, BYTE_EOS_ID

    def encode(self, text: str) -> list[int]:
        """Byte ids of ``text`` in UTF-8; bytes that are not UTF-8, which Python hands over as lone
        surrogates (command-line arguments, file names), are kept as the raw bytes they stand for."""
        return [byte + BYTE_OFFSET for byte in text.encode("utf-8", errors="surrogateescape")]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte ids in ``ids`` (special ids are dropped; broken UTF-8 becomes U+FFFD)."""
        data = bytes(int(i) - BYTE_OFFSET for i in ids if BYTE_OFFSET <= int(i) < BYTE_VOCAB_SIZE)
        return data.decode("utf-8", errors="replace")


_MOVED_TO_BPE = ("BPETokenizer", "MAX_BPE_VOCAB", "TokenizedCorpus", "bpe_text_dataset", "train_bpe_tokenizer")


def __getattr__(name: str):
    """The BPE names that lived here before ``bpe.py`` existed, still importable from this module."""
    if name in _MOVED_TO_BPE:
        from . import bpe

        return getattr(bpe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
