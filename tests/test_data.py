"""Datasets: duplication sequences, byte windows, held-out split, streaming reads, data order, BPE."""

import resource
from pathlib import Path

import numpy as np
import pytest
import torch

from torch_reformer import bpe, data


def _write(path, content: bytes):
    path.write_bytes(content)
    return path


# ------------------------------------------------------------------------------------------ duplication


def test_duplication_sequences_are_0w0w_with_only_the_second_w_scored():
    task = data.DuplicationTask(seq_len=12, vocab_size=7, seed=3)
    input_ids, labels = task.train_batch(step=5, batch_size=8)
    assert input_ids.shape == labels.shape == (8, 12)
    half = 6
    w = input_ids[:, 1:half]
    assert (input_ids[:, 0] == 0).all() and (input_ids[:, half] == 0).all()
    assert torch.equal(input_ids[:, half + 1 :], w)
    assert ((w >= 1) & (w <= 6)).all()
    assert (labels[:, : half + 1] == data.IGNORE_INDEX).all()
    assert torch.equal(labels[:, half + 1 :], w)


def test_duplication_symbols_are_uniform():
    task = data.DuplicationTask(seq_len=64, vocab_size=5, seed=0)
    input_ids, _ = task.train_batch(0, 512)
    counts = torch.bincount(input_ids[:, 1:32].reshape(-1), minlength=5)[1:].double()
    assert counts.sum() == 512 * 31
    assert (counts / counts.sum() - 0.25).abs().max() < 0.01


def test_duplication_batches_are_pure_functions_of_seed_and_step():
    a = data.DuplicationTask(16, 10, seed=1)
    b = data.DuplicationTask(16, 10, seed=1)
    for _ in range(3):
        b.train_batch(7, 4)  # call history must not matter
    assert torch.equal(a.train_batch(2, 4)[0], b.train_batch(2, 4)[0])
    assert not torch.equal(a.train_batch(2, 4)[0], a.train_batch(3, 4)[0])
    assert not torch.equal(a.train_batch(2, 4)[0], data.DuplicationTask(16, 10, seed=2).train_batch(2, 4)[0])
    full_ids, full_labels = a.train_batch(4, 6)
    part_ids, part_labels = a.train_batch(4, 6, rows=range(2, 5))
    assert torch.equal(part_ids, full_ids[2:5]) and torch.equal(part_labels, full_labels[2:5])


def test_duplication_eval_set_is_fixed_and_sharded():
    task = data.DuplicationTask(8, 50, seed=0, eval_size=10)
    first = torch.cat([ids for ids, _ in task.eval_batches(4)])
    again = torch.cat([ids for ids, _ in task.eval_batches(3)])
    assert first.shape == (10, 8) and torch.equal(first, again)
    shards = [torch.cat([ids for ids, _ in task.eval_batches(2, rank, 2)]) for rank in range(2)]
    interleaved = [shards[0][0:2], shards[1][0:2], shards[0][2:4], shards[1][2:4], shards[0][4:]]
    assert torch.equal(torch.cat(interleaved), first)


@pytest.mark.parametrize("kwargs", [dict(seq_len=7), dict(seq_len=2), dict(seq_len=8, vocab_size=2),
                                    dict(seq_len=8, eval_size=0)])
def test_duplication_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        data.DuplicationTask(**kwargs)


# ----------------------------------------------------------------------------------------------- bytes


def _reference_stream(contents):
    ids = []
    for content in contents:
        ids += [b + data.BYTE_OFFSET for b in content] + [data.BYTE_EOS_ID]
    return np.array(ids)


def test_byte_source_reads_exact_ranges_across_files(tmp_path):
    contents = [b"hello world\n", b"x", "caf\u00e9 \u00fc\n".encode()]
    files = [_write(tmp_path / f"{i}.txt", c) for i, c in enumerate(contents)]
    source = data.ByteSource(files)
    reference = _reference_stream(contents)
    assert len(source) == len(reference)
    for start in range(len(reference)):
        for length in (0, 1, 3, len(reference) - start):
            if start + length <= len(reference):
                assert np.array_equal(source.read(start, length), reference[start : start + length])
    with pytest.raises(IndexError):
        source.read(len(reference) - 2, 3)


