"""Training tokenizers: character-level and byte-level BPE.

* Character level (Karpathy's char-rnn / nanoGPT ``shakespeare_char``): one id per
  Unicode code point seen in the training text, ids in sorted character order.
* Byte-level BPE (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with
  Subword Units", Algorithm 1: repeatedly merge the most frequent adjacent pair; on
  bytes as in GPT-2, Radford et al. 2019, sec. 2.2): the 256 byte symbols are always in
  the initial alphabet, so any string encodes without an unknown token.

Both are built from the Hugging Face ``tokenizers`` library, so the result saves as a
single ``tokenizer.json`` that ``transformers`` can also read.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from .base import Tokenizer

UNK = "<unk>"
_TEXT_SUFFIXES = (".txt", ".text", ".md", ".json", ".jsonl", ".csv", ".tsv")


def train_char_tokenizer(text: str, special_tokens: Iterable[str] = ()) -> Tokenizer:
    """A character-level tokenizer over the characters of ``text``.

    Ids ``0..n-1`` are the distinct characters of ``text`` in sorted order (so they match
    nanoGPT's ``stoi`` for the same text), then ``special_tokens`` in order, then ``<unk>``
    (the id any character absent from ``text`` encodes to; it decodes to the string ``"<unk>"``).
    Decoding concatenates the characters, so ``decode(encode(s)) == s`` for every ``s`` made of known characters,
    newlines and spaces included.
    """
    if not isinstance(text, str):
        raise TypeError(f"train_char_tokenizer expects a str, got {type(text).__name__}")
    if not text:
        raise ValueError("train_char_tokenizer: the text is empty")
    special_tokens = [s for s in special_tokens if s != UNK]
    chars = sorted(set(text))
    vocab = {c: i for i, c in enumerate(chars)}
    for s in special_tokens + [UNK]:
        if s in vocab:  # a special token that is itself a single character would shadow it
            raise ValueError(f"special token {s!r} is also a character of the text")
        vocab[s] = len(vocab)
    # A BPE model with an empty merge list maps each character of a word to its own id, and with no
    # pre-tokenizer the whole text is one "word": this is ~2x faster than WordLevel over a
    # per-character Split pre-tokenizer, and gives the same ids.
    tok = tokenizers.Tokenizer(models.BPE(vocab, [], unk_token=UNK))
    tok.decoder = decoders.Fuse()  # without a decoder, tokens would be joined with spaces
    # <unk> stays an ordinary vocabulary entry (not an added special token): a literal "<unk>" in the
    # text still encodes character by character, and an unknown character decodes visibly as "<unk>".
    if special_tokens:
        tok.add_special_tokens(list(special_tokens))
    return Tokenizer(tok, unk=UNK, kind="char")


def _resolve_source(item: str | os.PathLike) -> tuple[str, Path | None]:
    """Classifies one item of ``files_or_texts`` as a file path or a literal text."""
    if isinstance(item, os.PathLike):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file not found")
        return "file", path
    if not isinstance(item, str):
        raise TypeError(f"expected a file path or a text, got {type(item).__name__}")
    if "\n" not in item and len(item) < 4096:
        if os.path.isfile(item):
            return "file", Path(item)
        if item.lower().endswith(_TEXT_SUFFIXES):  # looks like a path: a typo must not be trained on as text
            raise FileNotFoundError(f"{item}: file not found")
    return "text", None


def read_text_file(path: str | Path) -> str:
    """Reads a UTF-8 text file; missing, empty or non-UTF-8 files raise errors naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    data = path.read_bytes()
    if not data:
        raise ValueError(f"{path}: file is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: not valid UTF-8 (byte {e.start}, line {line}): {e.reason}") from None


def _iter_training_texts(files_or_texts, chunk_chars: int = 1 << 16) -> Iterator[str]:
    """Validates all sources, then returns an iterator over ~64K-character pieces."""
    if isinstance(files_or_texts, (str, os.PathLike)):
        files_or_texts = [files_or_texts]
    # Resolve and read every source before training starts, so a bad file fails fast and by name.
    texts = []
    for item in files_or_texts:
        kind, path = _resolve_source(item)
        texts.append(read_text_file(path) if kind == "file" else item)
    if not any(texts):
        raise ValueError("no training text: every source is empty")
    return _chunks(texts, chunk_chars)


def _chunks(texts: list[str], chunk_chars: int) -> Iterator[str]:
    for text in texts:
        # Pieces of ~64K characters cut after a newline: the trainer counts words per piece,
        # and BPE never merges across the whitespace split anyway.
        start = 0
        while start < len(text):
            end = text.find("\n", start + chunk_chars)
            end = len(text) if end < 0 else end + 1
            yield text[start:end]
            start = end


def train_bpe_tokenizer(files_or_texts, vocab_size: int, special_tokens: Iterable[str] = ("<|endoftext|>",),
                        min_frequency: int = 2, show_progress: bool = False) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) trained on files or texts.

    Args:
        files_or_texts: a path/str or a list of them; a ``Path`` or a single-line ``str`` naming an
            existing file is read as UTF-8, any other ``str`` is training text.
        vocab_size: final vocabulary size, the 256 byte symbols and the special tokens included.
        special_tokens: added first (ids 0, 1, ...); the first one is used as BOS and EOS,
            like GPT-2's ``<|endoftext|>`` (documents are separated by it).
        min_frequency: a pair must occur this often to be merged.
    """
    special_tokens = list(special_tokens)
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small for byte-level BPE: need at least {minimum} "
                         f"(256 bytes + {len(special_tokens)} special tokens)")
    tok = tokenizers.Tokenizer(models.BPE())
    # add_prefix_space=False: GPT-2 does not prepend a space, so decode(encode(s)) == s exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(_iter_training_texts(files_or_texts), trainer=trainer)
    first = special_tokens[0] if special_tokens else None
    return Tokenizer(tok, bos=first, eos=first, kind="bpe")
