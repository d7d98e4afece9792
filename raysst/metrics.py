"""The evaluation report of one model on one labeled set, by task kind (raysst.task): what report.json holds.

- single-label: accuracy with its Wilson interval, per-class precision/recall/F1, macro-F1, the N x N
  confusion matrix, calibration (ECE and Brier), accuracy by length and the most confident mistakes;
- multi-label: micro- and macro-F1 at the threshold, subset accuracy, per-label precision/recall/F1/support;
- regression: Pearson, Spearman, MSE and MAE, the points of the scatter plot, and the largest errors.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from raysst.formats import DataError
from raysst.task import MULTI, REGRESSION, Task

N_BINS = 10
TOP_MISTAKES = 20
SCATTER_POINTS = 5000  # a regression report keeps at most this many (gold, predicted) points for its plot
Z95 = 1.959963984540054  # two-sided 95% normal quantile
# Word-count buckets [lo, next lo); words, not tokens, so models with different tokenizers compare.
LENGTH_EDGES = (1, 6, 11, 21, 31, 41, 81)


def wilson_interval(correct: int, n: int, z: float = Z95) -> list:
    """Wilson score interval for a proportion; unlike the normal one it stays inside [0, 1] at small n."""
    if n == 0:
        return [None, None]
    p, z2 = correct / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return [float(max(0.0, center - half)), float(min(1.0, center + half))]


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0  # sklearn's zero_division=0 convention


def _prf(tp: int, predicted: int, actual: int) -> dict:
    precision, recall = _ratio(tp, predicted), _ratio(tp, actual)
    return {"precision": precision, "recall": recall, "f1": _ratio(2 * precision * recall, precision + recall),
            "support": int(actual)}


def compute_report(texts: Sequence[str], gold_labels: Sequence, outputs, task: Task, source: str = "data",
                   label_column: str = "label", top_k: int = TOP_MISTAKES) -> dict:
    """All metrics of one model on one labeled set: gold labels as found (names, ids, lists or numbers),
    outputs as the task's (rows, num_labels) probabilities or values."""
    texts = [str(t) for t in texts]
    gold = task.encode(pd.Series(list(gold_labels), dtype=object), source, label_column)
    outputs = np.asarray(outputs, dtype=float).reshape(len(texts), -1) if len(texts) else np.zeros((0, 1))
    if not len(texts) == len(gold) == len(outputs):
        raise ValueError(f"{source}: {len(texts)} texts, {len(gold)} labels and {len(outputs)} outputs")
    if len(outputs) == 0:
        raise DataError(f"{source}: no rows to evaluate")
    if outputs.shape[1] != task.num_labels or not np.isfinite(outputs).all() or (
            task.kind != REGRESSION and not ((outputs >= 0) & (outputs <= 1)).all()):
        raise ValueError(f"{source}: outputs must be {task.num_labels} finite "
                         f"{'values' if task.kind == REGRESSION else 'probabilities in [0, 1]'} per row; found "
                         f"shape {outputs.shape} with {outputs[~np.isfinite(outputs)][:5].tolist()}")
    base = {"n": len(gold), "task": task.to_dict(), **task.score(outputs, gold)}
    if task.kind == REGRESSION:
        return {**base, **_regression(texts, gold, outputs[:, 0], top_k)}
    if task.kind == MULTI:
        return {**base, **_multi_label(gold > 0.5, outputs > task.threshold, task)}
    return {**base, **_single_label(texts, gold, outputs, task, top_k)}


def _single_label(texts: list, gold: np.ndarray, prob: np.ndarray, task: Task, top_k: int) -> dict:
    names = list(task.labels)
    pred = prob.argmax(1)  # ties go to the first class, as argmax does
    correct = pred == gold
    n, k = len(gold), len(names)
    matrix = np.zeros((k, k), int)
    np.add.at(matrix, (gold, pred), 1)
    per_class = {name: _prf(matrix[c, c], matrix[:, c].sum(), matrix[c].sum()) for c, name in enumerate(names)}
    confidence = prob.max(1)
    edges = np.linspace(0, 1, N_BINS + 1)
    # Bins are (lo, hi]; digitize against the inner edges keeps 0.7 in (0.6, 0.7] despite 7 * 0.1 > 0.7.
    bin_of = np.digitize(confidence, edges[1:-1], right=True)
    bins, ece = [], 0.0
    for b in range(N_BINS):
        inside = bin_of == b
        count = int(inside.sum())
        acc = float(correct[inside].mean()) if count else None
        conf = float(confidence[inside].mean()) if count else None
        if count:
            ece += count / n * abs(acc - conf)
        bins.append({"lo": round(float(edges[b]), 10), "hi": round(float(edges[b + 1]), 10), "count": count,
                     "accuracy": acc, "confidence": conf})
    one_hot = np.eye(k)[gold]
    words = np.array([len(t.split()) for t in texts])
    buckets = []
    for lo, hi in zip(LENGTH_EDGES, LENGTH_EDGES[1:] + (None,)):
        inside = (words >= lo) & (words < hi if hi else True)
        count, right = int(inside.sum()), int(correct[inside].sum())
        buckets.append({"words": f"{lo}-{hi - 1}" if hi else f"{lo}+", "lo": lo, "hi": hi - 1 if hi else None,
                        "count": count, "accuracy": _ratio(right, count) if count else None,
                        "ci95": wilson_interval(right, count)})
    wrong = np.flatnonzero(~correct)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:top_k]
    columns = task.prob_columns() or []
    return {
        "accuracy_ci95": wilson_interval(int(correct.sum()), n),
        "per_class": per_class,
        "confusion_matrix": {"labels": names, "rows": "gold", "columns": "predicted", "matrix": matrix.tolist()},
        # Brier: the squared gap between the probabilities and the one-hot gold, averaged over rows and classes
        # (for two classes the classic (p - y)^2 of one class).
        "calibration": {"ece": float(ece), "n_bins": N_BINS, "brier": float(np.mean((prob - one_hot) ** 2)),
                        "confidence": "probability of the predicted label", "bins": bins},
        "accuracy_by_length": {"unit": "words (whitespace-separated)", "buckets": buckets},
        "most_confident_mistakes": [
            {"text": texts[i], "gold": names[gold[i]], "predicted": names[pred[i]], "confidence": float(confidence[i]),
             **{c: float(prob[i, j]) for j, c in enumerate(columns)}} for i in wrong],
    }


def _multi_label(gold: np.ndarray, pred: np.ndarray, task: Task) -> dict:
    tp, predicted, actual = (gold & pred).sum(0), pred.sum(0), gold.sum(0)
    return {"threshold": task.threshold,
            "per_label": {name: _prf(tp[i], predicted[i], actual[i]) for i, name in enumerate(task.labels)},
            "labels_per_row": {"gold": float(gold.sum(1).mean()), "predicted": float(pred.sum(1).mean())}}


def _regression(texts: list, gold: np.ndarray, pred: np.ndarray, top_k: int) -> dict:
    error = np.abs(pred - gold)
    worst = np.argsort(-error, kind="stable")[:top_k]
    keep = np.random.default_rng(0).permutation(len(gold))[:SCATTER_POINTS]
    return {"gold_range": [float(gold.min()), float(gold.max())],
            "points": {"gold": gold[keep].tolist(), "predicted": pred[keep].tolist()},
            "largest_errors": [{"text": texts[i], "gold": float(gold[i]), "predicted": float(pred[i]),
                                "error": float(error[i])} for i in worst]}
