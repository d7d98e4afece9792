"""Turn a training checkpoint into a Hugging Face model directory with metrics, a model card and an evaluation
report."""

from __future__ import annotations

import io
import json
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raysst.batching import PAIR, TEXT
from raysst.config import Config
from raysst.data import Columns
from raysst.evaluate import compute_report, evaluate_model, scored_dir_for, write_report
from raysst.models import precision_name
from raysst.task import TITLES, Task, best_row, describe, metric_mode
from raysst.report import CURVES, card_section, with_card_section
from raysst.storage import (HISTORY_FILE, PREDICTIONS_FILE, STATE_FILES, copy_to, filesystem, local_dir, read_text,
                            write_text)


def export_run(result, cfg: Config, dest: Optional[str] = None) -> str:
    """Export the best checkpoint of a finished Ray Train run to `<run>/model` (or `dest`)."""
    if result.error:
        raise RuntimeError(f"training run {cfg.name} failed: {result.error}") from result.error
    best = result.get_best_checkpoint(cfg.metric, metric_mode(cfg.metric)) or result.checkpoint
    if best is None:
        raise RuntimeError(f"training run {cfg.name} reported no checkpoint; nothing to export")
    with result.checkpoint.as_directory() as latest:
        history = json.loads((Path(latest) / HISTORY_FILE).read_text())
    return export_checkpoint(best, history, cfg, dest or posixpath.join(run_uri(result), "model"))


def run_uri(result) -> str:
    """The run's directory as raysst.storage opens it: Result.path is a path inside result.filesystem, without
    the scheme (`bucket/raysst/run` for s3://bucket/raysst/run), so taken alone it names a local directory."""
    scheme = {"s3": "s3", "gcs": "gs"}.get(result.filesystem.type_name)
    return f"{scheme}://{result.path}" if scheme else str(result.path)


def export_checkpoint(checkpoint, history: list, cfg: Config, dest: str) -> str:
    """Write the checkpoint's weights and tokenizer, `metrics.json` and `README.md` to `dest`."""
    with tempfile.TemporaryDirectory() as tmp, checkpoint.as_directory() as src:
        out = Path(tmp) / "model"
        shutil.copytree(src, out, ignore=shutil.ignore_patterns(*STATE_FILES, HISTORY_FILE, PREDICTIONS_FILE))
        if (Path(src) / PREDICTIONS_FILE).exists():  # the evaluation report is made of them (training_report)
            (out / "eval").mkdir()
            shutil.copy(Path(src) / PREDICTIONS_FILE, out / "eval" / PREDICTIONS_FILE)
        task = checkpoint_task(src)
        best = best_row(history, cfg.metric)
        metrics = {
            "epochs": history,
            "task": task.to_dict(),
            "metric": cfg.metric,
            "best_epoch": best["epoch"],
            **{m: best[m] for m in (*task.metrics, cfg.metric) if m in best},
            "eval_loss": best["eval_loss"],
            "train_samples_per_second": _mean(history, "train_samples_per_second"),
            "train_tokens_per_second": _mean(history, "train_tokens_per_second"),
            "train_steps_per_second": _mean(history, "train_steps_per_second"),
            "total_flops": sum(row["flops"] for row in history),
            "hardware": _hardware(history[-1]),
            "workers_per_epoch": [row.get("workers") for row in history],  # None: a checkpoint from before they were
            "config": cfg.to_dict(),
        }
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "README.md").write_text(model_card(metrics, cfg, task))
        return copy_to(out, dest)


def checkpoint_task(directory: str) -> Task:
    """The task a checkpoint was trained for, from its config.json."""
    from transformers import AutoConfig

    return Task.from_hf_config(AutoConfig.from_pretrained(directory))


