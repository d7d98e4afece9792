"""What a task is: its kind, label names, loss, metrics and output columns, in one place.

Three kinds, as in Hugging Face's `problem_type`:
- `single`: one label per row out of N named classes; cross-entropy; accuracy and macro-F1; the scorer writes
  `label`, `score` and a `prob_<name>` column per class (a `probs` list column above MAX_PROB_COLUMNS classes).
- `multi-label`: any subset of N named labels per row; BCE on sigmoid outputs; micro- and macro-F1 at
  `threshold`; the scorer writes `labels` (the names over the threshold) and the per-label probabilities.
- `regression`: one number per row; MSE; Pearson and Spearman; the scorer writes `value`.

A Task travels with the model in its `config.json` (`id2label`, `label2id`, `problem_type`), so scoring and
evaluation read it from any Hugging Face sequence-classification checkpoint, raysst's or not. Everything
"what does multi-label change?" asks is answered in this file. Imports no torch at the top: the data stages
that read it need none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

from raysst.formats import DataError

SINGLE, MULTI, REGRESSION = "single", "multi-label", "regression"
KINDS = (SINGLE, MULTI, REGRESSION)
PROBLEM_TYPES = {SINGLE: "single_label_classification", MULTI: "multi_label_classification",
                 REGRESSION: "regression"}
METRICS = {SINGLE: ("accuracy", "macro_f1"), MULTI: ("micro_f1", "macro_f1"), REGRESSION: ("pearson", "spearman")}
LOWER_IS_BETTER = ("eval_loss",)
TITLES = {"accuracy": "Accuracy", "macro_f1": "Macro F1", "micro_f1": "Micro F1", "pearson": "Pearson",
          "spearman": "Spearman", "eval_loss": "Validation Loss"}
MAX_PROB_COLUMNS = 32  # past this many classes the per-class probabilities go in one list column, `probs`
VALUE = "value"  # a regression model's one output, and its label name


class LabelError(DataError):
    """Labels that cannot define or fit a task; the message names the source, the column and the values."""


@dataclass(frozen=True)
class Task:
    kind: str = SINGLE
    labels: tuple = ("negative", "positive")
    threshold: float = 0.5  # multi-label: a label is on when its probability exceeds this

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must lie in (0, 1), got {self.threshold!r}")

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == REGRESSION else len(self.labels)

    @property
    def metrics(self) -> tuple:
        return METRICS[self.kind]

    def hf_config(self) -> dict:
        """What `from_pretrained` and `config.json` carry of the task."""
        names = (VALUE,) if self.kind == REGRESSION else self.labels
        return {"num_labels": self.num_labels, "id2label": dict(enumerate(names)),
                "label2id": {n: i for i, n in enumerate(names)}, "problem_type": PROBLEM_TYPES[self.kind]}

    @classmethod
    def from_hf_config(cls, config, threshold: float = 0.5) -> "Task":
        """The task of a checkpoint's config: its problem type, else one output means regression."""
        kind = {v: k for k, v in PROBLEM_TYPES.items()}.get(getattr(config, "problem_type", None))
        kind = kind or (REGRESSION if config.num_labels == 1 else SINGLE)
        labels = tuple(str(config.id2label[i]) for i in range(config.num_labels))
        return cls(kind, (VALUE,) if kind == REGRESSION else labels, threshold)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "labels": list(self.labels), "threshold": self.threshold}

    @classmethod
    def from_dict(cls, d: dict) -> "Task":
        return cls(d["kind"], tuple(d["labels"]), d.get("threshold", 0.5))

    # Training: targets, loss and what the model's logits mean.
    def loss(self, logits, targets, reduction: str = "mean"):
        import torch.nn.functional as F

        logits = logits.float()
        if self.kind == SINGLE:
            return F.cross_entropy(logits, targets, reduction=reduction)
        if self.kind == MULTI:  # per row the mean over labels, as HF's BCEWithLogitsLoss over all elements
            per_row = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1)
            return per_row.mean() if reduction == "mean" else per_row.sum()
        return F.mse_loss(logits[:, 0], targets, reduction=reduction)

    def outputs(self, logits):
        """(rows, num_labels) floats: class probabilities, per-label probabilities, or the predicted value."""
        logits = logits.float()
        return {SINGLE: logits.softmax(-1), MULTI: logits.sigmoid()}.get(self.kind, logits)

    def encode(self, values: pd.Series, source: str, column: str) -> np.ndarray:
        """Gold labels as targets: class ids, multi-hot rows (rows, N), or floats; LabelError names what does
        not fit (a null, a name outside `labels`, an id out of range, a list where one label belongs)."""
        no_nulls(values, source, column)
        where = f"{source}: column {column!r}"
        if self.kind == REGRESSION:
            floats = pd.to_numeric(values, errors="coerce")
            _reject(values, floats.isna() | ~np.isfinite(floats.fillna(0)), where, "finite numbers (regression)")
            return floats.to_numpy(np.float32)
        index = {name.lower(): i for i, name in enumerate(self.labels)}
        # Ids stand for names (GLUE's 0/1 for negative/positive) unless the names are numbers themselves.
        ids_allowed = not all(re.fullmatch(r"-?\d+", n) for n in self.labels)

        def one(v) -> Optional[int]:
            if isinstance(v, (float, np.floating)) and float(v).is_integer():
                v = int(v)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer, str)):
                return None
            key = str(v).strip()
            found = index.get(key.lower())
            if found is None and ids_allowed and key.isdigit() and int(key) < len(self.labels):
                found = int(key)
            return found
        if self.kind == SINGLE:
            ids = values.map(one)
            _reject(values, ids.isna(), where, f"one of the labels {list(self.labels)} (or their ids 0 to "
                    f"{len(self.labels) - 1}); pass --labels to fix the list")
            return ids.to_numpy(np.int64)
        hot = np.zeros((len(values), len(self.labels)), np.float32)
        bad = np.zeros(len(values), bool)
        for r, v in enumerate(values):
            ids = [one(x) for x in v] if is_list(v) else [None]
            bad[r] = None in ids
            hot[r, [i for i in ids if i is not None]] = 1
        _reject(values, pd.Series(bad, index=values.index), where,
                f"lists of the labels {list(self.labels)}; pass --labels to fix the list")
        return hot

    # Metrics: one number each, higher is better (eval_loss aside).
    def score(self, outputs: np.ndarray, targets: np.ndarray) -> dict:
        """The task's metrics of (rows, num_labels) outputs against encoded targets."""
        if self.kind == REGRESSION:
            pred = outputs[:, 0].astype(np.float64)
            gold = np.asarray(targets, np.float64)
            return {"pearson": _corr(pred, gold), "spearman": _corr(*(pd.Series(a).rank().to_numpy()
                                                                     for a in (pred, gold))),
                    "mse": float(np.mean((pred - gold) ** 2)), "mae": float(np.mean(np.abs(pred - gold)))}
        if self.kind == SINGLE:
            pred, gold = outputs.argmax(1), np.asarray(targets)
            f1 = [_f1(np.sum((pred == c) & (gold == c)), np.sum(pred == c), np.sum(gold == c))
                  for c in range(len(self.labels))]
            return {"accuracy": float(np.mean(pred == gold)), "macro_f1": float(np.mean(f1))}
        pred, gold = outputs > self.threshold, np.asarray(targets) > 0.5
        tp, predicted, actual = (pred & gold).sum(0), pred.sum(0), gold.sum(0)
        return {"micro_f1": _f1(tp.sum(), predicted.sum(), actual.sum()),
                "macro_f1": float(np.mean([_f1(*c) for c in zip(tp, predicted, actual)])),
                "subset_accuracy": float(np.mean((pred == gold).all(1)))}

    # Scoring: the output columns, the same for every model of a kind.
    def prob_columns(self) -> Optional[list]:
        """`prob_<name>` per label, or None when they would be too many or two names would collide."""
        names = [f"prob_{re.sub(r'[^0-9A-Za-z_]+', '_', n)}" for n in self.labels]
        return names if len(names) <= MAX_PROB_COLUMNS and len(set(names)) == len(names) else None

    def output_columns(self) -> tuple:
        """The scorer's columns: the task's outputs, then `windows` (windows scored for the row) and `status`."""
        if self.kind == REGRESSION:
            return (VALUE, "windows", "status")
        probs = tuple(self.prob_columns() or ["probs"])
        return (("label", "score") if self.kind == SINGLE else ("labels",)) + probs + ("windows", "status")

    def output_arrays(self, outputs: np.ndarray, valid: np.ndarray) -> dict:
        """The scored columns (all but `status`) of (rows, num_labels) outputs; null where not `valid`."""
        import pyarrow as pa

        mask = ~valid
        if self.kind == REGRESSION:
            return {VALUE: pa.array(outputs[:, 0].astype(np.float64), mask=mask)}
        out = {}
        names = np.array(self.labels, dtype=object)
        if self.kind == SINGLE:
            out["label"] = pa.array(names[outputs.argmax(1)], pa.string(), mask=mask)
            out["score"] = pa.array(outputs.max(1).astype(np.float64), mask=mask)
        else:
            on = [list(names[row > self.threshold]) if ok else None for row, ok in zip(outputs, valid)]
            out["labels"] = pa.array(on, pa.list_(pa.string()))
        columns = self.prob_columns()
        if columns:
            out.update({c: pa.array(outputs[:, i].astype(np.float64), mask=mask) for i, c in enumerate(columns)})
        else:
            out["probs"] = pa.array([list(map(float, r)) if ok else None for r, ok in zip(outputs, valid)],
                                    pa.list_(pa.float32()))
        return out

    def outputs_of(self, scored: pd.DataFrame) -> np.ndarray:
        """(rows, num_labels) outputs read back from the scorer's columns (what evaluation reports on)."""
        if self.kind == REGRESSION:
            return scored[[VALUE]].to_numpy(np.float64)
        columns = self.prob_columns()
        return scored[columns].to_numpy(np.float64) if columns else np.stack(scored["probs"].to_numpy())


