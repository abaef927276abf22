"""``polymodal score-text``: BLEU/chrF (sacreBLEU) or ROUGE (rouge-score) of a file of outputs."""
from __future__ import annotations

import json as jsonlib
from typing import Literal


def score_text_cmd(hypotheses: str, references: str, metric: Literal["bleu", "rouge"] = "bleu",
                   json: bool = False) -> dict:
    """Scores a file of outputs against a file of references (one per line): BLEU and chrF, or ROUGE.

    Args:
        hypotheses: system outputs, one per line (e.g. from `polymodal translate` / `summarize`).
        references: references, one per line, aligned with the hypotheses.
        metric: bleu (sacreBLEU BLEU + chrF, with sacreBLEU's signature) or rouge (ROUGE-1/2/L F1 with stemming).
        json: print one JSON object instead of text
    """
    from ..eval.text_metrics import bleu_chrf, bleu_signature, read_lines, rouge

    hyps, refs = read_lines(hypotheses), read_lines(references)
    scores = bleu_chrf(hyps, refs) if metric == "bleu" else rouge(hyps, refs)
    out = {**scores, "n": len(hyps)}
    if metric == "bleu":
        out["signature"] = bleu_signature(hyps, refs)
    if json:
        print(jsonlib.dumps(out))
    else:
        print("  ".join(f"{k} {v:.2f}" for k, v in scores.items()) + (f"  ({out['signature']})" if metric == "bleu" else ""))
    return out
