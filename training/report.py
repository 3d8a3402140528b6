"""Plots and a one-page HTML report for a training run or an evaluation."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402


def loss_curve(path: Path, loss: Sequence[float], val_loss: Sequence[float], best_epoch: int) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = np.arange(1, len(loss) + 1)
    ax.plot(epochs, loss, label="training loss")
    ax.plot(epochs, val_loss, label="validation loss")
    ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
    ax.set(xlabel="epoch", ylabel="MSE", title="Autoencoder loss", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def score_histogram(path: Path, normal: np.ndarray, anomalous: np.ndarray | None, threshold: float) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    positive = np.concatenate([normal, anomalous]) if anomalous is not None else normal
    floor = max(float(np.min(positive[positive > 0])) if np.any(positive > 0) else 1e-6, 1e-9)
    bins = np.logspace(np.log10(floor), np.log10(max(float(positive.max()), threshold) * 1.01), 60)
    # Each group's bars sum to 1 (share of its rows): densities would shrink the wide log-scale bins.
    ax.hist(np.maximum(normal, floor), bins=list(bins), alpha=0.6, label=f"normal ({normal.size})",
            weights=np.full(normal.size, 1.0 / max(normal.size, 1)))
    if anomalous is not None and anomalous.size:
        ax.hist(np.maximum(anomalous, floor), bins=list(bins), alpha=0.6, label=f"anomalous ({anomalous.size})",
                weights=np.full(anomalous.size, 1.0 / anomalous.size))
    ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set(xscale="log", xlabel="anomaly score", ylabel="share of rows",
           title="Score distribution")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: Signature outputs that make up the score, and how the report names them.
PART_TITLES = {"score_reconstruction": "reconstruction", "score_distance": "nearest-neighbour distance"}


def part_shares(parts: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Mean share of each row's score that comes from each term (rows with score 0 count equally for all)."""
    names = [n for n in PART_TITLES if n in parts]
    if not names or len(parts[names[0]]) == 0:
        return {}
    stacked = np.stack([np.asarray(parts[n], dtype=np.float64) for n in names], axis=1)
    totals = stacked.sum(axis=1, keepdims=True)
    shares = np.where(totals > 0, stacked / np.where(totals > 0, totals, 1.0), 1.0 / len(names))
    return {PART_TITLES[n]: float(v) for n, v in zip(names, shares.mean(axis=0), strict=True)}


def describe_shares(shares: Mapping[str, float], rows: int) -> str:
    """'reconstruction 31 %, nearest-neighbour distance 69 % (120 rows)' for the facts table."""
    return ", ".join(f"{name} {100 * share:.0f} %" for name, share in shares.items()) + f" ({rows} rows)"


def describe_counts(counts: Mapping[str, int], none: str) -> str:
    """{"late": 3, "no_time": 1} -> "late 3, no_time 1" (`none` when empty)."""
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or none


def score_parts(path: Path, groups: Mapping[str, Mapping[str, float]]) -> None:
    """Stacked bars: for each group of rows, the mean share of the score from each term."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = list(groups)
    left = np.zeros(len(labels))
    for title in PART_TITLES.values():
        values = np.array([groups[g].get(title, 0.0) for g in labels])
        ax.barh(labels, values, left=left, label=title)
        left += values
    ax.set(xlim=(0, 1), xlabel="mean share of the score", title="Where the score comes from")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def roc_pr_curves(roc_path: Path, pr_path: Path, scores: np.ndarray, is_anomaly: np.ndarray,
                  roc_auc: float, pr_auc: float) -> None:
    fpr, tpr, _ = roc_curve(is_anomaly, scores)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"ROC-AUC {roc_auc:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC curve")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(roc_path, dpi=110)
    plt.close(fig)
    precision, recall, _ = precision_recall_curve(is_anomaly, scores)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(recall, precision, label=f"PR-AUC {pr_auc:.3f}")
    ax.axhline(float(np.mean(is_anomaly)), color="grey", linestyle=":", label="chance")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall curve", ylim=(0, 1.02))
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(pr_path, dpi=110)
    plt.close(fig)


def confusion(path: Path, tp: int, fp: int, tn: int, fn: int) -> None:
    matrix = np.array([[tn, fp], [fn, tp]])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, f"{v}", ha="center", va="center",
                color="white" if v > matrix.max() / 2 else "black", fontsize=13)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["normal", "anomaly"], yticklabels=["normal", "anomaly"],
           xlabel="predicted", ylabel="actual", title="Confusion matrix at threshold")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_html(path: Path, title: str, facts: Mapping[str, Any], images: Sequence[str]) -> None:
    """One self-contained page: a table of facts and metrics, then the plots (PNG files beside it)."""
    rows = "\n".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                     for k, v in facts.items())
    imgs = "\n".join(f'<figure><img src="{html.escape(name)}" alt="{html.escape(name)}"></figure>'
                     for name in images)
    path.write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:4px 10px;text-align:left}}figure{{display:inline-block;margin:8px}}
img{{max-width:520px}}</style></head>
<body><h1>{html.escape(title)}</h1>
<table>
{rows}
</table>
{imgs}
</body></html>
""")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
