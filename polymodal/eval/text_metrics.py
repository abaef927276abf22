"""Translation and summarisation metrics from the reference libraries, and the lead-3 baseline.

* BLEU (Papineni et al., 2002) and chrF (Popovic, 2015) through sacreBLEU, the reference
  implementation with standard tokenisation, so scores are comparable across papers.
* ROUGE-1/2/L F1 (Lin, 2004) through Google's ``rouge-score`` with the Porter stemmer.
* Lead-3 (See et al., 2017): the first three sentences of the article as its summary, the
  extractive baseline a summariser has to beat.
"""
from __future__ import annotations

import re
from typing import Literal, Sequence
from ..data.textio import read_lines  # noqa: F401 - re-exported


def bleu_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (0-100) of one hypothesis per reference."""
    import sacrebleu

    _same_length(hypotheses, references)
    return {"bleu": sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score,
            "chrf": sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score}


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (0-100) with stemming."""
    from rouge_score import rouge_scorer

    _same_length(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hyp, ref in zip(hypotheses, references):
        for name, score in scorer.score(ref, hyp).items():  # rouge-score takes (target, prediction)
            totals[name] += score.fmeasure
    n = max(len(references), 1)
    return {k: 100.0 * v / n for k, v in totals.items()}


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'A-Z0-9])")


def lead_n(article: str, n: int = 3) -> str:
    """The first ``n`` sentences of the article body (a BBC headline line is skipped)."""
    paragraphs = [p.strip() for p in article.strip().split("\n") if p.strip()]
    if len(paragraphs) > 1 and not re.search(r"[.!?]$", paragraphs[0]):
        paragraphs = paragraphs[1:]  # the first line of a BBC article is its title
    sentences = [s for p in paragraphs for s in _SENTENCE_END.split(p) if s]
    return " ".join(sentences[:n])


def _same_length(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references: they must align line by line")


def bleu_signature(hypotheses: Sequence[str], references: Sequence[str]) -> str:
    """sacreBLEU's signature for the corpus BLEU above (references, tokenizer, smoothing, version),
    so a reported BLEU can be compared with another paper's."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    bleu.corpus_score(list(hypotheses), [list(references)])
    return str(bleu.get_signature())