def test_text_windows_are_exact_and_held_out_split_is_disjoint(tmp_path):
    content = bytes(np.random.default_rng(0).integers(32, 127, 285).tolist())  # 285 bytes + EOS = 286 ids
    dataset = data.byte_text_dataset(_write(tmp_path / "a.txt", content), seq_len=10, eval_fraction=0.2, eval_size=100)
    reference = _reference_stream([content])
    split = int(286 * 0.8)
    assert dataset.eval_offset == split and dataset.num_train_windows == split // 10
    # One epoch visits every training window exactly once.
    input_ids, labels = dataset.train_batch(0, dataset.num_train_windows)
    assert torch.equal(input_ids, labels)
    starts = []
    for row in input_ids.numpy():
        start = next(s for s in range(0, split, 10) if np.array_equal(reference[s : s + 10], row))
        starts.append(start)
    assert sorted(starts) == list(range(0, dataset.num_train_windows * 10, 10))
    assert max(starts) + 10 <= split
    eval_ids = torch.cat([ids for ids, _ in dataset.eval_batches(4)])
    assert len(eval_ids) == (286 - split) // 10
    for k, row in enumerate(eval_ids.numpy()):
        assert np.array_equal(row, reference[split + 10 * k : split + 10 * k + 10])


def test_text_order_is_deterministic_reshuffled_per_epoch_and_seeded(tmp_path):
    path = _write(tmp_path / "a.txt", b"abcdefghij" * 40)
    make = lambda seed: data.byte_text_dataset(path, seq_len=4, seed=seed, eval_fraction=0.1)  # noqa: E731
    a, b = make(0), make(0)
    n = a.num_train_windows
    b.train_batch(5, 8)  # history does not matter
    assert torch.equal(a.train_batch(3, 8)[0], b.train_batch(3, 8)[0])
    assert torch.equal(a.train_batch(3, 8, rows=range(4, 8))[0], a.train_batch(3, 8)[0][4:])
    assert not torch.equal(a.train_batch(0, n)[0], make(1).train_batch(0, n)[0])
    epoch0 = [tuple(r) for r in a.train_batch(0, n)[0].tolist()]
    epoch1 = [tuple(r) for r in a.train_batch(1, n)[0].tolist()]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


def test_bits_per_character_counts_decoded_characters(tmp_path):
    text = "na\u00efve \u20ac \U0001f600 ok"
    dataset = data.byte_text_dataset(_write(tmp_path / "a.txt", text.encode() * 20), seq_len=8, eval_fraction=0.5)
    input_ids, labels = dataset.train_batch(0, 4)
    for row, label_row in zip(input_ids, labels):
        expected = len(data.ByteTokenizer().decode(row[1:].tolist()).replace("\ufffd", ""))
        lead_bytes = sum(1 for i in row[1:].tolist() if i >= 2 and not 0x80 <= i - 2 < 0xC0)
        assert dataset.count_characters(label_row[None]) == lead_bytes
        assert lead_bytes >= expected  # a character cut at the window's end still counts once
    whole = torch.tensor([data.BYTE_EOS_ID] + data.ByteTokenizer().encode(text))[None]
    assert dataset.count_characters(whole) == len(text)


def test_byte_tokenizer_round_trip():
    tokenizer = data.ByteTokenizer()
    text = "Grüße, мир! \U0001f600"
    ids = tokenizer.encode(text)
    assert min(ids) >= data.BYTE_OFFSET and max(ids) < data.BYTE_VOCAB_SIZE
    assert tokenizer.decode(ids + [data.BYTE_EOS_ID]) == text
    # Bytes that are not UTF-8 reach Python (argv, file names) as lone surrogates: they map to themselves.
    raw = b"a\xff\xfeb".decode("utf-8", errors="surrogateescape")
    assert tokenizer.encode(raw) == [byte + data.BYTE_OFFSET for byte in b"a\xff\xfeb"]


