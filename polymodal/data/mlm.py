"""Masked-LM pretraining data: documents -> sentence pairs (NSP/SOP) or packed segments -> masks.

* **Documents** (``read_documents``): ``.txt`` (documents separated by blank lines, a sentence a
  line, lines also cut after . ! ?), ``.tsv`` with a header (a row per document) or ``.jsonl``
  (a record per document).
* **Instances** after BERT's ``create_pretraining_data.py`` (Devlin et al. 2019, sec. 3.1 and
  appendix A.2): sentences are gathered until a target length (10% of the time a shorter random
  one), then split at a random sentence boundary into A and B (``build_pair_instances``). For
  next-sentence prediction B is, half the time, a span of another document (NotNext); for
  ALBERT's sentence-order prediction (Lan et al. 2020, sec. 3.2) A and B are always consecutive
  and swapped half the time. Without a pair task, whole sentences of one document are packed up
  to the length limit: RoBERTa's DOC-SENTENCES input (Liu et al. 2019, sec. 4.2;
  ``build_single_instances``).
* **Masking** (BERT sec. 3.1 "Task #1", appendix A.1; ``mask_tokens``): 15% of the non-special
  tokens (or of the words, with whole-word masking) are chosen as targets; a chosen token becomes
  [MASK] with probability 0.8, a random token with 0.1 and stays with 0.1. The loss is
  L_MLM = -1/|M| sum_{t in M} log p(x_t | x~) over the chosen set M only (labels -100 elsewhere).
"""
from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path
from typing import Iterable, Sequence

import torch

TEXT_SUFFIXES = (".txt", ".text", ".tsv", ".jsonl")
TEXT_FIELDS = ("text", "sentence", "article", "content", "document")
# A sentence ends at . ! or ? followed by white space. A simple splitter ("Mr. Smith" is cut too),
# which only moves a segment boundary.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")

# A token sequence with, per token, whether it starts a word (for whole-word masking).
Piece = tuple[list[int], list[bool]]


# ------------------------------------------------------------------------------------------ corpus
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
    if not any(docs):
        raise ValueError(f"{path}:1: header only, no text rows")
    return [d for d in docs if d]


def _read_jsonl(path: Path, text: str, text_field: str | None) -> list[list[str]]:
    """One JSON object per line; its text field is one document (e.g. a BBC article)."""
    from .tasks import iter_json_objects

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
        raise ValueError("no input files given (--data)")
    return files


def read_documents(inputs: Iterable[str | Path], text_field: str | None = None) -> list[list[str]]:
    """Documents (lists of sentences) from text files (documents separated by blank lines),
    .tsv files with a header (a row per document) or .jsonl files (a record per document).
    A missing, empty or non-UTF-8 file is refused by name (and line, for bad bytes)."""
    from ..tokenizers import read_text_file

    docs: list[list[str]] = []
    for path in input_files(inputs):
        text = read_text_file(path)
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
    if fraction >= 1:
        raise ValueError(f"--val-fraction must be < 1, got {fraction}")
    want = max(1, round(sum(len(d) for d in docs) * fraction))
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


# ------------------------------------------------------------------------------- tokens and words
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
    """Word starts from the encoding's word ids (the pre-tokeniser's words), else the '##'/'Ġ' convention."""
    wids = enc.word_ids
    if wids and all(w is not None for w in wids):
        return [i == 0 or w != wids[i - 1] for i, w in enumerate(wids)]
    return word_starts_from_tokens(enc.tokens)


def tokenize_documents(tok, docs: Sequence[Sequence[str]]) -> list[list[Piece]]:
    """Each sentence as (ids, word starts), without special tokens; empty sentences dropped."""
    backend = getattr(tok, "backend", tok)
    flat = [s for d in docs for s in d]
    encs = iter(backend.encode_batch(flat, add_special_tokens=False) if flat else [])
    out = []
    for d in docs:
        sents = [(list(e.ids), _word_starts(e)) for e in (next(encs) for _ in d) if e.ids]
        if sents:
            out.append(sents)
    return out


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


