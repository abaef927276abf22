"""``polymodal pretrain-mlm``: masked-LM pretraining of the encoder family (BERT, RoBERTa, ALBERT,
MiniLM), from scratch with a tokenizer trained on the text, or continued from a checkpoint.

The objectives (docs/mlm.md has the formulas):

* **Masked LM** (BERT, Devlin et al. 2019, sec. 3.1 "Task #1" and appendix A.1): 15% of the
  input tokens are chosen as prediction targets; of those, 80% are replaced by [MASK], 10% by
  a random token and 10% kept, and the model minimises the cross-entropy of the original
  tokens at the chosen positions only (``mask_tokens``; labels are -100 elsewhere). The mask
  is drawn afresh every time a batch is drawn: RoBERTa's *dynamic masking* (Liu et al. 2019,
  sec. 4.1), instead of BERT's ten static copies of the data.
* **Whole-word masking** (Google's BERT release of May 2019; Cui et al. 2019, "Pre-Training
  with Whole Word Masking for Chinese BERT", sec. 3.1): words, not word pieces, are chosen,
  so every piece of a chosen word is a target.
* **Next-sentence prediction** (BERT sec. 3.1 "Task #2"): the input is [CLS] A [SEP] B [SEP];
  half the time B is the text that follows A (IsNext, label 0), half the time a span from
  another document (NotNext, label 1). RoBERTa (sec. 4.2, table 2) drops it: single
  segments of whole sentences up to the length limit train as well or better.
* **Sentence-order prediction** (ALBERT, Lan et al. 2020, sec. 3.2 "inter-sentence coherence
  loss"): A and B are always two consecutive segments of one document, swapped half the
  time (label 1); the task cannot be solved by topic alone, unlike NSP's random negatives.

Pairs are cut from documents as in BERT's ``create_pretraining_data.py``: sentences are
gathered until a target length is reached (10% of the time a shorter random one, so that
short inputs are seen too), then split at a random sentence boundary into A and B. The
pairs are rebuilt with a new seed on every pass over the data, so NSP negatives and cut
points vary like the masks.

The run folder gets ``model/`` (a polymodal checkpoint with its tokenizer, which
``polymodal finetune --model`` accepts; a ``latest`` file points at it, so the run folder
itself can be given too), ``metrics.jsonl``, ``loss.png`` and ``summary.json``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import time
from pathlib import Path
from typing import Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

OBJECTIVES = ("mlm", "mlm+nsp", "mlm+sop")
# Default objective per encoder variant: BERT trains with NSP, ALBERT with SOP, RoBERTa with MLM alone.
DEFAULT_OBJECTIVE = {"bert": "mlm+nsp", "albert": "mlm+sop", "roberta": "mlm"}
# Special tokens of the tokenizers trained here, in id order. Both orders give the ids the
# presets expect: [PAD]=0 (BERT/ALBERT pad_token_id), [CLS]=2 / [SEP]=3 (ALBERT bos/eos);
# <s>=0, <pad>=1, </s>=2 (RoBERTa bos/pad/eos).
WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
TEXT_SUFFIXES = (".txt", ".text", ".tsv", ".jsonl")
TEXT_FIELDS = ("text", "sentence", "article", "content", "document")
# A sentence ends at . ! or ? followed by white space (a simple splitter: "Mr. Smith" is cut too,
# which only moves a segment boundary).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")

# A token sequence with, per token, whether it starts a word (for whole-word masking).
Piece = tuple[list[int], list[bool]]


# ----------------------------------------------------------------------------------------- corpus
def split_sentences(text: str) -> list[str]:
    """Sentences of a paragraph: one per line, lines further cut after . ! ? and a space."""
    out = []
    for line in text.splitlines():
        out.extend(s.strip() for s in _SENTENCE_END.split(line.strip()) if s.strip())
    return out


def _documents_from_text(text: str) -> list[list[str]]:
    """Documents are separated by blank lines; each is a list of sentences."""
    docs = [split_sentences(block) for block in re.split(r"\n[ \t]*\n", text)]
    return [d for d in docs if d]


def _pick_field(names: Sequence[str], text_field: str | None, where: str) -> str:
    if text_field is not None:
        if text_field not in names:
            raise ValueError(f"{where}: no field {text_field!r} (fields: {', '.join(names)})")
        return text_field
    for f in TEXT_FIELDS:
        if f in names:
            return f
    raise ValueError(f"{where}: no text field among {', '.join(names)}; name it with --text-field")


def _read_tsv(path: Path, text: str, text_field: str | None) -> list[list[str]]:
    """A tab-separated file with a header: each row's text is one document (GLUE style)."""
    lines = text.splitlines()
    header = lines[0].split("\t")
    col = header.index(_pick_field(header, text_field, f"{path}:1"))
    docs = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != len(header):
            raise ValueError(f"{path}:{n}: {len(cells)} columns, the header has {len(header)}")
        docs.append(split_sentences(cells[col]))
    return [d for d in docs if d]