def model_card(metrics: dict, cfg: Config, task: Task) -> str:
    """A model card in the form of the well-known bert-base-uncased SST-2 card, for any task."""
    metric = cfg.metric or metrics.get("metric") or task.metrics[0]
    # The table shows the metric that picked the checkpoint (the public card's one column for SST-2);
    # metrics.json and the evaluation report hold the others.
    names = (metric,) if metric != "eval_loss" else task.metrics[:1]
    rows = "\n".join(f"| {r['epoch']} | {r['train_loss']:.4f} | {r['eval_loss']:.4f} | "
                     + " | ".join(f"{r[m]:.4f}" if m in r else "n/a" for m in names) + f" | {r.get('workers', '?')} |"
                     for r in metrics["epochs"])
    value = metrics.get(metric, best_row(metrics["epochs"], metric)[metric])
    headline = f"{value:.2%}" if metric in ("accuracy", "micro_f1", "macro_f1") else f"{value:.4f}"
    usage = ('classifier = pipeline("text-classification", model="PATH/TO/THIS/DIRECTORY"' +
             (", top_k=None)  # every label's score" if task.kind == "multi-label" else ")"))
    example = ('classifier({"text": "the first text", "text_pair": "the second"})' if cfg.text_pair_column or
               Columns.of(cfg).pair else 'classifier("a gripping, beautifully acted film")')
    c = cfg
    return f"""---
language: en
license: apache-2.0
tags: [text-classification, raysst]
datasets: [{c.data}]
metrics: [{", ".join(task.metrics)}]
pipeline_tag: text-classification
---

# {c.name}: {c.model} fine-tuned on {c.data}{f" ({c.data_config})" if c.data_config else ""}

Task: {describe(task)}{"" if task.kind == "regression" else f"; labels {', '.join(f'`{n}`' for n in task.labels)}"};
trained with raysst on Ray Train. It reaches **{headline}** {metric} (the metric that picked the checkpoint)
on the validation set ({metrics['epochs'][-1]['eval_samples']} rows; best epoch {metrics['best_epoch']}).

```python
from transformers import pipeline
{usage}
{example}
```

## Training results

| Epoch | Training Loss | Validation Loss | {" | ".join(TITLES[m] for m in names)} | Workers |
|:-----:|:-------------:|:---------------:|{":---:|" * len(names)}:-------:|
{rows}

## Training hyperparameters

- base model: `{c.model}`
- data: `{c.data}` ({metrics['epochs'][-1]['train_samples']} training examples per epoch)
- epochs: {c.epochs}; global batch size: {c.batch_size} ({_split(metrics.get('workers_per_epoch', []), c)} x {c.grad_accum_steps} accumulation step(s)){f'; --num-workers {c.num_workers}: each epoch ran on the workers in the table' if c.elastic else ''}
- optimizer: AdamW (fused), learning rate {c.lr:g}{f' (head: {c.head_lr_scale:g}x)' if c.head_lr_scale != 1 else ''}, weight decay {c.weight_decay:g}, betas (0.9, 0.999), eps 1e-8
- schedule: linear warmup over {c.warmup_ratio:.0%} of steps, then linear decay; gradient clipping at {c.max_grad_norm:g}
- dropout: {"the base model's own" if c.dropout is None else f"{c.dropout:g}"}
- max sequence length: {c.max_seq_length}; dynamic padding{', length-grouped batches' if c.group_by_length else ''}
- precision: {precision_name(c.compute_on_gpu, c.precision)}; seed: {c.seed}

## Speed and hardware

- hardware: {metrics['hardware']}
- training samples/s: {metrics['train_samples_per_second']:.1f}; tokens/s: {metrics['train_tokens_per_second']:.0f}; steps/s: {metrics['train_steps_per_second']:.2f}
- total FLOPs (6 x parameters x tokens): {metrics['total_flops']:.3g}

Full per-epoch figures and the resolved config are in `metrics.json`.

## Intended uses and limitations

For texts like those of the training data (`{c.data}`), in their language and domain; expect lower
scores on other domains, and check the evaluation report before relying on the outputs. Inputs longer
than {c.max_seq_length} tokens are truncated. Probabilities are not calibrated guarantees. The model
carries the biases of its training data.
"""


def _hardware(epoch: dict) -> str:
    """What the rank-0 worker reported for its device (checkpoints from before it did so have no record)."""
    if "hardware" not in epoch:
        return "not recorded"
    return f"{epoch['workers']} worker(s), each on {epoch['hardware']}"


def _split(workers_per_epoch: list, cfg: Config) -> str:
    """How the global batch was split: `2 worker(s) x 16`, or `1 worker(s) x 32 or 2 worker(s) x 16` for a run
    that was resized."""
    sizes = sorted({w for w in workers_per_epoch if w}) or [cfg.min_workers]
    return " or ".join(f"{w} worker(s) x {cfg.per_worker_batch(w)}" for w in sizes)