def test_streaming_reads_a_window_of_a_large_file_without_loading_it(tmp_path):
    path = tmp_path / "big.txt"
    size = 3 * 2**30  # sparse on disk: 3 GiB that take no space
    marker = b"the end of a long corpus"
    with open(path, "wb") as handle:
        handle.truncate(size)
        handle.seek(size - len(marker))
        handle.write(marker)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    source = data.ByteSource([path])
    window = source.read(size - len(marker), len(marker) + 1)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert bytes(int(i) - data.BYTE_OFFSET for i in window[:-1]) == marker and window[-1] == data.BYTE_EOS_ID
    assert after - before < 200 * 1024  # KiB: far below the 3 GiB file


def test_bad_text_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.byte_text_dataset(tmp_path / "missing.txt", 8)
    with pytest.raises(ValueError, match="empty"):
        data.byte_text_dataset(_write(tmp_path / "empty.txt", b""), 8)
    binary = _write(tmp_path / "latin1.txt", "caf\u00e9".encode("latin-1") * 100)
    with pytest.raises(ValueError, match="not UTF-8"):
        data.byte_text_dataset(binary, 8)
    assert data.byte_text_dataset(binary, 8, allow_binary=True).vocab_size == data.BYTE_VOCAB_SIZE
    with pytest.raises(ValueError, match="too few"):
        data.byte_text_dataset(_write(tmp_path / "short.txt", b"tiny"), 8)


def test_directories_are_walked_sorted_skipping_hidden_empty_and_binary_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    _write(tmp_path / "sub" / "b.txt", b"bbb")
    _write(tmp_path / "a.txt", b"aaa")
    _write(tmp_path / ".git" / "c.txt", b"ccc")
    _write(tmp_path / "empty.txt", b"")
    _write(tmp_path / "blob.bin", b"\xff\xfe\x00")
    with pytest.warns(UserWarning, match="skipping"):
        files = data.collect_text_files(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a.txt", "sub/b.txt"]
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="no non-empty text files"):
        data.collect_text_files(empty_dir)


def test_linked_folders_are_walked_once_and_many_files_keep_few_maps_open(tmp_path, monkeypatch):
    real = tmp_path / "corpus" / "real"
    real.mkdir(parents=True)
    for i in range(12):
        _write(real / f"{i:02d}.txt", f"file {i}\n".encode())
    (tmp_path / "corpus" / "linked").symlink_to(real, target_is_directory=True)
    (real / "loop").symlink_to(tmp_path / "corpus", target_is_directory=True)
    (tmp_path / "corpus" / "0_alias").symlink_to(real, target_is_directory=True)  # sorts before "real"
    outside = tmp_path / "outside"
    outside.mkdir()
    _write(outside / "far.txt", b"far away\n")
    (tmp_path / "corpus" / "zz_outside").symlink_to(outside, target_is_directory=True)
    files = data.collect_text_files(tmp_path / "corpus")
    # Links into the tree are skipped (its folders are walked by their own paths, whatever the links'
    # names), a link to a folder outside is followed, and the loop ends.
    assert files == sorted(real / f"{i:02d}.txt" for i in range(12)) + [tmp_path / "corpus" / "zz_outside" / "far.txt"]
    files = files[:12]
    monkeypatch.setattr(data.ByteSource, "MAX_OPEN_MAPS", 3)
    source = data.ByteSource(files)
    stream = source.read(0, len(source))
    expected = []
    for path in files:
        expected += [b + data.BYTE_OFFSET for b in path.read_bytes()] + [data.BYTE_EOS_ID]
    assert stream.tolist() == expected and len(source._maps) == 3
    assert source.read(0, 5).tolist() == expected[:5]


