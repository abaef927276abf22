"""``polymodal prepare``: text files -> tokenizer + ``train.bin``/``val.bin`` token shards.

The corpus is tokenised once, ahead of training, into flat arrays of ids (the nanoGPT
``prepare.py`` recipe), so the training loop only slices windows out of a memory map
(see :mod:`polymodal.data.shards` for the next-token objective they feed).

Layout of ``out/``::

    train.bin, val.bin        raw ids, uint16 when vocab_size < 65536 else uint32
    meta.json                 {"dtype", "vocab_size", "n_train", "n_val", "tokenizer", "sources", ...}
    tokenizer.json, tokenizer_config.json

The folder is written into a temporary sibling and renamed into place, so an interrupted
run never leaves half-written shards behind.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np

from ..io import atomic_dir
from ..tokenizers import Tokenizer, read_text_file, train_bpe_tokenizer, train_char_tokenizer

# Cut points for parallel encoding: a newline between two non-space characters. Byte-level
# BPE pre-tokenisation (GPT-2's regex) splits there anyway, so encoding the pieces separately
# gives the same ids as encoding the whole text; cutting inside a whitespace run would not.
_CUT = re.compile(r"(?<=\S)\n(?=\S)")
_CHUNK_CHARS = 1 << 16


def split_for_encoding(text: str, chunk_chars: int = _CHUNK_CHARS) -> list[str]:
    """Splits ``text`` into pieces of about ``chunk_chars`` characters at safe cut points
    (``"".join(pieces) == text``); a text with no safe cut point stays whole."""
    pieces, start = [], 0
    while start < len(text):
        m = _CUT.search(text, start + chunk_chars) if start + chunk_chars < len(text) else None
        end = m.end() if m else len(text)
        pieces.append(text[start:end])
        start = end
    return pieces


def _cuts_are_safe(tok: Tokenizer, text: str) -> bool:
    """Checks on a sample that piecewise encoding reproduces whole-text encoding. It does for
    GPT-2/Llama-3 style regex pre-tokenisers and char level, but not e.g. for SentencePiece-style
    tokenizers that prepend a space to every piece."""
    sample = text[:100_000]
    pieces = split_for_encoding(sample, 2_000)
    return len(pieces) < 2 or sum(tok.encode_batch(pieces), []) == tok.encode(sample)


def _encode_text(tok: Tokenizer, text: str, dtype, bar, safe: bool = True) -> np.ndarray:
    pieces = split_for_encoding(text) if safe else [text]
    out = []
    group = 32  # pieces per encode_batch call: enough to keep every core busy
    for i in range(0, len(pieces), group):
        batch = pieces[i:i + group]
        out.extend(np.asarray(ids, dtype=dtype) for ids in tok.encode_batch(batch))
        if bar is not None:
            bar.update(sum(len(p) for p in batch))
    return np.concatenate(out) if out else np.zeros(0, dtype)


def _expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; a folder stands for the ``*.txt`` files inside it (sorted)."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise ValueError("prepare: no input files given")
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("*.txt"))
            if not found:
                raise ValueError(f"{p}: folder contains no .txt files")
            files.extend(found)
        elif not p.exists():
            raise FileNotFoundError(f"{p}: input file not found")
        else:
            files.append(p)
    return files


def prepare(inputs: list[str], out: str, tokenizer: Literal["char", "bpe"] = "char", vocab_size: int = 8192,
            val_fraction: float = 0.1, val: str | None = None, tokenizer_from: str | None = None) -> dict:
    """Tokenises text files into ``train.bin``/``val.bin`` shards plus the tokenizer and
    ``meta.json`` (the arguments are ``polymodal prepare``'s flags: ``polymodal/commands/prepare.py``)."""
    t0 = time.perf_counter()
    files = _expand_inputs(inputs)
    val_path = Path(val) if val is not None else None
    if val_path is not None:
        if val_path.resolve() in {f.resolve() for f in files}:
            raise ValueError(f"{val_path}: the validation file is also a training input")
    elif not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1) when no --val file is given, got {val_fraction}")
    if tokenizer not in ("char", "bpe"):
        raise ValueError(f"tokenizer must be 'char' or 'bpe', got {tokenizer!r}")
    out_path = Path(out)
    # The output folder is replaced wholesale, so never take over a folder we did not write.
    reusable = out_path.is_dir() and (not any(out_path.iterdir()) or (out_path / "meta.json").is_file())
    if out_path.exists() and not reusable:
        raise ValueError(f"{out_path}: exists and is not a previous 'prepare' output folder; refusing to replace it")

    texts = [read_text_file(f) for f in files]  # errors name the missing / empty / non-UTF-8 file
    val_text = read_text_file(val_path) if val_path is not None else None

    if tokenizer_from is not None:
        tok = Tokenizer.load(tokenizer_from)
        kind = tok.kind
    elif tokenizer == "char":
        # The character set of the validation text is included (as nanoGPT does over the whole
        # file): otherwise any character only seen in val would be scored as <unk>.
        tok = train_char_tokenizer("".join(texts) + (val_text or ""))
        kind = "char"
    else:
        tok = train_bpe_tokenizer(texts, vocab_size)
        kind = "bpe"

    dtype = np.uint16 if tok.vocab_size < 65536 else np.uint32
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(map(len, texts)) + len(val_text or ""), unit="char", unit_scale=True,
                   desc="encode", disable=None)  # disable=None: silent when stderr is not a terminal
    except ImportError:  # progress is optional
        bar = None
    safe = kind in ("char", "bpe") or _cuts_are_safe(tok, texts[0])
    sep = tok.eos_id if (tok.eos_id is not None and kind != "char") else None
    parts = []
    for i, text in enumerate(texts):
        if i and sep is not None:
            parts.append(np.array([sep], dtype))
        parts.append(_encode_text(tok, text, dtype, bar, safe))
    stream = np.concatenate(parts)
    if val_text is not None:
        train_ids, val_ids = stream, _encode_text(tok, val_text, dtype, bar, safe)
    else:
        n_val = int(round(len(stream) * val_fraction))
        if n_val < 1 or n_val >= len(stream):
            raise ValueError(f"val_fraction={val_fraction} of {len(stream)} tokens leaves an empty split; "
                             "add data, change --val-fraction or give --val")
        train_ids, val_ids = stream[:-n_val], stream[-n_val:]
    if bar is not None:
        bar.close()

    meta = {
        "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size,
        "n_train": int(len(train_ids)),
        "n_val": int(len(val_ids)),
        "tokenizer": kind,
        "sources": [str(f) for f in files],
        "val": str(val_path) if val_path is not None else f"last {val_fraction} of the token stream",
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
    }
    if tokenizer_from is not None:
        meta["tokenizer_from"] = str(tokenizer_from)
    with atomic_dir(out_path) as tmp:
        train_ids.tofile(tmp / "train.bin")
        val_ids.tofile(tmp / "val.bin")
        tok.save(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    seconds = time.perf_counter() - t0
    print(f"prepare: {meta['n_train']:,} train + {meta['n_val']:,} val tokens, vocab {meta['vocab_size']} "
          f"({kind}, {meta['dtype']}) -> {out_path} in {seconds:.1f}s", file=sys.stderr)
    return {**meta, "out": str(out_path)}
