"""Visual question answering data sets: easy-VQA, DAQUAR and the VQAv2 JSON pair.

Every loader returns ``VQAExample(image, question, answers, qid)``: ``answers`` holds one
string for the single-answer sets (easy-VQA, DAQUAR; scored by exact match) and the ten
human answers for VQAv2 (scored with the soft accuracy min(#humans/3, 1) of Antol et al.,
2015, see ``polymodal.eval.vqa``).

Formats
-------
* easy-VQA (Zhou, 2019): a folder with ``<split>_questions.json`` (a JSON list of
  ``[question, answer, image_id]``) and ``images/<image_id>.png`` (our ``../shared`` copy), or
  the source repository's layout ``<split>/questions.json`` + ``<split>/images/<id>.png``.
* DAQUAR (Malinowski & Fritz, 2014), as re-packaged by tezansahu/VQA-With-Multimodal-Transformers:
  a folder with ``<split>_qa.csv`` (columns ``question,answer,image_id``) and
  ``images/<image_id>.jpg``. Some answers are lists ("black, white"): one answer string.
* VQAv2 (Goyal et al., 2017): ``..._questions.json`` ``{"data_subtype": "val2014",
  "questions": [{"question_id", "image_id", "question"}]}`` and ``..._annotations.json``
  ``{"annotations": [{"question_id", "answers": [{"answer", ...}] * 10, ...}]}``; images are
  ``COCO_<subtype>_<image_id:012d>.jpg`` under ``image_root``. The annotations file is found
  beside the questions file (same subtype, "annotations" in the name) or passed explicitly.

Bad input raises ``ValueError``/``FileNotFoundError`` naming the file and the line (CSV) or
entry index (JSON).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Sequence

from .textio import read_utf8


@dataclasses.dataclass
class VQAExample:
    image: Path
    question: str
    answers: list[str]
    qid: str


def _read_json(path: Path):
    try:
        return json.loads(read_utf8(path))  # a bad byte: "path:LINE: not valid UTF-8"
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None


def _check_image(image: Path, where: str, seen: dict[Path, bool]) -> Path:
    """Fails early, naming the entry, instead of deep inside a training batch."""
    if image not in seen:
        seen[image] = image.is_file()
    if not seen[image]:
        raise FileNotFoundError(f"{where}: image {image} not found")
    return image


def _question(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: empty question")
    return value.strip()


def _answer(value, where: str) -> str:
    if not isinstance(value, (str, int, float)) or not str(value).strip():
        raise ValueError(f"{where}: empty answer")
    return str(value).strip()


# -- easy-VQA -----------------------------------------------------------------------------
def load_easy_vqa(root: str | Path, split: str = "train") -> list[VQAExample]:
    """easy-VQA folder -> examples of ``split`` (train | val, or test in the source layout)."""
    root = Path(root)
    flat = root / f"{split}_questions.json"
    nested = root / split / "questions.json"
    if flat.is_file():
        qpath, image_dir = flat, root / "images"
    elif nested.is_file():
        qpath, image_dir = nested, root / split / "images"
    else:
        raise FileNotFoundError(f"{root}: no {flat.name} (or {split}/questions.json) for split {split!r}")
    rows = _read_json(qpath)
    if not isinstance(rows, list):
        raise ValueError(f"{qpath}: expected a JSON list of [question, answer, image_id]")
    if not rows:
        raise ValueError(f"{qpath}: empty split, no questions")
    seen: dict[Path, bool] = {}
    out = []
    for i, row in enumerate(rows):
        where = f"{qpath}: entry {i}"
        if not isinstance(row, (list, tuple)) or len(row) != 3:
            raise ValueError(f"{where}: expected [question, answer, image_id], got {str(row)[:80]}")
        q, a, img = row
        if not isinstance(img, int) and not (isinstance(img, str) and img.strip()):
            raise ValueError(f"{where}: missing image_id")
        image = _check_image(image_dir / f"{img}.png", where, seen)
        out.append(VQAExample(image, _question(q, where), [_answer(a, where)], f"{split}-{i}"))
    return out


# -- DAQUAR -------------------------------------------------------------------------------
def load_daquar(root: str | Path, split: str = "train") -> list[VQAExample]:
    """DAQUAR folder (``<split>_qa.csv`` + ``images/``) -> examples of ``split``."""
    root = Path(root)
    path = root / f"{split}_qa.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (DAQUAR split {split!r})")
    seen: dict[Path, bool] = {}
    out = []
    with io.StringIO(read_utf8(path), newline="") as f:
        reader = csv.DictReader(f)
        missing = {"question", "answer", "image_id"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}:1: header lacks column(s) {sorted(missing)} "
                             "(expected question,answer,image_id)")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            img = (row.get("image_id") or "").strip()
            if not img:
                raise ValueError(f"{where}: missing image_id")
            name = img if Path(img).suffix else f"{img}.jpg"
            image = _check_image(root / "images" / name, where, seen)
            out.append(VQAExample(image, _question(row.get("question"), where),
                                  [_answer(row.get("answer"), where)], f"{split}-{reader.line_num}"))
    if not out:
        raise ValueError(f"{path}:1: header only, no questions")
    return out


# -- VQAv2 --------------------------------------------------------------------------------
_SUBTYPE = re.compile(r"(train|val|test-dev|test)(\d{4})")


def _find_questions(folder: Path, split: str) -> Path:
    hits = sorted(p for p in folder.glob("*.json") if "question" in p.name and split in p.name)
    if len(hits) != 1:
        raise FileNotFoundError(f"{folder}: expected one VQAv2 questions JSON with {split!r} in its name, "
                                f"found {[p.name for p in hits]}")
    return hits[0]


def _find_annotations(qpath: Path, subtype: str) -> Path:
    """Beside the questions file: VQAv2's own names first, then any one '*annotations*' JSON of the subtype."""
    guess = qpath.with_name(re.sub(r"OpenEnded_|MultipleChoice_", "", qpath.name).replace("questions", "annotations"))
    if guess != qpath and guess.is_file():
        return guess
    hits = sorted(p for p in qpath.parent.glob("*.json") if "annotation" in p.name and subtype in p.name)
    if len(hits) != 1:
        hits = sorted(p for p in qpath.parent.glob("*.json") if "annotation" in p.name)
    if len(hits) != 1:
        raise FileNotFoundError(f"{qpath}: no single annotations JSON beside it "
                                f"(found {[p.name for p in hits]}); pass annotations=PATH")
    return hits[0]


