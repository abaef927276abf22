"""Training tokenizers: character-level, byte-level BPE and WordPiece.

* Character level (Karpathy's char-rnn / nanoGPT ``shakespeare_char``): one id per
  Unicode code point seen in the training text, ids in sorted character order.
* Byte-level BPE (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with
  Subword Units", Algorithm 1: repeatedly merge the most frequent adjacent pair; on
  bytes as in GPT-2, Radford et al. 2019, sec. 2.2): the 256 byte symbols are always in
  the initial alphabet, so any string encodes without an unknown token.
* WordPiece (Wu et al. 2016, "Google's Neural Machine Translation System", sec. 4.1; BERT,
  Devlin et al. 2019, sec. 3): pieces continuing a word carry a ``##`` prefix, with BERT's
  normaliser and punctuation-splitting pre-tokeniser, for the encoders' masked-LM pretraining;
  RoBERTa's byte-level BPE (Liu et al. 2019, sec. 4.4) is the BPE above with its special tokens.

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


# Special tokens of the encoder tokenizers, in id order. Both orders give the ids the encoder presets
# expect: [PAD]=0 (BERT/ALBERT pad_token_id), [CLS]=2 / [SEP]=3 (ALBERT bos/eos); <s>=0, <pad>=1,
# </s>=2 (RoBERTa bos/pad/eos).
WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int, lowercase: bool = True,
                              min_frequency: int = 2) -> Tokenizer:
    """A BERT WordPiece tokenizer trained on ``texts``: BERT's normaliser (optionally
    lower-casing) and pre-tokeniser (white space and punctuation), ``##`` continuation pieces,
    and the post-processor [CLS] A [SEP] (B [SEP]) with token types 0 / 1.

    The same texts give the same vocabulary and ids in every process (two ranks, a run and its
    resume). The library's trainer alone does not: it numbers the ``##x`` continuation characters
    in hash-map order, and merges of equal count are ranked by those ids (huggingface/tokenizers
    issue 1794). Declaring every ``##x`` up front, as trainer special tokens in sorted order, fixes
    their ids; the final tokenizer keeps them as ordinary vocabulary entries."""
    from tokenizers import normalizers

    texts = list(texts)
    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    chars = sorted(set().union(*(set(normalizer.normalize_str(t)) for t in texts)) - set(" \t\n\r\f\v"))
    continuation = [f"##{c}" for c in chars]
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=[*WORDPIECE_SPECIALS, *continuation], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    final = tokenizers.Tokenizer(models.WordPiece(tok.get_vocab(), unk_token="[UNK]"))
    final.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    final.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    final.decoder = decoders.WordPiece(prefix="##")
    final.add_special_tokens(list(WORDPIECE_SPECIALS))
    cls, sep = final.token_to_id("[CLS]"), final.token_to_id("[SEP]")
    final.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return Tokenizer.from_tokenizers(final, pad="[PAD]", unk="[UNK]", cls="[CLS]", sep="[SEP]", mask="[MASK]",
                                     kind="wordpiece")


def train_roberta_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """RoBERTa's byte-level BPE trained on ``texts`` (literal texts, never file names), with its
    special tokens and template <s> A </s> (</s> B </s>)."""
    texts = [t if "\n" in t else t + "\n" for t in texts]  # a newline marks each item as text, not a path
    bpe = train_bpe_tokenizer(texts, vocab_size, special_tokens=ROBERTA_SPECIALS, min_frequency=min_frequency)
    tok = bpe.backend
    sep, cls = ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.RobertaProcessing(sep, cls, trim_offsets=False, add_prefix_space=False)
    return Tokenizer.from_tokenizers(tok, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", cls="<s>", sep="</s>",
                                     mask="<mask>", kind="bpe")