def describe(task: Task) -> str:
    """One line for logs and cards: `single-label, 3 classes (anger, fear, joy)`."""
    if task.kind == REGRESSION:
        return "regression (one value)"
    names = ", ".join(task.labels[:8]) + (", ..." if len(task.labels) > 8 else "")
    what = "classes" if task.kind == SINGLE else f"labels, threshold {task.threshold:g}"
    return f"{'single-label' if task.kind == SINGLE else 'multi-label'}, {len(task.labels)} {what} ({names})"


def best_row(history: list, metric: str) -> dict:
    """The epoch whose `metric` is best (the first of equals): the one a run exports."""
    sign = -1 if metric_mode(metric) == "min" else 1
    return max(history, key=lambda row: sign * row[metric])


def metric_mode(metric: str) -> str:
    return "min" if metric in LOWER_IS_BETTER else "max"


def check_metric(task: Task, metric: Optional[str]) -> str:
    """The metric that picks the best checkpoint: `metric`, or the task's first."""
    allowed = (*task.metrics, *LOWER_IS_BETTER)
    if metric is None:
        return task.metrics[0]
    if metric not in allowed:
        raise ValueError(f"--metric {metric} is not a metric of a {task.kind} task; use one of {', '.join(allowed)}")
    return metric


def is_list(v) -> bool:
    return isinstance(v, (list, tuple, np.ndarray))


def no_nulls(values: pd.Series, source: str, column: str) -> None:
    missing = values.map(lambda v: not is_list(v) and pd.isna(v))
    if missing.any():
        raise LabelError(f"{source}: column {column!r} has {int(missing.sum())} null labels "
                         f"(rows {values.index[missing].tolist()[:5]})")


def _reject(values: pd.Series, bad: pd.Series, where: str, expected: str) -> None:
    if bad.any():
        found = sorted({str(v) for v in values[bad]})[:10]
        raise LabelError(f"{where} must hold {expected}; found {int(bad.sum())} rows with {found} "
                         f"(rows {values.index[bad.to_numpy()].tolist()[:5]})")


def _f1(tp, predicted, actual) -> float:
    return float(2 * tp / (predicted + actual)) if predicted + actual else 0.0


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])
