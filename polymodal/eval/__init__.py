"""Task evaluation: metrics from scikit-learn, scipy, seqeval and torchmetrics (``metrics``)."""
from .metrics import (accuracy, classification_metrics, entity_metrics, f1, mcc, pearson, regression_metrics,
                      spearman, squad_metrics)

__all__ = ["accuracy", "classification_metrics", "entity_metrics", "f1", "mcc", "pearson", "regression_metrics",
           "spearman", "squad_metrics"]