def _read_jsonl(path: Path, text: str, text_field: str | None) -> list[list[str]]:
    """One JSON object per line; its text field is one document (e.g. a BBC article)."""
    from ..data.tasks import iter_json_objects

    docs = []
    for n, rec in iter_json_objects(path, text):
        field = _pick_field(list(rec), text_field, f"{path}:{n}")
        if not isinstance(rec[field], str):
            raise ValueError(f"{path}:{n}: field {field!r} is not a string")
        docs.append(split_sentences(rec[field]))
    return [d for d in docs if d]


def input_files(inputs: Iterable[str | Path]) -> list[Path]:
    """The files behind ``inputs``: files as given, folders expanded to their text files."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{p}: no text files ({', '.join(TEXT_SUFFIXES)}) in this folder")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: file not found")
    if not files:
        raise ValueError("no input files given")
    return files


def read_documents(inputs: Iterable[str | Path], text_field: str | None = None) -> list[list[str]]:
    """Documents (lists of sentences) from text files (documents separated by blank lines),
    .tsv files with a header (a row per document) or .jsonl files (a record per document)."""
    from ..tokenizers import read_text_file

    docs: list[list[str]] = []
    for path in input_files(inputs):
        text = read_text_file(path)  # names the file when it is missing, empty or not UTF-8
        suffix = path.suffix.lower()
        if suffix == ".tsv":
            got = _read_tsv(path, text, text_field)
        elif suffix == ".jsonl":
            got = _read_jsonl(path, text, text_field)
        else:
            got = _documents_from_text(text)
        if not got:
            raise ValueError(f"{path}: file is empty (no text, only white space)")
        docs.extend(got)
    return docs


def split_documents(docs: list, fraction: float) -> tuple[list, list]:
    """(train, val): whole documents from the end are held out until they hold ``fraction`` of
    the sentences; a single document is cut between sentences instead."""
    if fraction <= 0:
        return list(docs), []
    total = sum(len(d) for d in docs)
    want = max(1, round(total * fraction))
    if len(docs) == 1:
        d = docs[0]
        if len(d) < 2:
            raise ValueError("the text is one sentence: too short to hold out a validation slice (--val-fraction 0)")
        cut = max(1, len(d) - want)
        return [d[:cut]], [d[cut:]]
    train, val, n = list(docs), [], 0
    while n < want and len(train) > 1:
        val.insert(0, train.pop())
        n += len(val[0])
    return train, val


# ------------------------------------------------------------------------------------- tokenizers
def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int, lowercase: bool = True,
                              min_frequency: int = 2):
    """A BERT WordPiece tokenizer (Wu et al. 2016, sec. 4.1; BERT sec. 3) trained on ``texts``:
    BERT's normaliser (optionally lower-casing) and pre-tokeniser (white space and punctuation),
    word pieces continuing a word carry the ``##`` prefix, and the post-processor writes
    [CLS] A [SEP] (B [SEP]) with token types 0 / 1."""
    import tokenizers
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    from ..tokenizers import Tokenizer

    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(WORDPIECE_SPECIALS), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return Tokenizer.from_tokenizers(tok, pad="[PAD]", unk="[UNK]", cls="[CLS]", sep="[SEP]", mask="[MASK]",
                                     kind="wordpiece")


def train_roberta_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """RoBERTa's byte-level BPE (sec. 4.4; GPT-2's scheme) trained on ``texts``, with RoBERTa's
    special tokens and template <s> A </s> (</s> B </s>)."""
    from tokenizers import processors

    from ..tokenizers import Tokenizer, train_bpe_tokenizer

    bpe = train_bpe_tokenizer(list(texts), vocab_size, special_tokens=ROBERTA_SPECIALS, min_frequency=min_frequency)
    tok = bpe.backend
    sep, cls = ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.RobertaProcessing(sep, cls, trim_offsets=False, add_prefix_space=False)
    return Tokenizer.from_tokenizers(tok, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", cls="<s>", sep="</s>",
                                     mask="<mask>", kind="bpe")


def special_ids(tok) -> set[int]:
    """Ids never masked: the tokenizer's special tokens and its named roles (pad, cls, ...)."""
    ids = set(tok.special_ids)
    for role in ("bos", "eos", "pad", "unk", "cls", "sep", "mask"):
        v = getattr(tok, f"{role}_id", None)
        if v is not None:
            ids.add(int(v))
    return ids


def mask_token_id(tok) -> int:
    if getattr(tok, "mask_id", None) is not None:
        return int(tok.mask_id)
    for t in ("[MASK]", "<mask>"):
        if tok.token_to_id(t) is not None:
            return int(tok.token_to_id(t))
    raise ValueError("the tokenizer has no mask token ([MASK] or <mask>); masked-LM pretraining needs one")


# Word pieces continuing a word start with "##" (WordPiece); word-initial pieces start with "Ġ"
# (byte-level BPE) or "▁" (SentencePiece).
_CONTINUES = "##"
_STARTS = ("Ġ", "▁")


def word_starts_from_tokens(tokens: Sequence[str]) -> list[bool]:
    """Whether each token starts a word, from the spelling conventions alone (a fallback for
    tokenizers that give no word ids): a token continues the previous word if it begins with
    '##'; with 'Ġ'/'▁' marking word starts, a token without the mark continues a word."""
    marked = any(t.startswith(_STARTS) for t in tokens)
    out = []
    for i, t in enumerate(tokens):
        if i == 0:
            out.append(True)
        elif t.startswith(_CONTINUES):
            out.append(False)
        else:
            out.append(t.startswith(_STARTS) if marked else True)
    return out