def _mean(rows: list, key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def training_report(model_dir: str, validation: Union[pd.DataFrame, str], history: Optional[list] = None,
                    cfg: Optional[Config] = None, update_card: bool = True) -> str:
    """Evaluate an exported model on its validation set into `<model_dir>/eval/`, draw the training curves.

    `validation` is a frame of raysst.data.load_data (labels encoded) or a labeled data path; `history`
    defaults to the `epochs` of `<model_dir>/metrics.json`. A model that `jobs/train.py` exported carries its
    epoch's own validation outputs (`eval/validation_outputs.npy`, from the workers' validation pass): the
    report on that frame is made of them, the very figures of the card, with no second scoring pass.
    Otherwise the batch scorer scores `validation`. Returns the model card section, which is also inserted
    into `<model_dir>/README.md` unless `update_card` is False.
    """
    from raysst.plots import plot_training_curves

    cfg = cfg or Config()
    eval_dir = posixpath.join(model_dir, "eval")
    recorded = json.loads(read_text(posixpath.join(model_dir, "metrics.json")))
    history = recorded["epochs"] if history is None else history
    task = Task.from_dict(recorded["task"]) if "task" in recorded else checkpoint_task(model_dir)  # older exports
    metric = cfg.metric or task.metrics[0]
    outputs = training_predictions(eval_dir, validation, history, task, metric)
    if outputs is not None:
        report = report_from_training(model_dir, validation, outputs, history, task, metric)
    else:
        with scored_dir_for(eval_dir, "") as scored, tempfile.TemporaryDirectory() as tmp:
            data = validation
            if isinstance(validation, pd.DataFrame):
                # The scorer reads files. Next to a local model the rows stay on record (and on its shared disk).
                data = str(Path(tmp if "://" in eval_dir else eval_dir, "validation.parquet"))
                Path(data).parent.mkdir(parents=True, exist_ok=True)
                validation = training_frame(validation, task)
                validation.to_parquet(data, index=False)
                # the (sentence[, sentence_pair], label) of check_frame
                cfg = cfg.replace(label_column="label", text_column=TEXT,
                                  text_pair_column=PAIR if PAIR in validation else None)
            report = evaluate_model(cfg.replace(model=model_dir, input=data), eval_dir, scored)
    with local_dir(eval_dir) as out:
        plot_training_curves(history, out / CURVES, cfg.name, metric)
    section = card_section(report, "eval")
    if update_card:
        card_path = posixpath.join(model_dir, "README.md")
        write_text(card_path, with_card_section(read_text(card_path), section))
    return section


def training_frame(validation: pd.DataFrame, task: Task) -> pd.DataFrame:
    """The validation frame with its encoded labels as names again (lists of names for multi-label), as a
    labeled file the scorer and the report read."""
    if task.kind == "regression":
        return validation
    names = np.array(task.labels, dtype=object)
    labels = (names[validation["label"].to_numpy(np.int64)] if task.kind == "single"
              else [list(names[np.asarray(y) > 0.5]) for y in validation["label"]])
    return validation.assign(label=list(labels))


def training_predictions(eval_dir: str, validation: Union[pd.DataFrame, str], history: list, task: Task,
                         metric: str) -> Optional[np.ndarray]:
    """The exported epoch's validation outputs, where they are there and belong to `validation`: one row per
    row, and against its labels the very metric the epoch recorded."""
    from pyarrow.fs import FileType

    fs, path = filesystem(posixpath.join(eval_dir, PREDICTIONS_FILE))
    if not isinstance(validation, pd.DataFrame) or fs.get_file_info(path).type != FileType.File:
        return None
    with fs.open_input_file(path) as f:
        outputs = np.load(io.BytesIO(f.read()))
    if outputs.ndim != 2 or len(outputs) != len(validation) or outputs.shape[1] != task.num_labels:
        return None
    value = task.score(outputs, np.stack(validation["label"].to_numpy()))[metric] if metric in task.metrics else None
    return outputs if value is not None and abs(value - best_row(history, metric)[metric]) < 1e-6 else None


def report_from_training(model_dir: str, validation: pd.DataFrame, outputs: np.ndarray, history: list,
                         task: Task, metric: str) -> dict:
    """The report of `validation` from the training run's own outputs; the rows and their outputs stay on
    record as `eval/validation.parquet`."""
    best = best_row(history, metric)  # the epoch export_run keeps
    eval_dir = posixpath.join(model_dir, "eval")
    frame = training_frame(validation, task)
    report = {"model": model_dir, "data": posixpath.join(eval_dir, "validation.parquet"), "label_column": "label",
              "precision": best.get("precision", "float32"),
              **compute_report(frame[TEXT], frame["label"], outputs, task, "validation"),
              "rows": {"total": len(outputs), "evaluated": len(outputs), "not_scored": {},
                       "truncated": best.get("eval_truncated", 0)},
              "scoring": {"source": f"the training workers' validation pass of epoch {best['epoch']}"}}
    scored = pa.Table.from_pandas(frame, preserve_index=False)
    for name, column in task.output_arrays(outputs, np.ones(len(outputs), bool)).items():
        scored = scored.append_column(name if name not in scored.column_names else f"output_{name}", column)
    with local_dir(eval_dir) as out:
        pq.write_table(scored, out / "validation.parquet")
    write_report(report, eval_dir)
    print(f"[raysst] {model_dir}: {metric} {report.get(metric, best[metric]):.4f} on {report['n']} rows (epoch "
          f"{best['epoch']}'s own validation outputs); report in {eval_dir}", flush=True)
    return report
