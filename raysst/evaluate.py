"""Evaluate classifiers and regressors on labeled data: the task's metrics, per-class scores, calibration,
failures, plots.

Predictions come from the batch scorer (`raysst.score`); `raysst.metrics` turns (text, gold label, outputs)
into the report, and this module writes `report.json`, PNG figures and a `report.md` that reads on its own.
"""

from __future__ import annotations

import json
import posixpath
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pandas as pd

from raysst.config import Config, expand_path
from raysst.formats import DataError, find_text_column
from raysst.lease import Lease, holding
from raysst.metrics import compute_report, wilson_interval  # noqa: F401  (the report's API, re-exported)
from raysst.report import figures_for, report_markdown, write_comparison
from raysst.storage import local_dir
from raysst.score_workers import SCORED
from raysst.task import Task

def scored_name(column: str, task: Task) -> str:
    """Where an input column ends up in the scorer's output (renamed when it clashes with an output)."""
    return f"input_{column}" if column in task.output_columns() else column


def evaluate_frame(scored: pd.DataFrame, source: str, task: Task, label_column: str = "label",
                   text_column: Optional[str] = None) -> dict:
    """The report for a scorer output frame; rows the scorer could not score are counted, not evaluated."""
    outputs = task.output_columns()
    inputs = {scored_name(c, task): c for c in outputs}
    found = [inputs.get(c, c) for c in scored.columns if c not in outputs]
    gold_col = scored_name(label_column, task)
    if gold_col not in scored.columns:
        raise DataError(f"{source}: no label column {label_column!r}; columns are {found} "
                        f"(choose one with --label-column)")
    text_col = scored_name(find_text_column(found, source, text_column), task)
    ok = scored["status"].isin(SCORED).to_numpy()
    if not ok.any():
        raise DataError(f"{source}: no row could be scored; statuses {scored['status'].value_counts().to_dict()}")
    rows = scored[ok]
    report = compute_report(rows[text_col], rows[gold_col], task.outputs_of(rows), task, source, label_column)
    status = scored["status"].astype(str)
    report["rows"] = {"total": len(scored), "evaluated": int(ok.sum()),
                      "not_scored": {k: int(v) for k, v in status[~ok].value_counts().items()},
                      "truncated": int((status == "truncated").sum()),
                      **({"capped": int((status == "capped").sum())} if (status == "capped").any() else {})}
    return report


def write_report(report: dict, out_dir: str) -> list:
    """Write report.json, the task's PNG figures and report.md to `out_dir` (local path or URI); return the names."""
    from raysst import plots

    title, figures = report.get("model", "model"), figures_for(report)
    draw = {"confusion": lambda p: plots.plot_confusion(report["confusion_matrix"], p, title),
            "reliability": lambda p: plots.plot_reliability(report["calibration"], p, title),
            "length": lambda p: plots.plot_accuracy_by_length(report["accuracy_by_length"], report["accuracy"], p,
                                                              title),
            "per_label": lambda p: plots.plot_per_label(report["per_label"], p, title),
            "scatter": lambda p: plots.plot_scatter(report, p, title)}
    with local_dir(out_dir) as out:
        for kind, name in figures.items():
            draw[kind](out / name)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "report.md").write_text(report_markdown(report, figures))
    return ["report.json", "report.md", *figures.values()]


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
    task = Task.from_dict(summary["task"])  # the model's, as the scorer's actors read it
    # The precision belongs next to the scores: int8 probabilities differ a little from fp32 ones.
    report = {"model": cfg.model, "data": cfg.input, "label_column": cfg.label_column,
              "precision": summary["hardware"]["dtype"],
              **evaluate_frame(read_scored(scored_dir), cfg.input, task, cfg.label_column, cfg.text_column),
              "scoring": summary}
    write_report(report, out_dir)
    metric = task.metrics[0]
    print(f"[raysst] {cfg.model}: {metric} {report[metric]:.4f} on {report['n']} rows; report in {out_dir}",
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