def _word_starts(enc) -> list[bool]:
    """Word starts from the encoding's word ids (the pre-tokeniser's words), else the '##'/'Ġ'
    convention."""
    wids = enc.word_ids
    if wids and all(w is not None for w in wids):
        return [i == 0 or w != wids[i - 1] for i, w in enumerate(wids)]
    return word_starts_from_tokens(enc.tokens)


def tokenize_documents(tok, docs: Sequence[Sequence[str]]) -> list[list[Piece]]:
    """Each sentence as (ids, word starts), without special tokens; empty sentences dropped."""
    backend = getattr(tok, "backend", tok)
    flat = [s for d in docs for s in d]
    encs = backend.encode_batch(flat, add_special_tokens=False) if flat else []
    out, k = [], 0
    for d in docs:
        sents = []
        for _ in d:
            e = encs[k]
            k += 1
            if e.ids:
                sents.append((list(e.ids), _word_starts(e)))
        if sents:
            out.append(sents)
    return out


# -------------------------------------------------------------------------------------- instances
@dataclasses.dataclass
class PairFormat:
    """Where a tokenizer puts its special tokens around one or two segments, as (id, type) lists:
    BERT [CLS] A [SEP] B [SEP] (types 0.. 1..), RoBERTa <s> A </s></s> B </s>."""

    single_prefix: list[tuple[int, int]]
    single_suffix: list[tuple[int, int]]
    pair_prefix: list[tuple[int, int]]
    pair_middle: list[tuple[int, int]]
    pair_suffix: list[tuple[int, int]]
    type_a: int = 0
    type_b: int = 1

    @classmethod
    def from_tokenizer(cls, tok) -> "PairFormat":
        """Reads the template off the tokenizer's post-processor by encoding a probe pair."""
        backend = getattr(tok, "backend", tok)
        enc = backend.encode("a", "b", add_special_tokens=True)
        one = backend.encode("a", add_special_tokens=True)
        seq, ids, types = enc.sequence_ids, enc.ids, enc.type_ids
        if 0 in seq and 1 in seq and None in seq:
            a0, a1 = seq.index(0), len(seq) - 1 - seq[::-1].index(0)
            b0, b1 = seq.index(1), len(seq) - 1 - seq[::-1].index(1)

            def specials(lo: int, hi: int) -> list[tuple[int, int]]:
                return [(ids[i], types[i]) for i in range(lo, hi) if seq[i] is None]

            s_seq = one.sequence_ids
            s0, s1 = s_seq.index(0), len(s_seq) - 1 - s_seq[::-1].index(0)
            return cls([(i, t) for i, t in zip(one.ids[:s0], one.type_ids[:s0])],
                       [(i, t) for i, t in zip(one.ids[s1 + 1:], one.type_ids[s1 + 1:])],
                       specials(0, a0), specials(a1 + 1, b0), specials(b1 + 1, len(seq)), types[a0], types[b0])
        # No post-processor: BERT's layout from the named [CLS]/[SEP] tokens.
        cls_id, sep_id = getattr(tok, "cls_id", None), getattr(tok, "sep_id", None)
        if cls_id is None or sep_id is None:
            raise ValueError("the tokenizer neither adds special tokens (no post-processor) nor names [CLS]/[SEP]; "
                             "cannot lay out pretraining inputs")
        return cls([(cls_id, 0)], [(sep_id, 0)], [(cls_id, 0)], [(sep_id, 0)], [(sep_id, 1)])

    @property
    def n_single(self) -> int:
        return len(self.single_prefix) + len(self.single_suffix)

    @property
    def n_pair(self) -> int:
        return len(self.pair_prefix) + len(self.pair_middle) + len(self.pair_suffix)

    def build(self, a: Piece, b: Piece | None = None) -> dict:
        """input_ids, token_type_ids and word_ids (-1 on special tokens; each row numbers its words
        from 0, the first token of a segment always starting one)."""
        ids, types, words = [], [], []
        w = -1

        def specials(lst):
            for i, t in lst:
                ids.append(i)
                types.append(t)
                words.append(-1)

        def segment(piece: Piece, t: int):
            nonlocal w
            for k, (i, start) in enumerate(zip(*piece)):
                if start or k == 0:
                    w += 1
                ids.append(i)
                types.append(t)
                words.append(w)

        if b is None:
            specials(self.single_prefix)
            segment(a, self.type_a)
            specials(self.single_suffix)
        else:
            specials(self.pair_prefix)
            segment(a, self.type_a)
            specials(self.pair_middle)
            segment(b, self.type_b)
            specials(self.pair_suffix)
        return {"input_ids": ids, "token_type_ids": types, "word_ids": words}


def _join(pieces: Sequence[Piece]) -> Piece:
    ids, starts = [], []
    for i, s in pieces:
        ids.extend(i)
        starts.extend(s)
    return ids, starts


