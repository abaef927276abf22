"""Validation splits that look like the official test sets (issue 21), carved from the train files.

The shipped ``val`` files flatter: SST-2's ``val.tsv`` is 872 random rows of GLUE's train set, most
of them short phrases whose parent sentences are in training, while GLUE's dev set is 872 whole
sentences of other reviews; CoNLL-2003's ``val.txt`` is 47 random documents of eng.train, while
eng.testb is later news with more unseen entities. Two deterministic alternatives:

* ``sentences`` (SST-2). GLUE's SST-2 train set is every sentiment-bearing phrase of the SST
  training parse trees, deduplicated, so a *whole sentence* is a row that is not a word span of
  any other row (a tree root; 6,904 of the 66,477 rows of the shipped train.tsv, 19.3 words on
  average, like the dev set's 19.5). The val set is ``n`` of them (default 872, dev's size) drawn
  with ``random.Random(0)`` from the distinct whole sentences in file order. Training keeps a row
  only if it is a word span of a whole sentence that is NOT held out: the held-out sentences and
  every phrase found only inside them leave training, while a phrase shared with a training
  sentence stays, exactly as for GLUE's dev sentences, whose own phrases were never in train.
* ``heldout-docs`` (CoNLL-2003): the last ``n`` documents of train.txt (default 100, about 1,250
  sentences and 10% of the tokens; ``-DOCSTART-`` lines separate documents) are the val set and
  leave training. The end of eng.train is its latest news, the nearest to testb's.

Neither depends on ``--seed``: a split is a property of the data, not of a training run.
"""
from __future__ import annotations

import random
from typing import Sequence

VAL_SPLITS = ("val", "sentences", "heldout-docs")
DEFAULT_SIZES = {"sentences": 872, "heldout-docs": 100}
_SPLIT_TASK = {"sentences": "sst2", "heldout-docs": "conll2003"}


def _spans(words: Sequence[str]):
    """Every contiguous word span of a row except the whole row, as text."""
    n = len(words)
    for i in range(n):
        for j in range(i + 1, n + 1 if i else n):
            yield " ".join(words[i:j])


def whole_sentences(texts: Sequence[str]) -> list[bool]:
    """Per row: True when its text is not a word span of another row (SST-2: a parse-tree root)."""
    norm = [" ".join(t.split()) for t in texts]
    rows = set(norm)
    inside: set[str] = set()
    for t in rows:
        inside.update(s for s in _spans(t.split()) if s in rows)
    return [t not in inside for t in norm]


def sentence_split(examples: Sequence, n: int = 872, seed: int = 0) -> tuple[list, list]:
    """(train, val) of a single-sentence task: ``n`` whole sentences held out, with the phrases
    found only inside them (see the module docstring). ``examples`` carry ``.text_a``."""
    texts = [" ".join(e.text_a.split()) for e in examples]
    whole = whole_sentences(texts)
    first: dict[str, int] = {}
    for i, (t, w) in enumerate(zip(texts, whole)):
        if w and t not in first:
            first[t] = i
    candidates = sorted(first, key=first.get)
    if n >= len(candidates):
        raise ValueError(f"--val-size {n}: only {len(candidates)} whole sentences in the training file; "
                         "hold out fewer so some stay for training")
    held = set(random.Random(seed).sample(candidates, n))
    rows = set(texts)
    keep: set[str] = set()
    for t in candidates:
        if t not in held:
            keep.add(t)
            keep.update(s for s in _spans(t.split()) if s in rows)
    val = [examples[first[t]] for t in candidates if t in held]
    train = [e for e, t in zip(examples, texts) if t in keep]
    return train, val


def heldout_docs(examples: Sequence, n: int = 100) -> tuple[list, list]:
    """(train, val) of a CoNLL file: its last ``n`` documents (``.doc``) held out."""
    docs = sorted({e.doc for e in examples})
    if n >= len(docs):
        raise ValueError(f"--val-size {n}: the training file has only {len(docs)} documents "
                         "(-DOCSTART- lines); hold out fewer so some stay for training")
    cut = docs[-n]
    return [e for e in examples if e.doc < cut], [e for e in examples if e.doc >= cut]


def carve(task: str, split: str, train: Sequence, n: int = 0) -> tuple[list, list]:
    """(train, val) for ``--val-split`` ``split`` of task ``task`` (``n`` = 0: the default size)."""
    if split not in _SPLIT_TASK:
        raise ValueError(f"--val-split must be one of {', '.join(VAL_SPLITS)}, got {split!r}")
    if task != _SPLIT_TASK[split]:
        raise ValueError(f"--val-split {split} is for --task {_SPLIT_TASK[split]}, not {task}")
    if n < 0:
        raise ValueError(f"--val-size must be >= 0 (0 = {DEFAULT_SIZES[split]}), got {n}")
    n = n or DEFAULT_SIZES[split]
    return sentence_split(train, n) if split == "sentences" else heldout_docs(train, n)
