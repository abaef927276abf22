"""Task metrics, computed by the libraries the benchmarks themselves use.

* GLUE (Wang et al. 2019, table 1): accuracy; F1 of the positive class (MRPC, QQP); Matthews
  correlation (CoLA), MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); Pearson and
  Spearman correlation (STS-B) - scikit-learn and scipy.
* CoNLL-2003 NER (Tjong Kim Sang & De Meulder 2003): entity-level precision/recall/F1, an entity
  counting only when its type and both boundaries are right - seqeval, which reproduces the
  conlleval script (IOB1 tags are read as conlleval does).
* SQuAD v1.1 (Rajpurkar et al. 2016, sec. 6): exact match and token-overlap F1 after SQuAD's
  answer normalisation (lower case, no punctuation or articles), the max over the reference
  answers - torchmetrics' ``SQuAD``, a port of the official evaluate-v1.1.py.

Scores are returned as plain floats; F1/EM for NER and SQuAD on the 0-100 scale the papers report,
classification metrics on 0-1 as scikit-learn returns them.
"""
from __future__ import annotations

from typing import Mapping, Sequence


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(labels, preds))


def f1(preds: Sequence[int], labels: Sequence[int], average: str = "binary") -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, preds, average=average, zero_division=0))


def mcc(preds: Sequence[int], labels: Sequence[int]) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels, preds))


def pearson(preds: Sequence[float], labels: Sequence[float]) -> float:
    from scipy.stats import pearsonr

    return float(pearsonr(preds, labels)[0])


def spearman(preds: Sequence[float], labels: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(preds, labels)[0])


def classification_metrics(preds: Sequence[int], labels: Sequence[int], num_labels: int = 2) -> dict[str, float]:
    """Accuracy, F1 (binary: positive class 1; else macro) and MCC."""
    out = {"accuracy": accuracy(preds, labels), "mcc": mcc(preds, labels),
           "f1_macro": f1(preds, labels, average="macro")}
    out["f1"] = f1(preds, labels) if num_labels == 2 else out["f1_macro"]
    return out


def regression_metrics(preds: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    return {"pearson": pearson(preds, labels), "spearman": spearman(preds, labels)}


def entity_metrics(pred_tags: Sequence[Sequence[str]], gold_tags: Sequence[Sequence[str]]) -> dict[str, float]:
    """seqeval's conlleval-compatible entity precision/recall/F1 (x100) and token accuracy."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    p, g = [list(s) for s in pred_tags], [list(s) for s in gold_tags]
    if [len(s) for s in p] != [len(s) for s in g]:
        raise ValueError("predicted and gold tag sequences differ in length")
    return {"f1": 100 * float(f1_score(g, p)), "precision": 100 * float(precision_score(g, p)),
            "recall": 100 * float(recall_score(g, p)), "accuracy": float(accuracy_score(g, p))}


def squad_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """SQuAD v1.1 exact match and F1 (x100) with torchmetrics; ``references``: id -> answer texts."""
    from torchmetrics.functional.text import squad

    missing = sorted(set(references) - set(predictions))
    if missing:
        raise ValueError(f"no prediction for {len(missing)} question(s), e.g. {missing[:3]}")
    preds = [{"prediction_text": predictions[i], "id": i} for i in references]
    target = [{"answers": {"answer_start": [0] * len(a), "text": list(a)}, "id": i} for i, a in references.items()]
    r = squad(preds, target)
    return {"exact_match": float(r["exact_match"]), "f1": float(r["f1"])}
