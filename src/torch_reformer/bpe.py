"""BPE-tokenised text (the optional ``tokenizers`` package, the ``bpe`` extra).

``train_bpe_tokenizer`` trains a byte-level BPE whose special tokens are ``<pad>=0, <s>=1, </s>=2``
(the config's default pad and eos ids) and saves it as one JSON file. ``BPETokenizer`` wraps such a
file, or another ``tokenizers`` BPE file with an end-of-text token (GPT-2's ``<|endoftext|>``, ...): text is encoded as text, so ``<s>`` or ``</s>`` written in a document stay characters (never
special ids), and no special tokens are added around it (a tokenizer file with a post-processor,
like RoBERTa's, would otherwise put ``<s>``/``</s>`` around every block it encodes).
``TokenizedCorpus`` tokenises the files of a path once into a uint16/uint32 token file in a cache
folder, with ``</s>`` after each file; ``bpe_text_dataset`` windows it like bytes (``data.TextDataset``).
"""

from __future__ import annotations

import codecs
import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .data import _READ_BLOCK, BPE_SPECIAL_TOKENS, TextDataset, TokenFileSource, collect_text_files
from .serialization import atomic_write_bytes


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("BPE tokenizers need the `tokenizers` package: pip install torch-reformer[bpe]") from None
    if not hasattr(tokenizers.Tokenizer, "encode_special_tokens"):
        raise ImportError(f"tokenizers {tokenizers.__version__} is too old (0.19 or newer encodes special-token text "
                          "as text): pip install -U 'tokenizers>=0.19'")
    return tokenizers


