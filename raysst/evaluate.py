"""Evaluate sentiment models on labeled data: accuracy, per-class scores, calibration, failures, plots.

Predictions come from the batch scorer (`raysst.score`); this module turns (text, gold label,
probability of `positive`) into `report.json`, PNG figures and a `report.md` that reads on its own.
"""

from __future__ import annotations

import json
import posixpath
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pandas as pd

from raysst.config import LABEL_NAMES, Config, expand_path
from raysst.formats import DataError, find_text_column
from raysst.lease import Lease, holding
from raysst.data import normalize_labels
from raysst.report import FIGURES, report_markdown, write_comparison
from raysst.storage import local_dir
from raysst.score_workers import OUTPUT_COLUMNS

N_BINS = 10
TOP_MISTAKES = 20
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


def compute_report(texts: Sequence[str], gold_labels: Sequence, prob_positive: Sequence[float],
                   source: str = "data", label_column: str = "label", top_k: int = TOP_MISTAKES) -> dict:
    """All metrics of one model on one labeled set; prediction is `positive` when prob_positive > 0.5."""
    texts = [str(t) for t in texts]
    gold = normalize_labels(pd.Series(list(gold_labels)), source, label_column).to_numpy()
    prob = np.asarray(prob_positive, dtype=float)
    if not len(texts) == len(gold) == len(prob):
        raise ValueError(f"{source}: {len(texts)} texts, {len(gold)} labels and {len(prob)} probabilities")
    if len(prob) == 0:
        raise DataError(f"{source}: no rows to evaluate")
    if not np.all((prob >= 0) & (prob <= 1)):
        raise ValueError(f"{source}: prob_positive must lie in [0, 1]; found {prob[~((prob >= 0) & (prob <= 1))][:5]}")
    pred = (prob > 0.5).astype(int)  # ties go to `negative`, as argmax over (negative, positive) does
    correct = pred == gold
    n = len(gold)
    matrix = [[int(np.sum((gold == g) & (pred == p))) for p in (0, 1)] for g in (0, 1)]
    per_class = {}
    for c, name in LABEL_NAMES.items():
        tp, predicted, actual = matrix[c][c], matrix[0][c] + matrix[1][c], sum(matrix[c])
        precision, recall = _ratio(tp, predicted), _ratio(tp, actual)
        per_class[name] = {"precision": precision, "recall": recall,
                           "f1": _ratio(2 * precision * recall, precision + recall), "support": actual}
    confidence = np.where(pred == 1, prob, 1 - prob)
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
    return {
        "n": n,
        "accuracy": float(correct.mean()),
        "accuracy_ci95": wilson_interval(int(correct.sum()), n),
        "per_class": per_class,
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
        "confusion_matrix": {"labels": list(LABEL_NAMES.values()), "rows": "gold", "columns": "predicted",
                             "matrix": matrix},
        "calibration": {"ece": float(ece), "n_bins": N_BINS, "brier": float(np.mean((prob - gold) ** 2)),
                        "confidence": "probability of the predicted label", "bins": bins},
        "accuracy_by_length": {"unit": "words (whitespace-separated)", "buckets": buckets},
        "most_confident_mistakes": [
            {"text": texts[i], "gold": LABEL_NAMES[int(gold[i])], "predicted": LABEL_NAMES[int(pred[i])],
             "confidence": float(confidence[i]), "prob_positive": float(prob[i])} for i in wrong],
    }


def scored_name(column: str) -> str:
    """Where an input column ends up in the scorer's output (renamed when it clashes with an output)."""
    return f"input_{column}" if column in OUTPUT_COLUMNS else column


def evaluate_frame(scored: pd.DataFrame, source: str, label_column: str = "label",
                   text_column: Optional[str] = None) -> dict:
    """The report for a scorer output frame; rows the scorer could not score are counted, not evaluated."""
    inputs = {scored_name(c): c for c in OUTPUT_COLUMNS}
    found = [inputs.get(c, c) for c in scored.columns if c not in OUTPUT_COLUMNS]
    gold_col = scored_name(label_column)
    if gold_col not in scored.columns:
        raise DataError(f"{source}: no label column {label_column!r}; columns are {found} "
                        f"(choose one with --label-column)")
    text_col = scored_name(find_text_column(found, source, text_column))
    ok = scored["label"].notna().to_numpy()
    if not ok.any():
        raise DataError(f"{source}: no row could be scored; statuses {scored['status'].value_counts().to_dict()}")
    rows = scored[ok]
    report = compute_report(rows[text_col], rows[gold_col], rows["prob_positive"], source, label_column)
    status = scored["status"].astype(str)
    report["rows"] = {"total": len(scored), "evaluated": int(ok.sum()),
                      "not_scored": {k: int(v) for k, v in status[~ok].value_counts().items()},
                      "truncated": int((status == "truncated").sum())}
    return report