def build_single_instances(docs: Sequence[Sequence[Piece]], fmt: PairFormat, max_length: int) -> list[dict]:
    """MLM-only inputs (RoBERTa's DOC-SENTENCES, sec. 4.2): whole sentences of one document packed
    up to ``max_length`` tokens; a sentence longer than that is cut into pieces."""
    budget = max_length - fmt.n_single
    if budget < 1:
        raise ValueError(f"max_length={max_length} leaves no room for text after {fmt.n_single} special tokens")
    out = []
    for doc in docs:
        cur: list[Piece] = []
        n = 0
        for ids, starts in doc:
            for s in range(0, len(ids), budget):
                piece = (ids[s:s + budget], starts[s:s + budget])
                if n + len(piece[0]) > budget and cur:
                    out.append({**fmt.build(_join(cur)), "pair_label": -100})
                    cur, n = [], 0
                cur.append(piece)
                n += len(piece[0])
        if cur:
            out.append({**fmt.build(_join(cur)), "pair_label": -100})
    return out


def _truncate_pair(a: Piece, b: Piece, max_tokens: int) -> tuple[Piece, Piece]:
    """Trims the longer segment until both fit: A loses tokens from its front, B from its back, so
    the junction between them (what NSP/SOP judge) stays intact and A + B stays contiguous text."""
    (ai, as_), (bi, bs) = a, b
    drop_a = drop_b = 0
    while len(ai) - drop_a + len(bi) - drop_b > max_tokens:
        if len(ai) - drop_a > len(bi) - drop_b:
            drop_a += 1
        else:
            drop_b += 1
    return (ai[drop_a:], as_[drop_a:]), (bi[:len(bi) - drop_b], bs[:len(bs) - drop_b])


def build_pair_instances(docs: Sequence[Sequence[Piece]], fmt: PairFormat, max_length: int,
                         objective: str, rng: random.Random, short_seq_prob: float = 0.1) -> list[dict]:
    """Sentence-pair inputs for NSP (``objective="mlm+nsp"``) or SOP (``"mlm+sop"``), after BERT's
    ``create_instances_from_document``. Each instance also records ``source``: the (document,
    first token index in the document) of segments A and B, for inspection and tests."""
    if objective not in ("mlm+nsp", "mlm+sop"):
        raise ValueError(f"pair instances need objective mlm+nsp or mlm+sop, got {objective!r}")
    max_tokens = max_length - fmt.n_pair
    if max_tokens < 2:
        raise ValueError(f"max_length={max_length} leaves no room for two segments after {fmt.n_pair} special tokens")
    if objective == "mlm+nsp" and len(docs) < 2:
        raise ValueError("next-sentence prediction needs at least 2 documents (separated by a blank line) "
                         "for its random negatives; use --objective mlm or mlm+sop")
    # token offset of every sentence in its document, to report where segments come from
    offsets = [[0] + list(_cumsum(len(s[0]) for s in doc)) for doc in docs]

    def target() -> int:
        # 10% of inputs are shorter, so the model also sees the short sequences of fine-tuning.
        return rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens

    out = []
    for d, doc in enumerate(docs):
        chunk_start, length, goal, i = 0, 0, target(), 0
        while i < len(doc):
            length += len(doc[i][0])
            if i == len(doc) - 1 or length >= goal:
                chunk = doc[chunk_start:i + 1]
                a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
                a, b = _join(chunk[:a_end]), _join(chunk[a_end:])
                src_a, src_b = (d, offsets[d][chunk_start]), (d, offsets[d][chunk_start + a_end])
                label = 0
                if objective == "mlm+nsp" and rng.random() < 0.5:
                    # NotNext: B is a span of another, random document.
                    other = rng.randrange(len(docs) - 1)
                    other += other >= d
                    od, start = docs[other], rng.randrange(len(docs[other]))
                    want, take = max(1, goal - len(a[0])), []
                    for s in od[start:]:
                        take.append(s)
                        if sum(len(x[0]) for x in take) >= want:
                            break
                    b, src_b, label = _join(take), (other, offsets[other][start]), 1
                    # the sentences of this chunk that B did not use are put back for the next chunk
                    i -= len(chunk) - a_end
                elif not b[0]:
                    # a one-sentence chunk: cut it in two at a word start (else anywhere)
                    ids, starts = a
                    if len(ids) < 2:
                        chunk_start, length, goal, i = i + 1, 0, target(), i + 1
                        continue
                    cuts = [k for k in range(1, len(ids)) if starts[k]] or list(range(1, len(ids)))
                    cut = rng.choice(cuts)
                    a, b = (ids[:cut], starts[:cut]), (ids[cut:], starts[cut:])
                    src_b = (d, src_a[1] + cut)
                if not a[0] or not b[0]:  # a one-token chunk (NotNext with an empty A cannot happen)
                    chunk_start, length, goal, i = i + 1, 0, target(), i + 1
                    continue
                n_a = len(a[0])
                a, b = _truncate_pair(a, b, max_tokens)
                src_a = (src_a[0], src_a[1] + n_a - len(a[0]))
                if objective == "mlm+sop" and rng.random() < 0.5:
                    a, b, src_a, src_b, label = b, a, src_b, src_a, 1  # swapped order
                out.append({**fmt.build(a, b), "pair_label": label, "source": (src_a, src_b)})
                chunk_start, length, goal = i + 1, 0, target()
            i += 1
    return out


