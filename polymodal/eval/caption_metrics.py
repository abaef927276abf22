"""Image-captioning metrics through pycocoevalcap, the code of the COCO caption evaluation
server (Chen et al., 2015, "Microsoft COCO Captions: Data Collection and Evaluation Server").

* BLEU-1..4 (Papineni et al., 2002): corpus-level modified n-gram precision with the brevity
  penalty computed against the closest reference length;
* METEOR 1.5 (Denkowski & Lavie, 2014): unigram alignment with stems, synonyms and
  paraphrases, F-mean with a fragmentation penalty (the Java scorer, ``-l en -norm``);
* ROUGE-L (Lin, 2004): the longest common subsequence F-measure with beta = 1.2, maximised
  over the references;
* CIDEr-D (Vedantam et al., 2015, eq. 2-4): the mean over n = 1..4 of the TF-IDF weighted
  n-gram cosine with a Gaussian length penalty (sigma = 6), x 10; the document frequencies
  are those of the evaluated set's references.

Every caption first goes through the Stanford PTB tokenizer (lower-cased, punctuation tokens
dropped), as on the server. The tokenizer and METEOR run on Java (``apt-get install
default-jre-headless``). Without Java, ``tokenizer="auto"`` falls back to ``simple_tokenize``, a
Python version of that tokenization (identical on ordinary captions), and METEOR is left out
(``None``) with a warning; the result says which tokenizer was used.
"""
from __future__ import annotations

import functools
import re
import shutil
import warnings
from typing import Hashable, Literal, Mapping, Sequence

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS: the tokens the server drops after tokenizing
_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def _require():
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise ImportError("caption metrics need pycocoevalcap: pip install pycocoevalcap") from None


def java_available() -> bool:
    return shutil.which("java") is not None


# -- tokenization --------------------------------------------------------------------------
def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """{key: [caption, ...]} -> the same, PTB-tokenized by pycocoevalcap (Java)."""
    _require()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not java_available():
        raise RuntimeError("the PTB tokenizer needs Java: apt-get install -y default-jre-headless")
    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


# Stanford PTBTokenizer (-lowerCase) rules that matter for captions: contractions split off
# ("dog's" -> "dog 's", "isn't" -> "is n't"), brackets become -lrb-/-rrb- (kept: the server's
# punctuation list is upper-case), quotes become `` / '' and punctuation marks become tokens.
_CONTRACTION = re.compile(r"(?i)(\w)('s|'re|'ve|'ll|'d|'m|n't)\b")
_SPLIT_WORDS = re.compile(r"\b(can)(not)\b|\b(gon|wan|got)(na|ta)\b")  # PTB: "cannot" -> "can not"
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "mt", "ft", "co", "inc", "ave"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_TOKEN = re.compile(r"""
    \.\.\.|--                                   # ellipsis, dash
  | (?:[a-z]\.){2,}                             # abbreviations with inner periods: u.s.
  | \d+(?:[.,]\d+)+                             # numbers with separators: 3.5, 1,000
  | [\w@&]+(?:[-'/.@&][\w@&]+)*                 # words, hyphenated words, e-mails
  | n't|'(?:s|re|ve|ll|d|m)\b                   # split-off contractions
  | -[lr][rsc]b-                                # bracket tokens
  | \S                                          # any other symbol on its own
""", re.VERBOSE)


def simple_tokenize(text: str) -> str:
    """A Python approximation of the server's tokenization (PTB, lower-cased, punctuation
    dropped), used when Java is missing. Ordinary captions tokenize exactly as with PTB."""
    s = text.replace("\n", " ").lower()
    s = _CONTRACTION.sub(lambda m: f"{m.group(1)} {m.group(2)}", s)
    s = _SPLIT_WORDS.sub(lambda m: " ".join(g for g in m.groups() if g), s)
    for b, tok in _BRACKETS.items():
        s = s.replace(b, f" {tok} ")
    s = s.replace('"', " '' ")
    tokens = _TOKEN.findall(s)
    out = []
    for i, t in enumerate(tokens):
        # PTB keeps the period of a known abbreviation ("st. mary", "mr. smith")
        if t in _ABBREVIATIONS and i + 1 < len(tokens) and tokens[i + 1] == ".":
            out.append(t + ".")
            tokens[i + 1] = ""
        else:
            out.append(t)
    return " ".join(t for t in out if t and t not in _PUNCT)


def _tokenize(captions: Mapping[Hashable, Sequence[str]], tokenizer: str) -> dict[Hashable, list[str]]:
    if tokenizer == "ptb":
        return ptb_tokenize(captions)
    if tokenizer == "simple":
        return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}
    if tokenizer == "none":
        return {k: list(v) for k, v in captions.items()}
    raise ValueError(f"tokenizer must be 'auto', 'ptb', 'simple' or 'none', got {tokenizer!r}")


