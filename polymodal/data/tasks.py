"""Fine-tuning data: GLUE/SuperGLUE sentence(-pair) tasks, CoNLL-2003 NER and SQuAD v1.1 QA.

Readers take any folder holding the task's files (``train``/``val`` or GLUE's ``dev``), so the
full datasets load the same way as the shared subsets. Every malformed row (wrong column
count, unknown label, empty text) raises ``DataError`` naming the file and line number.

Preprocessing follows BERT (Devlin et al. 2019, sec. 4):

* sentence pairs are packed as [CLS] A [SEP] B [SEP] with segment ids 0/1 (sec. 3, fig. 2);
* NER labels go to the FIRST sub-token of each word, the other sub-tokens get -100 (ignored by
  the loss), and a word's prediction is its first sub-token's (sec. 5.3);
* extractive QA (sec. 4.2) scores a span i..j by S*h_i + E*h_j with j >= i. Long contexts are
  cut into windows of ``max_length`` tokens overlapping by ``stride`` tokens (the "doc_stride"
  of the reference implementation, run_squad.py); a window that does not contain the answer
  is labelled with the [CLS] position, as in HF ``run_qa.py``. Postprocessing takes the
  ``n_best`` best starts and ends of every window, keeps spans inside the context and at most
  ``max_answer_length`` tokens long, and maps the best one back to the context's characters
  through the tokenizer's offsets.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch


class DataError(ValueError):
    """A malformed data file; the message names the file and line."""


# --------------------------------------------------------------------------------------------- tasks
@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # seq_cls | token_cls | qa
    folder: str  # default sub-folder of the data root
    fmt: str  # tsv | jsonl | conll | squad
    text: tuple = ()  # tsv: column names (header) or indices (no header); jsonl: keys
    label: Any = None  # tsv: column name or index; jsonl: key
    labels: tuple = ()  # label strings in id order; () = regression (float score)
    header: bool = True
    n_cols: int | None = None  # tsv: exact column count of every row
    metric: str = "accuracy"  # the key the early stopping watches (eval.metrics)
    mode: str = "max"  # its direction: every metric here (accuracy, MCC, F1, Pearson, EM) is better higher

    @property
    def problem(self) -> str:
        return "regression" if self.kind == "seq_cls" and not self.labels else "classification"


CONLL_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")

TASKS: dict[str, TaskSpec] = {s.name: s for s in [
    # GLUE (tab-separated; SST-2's copy says "text" where GLUE says "sentence")
    TaskSpec("sst2", "seq_cls", "sst2", "tsv", (("sentence", "text"),), "label", ("0", "1")),
    TaskSpec("cola", "seq_cls", "glue_cola", "tsv", (3,), 1, ("0", "1"), header=False, n_cols=4, metric="mcc"),
    TaskSpec("mrpc", "seq_cls", "glue_mrpc", "tsv", ("#1 String", "#2 String"), "Quality", ("0", "1"), metric="f1"),
    TaskSpec("rte", "seq_cls", "glue_rte", "tsv", ("sentence1", "sentence2"), "label",
             ("entailment", "not_entailment")),
    TaskSpec("qnli", "seq_cls", "glue_qnli", "tsv", ("question", "sentence"), "label",
             ("entailment", "not_entailment")),
    TaskSpec("wnli", "seq_cls", "glue_wnli", "tsv", ("sentence1", "sentence2"), "label", ("0", "1")),
    TaskSpec("stsb", "seq_cls", "glue_stsb", "tsv", ("sentence1", "sentence2"), "score", (), metric="pearson"),
    # SuperGLUE (JSON lines)
    TaskSpec("cb", "seq_cls", "superglue_cb", "jsonl", ("premise", "hypothesis"), "label",
             ("entailment", "contradiction", "neutral"), metric="f1_macro"),
    TaskSpec("superglue_rte", "seq_cls", "superglue_rte", "jsonl", ("premise", "hypothesis"), "label",
             ("entailment", "not_entailment")),
    TaskSpec("boolq", "seq_cls", "superglue_boolq", "jsonl", ("question", "passage"), "label", ("False", "True")),
    # NER and QA
    TaskSpec("conll2003", "token_cls", "conll2003", "conll", labels=CONLL_LABELS, metric="f1"),
    TaskSpec("squad", "qa", "squad_subset", "squad", metric="f1"),
]}

_SPLIT_FILES = {"train": ("train",), "val": ("val", "dev", "validation", "valid"), "test": ("test",)}
_EXT = {"tsv": (".tsv",), "jsonl": (".jsonl",), "conll": (".txt", ".conll"), "squad": (".json",)}


def read_text(path: str | Path) -> str:
    """A task file's text (UTF-8, a leading BOM dropped: MRPC starts with one). Bytes that are not
    UTF-8 raise :class:`DataError` naming the file, line and column, not a bare codec error."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {col}); "
                        "re-save the file as UTF-8") from None