# --------------------------------------------------------------------------------------- instances
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
            return cls(list(zip(one.ids[:s0], one.type_ids[:s0])), list(zip(one.ids[s1 + 1:], one.type_ids[s1 + 1:])),
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
                w += bool(start or k == 0)
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
        raise ValueError(f"--max-length {max_length} leaves no room for text after {fmt.n_single} special tokens")
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


def _random_span(docs, d: int, want: int, rng: random.Random, offsets) -> tuple[Piece, tuple[int, int]]:
    """NSP's NotNext B: sentences from a random sentence of a random *other* document, until ``want`` tokens."""
    other = rng.randrange(len(docs) - 1)
    other += other >= d
    od, start = docs[other], rng.randrange(len(docs[other]))
    take = []
    for s in od[start:]:
        take.append(s)
        if sum(len(x[0]) for x in take) >= want:
            break
    return _join(take), (other, offsets[other][start])


def _cut_sentence(a: Piece, rng: random.Random) -> tuple[Piece, Piece, int] | None:
    """A one-sentence chunk cut in two at a random word start (else anywhere); None if one token."""
    ids, starts = a
    if len(ids) < 2:
        return None
    cuts = [k for k in range(1, len(ids)) if starts[k]] or list(range(1, len(ids)))
    cut = rng.choice(cuts)
    return (ids[:cut], starts[:cut]), (ids[cut:], starts[cut:]), cut


def build_pair_instances(docs: Sequence[Sequence[Piece]], fmt: PairFormat, max_length: int,
                         objective: str, rng: random.Random, short_seq_prob: float = 0.1) -> list[dict]:
    """Sentence-pair inputs for NSP (``objective="mlm+nsp"``) or SOP (``"mlm+sop"``), after BERT's
    ``create_instances_from_document``. Each instance also records ``source``: the (document,
    first token index in the document) of segments A and B, for inspection and tests."""
    if objective not in ("mlm+nsp", "mlm+sop"):
        raise ValueError(f"pair instances need objective mlm+nsp or mlm+sop, got {objective!r}")
    max_tokens = max_length - fmt.n_pair
    if max_tokens < 2:
        raise ValueError(f"--max-length {max_length} leaves no room for two segments after {fmt.n_pair} special tokens")
    if objective == "mlm+nsp" and len(docs) < 2:
        raise ValueError("next-sentence prediction needs at least 2 documents (separated by a blank line) "
                         "for its random negatives; use --objective mlm or mlm+sop")
    offsets = [[0] + list(_cumsum(len(s[0]) for s in doc)) for doc in docs]  # token offset of each sentence

    def target() -> int:
        # 10% of inputs are shorter, so the model also sees the short sequences of fine-tuning.
        return rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens

    out = []
    for d, doc in enumerate(docs):
        chunk_start, length, goal, i = 0, 0, target(), 0
        while i < len(doc):
            length += len(doc[i][0])
            if i < len(doc) - 1 and length < goal:
                i += 1
                continue
            chunk = doc[chunk_start:i + 1]
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            a, b = _join(chunk[:a_end]), _join(chunk[a_end:])
            src_a, src_b = (d, offsets[d][chunk_start]), (d, offsets[d][chunk_start + a_end])
            label = 0
            if objective == "mlm+nsp" and rng.random() < 0.5:
                b, src_b = _random_span(docs, d, max(1, goal - len(a[0])), rng, offsets)
                label = 1
                i -= len(chunk) - a_end  # the chunk's sentences B did not use go to the next chunk
            elif not b[0]:
                cut = _cut_sentence(a, rng)
                if cut is not None:
                    a, b, k = cut
                    src_b = (d, src_a[1] + k)
            if a[0] and b[0]:  # else a one-token chunk: skipped
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
    """Pairs for NSP/SOP, packed single segments for MLM alone."""
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


# ----------------------------------------------------------------------------------------- masking
def mask_tokens(input_ids: torch.Tensor, special_mask: torch.Tensor, mask_id: int, replace_ids: torch.Tensor,
                probability: float = 0.15, word_ids: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking (sec. 3.1, appendix A.1): (masked inputs, labels).

    Each non-special token is chosen with ``probability`` (with ``word_ids``: each word is, and
    all its tokens with it); labels are the original ids at chosen positions and -100 elsewhere.
    A chosen token becomes ``mask_id`` with probability 0.8, a token drawn uniformly from
    ``replace_ids`` with 0.1, and stays as it is with 0.1. If nothing in the batch was chosen,
    one candidate is, so the loss is defined. A fresh mask per call is RoBERTa's dynamic masking
    (sec. 4.1); the caller's ``generator`` decides which (seeded by the batch index in training)."""
    cand = ~special_mask
    shape, dev = input_ids.shape, input_ids.device
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