def load_vqav2(questions: str | Path, annotations: str | Path | None = None,
               image_root: str | Path | None = None, split: str = "train") -> list[VQAExample]:
    """VQAv2 questions + annotations JSON -> one example per question, with all human answers."""
    qpath = Path(questions)
    qd = _read_json(qpath)
    if not isinstance(qd, dict) or not isinstance(qd.get("questions"), list):
        raise ValueError(f"{qpath}: a VQAv2 questions file needs a 'questions' list")
    if not qd["questions"]:
        raise ValueError(f"{qpath}: empty 'questions' list")
    subtype = qd.get("data_subtype")
    if not subtype:
        m = _SUBTYPE.search(qpath.name) or _SUBTYPE.search(split)
        subtype = m.group(0) if m else split
    apath = Path(annotations) if annotations else _find_annotations(qpath, subtype)
    ad = _read_json(apath)
    if not isinstance(ad, dict) or not isinstance(ad.get("annotations"), list):
        raise ValueError(f"{apath}: a VQAv2 annotations file needs an 'annotations' list")
    answers: dict = {}
    for i, a in enumerate(ad["annotations"]):
        where = f"{apath}: annotations[{i}]"
        if not isinstance(a, dict) or "question_id" not in a:
            raise ValueError(f"{where}: missing field 'question_id'")
        if not isinstance(a.get("answers"), list) or not a["answers"]:
            raise ValueError(f"{where}: missing field 'answers' (a list of {{'answer': ...}})")
        got = []
        for j, h in enumerate(a["answers"]):
            if not isinstance(h, dict) or "answer" not in h:
                raise ValueError(f"{where}: answers[{j}] missing field 'answer'")
            got.append(_answer(h["answer"], f"{where}: answers[{j}]"))
        answers[a["question_id"]] = got
    if image_root is None:
        image_root = next((d for d in (qpath.parent / subtype, qpath.parent / "images") if d.is_dir()), qpath.parent)
    image_root = Path(image_root)
    seen: dict[Path, bool] = {}
    out = []
    for i, q in enumerate(qd["questions"]):
        where = f"{qpath}: questions[{i}]"
        if not isinstance(q, dict):
            raise ValueError(f"{where}: expected an object")
        for field in ("question_id", "image_id", "question"):
            if field not in q:
                raise ValueError(f"{where}: missing field {field!r}")
        if q["question_id"] not in answers:
            raise ValueError(f"{where}: question_id {q['question_id']!r} has no entry in {apath}")
        try:
            name = f"COCO_{subtype}_{int(q['image_id']):012d}.jpg"
        except (TypeError, ValueError):
            raise ValueError(f"{where}: image_id {q['image_id']!r} is not an integer") from None
        image = _check_image(image_root / name, where, seen)
        out.append(VQAExample(image, _question(q["question"], where), answers[q["question_id"]],
                              str(q["question_id"])))
    return out


# -- dispatch -----------------------------------------------------------------------------
def detect_format(path: str | Path) -> str:
    """"easy_vqa", "daquar" or "vqav2" from what the path holds."""
    path = Path(path)
    if path.is_dir():
        if any(path.glob("*_questions.json")) or (path / "train" / "questions.json").is_file():
            if not any("annotation" in p.name for p in path.glob("*.json")):
                return "easy_vqa"
        if any(path.glob("*_qa.csv")):
            return "daquar"
        if any("question" in p.name for p in path.glob("*.json")):
            return "vqav2"
        raise FileNotFoundError(f"{path}: not an easy-VQA (<split>_questions.json), DAQUAR (<split>_qa.csv) "
                                "or VQAv2 (questions + annotations JSON) folder")
    if path.suffix.lower() == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        return "vqav2"
    raise FileNotFoundError(f"{path}: expected a VQA data folder or a VQAv2 questions .json")


def load_vqa(path: str | Path, split: str = "train", image_root: str | Path | None = None,
             annotations: str | Path | None = None) -> list[VQAExample]:
    """Examples of ``split`` from an easy-VQA folder, a DAQUAR folder, a VQAv2 questions JSON
    (annotations beside it or given) or a folder holding a VQAv2 pair per split."""
    path = Path(path)
    kind = detect_format(path)
    if kind == "easy_vqa":
        return load_easy_vqa(path, split)
    if kind == "daquar":
        return load_daquar(path, split)
    qpath = _find_questions(path, split) if path.is_dir() else path
    return load_vqav2(qpath, annotations, image_root, split)


def answer_space(examples: Sequence[VQAExample], min_count: int = 1) -> list[str]:
    """Normalised answers given at least ``min_count`` times, most frequent first: the label set
    of VQA as classification (``polymodal.eval.vqa.answer_vocab``)."""
    from ..eval.vqa import answer_vocab

    return answer_vocab([e.answers for e in examples], min_count)