def get_task(name: str) -> TaskSpec:
    if name in TASKS:
        return TASKS[name]
    key = name.lower().replace("-", "").replace("glue_", "")
    aliases = {"sst": "sst2", "stsb": "stsb", "conll": "conll2003", "ner": "conll2003", "squad_subset": "squad",
               "squadv1": "squad"}
    key = aliases.get(key, key)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[key]


def data_root() -> Path:
    """``$POLYMODAL_DATA`` if set, else the shared data folder of this workspace."""
    return Path(os.environ.get("POLYMODAL_DATA", "/work/shared/data"))


def split_file(spec: TaskSpec, split: str, data_dir: str | Path | None = None) -> Path:
    folder = Path(data_dir) if data_dir is not None else data_root() / spec.folder
    if folder.is_file():
        return folder
    names = [s + e for s in _SPLIT_FILES.get(split, (split,)) for e in _EXT[spec.fmt]]
    for n in names:
        if (folder / n).is_file():
            return folder / n
    raise FileNotFoundError(f"{spec.name}: no {split} file in {folder} (looked for {', '.join(names)})")


# ------------------------------------------------------------------------------------ sentence tasks
@dataclasses.dataclass
class TextExample:
    text_a: str
    text_b: str | None
    label: int | float
    line: int  # 1-based line in the source file


def _label(spec: TaskSpec, raw, where: str) -> int | float:
    if not spec.labels:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise DataError(f"{where}: score {raw!r} is not a number") from None
    s = str(raw).strip() if not isinstance(raw, bool) else str(raw)
    if s not in spec.labels:
        raise DataError(f"{where}: unknown label {raw!r}; expected one of {list(spec.labels)}")
    return spec.labels.index(s)


def read_tsv(spec: TaskSpec, path: str | Path) -> list[TextExample]:
    """A GLUE tsv file. Split on tabs only: GLUE text contains unbalanced double quotes, so csv
    quoting must stay off (RTE's README says the same)."""
    path = Path(path)
    out: list[TextExample] = []
    lines = read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    start, cols, idx = 0, None, None
    if spec.header:
        if not lines:
            raise DataError(f"{path}: empty file (expected a header line)")
        header = lines[0].rstrip("\r").split("\t")
        cols = len(header)

        def find(name) -> int:
            for n in (name if isinstance(name, tuple) else (name,)):
                if n in header:
                    return header.index(n)
            raise DataError(f"{path}:1: header has no column {name!r} (columns: {header})")

        idx = [find(n) for n in spec.text], find(spec.label)
        start = 1
    else:
        cols, idx = spec.n_cols, (list(spec.text), spec.label)
    for i, raw in enumerate(lines[start:], start=start + 1):
        where = f"{path}:{i}"
        row = raw.rstrip("\r").split("\t")
        if raw.strip() == "":
            raise DataError(f"{where}: empty line")
        if len(row) != cols:
            raise DataError(f"{where}: expected {cols} tab-separated columns, got {len(row)}")
        texts = []
        for j, c in enumerate(idx[0]):
            t = row[c].strip()
            if not t:
                raise DataError(f"{where}: empty text in column {spec.text[j]!r}")
            texts.append(t)
        out.append(TextExample(texts[0], texts[1] if len(texts) > 1 else None, _label(spec, row[idx[1]], where), i))
    return out