# -- scoring -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def meteor_scorer():
    """One pycocoevalcap ``Meteor`` (a Java process) per Python process: it takes ~10 s to load
    its paraphrase table, so every later call reuses it."""
    _require()
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def _check(predictions: Mapping, references: Mapping) -> None:
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [k for k in predictions if k not in references]
    if missing:
        raise ValueError(f"{len(missing)} prediction(s) have no references, e.g. key {missing[0]!r}")
    for k in predictions:
        if isinstance(predictions[k], (list, tuple)):
            raise ValueError(f"prediction {k!r}: expected one caption string, got a {type(predictions[k]).__name__}")
        if isinstance(references[k], str) or not references[k]:
            raise ValueError(f"references of {k!r}: expected a non-empty list of captions")


def score_captions(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                   tokenizer: Literal["auto", "ptb", "simple", "none"] = "auto", meteor: bool | None = None,
                   per_image: bool = False) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of one generated caption per image against that
    image's references, exactly as pycocoevalcap's ``COCOEvalCap`` computes them (0-1 scale;
    CIDEr is 0-10).

    Args:
        predictions: {image key: generated caption}.
        references: {image key: [reference captions]} (extra keys are ignored).
        tokenizer: "ptb" (Java), "simple" (Python), "none" (already tokenized), or "auto":
            PTB when Java is available, else simple.
        meteor: compute METEOR (Java); None = when Java is available.
        per_image: also return each image's BLEU-4, METEOR, ROUGE-L and CIDEr.
    Returns:
        {"BLEU-1": ..., ..., "CIDEr": ..., "n_images": n, "tokenizer": name[, "per_image": {key: {...}}]}
    """
    _require()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check(predictions, references)
    keys = list(predictions)
    if tokenizer == "auto":
        tokenizer = "ptb" if java_available() else "simple"
    if meteor is None:
        meteor = java_available()
        if not meteor:
            warnings.warn("Java not found: METEOR is left out (apt-get install -y default-jre-headless)", stacklevel=2)
    # one tokenizer call for both sides (one Java start); keys tagged so they cannot collide
    both = _tokenize({**{("res", k): [str(predictions[k])] for k in keys},
                      **{("gts", k): [str(c) for c in references[k]] for k in keys}}, tokenizer)
    res = {i: both[("res", k)] for i, k in enumerate(keys)}
    gts = {i: both[("gts", k)] for i, k in enumerate(keys)}
    out: dict = {}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        out[f"BLEU-{n + 1}"] = float(bleu[n])
    m, m_each = meteor_scorer().compute_score(gts, res) if meteor else (None, None)
    out["METEOR"] = None if m is None else float(m)
    r, r_each = Rouge().compute_score(gts, res)
    out["ROUGE-L"] = float(r)
    c, c_each = Cider().compute_score(gts, res)
    out["CIDEr"] = float(c)
    out["n_images"] = len(keys)
    out["tokenizer"] = tokenizer
    if per_image:
        out["per_image"] = {k: {"BLEU-4": float(bleu_each[3][i]),
                                "METEOR": None if m_each is None else float(m_each[i]),
                                "ROUGE-L": float(r_each[i]), "CIDEr": float(c_each[i])}
                            for i, k in enumerate(keys)}
    return out


def format_caption_metrics(m: Mapping) -> str:
    """One line: BLEU-1..4, METEOR, ROUGE-L, CIDEr."""
    return "  ".join(f"{k} {m[k]:.4f}" if m.get(k) is not None else f"{k} n/a" for k in METRICS)


def load_references(spec, image_root=None) -> dict[str, list[str]]:
    """{image file name: reference captions} from a Flickr8k-format folder (every split), a
    COCO-captions .json, or a text file of ``<image>[#k]<TAB><caption>`` lines."""
    from pathlib import Path

    from ..data.captions import load_captions
    from ..data.textio import read_utf8

    p = Path(spec)
    refs: dict[str, list[str]] = {}
    if p.is_dir() or p.suffix.lower() == ".json":
        for r in load_captions(p, "all", image_root):
            refs.setdefault(r.image.name, []).extend(r.captions)
        return refs
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such references file or folder")
    for n, line in enumerate(read_utf8(p).splitlines(), 1):
        if not line.strip():
            continue
        key, sep, cap = line.partition("\t")
        if not sep or not cap.strip():
            raise ValueError(f"{p}:{n}: expected '<image>[#k]<TAB><caption>', got {line[:80]!r}")
        refs.setdefault(Path(key.split("#")[0].strip()).name, []).append(cap.strip())
    if not refs:
        raise ValueError(f"{p}: no reference captions")
    return refs