def _cumsum(xs: Iterable[int]) -> Iterable[int]:
    t = 0
    for x in xs:
        t += x
        yield t


def build_instances(docs: Sequence[Sequence[Piece]], fmt: PairFormat, max_length: int, objective: str,
                    rng: random.Random) -> list[dict]:
    if objective == "mlm":
        return build_single_instances(docs, fmt, max_length)
    return build_pair_instances(docs, fmt, max_length, objective, rng)


def collate(instances: Sequence[dict], pad_id: int, specials: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pads a batch; ``special_mask`` marks padding and special-token ids (never masked)."""
    n, b = max(len(x["input_ids"]) for x in instances), len(instances)
    ids = torch.full((b, n), pad_id, dtype=torch.long)
    types = torch.zeros(b, n, dtype=torch.long)
    words = torch.full((b, n), -1, dtype=torch.long)
    attn = torch.zeros(b, n, dtype=torch.long)
    for r, x in enumerate(instances):
        m = len(x["input_ids"])
        ids[r, :m] = torch.tensor(x["input_ids"])
        types[r, :m] = torch.tensor(x["token_type_ids"])
        words[r, :m] = torch.tensor(x["word_ids"])
        attn[r, :m] = 1
    special = attn.eq(0) | torch.isin(ids, specials) | words.lt(0)
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": attn, "word_ids": words,
            "special_mask": special, "pair_labels": torch.tensor([x["pair_label"] for x in instances])}


# ---------------------------------------------------------------------------------------- masking
def mask_tokens(input_ids: torch.Tensor, special_mask: torch.Tensor, mask_id: int, replace_ids: torch.Tensor,
                probability: float = 0.15, word_ids: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking (sec. 3.1, appendix A.1): (masked inputs, labels).

    Each non-special token is chosen with ``probability`` (with ``word_ids``: each word is, and
    all its tokens with it); labels are the original ids at chosen positions and -100 elsewhere.
    A chosen token becomes ``mask_id`` with probability 0.8, a token drawn uniformly from
    ``replace_ids`` with 0.1, and stays as it is with 0.1. If nothing in the batch was chosen,
    one candidate is, so the loss is defined. Every call draws a fresh mask (dynamic masking)."""
    cand = ~special_mask
    shape = input_ids.shape
    dev = input_ids.device
    if word_ids is None:
        chosen = torch.rand(shape, generator=generator, device=dev) < probability
    else:
        # one draw per (row, word), spread to the word's tokens
        n_words = int(word_ids.max()) + 1 if word_ids.numel() else 0
        draw = torch.rand(shape[0], max(n_words, 1), generator=generator, device=dev) < probability
        chosen = draw.gather(1, word_ids.clamp(min=0)) & word_ids.ge(0)
    chosen &= cand
    if not bool(chosen.any()) and bool(cand.any()):
        where = cand.flatten().nonzero().squeeze(1)
        pick = where[torch.randint(len(where), (1,), generator=generator, device=dev)]
        if word_ids is not None and int(word_ids.flatten()[pick]) >= 0:
            row = pick // shape[1]
            same = word_ids.eq(word_ids.flatten()[pick]) & (torch.arange(shape[0], device=dev)[:, None] == row)
            chosen |= same & cand
        else:
            chosen.view(-1)[pick] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    u = torch.rand(shape, generator=generator, device=dev)
    to_mask = chosen & (u < 0.8)
    to_random = chosen & (u >= 0.8) & (u < 0.9)
    out = input_ids.clone()
    out[to_mask] = mask_id
    n_rand = int(to_random.sum())
    if n_rand:
        pick = torch.randint(len(replace_ids), (n_rand,), generator=generator, device=dev)
        out[to_random] = replace_ids.to(dev)[pick]
    return out, labels


# ------------------------------------------------------------------------------------------ model
def _objective_for(variant: str, objective: str | None) -> str:
    objective = objective or DEFAULT_OBJECTIVE[variant]
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
    return objective


def model_from_preset(preset: str, docs: Sequence[Sequence[str]], objective: str | None, vocab_size: int,
                      lowercase: bool = True):
    """(model, tokenizer, objective): a fresh encoder of ``preset`` and a tokenizer trained on
    ``docs``: byte-level BPE for RoBERTa, WordPiece for BERT/ALBERT/MiniLM (the real ALBERT
    uses SentencePiece; only the vocabulary differs)."""
    from ..models.encoder import EncoderConfig, build_encoder

    if preset not in EncoderConfig.presets:
        raise ValueError(f"unknown encoder preset {preset!r}; choose from {', '.join(sorted(EncoderConfig.presets))}")
    variant = EncoderConfig.presets[preset].get("variant", "bert")
    objective = _objective_for(variant, objective)
    texts = ["\n".join(d) + "\n" for d in docs]
    if variant == "roberta":
        tok = train_roberta_tokenizer(texts, vocab_size)
        ids = dict(pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    else:
        tok = train_wordpiece_tokenizer(texts, vocab_size, lowercase=lowercase)
        ids = dict(pad_token_id=tok.pad_id)
        if variant == "albert":
            ids.update(bos_token_id=tok.cls_id, eos_token_id=tok.sep_id)
    task = "mlm" if objective == "mlm" else "pretraining"
    config = EncoderConfig.from_preset(preset, task=task, vocab_size=tok.vocab_size, **ids)
    return build_encoder(config), tok, objective


def model_from_checkpoint(path: str | Path, objective: str | None):
    """(model, tokenizer, objective): an encoder checkpoint (polymodal or Hugging Face folder)
    with its own tokenizer; an MLM head (and the NSP/SOP head) is added fresh when it lacks one."""
    from ..interop import load
    from ..models.encoder import Encoder, EncoderForMaskedLM, EncoderForPreTraining, build_encoder
    from ..models.heads import TaskModel

    m, tok = load(path, device="cpu", dtype=torch.float32)
    if isinstance(m, TaskModel):
        raise ValueError(f"{path}: a fine-tuned {m.config.task} model; pretrain-mlm continues pretraining a "
                         "backbone (give the encoder it was fine-tuned from)")
    if getattr(getattr(m, "config", None), "family", None) != "encoder":
        raise ValueError(f"{path}: not an encoder (BERT/RoBERTa/ALBERT/MiniLM) checkpoint")
    if tok is None:
        raise ValueError(f"{path}: no tokenizer.json next to the weights")
    objective = _objective_for(m.config.variant, objective)
    need = "mlm" if objective == "mlm" else "pretraining"
    if isinstance(m, EncoderForPreTraining) or (need == "mlm" and isinstance(m, EncoderForMaskedLM)):
        return m, tok, objective
    enc = m.encoder if isinstance(m, EncoderForMaskedLM) else m
    if not isinstance(enc, Encoder):
        raise ValueError(f"{path}: an encoder of unexpected type {type(m).__name__}")
    config = dataclasses.replace(m.config, task=need, pooler=bool(m.config.pooler) or need == "pretraining")
    new = build_encoder(config)
    missing, unexpected = new.encoder.load_state_dict(enc.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise ValueError(f"{path}: weights do not fit the encoder (missing {missing}, unexpected {unexpected})")
    if isinstance(m, EncoderForMaskedLM):
        new.mlm.load_state_dict(m.mlm.state_dict())
    new.tie_weights()
    return new, tok, objective


def _forward(model: nn.Module, batch: dict, inputs: torch.Tensor, use_types: bool, pairs: bool):
    """(MLM logits, NSP/SOP logits or None when the objective has no pair task)."""
    tt = batch["token_type_ids"] if use_types else None
    out = model(inputs, batch["attention_mask"], tt)
    logits, pair_logits = out if isinstance(out, tuple) else (out, None)
    return logits, pair_logits if pairs else None


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[tuple[dict, torch.Tensor, torch.Tensor]], use_types: bool,
             pairs: bool) -> dict:
    """Val MLM loss (mean over masked tokens), MLM accuracy and, with a pair task, its loss and accuracy."""
    was = model.training
    model.eval()
    nll, hit, n, pair_hit, pair_n, pair_nll = 0.0, 0, 0, 0, 0, 0.0
    for batch, inputs, labels in batches:
        logits, pair_logits = _forward(model, batch, inputs, use_types, pairs)
        sel = labels.ne(-100)
        lg = logits[sel].float()
        nll += float(F.cross_entropy(lg, labels[sel], reduction="sum"))
        hit += int((lg.argmax(-1) == labels[sel]).sum())
        n += int(sel.sum())
        if pair_logits is not None:
            y = batch["pair_labels"]
            pair_nll += float(F.cross_entropy(pair_logits.float(), y, reduction="sum"))
            pair_hit += int((pair_logits.argmax(-1) == y).sum())
            pair_n += len(y)
    model.train(was)
    out = {"val_loss": nll / max(n, 1), "val_mlm_accuracy": hit / max(n, 1), "val_masked_tokens": n}
    if pair_n:
        out.update(val_pair_loss=pair_nll / pair_n, val_pair_accuracy=pair_hit / pair_n)
    return out


# ---------------------------------------------------------------------------------------- command
def pretrain_mlm(inputs: list[str], out: str = "runs/mlm", preset: str | None = None, model: str | None = None,
                 objective: Literal["mlm", "mlm+nsp", "mlm+sop"] | None = None, whole_word: bool = False,
                 vocab_size: int = 8000, lowercase: bool = True, max_length: int = 128, batch_size: int = 32,
                 steps: int = 1000, minutes: float | None = None, lr: float | None = None, warmup: float = 0.05,
                 weight_decay: float = 0.01, mask_prob: float = 0.15, val_fraction: float = 0.05,
                 max_val: int = 1000, eval_every: int = 100, log_every: int = 10, text_field: str | None = None, seed: int = 0,
                 device: str = "auto", progress: bool = True) -> dict:
    """Masked-LM pretraining (BERT/RoBERTa/ALBERT) with dynamic 80/10/10 masking and NSP or SOP.

    Args:
        inputs: text files or folders (.txt: documents separated by blank lines, a sentence per line; .tsv with a header; .jsonl)
        out: run folder (model/, metrics.jsonl, loss.png, summary.json)
        preset: train from scratch: an encoder preset (bert-base, roberta-base, albert-base-v2, minilm-l6, tiny-bert, tiny-roberta, tiny-albert, ...)
        model: continue pretraining this encoder checkpoint (polymodal or HF folder) with its own tokenizer
        objective: mlm, mlm+nsp or mlm+sop (default: BERT nsp, ALBERT sop, RoBERTa mlm only)
        whole_word: mask all word pieces of a chosen word together
        vocab_size: vocabulary of the tokenizer trained with --preset
        lowercase: lower-case the text (WordPiece tokenizers trained with --preset)
        max_length: tokens per input, special tokens included (capped by the model's positions)
        batch_size: inputs per step
        steps: optimizer steps (the schedule's length)
        minutes: wall-clock budget; the linear decay is fitted to the steps that fit in it
        lr: peak learning rate (default 5e-4 from scratch, 5e-5 when continuing)
        warmup: fraction of the steps with linear warm-up (then linear decay to 0)
        weight_decay: AdamW weight decay (not on biases, norms and embeddings)
        mask_prob: fraction of tokens (or words) chosen for prediction
        val_fraction: fraction of the sentences (whole documents from the end) held out for validation
        max_val: evaluate on at most this many held-out sequences
        eval_every: evaluate on the held-out slice every N steps
        log_every: write a training record every N steps
        text_field: the text column/field of .tsv/.jsonl inputs (default: text, sentence, article, ...)
        seed: random seed (pairs, masks, init)
        device: auto, cpu or cuda
        progress: show a progress bar
    """
    from ..io import atomic_write_text
    from ..models.encoder import mlm_loss
    from ..models.registry import save_model
    from ..runtime import pick_device
    from .loop import plot_losses
    from .optim import make_adamw
    from .schedule import lr_at

    if (preset is None) == (model is None):
        raise ValueError("give exactly one of --preset (train from scratch) or --model (continue pretraining)")
    if not 0 < mask_prob < 1:
        raise ValueError(f"--mask-prob must be in (0, 1), got {mask_prob}")
    if steps < 1 or batch_size < 1:
        raise ValueError("--steps and --batch-size must be positive")
    torch.manual_seed(seed)
    names = ", ".join(map(str, inputs))
    docs = read_documents(inputs, text_field)
    train_docs, val_docs = split_documents(docs, val_fraction)
    if preset is not None:
        net, tok, objective = model_from_preset(preset, train_docs, objective, vocab_size, lowercase)
        lr = 5e-4 if lr is None else lr
    else:
        net, tok, objective = model_from_checkpoint(model, objective)
        lr = 5e-5 if lr is None else lr
    cfg = net.config
    max_length = min(max_length, cfg.max_tokens)
    fmt = PairFormat.from_tokenizer(tok)
    mask_id = mask_token_id(tok)
    specials = special_ids(tok)
    pad_id = tok.pad_id if tok.pad_id is not None else (cfg.pad_token_id or 0)
    specials_cpu = torch.tensor(sorted(specials), dtype=torch.long)
    replace_ids = torch.tensor([i for i in range(min(tok.vocab_size, cfg.vocab_size)) if i not in specials])
    use_types = cfg.type_vocab_size > 1
    pairs = objective != "mlm"

    tok_train = tokenize_documents(tok, train_docs)
    tok_val = tokenize_documents(tok, val_docs)
    rng = random.Random(seed)
    train_inst = build_instances(tok_train, fmt, max_length, objective, rng)
    if len(train_inst) < batch_size:
        raise ValueError(f"{names}: too short to form a batch: {len(train_inst)} training sequences of up to "
                         f"{max_length} tokens, fewer than --batch-size {batch_size}; give more text or a smaller "
                         "--batch-size")
    # NSP negatives need two documents: a one-document val slice gets no validation
    val_ok = len(tok_val) >= (2 if objective == "mlm+nsp" else 1)
    val_inst = build_instances(tok_val, fmt, max_length, objective, random.Random(seed + 1)) if val_ok else []
    val_inst = val_inst[:max_val]

    dev = pick_device(device)
    net.to(dev).train()
    replace_ids = replace_ids.to(dev)

    def to_dev(b):
        return {k: v.to(dev) for k, v in b.items()}

    # The val masks are drawn once with a fixed seed, so successive evaluations are comparable.
    gval = torch.Generator(device=dev).manual_seed(seed + 2)
    val_batches = []
    for s in range(0, len(val_inst), batch_size):
        b = to_dev(collate(val_inst[s:s + batch_size], pad_id, specials_cpu))
        x, y = mask_tokens(b["input_ids"], b["special_mask"], mask_id, replace_ids, mask_prob,
                           b["word_ids"] if whole_word else None, gval)
        val_batches.append((b, x, y))

    opt = make_adamw(net, lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-6)
    total = steps
    n_warm = max(1, int(warmup * total))
    budget = minutes * 60 if minutes is not None else None
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    metrics_file = open(out_dir / "metrics.jsonl", "w", buffering=1)  # line-buffered: readable during the run

    def log(rec: dict) -> None:
        history.append(rec)
        metrics_file.write(json.dumps(rec) + "\n")

    print(f"[pretrain-mlm] {cfg.name} ({sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params, vocab "
          f"{tok.vocab_size}), objective {objective}{' whole-word' if whole_word else ''}: {len(train_inst)} train / "
          f"{len(val_inst)} val sequences of <= {max_length} tokens, {total} steps", flush=True)
    t0 = time.perf_counter()
    gtrain = torch.Generator(device=dev).manual_seed(seed + 3)
    order_gen = torch.Generator().manual_seed(seed + 4)
    perm, pos, epoch = torch.randperm(len(train_inst), generator=order_gen).tolist(), 0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="pretrain-mlm", dynamic_ncols=True)
    if val_batches:
        log({"step": 0, **evaluate(net, val_batches, use_types, pairs), "elapsed_s": 0.0})
    step, win_loss, win_mlm, win_pair, win_n = 0, 0.0, 0.0, 0.0, 0
    stop_reason = "steps"
    try:
        while step < total:
            elapsed = time.perf_counter() - t0
            if budget is not None and elapsed >= budget:
                stop_reason = "time budget"
                break
            if pos + batch_size > len(perm):
                # a new pass: new pair cut points and NSP negatives, a new order
                epoch += 1
                train_inst = build_instances(tok_train, fmt, max_length, objective, random.Random(seed + 1000 * epoch))
                perm, pos = torch.randperm(len(train_inst), generator=order_gen).tolist(), 0
            b = to_dev(collate([train_inst[i] for i in perm[pos:pos + batch_size]], pad_id, specials_cpu))
            pos += batch_size
            x, y = mask_tokens(b["input_ids"], b["special_mask"], mask_id, replace_ids, mask_prob,
                               b["word_ids"] if whole_word else None, gtrain)
            logits, pair_logits = _forward(net, b, x, use_types, pairs)
            mlm = mlm_loss(logits, y)
            pair = F.cross_entropy(pair_logits.float(), b["pair_labels"]) if pair_logits is not None else None
            loss = mlm + pair if pair is not None else mlm
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"loss is {float(loss)} at step {step}; lower --lr or check the data")
            for g in opt.param_groups:
                g["lr"] = lr_at(step, lr=lr, warmup=n_warm, decay_steps=total, schedule="linear")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            step += 1
            win_loss += float(loss.detach())
            win_mlm += float(mlm.detach())
            win_pair += float(pair.detach()) if pair is not None else 0.0
            win_n += 1
            if budget is not None and (step == 10 or step % eval_every == 0):
                # fit the linear decay to the steps the budget allows, re-estimated as speed drifts
                per_step = (time.perf_counter() - t0) / step
                total = max(step + 1, min(steps, int(step + (budget - (time.perf_counter() - t0)) / per_step)))
                n_warm = min(n_warm, max(1, int(warmup * total)))
                if bar is not None:
                    bar.total = total
                    bar.refresh()
            if step % log_every == 0 or step == total:
                rec = {"step": step, "loss": win_loss / win_n, "mlm_loss": win_mlm / win_n,
                       "lr": opt.param_groups[0]["lr"], "epoch": epoch, "elapsed_s": round(time.perf_counter() - t0, 2)}
                if pair is not None:
                    rec["pair_loss"] = win_pair / win_n
                log(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}")
                win_loss = win_mlm = win_pair = 0.0
                win_n = 0
            if val_batches and step % eval_every == 0 and step < total:
                ev = evaluate(net, val_batches, use_types, pairs)
                log({"step": step, **ev, "elapsed_s": round(time.perf_counter() - t0, 2)})
                if bar is not None:
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}", val=f"{ev['val_loss']:.3f}")
                plot_losses(history, out_dir / "loss.png")
            if bar is not None:
                bar.update(1)
    except KeyboardInterrupt:
        save_model(net, out_dir / "model", tokenizer=tok)
        atomic_write_text(out_dir / "latest", "model\n")
        print(f"\ninterrupted at step {step}; model saved to {out_dir / 'model'}")
        raise
    finally:
        if bar is not None:
            bar.close()
    if stop_reason == "steps" and total < steps:
        stop_reason = "time budget"  # the schedule was cut to the steps the budget allowed
    final = evaluate(net, val_batches, use_types, pairs) if val_batches else {}
    if final:
        log({"step": step, **final, "elapsed_s": round(time.perf_counter() - t0, 2)})
    metrics_file.close()
    plot_losses(history, out_dir / "loss.png")
    save_model(net, out_dir / "model", tokenizer=tok)
    atomic_write_text(out_dir / "latest", "model\n")  # so the run folder loads as its model
    summary = {"model": str(out_dir / "model"), "preset": preset, "init": model, "objective": objective,
               "whole_word": whole_word, "steps": step, "stop_reason": stop_reason, "epochs": epoch,
               "train_sequences": len(train_inst), "val_sequences": len(val_inst), "max_length": max_length,
               "vocab_size": tok.vocab_size, "elapsed_s": round(time.perf_counter() - t0, 2),
               "first_val": next((r for r in history if "val_loss" in r), None), **final}
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"[pretrain-mlm] {step} steps ({stop_reason}); "
          + (f"val MLM loss {final['val_loss']:.4f} accuracy {final['val_mlm_accuracy']:.4f}; " if final else "")
          + f"wrote {out_dir}", flush=True)
    return {**summary, "history": history}