def write_report(report: dict, out_dir: str) -> list:
    """Write report.json, the PNG figures and report.md to `out_dir` (local path or URI); return the names."""
    from raysst.plots import plot_accuracy_by_length, plot_confusion, plot_reliability

    title = report.get("model", "model")
    with local_dir(out_dir) as out:
        plot_confusion(report["confusion_matrix"], out / FIGURES["confusion"], title)
        plot_reliability(report["calibration"], out / FIGURES["reliability"], title)
        plot_accuracy_by_length(report["accuracy_by_length"], report["accuracy"], out / FIGURES["length"], title)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "report.md").write_text(report_markdown(report, FIGURES))
    return ["report.json", "report.md", *FIGURES.values()]


def model_names(models: Sequence[str]) -> list:
    """Short distinct directory names: the last path parts, as many as it takes to tell models apart."""
    parts = [[p for p in m.replace("\\", "/").rstrip("/").split("/") if p not in ("", ".", "~")] for m in models]
    for k in range(1, max(map(len, parts)) + 1):
        names = ["_".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{i}_{n}" for i, n in enumerate(names)]


def evaluate_model(cfg: Config, out_dir: str, scored_dir: str, lease: Optional[Lease] = None) -> dict:
    """Score cfg.input with cfg.model (the batch scorer) into `scored_dir`, then write the report to `out_dir`.

    The scorer resumes from the parts it finds, so `scored_dir` is emptied first: a retrained model
    at the same path must not be judged on its predecessor's scores. `lease`: the caller's on the output that
    holds `scored_dir` (else the scorer takes one on `scored_dir`).
    """
    from raysst.score import read_scored, score_driver_fn

    shutil.rmtree(scored_dir, ignore_errors=True)
    summary = score_driver_fn(cfg.replace(output=scored_dir, models=[]), lease)
    # The precision belongs next to the scores: int8 probabilities differ a little from fp32 ones.
    report = {"model": cfg.model, "data": cfg.input, "label_column": cfg.label_column,
              "precision": summary["hardware"]["dtype"],
              **evaluate_frame(read_scored(scored_dir), cfg.input, cfg.label_column, cfg.text_column),
              "scoring": summary}
    write_report(report, out_dir)
    print(f"[raysst] {cfg.model}: accuracy {report['accuracy']:.4f} on {report['n']} rows; report in {out_dir}",
          flush=True)
    return report


@contextmanager
def scored_dir_for(out_dir: str, name: str) -> Iterator[str]:
    """`<out_dir>/scored/<name>` for a local output; a temporary directory for a URI (the scorer writes locally)."""
    if "://" not in out_dir:
        yield str(Path(out_dir, "scored", name))
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield str(Path(tmp, name))


def evaluate_driver_fn(cfg: Config) -> dict:
    """Evaluate every model of cfg.eval_models on cfg.input; with several, also write a comparison table.

    One model: reports in `<output>/`. Several: `<output>/<name>/` each, and `<output>/comparison.md`.
    Scores land in `<output>/scored/<name>/` (kept only for a local output). Returns {name: report}.
    """
    if not cfg.input or not cfg.output:
        raise ValueError("evaluate needs --data (labeled file, directory or glob) and --output (directory)")
    require_label_column(cfg.input, cfg.label_column)
    # One job per output: a second one would empty the scored parts this one is writing.
    with holding(expand_path(cfg.output).rstrip("/"), "evaluate", cfg.lease_timeout, cfg.take_over) as lease:
        lease.confirm()
        return _evaluate_models(cfg, lease)


def _evaluate_models(cfg: Config, lease: Lease) -> dict:
    from raysst.runtime import init_ray

    init_ray()
    lease.note_ray()
    models = cfg.eval_models
    names = model_names(models)
    reports = {}
    for model, name in zip(models, names):
        out = cfg.output if len(models) == 1 else posixpath.join(cfg.output, name)
        with scored_dir_for(cfg.output, name) as scored:
            reports[name] = evaluate_model(cfg.replace(model=model), out, scored, lease)
    if len(models) > 1:
        write_comparison(reports, cfg.output)
    return reports


def require_label_column(spec: str, label_column: str) -> None:
    """Fail before any scoring when a file of the labeled data lacks the gold label column."""
    from raysst.corpus import file_columns, list_input_files

    for f in list_input_files(spec)[0]:
        columns = file_columns(f)[0]
        if label_column not in columns:
            raise DataError(f"{f.path}: no label column {label_column!r}; columns are {columns}")
