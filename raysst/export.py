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

from raysst.config import Config
from raysst.evaluate import compute_report, evaluate_model, scored_dir_for, write_report
from raysst.models import precision_name
from raysst.report import CURVES, card_section, with_card_section
from raysst.storage import (HISTORY_FILE, PREDICTIONS_FILE, STATE_FILES, copy_to, filesystem, local_dir, read_text,
                            write_text)


def export_run(result, cfg: Config, dest: Optional[str] = None) -> str:
    """Export the best checkpoint of a finished Ray Train run to `<run>/model` (or `dest`)."""
    if result.error:
        raise RuntimeError(f"training run {cfg.name} failed: {result.error}") from result.error
    best = result.get_best_checkpoint("accuracy", "max") or result.checkpoint
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
        best = max(history, key=lambda row: row["accuracy"])
        metrics = {
            "epochs": history,
            "best_epoch": best["epoch"],
            "accuracy": best["accuracy"],
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
        (out / "README.md").write_text(model_card(metrics, cfg))
        return copy_to(out, dest)


def model_card(metrics: dict, cfg: Config) -> str:
    """A model card in the form of the well-known bert-base-uncased SST-2 card."""
    rows = "\n".join(f"| {r['epoch']} | {r['train_loss']:.4f} | {r['eval_loss']:.4f} | {r['accuracy']:.4f} | "
                     f"{r.get('workers', '?')} |" for r in metrics["epochs"])
    c = cfg
    return f"""---
language: en
license: apache-2.0
tags: [text-classification, sentiment-analysis, raysst]
datasets: [glue/sst2]
metrics: [accuracy]
pipeline_tag: text-classification
---

# {c.name}: {c.model} fine-tuned on SST-2

Binary sentiment classifier (labels `negative`, `positive`) trained with
raysst on Ray Train. It reaches **{metrics['accuracy']:.2%}** accuracy
on the SST-2 validation set ({metrics['epochs'][-1]['eval_samples']} sentences; best epoch {metrics['best_epoch']}).

```python
from transformers import pipeline
classifier = pipeline("sentiment-analysis", model="PATH/TO/THIS/DIRECTORY")
classifier("a gripping, beautifully acted film")
```

## Training results

| Epoch | Training Loss | Validation Loss | Accuracy | Workers |
|:-----:|:-------------:|:---------------:|:--------:|:-------:|
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

For English sentiment of short texts such as movie-review sentences, the domain of SST-2.
Accuracy drops on other domains (product reviews, social media, long documents), on sarcasm
and on negation-heavy phrasing. Inputs longer than {c.max_seq_length} tokens are truncated.
Probabilities are not calibrated guarantees; check the evaluation report before relying on them.
The training data reflects the opinions of film critics and carries their biases.
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

    `validation` is a (sentence, label) frame or a labeled data path; `history` defaults to the
    `epochs` of `<model_dir>/metrics.json`. A model that `jobs/train.py` exported carries its epoch's own
    validation predictions (`eval/validation_prob_positive.npy`, from the workers' validation pass): the
    report on that frame is made of them, the very figures of the card, with no second scoring pass.
    Otherwise the batch scorer scores `validation`. Returns the model card section, which is also inserted
    into `<model_dir>/README.md` unless `update_card` is False.
    """
    from raysst.plots import plot_training_curves

    cfg = cfg or Config()
    eval_dir = posixpath.join(model_dir, "eval")
    if history is None:
        history = json.loads(read_text(posixpath.join(model_dir, "metrics.json")))["epochs"]
    prob = training_predictions(eval_dir, validation, history)
    if prob is not None:
        report = report_from_training(model_dir, validation, prob, history)
    else:
        with scored_dir_for(eval_dir, "") as scored, tempfile.TemporaryDirectory() as tmp:
            data = validation
            if isinstance(validation, pd.DataFrame):
                # The scorer reads files. Next to a local model the rows stay on record (and on its shared disk).
                data = str(Path(tmp if "://" in eval_dir else eval_dir, "validation.parquet"))
                Path(data).parent.mkdir(parents=True, exist_ok=True)
                validation.to_parquet(data, index=False)
                cfg = cfg.replace(label_column="label", text_column=None)  # the (sentence, label) of check_frame
            report = evaluate_model(cfg.replace(model=model_dir, input=data), eval_dir, scored)
    with local_dir(eval_dir) as out:
        plot_training_curves(history, out / CURVES, cfg.name)
    section = card_section(report, "eval")
    if update_card:
        card_path = posixpath.join(model_dir, "README.md")
        write_text(card_path, with_card_section(read_text(card_path), section))
    return section


def training_predictions(eval_dir: str, validation: Union[pd.DataFrame, str], history: list) -> Optional[np.ndarray]:
    """The exported epoch's validation probabilities, where they are there and belong to `validation`: one per
    row, and against its labels the very accuracy the epoch recorded."""
    from pyarrow.fs import FileType

    fs, path = filesystem(posixpath.join(eval_dir, PREDICTIONS_FILE))
    if not isinstance(validation, pd.DataFrame) or fs.get_file_info(path).type != FileType.File:
        return None
    with fs.open_input_file(path) as f:
        prob = np.load(io.BytesIO(f.read()))
    if len(prob) != len(validation):
        return None
    accuracy = float(((prob > 0.5) == validation["label"].to_numpy().astype(bool)).mean())
    return prob if abs(accuracy - max(row["accuracy"] for row in history)) < 1e-9 else None


def report_from_training(model_dir: str, validation: pd.DataFrame, prob: np.ndarray, history: list) -> dict:
    """The report of `validation` (sentence, label) from the training run's own predictions; the rows and
    their probabilities stay on record as `eval/validation.parquet`."""
    best = max(history, key=lambda row: row["accuracy"])  # the epoch export_run keeps
    eval_dir = posixpath.join(model_dir, "eval")
    report = {"model": model_dir, "data": posixpath.join(eval_dir, "validation.parquet"), "label_column": "label",
              "precision": best.get("precision", "float32"),
              **compute_report(validation["sentence"], validation["label"], prob, "validation"),
              "rows": {"total": len(prob), "evaluated": len(prob), "not_scored": {},
                       "truncated": best.get("eval_truncated", 0)},
              "scoring": {"source": f"the training workers' validation pass of epoch {best['epoch']}"}}
    with local_dir(eval_dir) as out:
        validation.assign(prob_positive=prob).to_parquet(out / "validation.parquet", index=False)
    write_report(report, eval_dir)
    print(f"[raysst] {model_dir}: accuracy {report['accuracy']:.4f} on {report['n']} rows (epoch {best['epoch']}'s "
          f"own validation predictions); report in {eval_dir}", flush=True)
    return report