# ------------------------------------------------------------------------------------------------- BPE


CORPUS = "The quick brown fox jumps over the lazy dog. Über naïve café, 東京 \U0001f600.\n" * 60


def test_bpe_round_trip_characters_and_token_cache(tmp_path):
    pytest.importorskip("tokenizers")
    corpus = _write(tmp_path / "corpus.txt", CORPUS.encode())
    tokenizer_path = bpe.train_bpe_tokenizer(corpus, 300, tmp_path / "tok" / "tokenizer.json")
    tokenizer = bpe.BPETokenizer(tokenizer_path)
    assert tokenizer.vocab_size <= 300
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    sample = "naïve brown 東京 dogs \U0001f600 ok"
    ids = tokenizer.encode(sample)
    assert tokenizer.decode(ids) == sample
    assert len(ids) < len(sample.encode())  # merges were learned
    assert int(tokenizer.characters_per_token()[ids].sum()) == len(sample)

    dataset = bpe.bpe_text_dataset(corpus, tokenizer_path, seq_len=16, cache_dir=tmp_path / "cache")
    expected = np.array(tokenizer.encode(CORPUS) + [tokenizer.eos_token_id])
    stream = dataset.source.read(0, len(dataset.source))
    assert np.array_equal(stream, expected)
    token_file = next((tmp_path / "cache").glob("tokens-*"))
    mtime = token_file.stat().st_mtime_ns
    bpe.bpe_text_dataset(corpus, tokenizer_path, seq_len=16, cache_dir=tmp_path / "cache")
    assert token_file.stat().st_mtime_ns == mtime and len(list((tmp_path / "cache").iterdir())) == 1


