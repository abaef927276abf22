"""Token shards: prepare() output decodes back to the input, batches are reproducible from the
generator state, evaluation windows tile the split, bad inputs fail by name. Budget: a few seconds."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from polymodal.data import TokenShards, prepare, split_for_encoding
from polymodal.tokenizers import Tokenizer, train_bpe_tokenizer

TEXT_A = "".join(f"Line {i}: the quick brown fox — naïve café 🦊 jumps.\n  indented {i % 7}\n\n" for i in range(300))
TEXT_B = "".join(f"Second file, verse {i}; to be or not to be.\n" for i in range(200))
VAL = "A held-out line: the fox rests.\n" * 20


@pytest.fixture
def corpus(tmp_path):
    a, b, v = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "val.txt"
    a.write_text(TEXT_A)
    b.write_text(TEXT_B)
    v.write_text(VAL)
    return a, b, v


def _decode_bin(folder, name):
    tok = Tokenizer.load(folder)
    return tok, TokenShards(folder / name)


def test_prepare_char_with_val_file(corpus, tmp_path):
    a, b, v = corpus
    out = tmp_path / "out"
    meta = prepare([str(a), str(b)], str(out), tokenizer="char", val=str(v))
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk["dtype"] == "uint16" and on_disk["tokenizer"] == "char"
    assert on_disk["sources"] == [str(a), str(b)] and meta["n_train"] == on_disk["n_train"]
    tok, train = _decode_bin(out, "train.bin")
    assert len(train) == meta["n_train"] == len(TEXT_A) + len(TEXT_B)  # one id per character
    assert tok.vocab_size == meta["vocab_size"] == len(set(TEXT_A + TEXT_B + VAL)) + 1
    assert tok.decode(np.asarray(train.data)) == TEXT_A + TEXT_B
    assert tok.decode(np.asarray(TokenShards(out / "val.bin").data)) == VAL
    assert (out / "train.bin").stat().st_size == 2 * meta["n_train"]


def test_prepare_bpe_split_fraction(corpus, tmp_path):
    a, b, _ = corpus
    out = tmp_path / "bpe"
    meta = prepare([str(a), str(b)], str(out), tokenizer="bpe", vocab_size=400, val_fraction=0.25)
    tok, train = _decode_bin(out, "train.bin")
    val = TokenShards(out / "val.bin")
    assert meta["vocab_size"] == 400 and meta["tokenizer"] == "bpe"
    n = meta["n_train"] + meta["n_val"]
    assert meta["n_val"] == round(0.25 * n) and len(val) == meta["n_val"] and len(train) == meta["n_train"]
    ids = np.concatenate([train.data, val.data])
    # Files are separated by EOS (<|endoftext|>), which decode skips.
    assert int((ids == tok.eos_id).sum()) == 1
    assert tok.decode(ids) == TEXT_A + TEXT_B
    assert tok.decode(ids, skip_special_tokens=False) == TEXT_A + "<|endoftext|>" + TEXT_B
    # Chunked parallel encoding gives exactly the ids of encoding each file whole.
    assert ids.tolist() == tok.encode(TEXT_A) + [tok.eos_id] + tok.encode(TEXT_B)


def test_split_for_encoding_is_lossless_and_cuts_safely():
    text = (TEXT_B + TEXT_A) * 3
    pieces = split_for_encoding(text, chunk_chars=500)
    assert len(pieces) > 10 and "".join(pieces) == text
    for p in pieces[:-1]:  # each cut is a newline between two non-space characters
        assert p.endswith("\n") and not p[-2].isspace()
    # No newline between two non-space characters: cutting anywhere could change BPE pre-tokens.
    assert split_for_encoding(TEXT_A, chunk_chars=100) == [TEXT_A]
    tok = train_bpe_tokenizer([text], 350)
    assert sum((tok.encode(p) for p in pieces), []) == tok.encode(text)


def test_prepare_tokenizer_from(corpus, tmp_path):
    a, _, v = corpus
    src = train_bpe_tokenizer([TEXT_B], 300)
    src.save(tmp_path / "tok")
    meta = prepare([str(a)], str(tmp_path / "o"), tokenizer_from=str(tmp_path / "tok"), val=str(v))
    assert meta["vocab_size"] == src.vocab_size and meta["tokenizer_from"] == str(tmp_path / "tok")
    tok, train = _decode_bin(tmp_path / "o", "train.bin")
    assert np.asarray(train.data).tolist() == Tokenizer.load(tmp_path / "tok").encode(TEXT_A)
    assert tok.decode(np.asarray(train.data)) == TEXT_A


def test_prepare_sentencepiece_style_tokenizer_is_not_chunked(tmp_path):
    # A Metaspace pre-tokenizer prepends "▁" to every piece it sees, so encoding 64K-character pieces
    # separately would change ids at each cut; prepare must detect that and encode whole.
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    raw = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    raw.decoder = decoders.Metaspace(prepend_scheme="always")
    raw.train_from_iterator([TEXT_B], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"], show_progress=False))
    Tokenizer.from_tokenizers(raw, unk="<unk>").save(tmp_path / "sp")
    text = TEXT_B * 8  # > 64K characters: more than one encoding piece
    assert len(split_for_encoding(text)) > 1
    (tmp_path / "sp.txt").write_text(text)
    prepare([str(tmp_path / "sp.txt")], str(tmp_path / "o"), tokenizer_from=str(tmp_path / "sp"), val_fraction=0.1)
    tok, train = _decode_bin(tmp_path / "o", "train.bin")
    ids = np.concatenate([train.data, TokenShards(tmp_path / "o" / "val.bin").data]).tolist()
    assert ids == tok.encode(text)


def test_prepare_uint32_for_large_vocab(tmp_path):
    # 66,000 distinct characters (CJK extension planes) -> a char vocabulary past 65,535 ids.
    text = "".join(chr(0x20000 + i) for i in range(66_000)) + "\n" + TEXT_B
    (tmp_path / "big.txt").write_text(text)
    meta = prepare([str(tmp_path / "big.txt")], str(tmp_path / "o32"), val_fraction=0.1)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 66_000 + len(set(TEXT_B + "\n")) + 1
    tok, train = _decode_bin(tmp_path / "o32", "train.bin")
    val = TokenShards(tmp_path / "o32" / "val.bin")
    assert train.dtype == np.uint32 and (tmp_path / "o32" / "train.bin").stat().st_size == 4 * len(train)
    assert int(train.data.max()) >= 65536
    assert tok.decode(np.concatenate([train.data, val.data])) == text


def test_prepare_errors(corpus, tmp_path):
    a, _, v = corpus
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        prepare([str(tmp_path / "nope.txt")], str(tmp_path / "o"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt: file is empty"):
        prepare([str(empty)], str(tmp_path / "o"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\nline two \xff\xfe\n")
    with pytest.raises(ValueError, match=r"bad.txt: not valid UTF-8 \(byte 12, line 2\)"):
        prepare([str(bad)], str(tmp_path / "o"))
    with pytest.raises(ValueError, match="val_fraction"):
        prepare([str(a)], str(tmp_path / "o"), val_fraction=1.5)
    with pytest.raises(ValueError, match="also a training input"):
        prepare([str(a)], str(tmp_path / "o"), val=str(a))
    with pytest.raises(ValueError, match="too small"):
        prepare([str(a)], str(tmp_path / "o"), tokenizer="bpe", vocab_size=10)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to replace"):
        prepare([str(a)], str(precious), val=str(v))
    assert (precious / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "o").exists()  # nothing half-written by the failures above


def test_prepare_cli(corpus, tmp_path):
    from polymodal.cli import main
    a, b, v = corpus
    rc = main(["prepare", "--inputs", str(a), str(b), "--out", str(tmp_path / "cli"), "--val", str(v)])
    assert rc == 0 and json.loads((tmp_path / "cli" / "meta.json").read_text())["n_val"] == len(VAL)
    assert main(["prepare", "--inputs", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")]) == 2


@pytest.fixture
def shard(tmp_path):
    data = (np.arange(1000) * 7 % 251).astype(np.uint16)  # distinct enough to identify windows
    path = tmp_path / "train.bin"
    data.tofile(path)
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 251}))
    return path, data


def test_get_batch_shapes_and_shift(shard):
    path, data = shard
    ds = TokenShards(path)
    assert len(ds) == 1000 and ds.dtype == np.uint16 and ds.vocab_size == 251
    x, y = ds.get_batch(8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):  # every row is a real window of the file, y shifted by one
        starts = [s for s in range(len(data) - 16) if np.array_equal(data[s:s + 16], row_x.numpy())]
        assert starts and np.array_equal(data[starts[0] + 1:starts[0] + 17], row_y.numpy())


def test_get_batch_reproducible_from_generator_state(shard):
    path, _ = shard
    ds = TokenShards(path)
    g = torch.Generator().manual_seed(123)
    ds.get_batch(4, 32, g)
    state = g.get_state()  # e.g. saved in a checkpoint mid-training
    after = [ds.get_batch(4, 32, g) for _ in range(3)]
    g2 = torch.Generator()
    g2.set_state(state)
    replay = [ds.get_batch(4, 32, g2) for _ in range(3)]
    for (x1, y1), (x2, y2) in zip(after, replay):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    again = [ds.get_batch(4, 32, torch.Generator().manual_seed(123)) for _ in range(2)]
    assert torch.equal(again[0][0], again[1][0])  # same seed, same first batch
    assert not torch.equal(after[0][0], after[1][0])  # consecutive batches differ


def test_iter_eval_batches_tiles_the_split(shard):
    path, data = shard
    ds = TokenShards(path)
    batches = list(ds.iter_eval_batches(batch_size=5, block_size=64))
    n_windows = (len(data) - 1) // 64
    assert sum(len(x) for x, _ in batches) == n_windows == ds.num_eval_windows(64)
    assert [len(x) for x, _ in batches] == [5, 5, 5]  # 15 windows of 64 in 999 targets
    y_all = torch.cat([y for _, y in batches]).flatten()
    x_all = torch.cat([x for x, _ in batches]).flatten()
    assert torch.equal(x_all, torch.from_numpy(data[:n_windows * 64].astype(np.int64)))  # no overlap, no gap
    assert torch.equal(y_all, torch.from_numpy(data[1:n_windows * 64 + 1].astype(np.int64)))
    assert len(list(ds.iter_eval_batches(5, 64, max_batches=2))) == 2
    assert [torch.equal(a[0], b[0]) for a, b in zip(batches, ds.iter_eval_batches(5, 64))] == [True] * 3


def test_shard_errors(shard, tmp_path):
    path, _ = shard
    ds = TokenShards(path)
    with pytest.raises(ValueError, match="block_size \\+ 1 = 1001"):
        ds.get_batch(2, 1000, torch.Generator())
    with pytest.raises(ValueError, match="block_size \\+ 1"):
        next(ds.iter_eval_batches(2, 1000))
    with pytest.raises(TypeError, match="torch.Generator"):
        ds.get_batch(2, 8, 0)
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        TokenShards(tmp_path / "nothing.bin")
    odd = tmp_path / "sub" / "odd.bin"
    odd.parent.mkdir()
    odd.write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="no meta.json"):
        TokenShards(odd)
    with pytest.raises(ValueError, match="not a multiple"):
        TokenShards(odd, dtype="uint16")