def iter_json_objects(path: str | Path, text: str | None = None):
    """Yield ``(line_number, object)`` for each non-blank line of a JSON-lines file; a line that
    is not a JSON object raises :class:`DataError` naming file and line."""
    path = Path(path)
    lines = text.splitlines() if text is not None else read_text(path).splitlines()
    for i, raw in enumerate(lines, start=1):
        where = f"{path}:{i}"
        if not raw.strip():
            continue
        try:
            d = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(d).__name__}")
        yield i, d


def read_jsonl(spec: TaskSpec, path: str | Path) -> list[TextExample]:
    path = Path(path)
    out = []
    for i, d in iter_json_objects(path):
        where = f"{path}:{i}"
        texts = []
        for k in spec.text:
            t = d.get(k)
            if not isinstance(t, str) or not t.strip():
                raise DataError(f"{where}: missing or empty text field {k!r}")
            texts.append(t.strip())
        if spec.label not in d:
            raise DataError(f"{where}: missing label field {spec.label!r}")
        out.append(TextExample(texts[0], texts[1] if len(texts) > 1 else None, _label(spec, d[spec.label], where), i))
    return out


# ----------------------------------------------------------------------------------------------- NER
@dataclasses.dataclass
class NERExample:
    words: list[str]
    tags: list[int]
    line: int  # line of the first word
    doc: int = 0  # document index in the file (-DOCSTART- lines separate documents)


