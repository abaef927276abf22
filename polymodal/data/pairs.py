"""Sentence pairs for sequence-to-sequence training: readers (Multi30k, BBC News Summary) and the
dynamic-padding collator.

Formats (any folder holding these files):

* translation (Multi30k, Elliott et al. 2016): ``{split}.{src_lang}`` and ``{split}.{tgt_lang}``,
  line i of one translating line i of the other;
* summarisation (BBC News Summary): ``{split}*.jsonl`` (``train_part1.jsonl``, ``train_part2.jsonl``,
  ``val.jsonl``), one JSON object per line with ``article`` and ``summary`` fields.

Every failure names the file and, where there is one, the line: two translation files of
different lengths (both named), a byte that is not UTF-8, a line that is not a JSON object with
the two fields, a split with no pairs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .tasks import iter_json_objects
from .textio import read_lines  # noqa: F401 - re-exported

IGNORE = -100  # label value the cross-entropy skips (padding)


def read_translation(data: str | Path, split: str, src_lang: str = "en", tgt_lang: str = "de") -> list[tuple[str, str]]:
    """(source, target) lines of ``{split}.{src_lang}`` / ``{split}.{tgt_lang}``."""
    data = Path(data)
    fs, ft = data / f"{split}.{src_lang}", data / f"{split}.{tgt_lang}"
    for f in (fs, ft):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: file not found (translation data is {{split}}.{{lang}} text files, "
                                    "line i of one translating line i of the other)")
    src, tgt = read_lines(fs), read_lines(ft)
    if len(src) != len(tgt):
        raise ValueError(f"{fs} has {len(src)} lines but {ft} has {len(tgt)}: the two files must be aligned "
                         "line by line")
    return list(zip(src, tgt))


def read_summaries(data: str | Path, split: str) -> list[tuple[str, str]]:
    """(article, summary) records of every ``{split}*.jsonl`` file of ``data`` (sorted by name)."""
    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"{data}: data folder not found")
    files = sorted(data.glob(f"{split}*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{data}: no {split}*.jsonl file (summarisation data is JSON lines with "
                                "'article' and 'summary' fields)")
    pairs = []
    for f in files:
        for n, rec in iter_json_objects(f, "\n".join(read_lines(f))):
            art, summ = rec.get("article"), rec.get("summary")
            if not isinstance(art, str) or not isinstance(summ, str):
                raise ValueError(f"{f}:{n}: needs string fields 'article' and 'summary' (has {sorted(rec)})")
            pairs.append((art, summ))
    return pairs


def read_pairs(data: str | Path, task: str, split: str, src_lang: str = "en", tgt_lang: str = "de") -> list[tuple[str, str]]:
    """The (source, target) pairs of one split for ``task`` "translate" or "summarize"; an empty
    split is an error (training or validating on nothing is never what was meant)."""
    if task == "translate":
        pairs = read_translation(data, split, src_lang, tgt_lang)
        where = f"{Path(data) / f'{split}.{src_lang}'}"
    elif task == "summarize":
        pairs = read_summaries(data, split)
        where = f"{Path(data) / f'{split}*.jsonl'}"
    else:
        raise ValueError(f"unknown seq2seq task {task!r}: expected 'translate' or 'summarize'")
    if not pairs:
        raise ValueError(f"{where}: the {split} split is empty (no pairs)")
    return pairs


def read_documents(path: str | Path) -> list[str]:
    """Inputs to summarise: a ``.jsonl`` file's ``article`` fields, else one document per line."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return read_lines(path)
    docs = []
    for n, rec in iter_json_objects(path, "\n".join(read_lines(path))):
        if not isinstance(rec.get("article"), str):
            raise ValueError(f"{path}:{n}: not a JSON object with an 'article' field (has {sorted(rec)})")
        docs.append(rec["article"])
    return docs


def encode_texts(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids + EOS, truncated to ``max_len`` tokens with the EOS kept (the model learns to stop)."""
    eos = tokenizer.eos_id
    return [tokenizer.encode(t)[: max_len - 1] + [eos] for t in texts]


def pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pads rows to the longest (dynamic padding: a batch is as long as its longest row)."""
    x = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return x


def pad_sources(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded source ids and their attention mask (1 = a real token). The mask comes from the
    lengths, not from ``ids != pad_id``: a literal "<pad>" in a text is a real token."""
    ids = pad(rows, pad_id)
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    return ids, mask


def collate_pairs(src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` (padding = -100, skipped by the loss)."""
    ids, mask = pad_sources(src, pad_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": pad(tgt, IGNORE)}
