"""Scoring a seq2seq model by what it generates: decode sources, compare with the references.

* translation: corpus BLEU (Papineni et al. 2002) and chrF (Popovic 2015) through sacreBLEU;
* summarisation: ROUGE-1/2/L F1 (Lin 2004) through rouge-score, beside the lead-3 baseline
  (See et al. 2017), the extractive summary a model has to beat.

(``polymodal.eval.text_metrics`` holds the metric calls; this module adds the decoding.)
"""
from __future__ import annotations

from typing import Sequence

from .text_metrics import bleu_chrf, lead_n, rouge


def score_generation(task: str, hypotheses: Sequence[str], references: Sequence[str],
                     sources: Sequence[str] | None = None) -> dict[str, float]:
    """BLEU + chrF for "translate"; ROUGE (and, given the articles, lead-3's ROUGE) for "summarize"."""
    if task == "translate":
        return bleu_chrf(hypotheses, references)
    if task == "summarize":
        out = rouge(hypotheses, references)
        if sources is not None:
            out.update({f"lead3_{k}": v for k, v in rouge([lead_n(s, 3) for s in sources], references).items()})
        return out
    raise ValueError(f"unknown seq2seq task {task!r}: expected 'translate' or 'summarize'")


def evaluate_seq2seq(model, tokenizer, pairs: Sequence[tuple[str, str]], task: str, *, num_beams: int = 4,
                     max_new_tokens: int = 64, max_src_len: int = 128, batch_size: int = 32,
                     no_repeat_ngram_size: int = 0) -> tuple[dict[str, float], list[str]]:
    """(scores, hypotheses) of ``model`` decoding the sources of ``pairs`` (beam search, the
    package's one decoder)."""
    from ..generate.seq2seq import generate_seq2seq_texts

    if not pairs:
        raise ValueError("no pairs to score")
    sources, refs = [s for s, _ in pairs], [t for _, t in pairs]
    hyps = generate_seq2seq_texts(model, tokenizer, sources, max_new_tokens=max_new_tokens, max_src_len=max_src_len,
                                  batch_size=batch_size, num_beams=num_beams, do_sample=False,
                                  no_repeat_ngram_size=no_repeat_ngram_size)
    return score_generation(task, hyps, refs, sources), hyps