def read_conll(path: str | Path, labels: Sequence[str] = CONLL_LABELS, n_cols: int = 4) -> list[NERExample]:
    """CoNLL-2003 column format: ``word POS chunk NER`` per line, blank lines between sentences,
    ``-DOCSTART-`` lines between documents. The NER tag is the last column."""
    path = Path(path)
    out: list[NERExample] = []
    words: list[str] = []
    tags: list[int] = []
    first, doc = 0, -1
    for i, raw in enumerate(read_text(path).split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            if words:
                out.append(NERExample(words, tags, first, max(doc, 0)))
            words, tags = [], []
            continue
        cols = line.split()
        if cols[0] == "-DOCSTART-":
            doc += 1
            continue
        if len(cols) != n_cols:
            raise DataError(f"{path}:{i}: expected {n_cols} space-separated columns (word POS chunk NER), "
                            f"got {len(cols)}")
        if cols[-1] not in labels:
            raise DataError(f"{path}:{i}: unknown label {cols[-1]!r}; expected one of {list(labels)}")
        if not words:
            first = i
        words.append(cols[0])
        tags.append(list(labels).index(cols[-1]))
    if words:
        out.append(NERExample(words, tags, first, max(doc, 0)))
    return out


# ------------------------------------------------------------------------------------------------ QA
@dataclasses.dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[str]
    answer_starts: list[int]


def read_squad(path: str | Path) -> list[QAExample]:
    """SQuAD v1.1 JSON: data -> paragraphs -> (context, qas -> (id, question, answers))."""
    path = Path(path)
    text = read_text(path)
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None

    def line_of(qid: str) -> int:  # JSON has no row numbers; find where the question's id is written
        pos = text.find(f'"{qid}"')
        return text.count("\n", 0, pos) + 1 if pos >= 0 else 0

    out = []
    for article in d.get("data", []) if isinstance(d, dict) else []:
        for para in article.get("paragraphs", []):
            ctx = para.get("context")
            for qa in para.get("qas", []):
                qid = str(qa.get("id", "?"))
                where = f"{path}:{line_of(qid)} (question id {qid})"
                if not isinstance(ctx, str) or not ctx.strip():
                    raise DataError(f"{where}: empty context")
                q = qa.get("question")
                if not isinstance(q, str) or not q.strip():
                    raise DataError(f"{where}: empty question")
                texts, starts = [], []
                for a in qa.get("answers", []):
                    t, s = a.get("text"), a.get("answer_start")
                    if not isinstance(t, str) or not t or not isinstance(s, int):
                        raise DataError(f"{where}: an answer needs non-empty 'text' and an integer 'answer_start'")
                    if ctx[s:s + len(t)] != t:
                        raise DataError(f"{where}: answer {t!r} is not at answer_start={s} of the context")
                    texts.append(t)
                    starts.append(s)
                out.append(QAExample(qid, q.strip(), ctx, texts, starts))
    if not out:
        raise DataError(f"{path}: no questions found (expected SQuAD v1.1 JSON: data -> paragraphs -> qas)")
    return out


def load_split(task: str | TaskSpec, split: str, data_dir: str | Path | None = None, val_size: int = 0) -> list:
    """Examples of one split of a task, from ``data_dir`` (a folder, or a file) or the data root;
    ``sentences`` / ``heldout-docs`` are the val splits carved from train (``data.splits``)."""
    spec = get_task(task) if isinstance(task, str) else task
    if split in ("sentences", "heldout-docs"):
        return load_train_val(spec, data_dir, split, val_size)[1]
    path = split_file(spec, split, data_dir)
    if spec.fmt == "tsv":
        out = read_tsv(spec, path)
    elif spec.fmt == "jsonl":
        out = read_jsonl(spec, path)
    elif spec.fmt == "conll":
        out = read_conll(path, spec.labels)
    else:
        out = read_squad(path)
    if not out:  # an empty split would otherwise train zero examples forever or score nothing
        where = f"{path}:1: header only" if spec.fmt == "tsv" and spec.header else f"{path}: empty"
        raise DataError(f"{where}, no examples (the {split} split of {spec.name} needs at least one)")
    return out


def load_train_val(spec: TaskSpec, data_dir: str | Path | None = None, val_split: str = "val",
                   val_size: int = 0) -> tuple[list, list]:
    """(train, val): the shipped val file, or a val carved from train and removed from it."""
    from .splits import carve

    train = load_split(spec, "train", data_dir)
    if val_split == "val":
        return train, load_split(spec, "val", data_dir)
    return carve(spec.name, val_split, train, val_size)


# ------------------------------------------------------------------------------------- tokenisation
def _backend(tokenizer, max_length: int, **trunc):
    """A private copy of the raw ``tokenizers.Tokenizer`` with our truncation and no padding
    (sentence-transformers' tokenizer.json pads every input to 128)."""
    b = getattr(tokenizer, "backend", tokenizer)
    b = type(b).from_str(b.to_str())
    b.no_padding()
    b.enable_truncation(max_length, **trunc)
    return b


def encode_text(tokenizer, examples: Sequence[TextExample], max_length: int = 128) -> list[dict]:
    """[CLS] A [SEP] (B [SEP]) with segment ids; pairs are truncated longest-first."""
    tok = _backend(tokenizer, max_length, strategy="longest_first")
    singles = [e.text_a for e in examples if e.text_b is None]
    if singles and len(singles) != len(examples):
        raise ValueError("mixed single sentences and pairs in one split")
    inputs = singles if singles else [(e.text_a, e.text_b) for e in examples]
    encs = tok.encode_batch(inputs, add_special_tokens=True)
    return [{"input_ids": en.ids, "token_type_ids": en.type_ids, "label": ex.label} for en, ex in zip(encs, examples)]


def align_labels(word_ids: Sequence[int | None], word_labels: Sequence[int]) -> list[int]:
    """Each word's label on its first sub-token; -100 on later sub-tokens and special tokens."""
    out, prev = [], None
    for w in word_ids:
        out.append(-100 if w is None or w == prev else word_labels[w])
        prev = w
    return out


# A word's capitalisation class, which an uncased tokenizer (MiniLM, BERT-uncased) throws away and
# NER needs ("Apple" vs "apple", "US" vs "us"). 0 marks special tokens and padding.
WORD_SHAPES = ("none", "lower", "Capitalised", "UPPER", "miXed", "digit", "punct")


def word_shape(word: str) -> int:
    """The :data:`WORD_SHAPES` class of a word: any digit -> digit; no letter -> punct; else by its
    letters: all lower, first upper and the rest lower ("Paris", "I"), all upper ("EU"), mixed."""
    if any(c.isdigit() for c in word):
        return 5
    letters = [c for c in word if c.isalpha()]
    if not letters:
        return 6
    if all(c.islower() for c in letters):
        return 1
    if letters[0].isupper() and all(c.islower() for c in letters[1:]):
        return 2
    return 3 if all(c.isupper() for c in letters) else 4


def encode_ner(tokenizer, examples: Sequence[NERExample], max_length: int = 128) -> list[dict]:
    """Sub-tokens with each word's label on its first piece and each word's shape on all of its
    pieces (``shape_ids``, read only by a model built with word shapes)."""
    tok = _backend(tokenizer, max_length)
    encs = tok.encode_batch([e.words for e in examples], is_pretokenized=True, add_special_tokens=True)
    out = []
    for en, ex in zip(encs, examples):
        shapes = [word_shape(w) for w in ex.words]
        out.append({"input_ids": en.ids, "token_type_ids": en.type_ids, "labels": align_labels(en.word_ids, ex.tags),
                    "shape_ids": [0 if w is None else shapes[w] for w in en.word_ids],
                    "word_ids": en.word_ids, "n_words": len(ex.words)})
    return out


def word_predictions(pred_ids: Sequence[int], word_ids: Sequence[int | None], n_words: int,
                     default: int = 0) -> list[int]:
    """Token predictions -> one per word (its first sub-token); words cut off by truncation get
    ``default`` (label 0, "O")."""
    out = [default] * n_words
    seen = set()
    for p, w in zip(pred_ids, word_ids):
        if w is not None and w not in seen:
            out[w] = int(p)
            seen.add(w)
    return out


def prepare_qa_features(tokenizer, examples: Sequence[QAExample], max_length: int = 384, stride: int = 128,
                        train: bool = True) -> list[dict]:
    """Question + context windows. Each feature: input_ids, token_type_ids, ``offsets`` (character
    span in the context for context tokens, None elsewhere), ``example`` (index) and, for
    training, ``start_positions``/``end_positions`` (token indices; 0 = [CLS] when the window
    does not hold the first answer)."""
    # A window holds the question, the specials (<= 4: RoBERTa's <s> q </s></s> c </s>) and more
    # context than the stride; longer questions are cut, as BERT's run_squad.py cuts them to
    # max_query_length (otherwise the tokenizer aborts the process).
    max_query = max_length - stride - 5
    if max_query < 1:
        raise ValueError(f"QA windows of max_length {max_length} leave no room for a question and more context "
                         f"than the stride ({stride}); raise --max-length or lower --stride")
    tok = _backend(tokenizer, max_length, stride=stride, strategy="only_second")
    query = _backend(tokenizer, max_query)
    feats = []
    for k, ex in enumerate(examples):
        q = query.encode(ex.question, add_special_tokens=False)
        question = ex.question[:q.offsets[-1][1]] if q.overflowing and q.offsets else ex.question
        first = tok.encode(question, ex.context, add_special_tokens=True)
        for en in [first, *first.overflowing]:
            seq = en.sequence_ids
            offsets = [tuple(o) if s == 1 else None for o, s in zip(en.offsets, seq)]
            f = {"input_ids": en.ids, "token_type_ids": en.type_ids, "offsets": offsets, "example": k}
            if train:
                s_tok = e_tok = 0
                if ex.answers:
                    a0 = ex.answer_starts[0]
                    a1 = a0 + len(ex.answers[0])
                    ctx = [i for i, o in enumerate(offsets) if o is not None]
                    if ctx and offsets[ctx[0]][0] <= a0 and offsets[ctx[-1]][1] >= a1:
                        s_tok = next(i for i in ctx if offsets[i][1] > a0)
                        e_tok = next(i for i in reversed(ctx) if offsets[i][0] < a1)
                f["start_positions"], f["end_positions"] = s_tok, e_tok
            feats.append(f)
    return feats


def postprocess_qa(examples: Sequence[QAExample], features: Sequence[dict], start_logits, end_logits,
                   n_best: int = 20, max_answer_length: int = 30) -> tuple[dict[str, str], dict[str, list]]:
    """Best answer text per question id, and the n-best (text, score) lists.

    A span (i, j) is valid when both ends are context tokens of the same window, j >= i and
    j - i + 1 <= max_answer_length; its score is start_logit[i] + end_logit[j]."""
    by_example: dict[int, list[int]] = {}
    for fi, f in enumerate(features):
        by_example.setdefault(f["example"], []).append(fi)
    preds, nbest = {}, {}
    for k, ex in enumerate(examples):
        cands = []
        for fi in by_example.get(k, []):
            offs = features[fi]["offsets"]
            s_log = torch.as_tensor(start_logits[fi], dtype=torch.float32)[: len(offs)]
            e_log = torch.as_tensor(end_logits[fi], dtype=torch.float32)[: len(offs)]
            top_s = torch.topk(s_log, min(n_best, len(offs))).indices.tolist()
            top_e = torch.topk(e_log, min(n_best, len(offs))).indices.tolist()
            for i in top_s:
                for j in top_e:
                    if offs[i] is None or offs[j] is None or j < i or j - i + 1 > max_answer_length:
                        continue
                    cands.append((float(s_log[i] + e_log[j]), ex.context[offs[i][0]:offs[j][1]]))
        cands.sort(key=lambda c: -c[0])
        nbest[ex.id] = [(t, s) for s, t in cands[:n_best]]
        preds[ex.id] = cands[0][1] if cands else ""
    return preds, nbest


def collate(features: Sequence[dict], pad_id: int, keys: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Pads input_ids/token_type_ids (per-token ``labels`` with -100, ``shape_ids`` with 0) to the
    batch's longest row."""
    n = max(len(f["input_ids"]) for f in features)
    b = len(features)
    ids = torch.full((b, n), pad_id, dtype=torch.long)
    tt = torch.zeros(b, n, dtype=torch.long)
    mask = torch.zeros(b, n, dtype=torch.long)
    for r, f in enumerate(features):
        m = len(f["input_ids"])
        ids[r, :m] = torch.tensor(f["input_ids"])
        tt[r, :m] = torch.tensor(f["token_type_ids"])
        mask[r, :m] = 1
    out = {"input_ids": ids, "token_type_ids": tt, "attention_mask": mask}
    if "shape_ids" in features[0]:  # NER word shapes; padding is class 0 like the special tokens
        shapes = torch.zeros(b, n, dtype=torch.long)
        for r, f in enumerate(features):
            shapes[r, :len(f["shape_ids"])] = torch.tensor(f["shape_ids"])
        out["shape_ids"] = shapes
    for k in keys:
        if k == "labels":
            lab = torch.full((b, n), -100, dtype=torch.long)
            for r, f in enumerate(features):
                lab[r, :len(f["labels"])] = torch.tensor(f["labels"])
            out[k] = lab
        elif k == "label":
            vals = [f["label"] for f in features]
            out["labels"] = torch.tensor(vals, dtype=torch.float32 if isinstance(vals[0], float) else torch.long)
        else:
            out[k] = torch.tensor([f[k] for f in features], dtype=torch.long)
    return out


def encode_split(spec: TaskSpec, tokenizer, examples: Sequence, max_length: int = 128, stride: int = 128) -> list[dict]:
    """A split's model inputs: one feature per example (sentence tasks, NER) or per context
    window (QA; windows carry their answer positions so a val loss can be computed too)."""
    if spec.kind == "seq_cls":
        return encode_text(tokenizer, examples, max_length)
    if spec.kind == "token_cls":
        return encode_ner(tokenizer, examples, max_length)
    return prepare_qa_features(tokenizer, examples, max_length=max_length, stride=min(stride, max_length // 2),
                               train=True)


def label_keys(kind: str) -> list[str]:
    """The feature keys :func:`collate` turns into label tensors for a task kind."""
    return {"seq_cls": ["label"], "token_cls": ["labels"], "qa": ["start_positions", "end_positions"]}[kind]