def _byte_level_alphabet() -> dict[str, int]:
    """Character -> byte of the byte-level BPE alphabet: printable bytes stand for themselves, the
    others (controls, space, ...) are shifted to code points from 256 upwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {chr(b): b for b in printable}
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            mapping[chr(256 + shifted)] = byte
            shifted += 1
    return mapping


# Token ids are stored as uint32 in the tokenised corpus cache; far above any useful BPE vocabulary.
MAX_BPE_VOCAB = 1 << 24


def train_bpe_tokenizer(files: Sequence[str | os.PathLike] | str | os.PathLike, vocab_size: int,
                        out_path: str | os.PathLike, min_frequency: int = 2) -> Path:
    """Train a byte-level BPE on UTF-8 ``files`` (or a directory) and save it as one JSON file."""
    tokenizers = _import_tokenizers()
    if not isinstance(vocab_size, int) or not 256 + len(BPE_SPECIAL_TOKENS) <= vocab_size <= MAX_BPE_VOCAB:
        raise ValueError(f"--vocab-size must lie in [{256 + len(BPE_SPECIAL_TOKENS)}, {MAX_BPE_VOCAB}] (at least the "
                         f"256 bytes and the special tokens), got {vocab_size!r}")
    out_path = Path(out_path)
    if out_path.is_dir():
        raise IsADirectoryError(f"--out {out_path} is a directory: give the path of the JSON file to write")
    if out_path.parent.exists() and not out_path.parent.is_dir():
        raise NotADirectoryError(f"--out {out_path}: {out_path.parent} is a file, not a directory")
    paths = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    text_files = [str(f) for path in paths for f in collect_text_files(path)]
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(BPE_SPECIAL_TOKENS),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train(text_files, trainer)
    if tokenizer.get_vocab_size() < vocab_size:
        warnings.warn(f"the corpus supports only {tokenizer.get_vocab_size()} tokens (merges of pairs seen at least "
                      f"{min_frequency} times), fewer than the {vocab_size} asked for", stacklevel=2)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, [tokenizer.to_str().encode("utf-8")])
    return out_path


# Special-token names of the end of a text, padding and the start of a text, as the common tokenizer
# files spell them (ours: <pad>, <s>, </s>; GPT-2: <|endoftext|>; BERT-style: [PAD], [SEP], [CLS]).
_EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>", "<|eos|>", "[EOS]", "[SEP]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
_BOS_NAMES = ("<s>", "<|startoftext|>", "<bos>", "<|bos|>", "[BOS]", "[CLS]")


class BPETokenizer:
    """A trained BPE (``tokenizers`` JSON file): encode/decode and per-token character counts.

    Files written by ``train_bpe_tokenizer`` and other ``tokenizers`` BPE files work: the
    end-of-text token is the first of ``_EOS_NAMES`` the file holds (required: it separates the
    files of a corpus), padding the first of ``_PAD_NAMES`` (else the end-of-text token, as for
    GPT-2's files), the start token the first of ``_BOS_NAMES`` (optional).
    """

    def __init__(self, path: str | os.PathLike):
        tokenizers = _import_tokenizers()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {self.path} does not exist (train one with `reformer tokenizer train`)"
            )
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as err:  # the Rust library raises its own exception type
            raise ValueError(f"{self.path} is not a tokenizers JSON file ({err})") from None
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.special_tokens = {
            token.content for token in self.tokenizer.get_added_tokens_decoder().values() if token.special
        } | set(BPE_SPECIAL_TOKENS)
        self.eos_token_id = self._first_token_id(_EOS_NAMES)
        if self.eos_token_id is None:
            raise ValueError(
                f"{self.path} has no end-of-text token (one of {', '.join(_EOS_NAMES)}; its special tokens are "
                f"{sorted(self.special_tokens & set(self.tokenizer.get_vocab())) or 'none'}): add one when training "
                "it, or train one with `reformer tokenizer train`"
            )
        pad = self._first_token_id(_PAD_NAMES)
        self.pad_token_id = self.eos_token_id if pad is None else pad  # as GPT-2 files do, which have no pad
        self.bos_token_id = self._first_token_id(_BOS_NAMES)
        self.tokenizer.encode_special_tokens = True  # "<s>" in a text is three characters, not the id 1

    def _first_token_id(self, names: Sequence[str]) -> int | None:
        return next((self.tokenizer.token_to_id(n) for n in names if self.tokenizer.token_to_id(n) is not None), None)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with no special tokens added or recognised in it."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def characters_per_token(self) -> np.ndarray:
        """(V,) characters each token contributes to decoded text (its UTF-8 lead bytes; specials 0)."""
        alphabet = _byte_level_alphabet()
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        specials = self.special_tokens
        for token_id in range(self.vocab_size):
            token = self.tokenizer.id_to_token(token_id)
            if token is None or token in specials:
                continue
            counts[token_id] = sum(1 for ch in token if not 0x80 <= alphabet.get(ch, 0) < 0xC0)
        return counts


def _text_blocks(path: Path) -> Iterator[str]:
    """The UTF-8 text of ``path`` in blocks of about 1 MiB, each cut after a newline when there is one,
    else after a space, else where the block ends (so a file without line breaks is not read whole)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending = ""
    with open(path, "rb") as handle:
        while block := handle.read(_READ_BLOCK):
            pending += decoder.decode(block, final=False)
            cut = pending.rfind("\n") + 1
            if cut == 0:  # cut before the last space, which then starts the next word as it does in the text
                cut = max(pending.rfind(" "), 0) or len(pending)
            if cut > 0:
                yield pending[:cut]
                pending = pending[cut:]
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending


# Part of the cache key: how text becomes ids (special-token text encoded as text, none added).
_ENCODING_VERSION = b"encoding 2\n"


class TokenizedCorpus:
    """The files of a path tokenised once into ``cache_dir`` (uint16 ids when they fit, else uint32),
    with the tokenizer's EOS after each file. The cache key covers the tokenizer file and each input
    file's path, size and modification time; the token file is written under a temporary name and renamed.
    Token files of other keys stay until ``prune_token_cache`` removes them."""

    def __init__(self, path: str | os.PathLike, tokenizer: BPETokenizer, cache_dir: str | os.PathLike):
        self.files = collect_text_files(path)
        self.tokenizer = tokenizer
        self.dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
        key = hashlib.sha256(tokenizer.path.read_bytes())
        key.update(_ENCODING_VERSION)
        for f in self.files:
            stat = f.stat()
            key.update(f"{f.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.token_path = cache_dir / f"tokens-{key.hexdigest()[:16]}.{self.dtype}"
        if not self.token_path.is_file():
            self._tokenise()

    def _tokenise(self) -> None:
        tmp_path = self.token_path.with_name(self.token_path.name + f".tmp-{os.getpid()}")
        try:
            with open(tmp_path, "wb") as out:
                for f in self.files:
                    for text in _text_blocks(f):
                        np.asarray(self.tokenizer.encode(text), dtype=self.dtype).tofile(out)
                    np.asarray([self.tokenizer.eos_token_id], dtype=self.dtype).tofile(out)
            os.replace(tmp_path, self.token_path)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


    def source(self) -> TokenFileSource:
        return TokenFileSource(self.token_path, self.dtype)


def prune_token_cache(dataset: TextDataset) -> None:
    """Remove the token files of other corpora or tokenizers from the cache folder ``dataset`` reads
    from (a run calls it once it has accepted the dataset; a refused resume keeps its cache)."""
    token_path = getattr(dataset.source, "path", None)
    if token_path is None:
        return
    for stale in token_path.parent.glob("tokens-*"):
        if stale != token_path and ".tmp-" not in stale.name:
            stale.unlink(missing_ok=True)


def bpe_text_dataset(path: str | os.PathLike, tokenizer_path: str | os.PathLike, seq_len: int,
                     cache_dir: str | os.PathLike, seed: int = 0, eval_fraction: float = 0.05,
                     eval_size: int = 64) -> TextDataset:
    """A ``TextDataset`` over the BPE tokens of ``path`` (tokenised once into ``cache_dir``)."""
    tokenizer = BPETokenizer(tokenizer_path)
    corpus = TokenizedCorpus(path, tokenizer, cache_dir)
    tokenizer_bytes = Path(tokenizer_path).read_bytes()
    source = corpus.source()
    description = {"task": "bpe", "data": os.path.abspath(path), "tokens": len(source),  # resume notices a change
                   "tokenizer_sha256": hashlib.sha256(tokenizer_bytes).hexdigest()}
    return TextDataset(
        source, seq_len, tokenizer.vocab_size, tokenizer.characters_per_token(), seed=seed,
        eval_fraction=eval_fraction, eval_size=eval_size, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, description=description, run_files={"tokenizer.json": tokenizer_bytes},
    )