def test_bpe_encodes_special_token_text_as_text_and_adds_no_special_tokens(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    corpus = _write(tmp_path / "corpus.txt", CORPUS.encode())
    tokenizer_path = bpe.train_bpe_tokenizer(corpus, 300, tmp_path / "tokenizer.json")
    tagged = "use <s>old</s> and <pad> tags"
    tokenizer = bpe.BPETokenizer(tokenizer_path)
    ids = tokenizer.encode(tagged)
    assert tokenizer.decode(ids) == tagged and not {0, 1, 2} & set(ids)
    # The same file with a RoBERTa-style post-processor, which would wrap every encoded text in <s> ... </s>.
    wrapping = tokenizers.Tokenizer.from_file(str(tokenizer_path))
    wrapping.post_processor = tokenizers.processors.RobertaProcessing(("</s>", 2), ("<s>", 1))
    wrapping.save(str(tmp_path / "wrapping.json"))
    assert wrapping.encode("the fox").ids[0] == 1
    assert bpe.BPETokenizer(tmp_path / "wrapping.json").encode("the fox") == tokenizer.encode("the fox")
    stream = bpe.bpe_text_dataset(corpus, tmp_path / "wrapping.json", 16, tmp_path / "cache").source
    tokens = stream.read(0, len(stream))
    assert (tokens == 2).sum() == 1 and tokens[-1] == 2 and not (tokens == 1).any()  # one EOS, after the file


def test_text_without_line_breaks_is_read_in_bounded_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(bpe, "_READ_BLOCK", 64)
    text = "".join(f"word{i} " for i in range(400))  # no newline anywhere
    blocks = list(bpe._text_blocks(_write(tmp_path / "one-line.txt", text.encode())))
    assert "".join(blocks) == text and len(blocks) > 10
    assert max(map(len, blocks)) <= 128
    assert all(block.startswith(" ") for block in blocks[1:])  # cut before a space: words stay whole
    unbroken = "x" * 1000
    assert "".join(bpe._text_blocks(_write(tmp_path / "unbroken.txt", unbroken.encode()))) == unbroken


def test_bpe_runs_record_the_corpus_size_and_small_corpora_warn_about_the_vocabulary(tmp_path):
    pytest.importorskip("tokenizers")
    corpus = _write(tmp_path / "corpus.txt", CORPUS.encode())
    with pytest.warns(UserWarning, match="the corpus supports only"):
        tokenizer_path = bpe.train_bpe_tokenizer(corpus, 5000, tmp_path / "tokenizer.json")
    dataset = bpe.bpe_text_dataset(corpus, tokenizer_path, 16, tmp_path / "cache")
    assert dataset.describe()["tokens"] == len(dataset.source)
    with open(corpus, "a") as handle:
        handle.write("more text\n")
    grown = bpe.bpe_text_dataset(corpus, tokenizer_path, 16, tmp_path / "cache")
    assert grown.describe()["tokens"] > dataset.describe()["tokens"]
    assert len(list((tmp_path / "cache").glob("tokens-*"))) == 2
    bpe.prune_token_cache(grown)
    assert list((tmp_path / "cache").glob("tokens-*")) == [grown.source.path]


def test_bpe_names_still_import_from_data():
    assert data.BPETokenizer is bpe.BPETokenizer and data.train_bpe_tokenizer is bpe.train_bpe_tokenizer
    with pytest.raises(AttributeError):
        data.no_such_name


def test_bpe_bad_inputs(tmp_path):
    pytest.importorskip("tokenizers")
    with pytest.raises(ValueError, match="vocab-size"):
        bpe.train_bpe_tokenizer(_write(tmp_path / "a.txt", b"abc"), 10, tmp_path / "t.json")
    with pytest.raises(FileNotFoundError):
        bpe.BPETokenizer(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="not a tokenizers JSON"):
        bpe.BPETokenizer(_write(tmp_path / "bad.json", b"{}"))
    with pytest.raises(ValueError, match="not UTF-8"):
        bpe.train_bpe_tokenizer(_write(tmp_path / "b.txt", b"\xff\xfe" * 10), 300, tmp_path / "t.json")


def _foreign_bpe(tmp_path, special_tokens: list[str], name: str) -> Path:
    """A byte-level BPE trained by the tokenizers library directly, with other special tokens than ours."""
    tokenizers = pytest.importorskip("tokenizers")
    corpus = _write(tmp_path / "corpus.txt", CORPUS.encode())
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    tokenizer.train([str(corpus)], tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=special_tokens, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer.save(str(tmp_path / name))
    return tmp_path / name


def test_bpe_files_with_other_special_tokens_work(tmp_path):
    gpt2_style = bpe.BPETokenizer(_foreign_bpe(tmp_path, ["<|endoftext|>"], "gpt2.json"))
    assert gpt2_style.eos_token_id == 0 and gpt2_style.pad_token_id == 0 and gpt2_style.bos_token_id is None
    bert_style = bpe.BPETokenizer(_foreign_bpe(tmp_path, ["[UNK]", "[PAD]", "[CLS]", "[SEP]"], "bert.json"))
    assert (bert_style.pad_token_id, bert_style.bos_token_id, bert_style.eos_token_id) == (1, 2, 3)
    sample = "the lazy café [SEP] fox"
    ids = bert_style.encode(sample)
    assert bert_style.decode(ids) == sample and 3 not in ids  # special-token text stays text
    counts = bert_style.characters_per_token()
    assert counts[[0, 1, 2, 3]].tolist() == [0, 0, 0, 0] and int(counts[ids].sum()) == len(sample)
    stream = bpe.bpe_text_dataset(tmp_path / "corpus.txt", tmp_path / "bert.json", 16, tmp_path / "cache").source
    tokens = stream.read(0, len(stream))
    assert (tokens == 3).sum() == 1 and tokens[-1] == 3  # the file's own end-of-text token ends the file
    with pytest.raises(ValueError, match=r"no end-of-text token .* its special tokens are \['\[UNK\]'\]"):
        bpe.BPETokenizer(_foreign_bpe(tmp_path, ["[UNK]"], "no-eos.json"))
