"""Detection metrics of scores against labels, at the bundle's threshold and at the F1-optimal one."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score


@dataclass(frozen=True)
class Evaluation:
    rows: int
    anomalies: int
    roc_auc: float
    pr_auc: float
    threshold: float
    precision: float
    recall: float
    f1: float
    false_positive_rate: float
    tp: int
    fp: int
    tn: int
    fn: int
    f1_optimal_threshold: float
    f1_optimal: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def evaluate(scores: np.ndarray, is_anomaly: np.ndarray, threshold: float) -> Evaluation:
    """ROC-AUC, PR-AUC (average precision) and the confusion counts at `threshold` (score > threshold)."""
    y = np.asarray(is_anomaly, dtype=bool)
    if y.all() or not y.any():
        raise ValueError("evaluation needs both normal and anomalous rows")
    pred = scores > threshold
    tp, fp = int(np.sum(pred & y)), int(np.sum(pred & ~y))
    tn, fn = int(np.sum(~pred & ~y)), int(np.sum(~pred & y))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    p, r, t = precision_recall_curve(y, scores)
    f1s = np.where(p[:-1] + r[:-1] > 0, 2 * p[:-1] * r[:-1] / np.maximum(p[:-1] + r[:-1], 1e-12), 0.0)
    best = int(np.argmax(f1s))
    return Evaluation(
        rows=int(y.size), anomalies=int(y.sum()), roc_auc=float(roc_auc_score(y, scores)),
        pr_auc=float(average_precision_score(y, scores)), threshold=float(threshold), precision=precision,
        recall=recall, f1=f1, false_positive_rate=fp / (fp + tn) if fp + tn else 0.0, tp=tp, fp=fp, tn=tn, fn=fn,
        # precision_recall_curve predicts positive at score >= t; our rule is score > threshold.
        f1_optimal_threshold=float(np.nextafter(t[best], -np.inf)), f1_optimal=float(f1s[best]))
