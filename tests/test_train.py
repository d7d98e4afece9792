"""Ray Train end to end on a tiny BERT: DDP, checkpoints, export, resume and worker failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from raysst.config import Config
from hf_reference import collate
from servers import moto_s3
from raysst.models import load_classifier, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SST2 = str((ROOT.parent / "shared" / "data" / "sst2").resolve())


def tiny_cfg(tiny_model, data, tmp_path, **kw) -> Config:
    base = dict(model=tiny_model, data=str(data), storage_path=str(tmp_path / "runs"), name="run",
                num_workers=2, epochs=2, lr=1e-3, batch_size=16, eval_batch_size=32, log_every=10, num_actors=1)
    return Config(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(ray_local, tiny_model, sst2_small, tmp_path_factory):
    """One 2-worker DDP run shared by the assertions below."""
    from raysst.train import train_driver_fn

    tmp = tmp_path_factory.mktemp("train")
    cfg = tiny_cfg(tiny_model, sst2_small, tmp, mlflow_uri=f"sqlite:///{tmp}/mlflow.db", dropout=0.0)
    return cfg, Path(train_driver_fn(cfg))


def test_two_worker_run_checkpoints_and_metrics(trained):
    cfg, model_dir = trained
    run_dir = Path(cfg.storage_path) / cfg.name
    assert sorted(p.name for p in run_dir.glob("checkpoint_epoch_*")) == ["checkpoint_epoch_001", "checkpoint_epoch_002"]
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2]
    for row in metrics["epochs"]:
        assert row["eval_samples"] == 101  # every validation row counted once over the 2 workers
        assert row["train_samples"] == 800 and row["train_samples_per_second"] > 0
        assert row["train_tokens_per_second"] > row["train_samples_per_second"]
        assert row["attention"] == "sdpa"  # fused attention, not assumed
        assert 0 < row["input_seconds"] < row["train_seconds"]  # the loop's wait for batches, within the epoch
        assert row["input_samples_per_second_per_worker"] > row["train_samples_per_second"] / 2
    assert metrics["config"]["num_workers"] == 2
    card = (model_dir / "README.md").read_text()
    assert "| Epoch | Training Loss | Validation Loss | Accuracy |" in card
    assert f"| 2 | {metrics['epochs'][1]['train_loss']:.4f} |" in card
    assert "- dropout: 0\n" in card


def test_dropout_override_reaches_attention_dropout_too(tiny_model):
    """Only attention dropout is on, so a deterministic training-mode pass after set_dropout(0) shows it was reached."""
    from transformers import AutoModelForSequenceClassification

    from raysst.models import set_dropout

    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5).train()
    batch = collate(load_tokenizer(tiny_model), ["a fine film", "dull and far too long"], 16)
    logits = lambda: model(**batch).logits  # noqa: E731
    assert not torch.equal(logits(), logits())
    set_dropout(model, 0.0)
    assert torch.equal(logits(), logits())


def test_head_gets_its_learning_rate_and_norms_no_weight_decay(tiny_model):
    from raysst.config import TRAIN
    from raysst.cli import parse_config
    from raysst.train_worker import param_groups

    model = load_classifier(tiny_model)
    cfg = parse_config(TRAIN, ["--lr", "1e-4", "--head-lr-scale", "10"])
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, cfg)
    got = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert len(got) == sum(len(g["params"]) for g in groups) == len(names)  # every parameter in exactly one group
    assert got["classifier.weight"] == (pytest.approx(1e-3), 0.01)
    assert got["bert.pooler.dense.bias"] == (pytest.approx(1e-3), 0.0)
    assert got["bert.encoder.layer.0.attention.self.query.weight"] == (1e-4, 0.01)
    assert got["bert.embeddings.LayerNorm.weight"] == (1e-4, 0.0)
    with pytest.raises(ValueError, match="head_lr_scale must be a positive number, got 0"):
        Config(head_lr_scale=0)


def test_tensorboard_and_mlflow_tracking(trained):
    import mlflow

    cfg, model_dir = trained
    assert list((Path(cfg.storage_path) / cfg.name / "tensorboard").glob("events.out.tfevents.*"))
    last = json.loads((model_dir / "metrics.json").read_text())["epochs"][-1]
    mlflow.set_tracking_uri(cfg.mlflow_uri)
    run = mlflow.search_runs(experiment_names=["raysst"]).iloc[0]
    assert run["metrics.epoch_accuracy"] == pytest.approx(last["accuracy"])
    assert run["params.lr"] == str(cfg.lr) and run["tags.mlflow.runName"] == cfg.name


def test_exported_model_loads_in_pipeline(trained):
    from transformers import pipeline

    _, model_dir = trained
    classifier = pipeline("sentiment-analysis", model=str(model_dir), device="cpu")
    answers = classifier(["a moving, funny and beautiful film", "a tedious mess"])
    assert {a["label"] for a in answers} <= {"negative", "positive"}
    assert all(0.5 <= a["score"] <= 1 for a in answers)


def test_bf16_on_cpu_trains_under_autocast_and_exports_fp32_weights(ray_local, tiny_model, sst2_small, tmp_path):
    """--precision bf16 without a GPU: the step runs under CPU autocast (1.3x on CPUs with AVX512-BF16);
    the weights stay fp32, as saved and as `pipeline` loads them, and the card says what ran."""
    from safetensors.torch import load_file

    from raysst.train import train_driver_fn

    cfg = tiny_cfg(tiny_model, sst2_small, tmp_path, num_workers=1, epochs=1, precision="bf16", name="bf16")
    model_dir = Path(train_driver_fn(cfg))
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert 0 < metrics["epochs"][0]["train_loss"] < 10 and metrics["epochs"][0]["train_samples"] == 800
    assert "- precision: bfloat16;" in (model_dir / "README.md").read_text()
    assert {t.dtype for t in load_file(str(model_dir / "model.safetensors")).values()} == {torch.float32}
    # The report holds the bf16 validation pass itself: the card's accuracy, not an fp32 rescoring's.
    report = json.loads((model_dir / "eval" / "report.json").read_text())
    assert report["precision"] == "bfloat16" and report["accuracy"] == metrics["accuracy"]


def test_reported_accuracy_equals_recomputed(trained, sst2_small):
    cfg, model_dir = trained
    metrics = json.loads((model_dir / "metrics.json").read_text())
    val = pd.read_parquet(sst2_small / "validation.parquet")
    model, tok = load_classifier(str(model_dir)).eval(), load_tokenizer(str(model_dir))
    with torch.inference_mode():
        batch = collate(tok, val["sentence"], cfg.max_seq_length)
        probs = model(**batch).logits.softmax(-1).numpy()
    predictions = probs.argmax(-1)
    assert metrics["accuracy"] == pytest.approx((predictions == val["label"].to_numpy()).mean(), abs=1e-12)
    # The evaluation report is made of the workers' own validation predictions (2 workers, rows interleaved):
    # row for row those of the exported model, and the card's accuracy to the last digit.
    report = json.loads((model_dir / "eval" / "report.json").read_text())
    assert report["scoring"]["source"].startswith("the training workers' validation pass")
    assert report["accuracy"] == metrics["accuracy"] and report["precision"] == "float32"
    assert report["rows"] == {"total": 101, "evaluated": 101, "not_scored": {}, "truncated": 0}
    on_record = pd.read_parquet(model_dir / "eval" / "validation.parquet")
    assert on_record.sentence.tolist() == val.sentence.tolist()
    assert on_record.prob_positive.to_numpy() == pytest.approx(probs[:, 1], abs=1e-5)


def _run_train_job(args: list, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "jobs/train.py", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def _checkpoint_registered(run_dir: Path, epoch: int) -> bool:
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    return snapshot.exists() and f"checkpoint_epoch_{epoch:03d}" in snapshot.read_text()


@pytest.mark.timeout(420)
def test_killed_job_resumes_at_epoch_two(tiny_model, tmp_path):
    """Kill the whole job (driver and its local Ray) after epoch 1, rerun: it continues at epoch 2."""
    args = ["--model", tiny_model, "--data", SST2, "--max-train-samples", "6000", "--num-workers", "1",
            "--cpus-per-worker", "1", "--epochs", "3", "--batch-size", "16", "--lr", "1e-3",
            "--storage-path", str(tmp_path), "--name", "resume"]
    first = _run_train_job(args)
    deadline = time.time() + 240
    while not _checkpoint_registered(tmp_path / "resume", 1):
        assert first.poll() is None and time.time() < deadline, first.stdout.read()
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (tmp_path / "resume" / "model").exists()

    second = _run_train_job(args)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    assert "resuming from the checkpoint of epoch 1" in out
    rows = json.loads((tmp_path / "resume" / "model" / "metrics.json").read_text())["epochs"]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0]["start_epoch"] == 1 and rows[1]["start_epoch"] == rows[2]["start_epoch"] == 2
    assert rows[0]["run_id"] != rows[1]["run_id"] == rows[2]["run_id"]


@pytest.mark.timeout(300)
def test_killed_worker_restarts_from_checkpoint(ray_local, tiny_model, tmp_path):
    from ray.util.state import list_actors
    from raysst.data import load_data, to_ray_datasets
    from raysst.train import build_trainer

    cfg = tiny_cfg(tiny_model, SST2, tmp_path, epochs=3, max_train_samples=6000, max_failures=1)
    train, validation, task = load_data(cfg)
    trainer = build_trainer(cfg, to_ray_datasets(train, validation, cfg.model, cfg.max_seq_length), len(train),
                            task)
    outcome = {}
    fit = threading.Thread(target=lambda: outcome.setdefault("result", trainer.fit()))
    fit.start()
    run_dir = Path(cfg.storage_path) / cfg.name
    while not _checkpoint_registered(run_dir, 1):
        assert fit.is_alive(), "training ended before its first checkpoint"
        time.sleep(0.2)
    # The address pins the query to this test's Ray: other Rays may run on the machine.
    workers = list_actors(address=ray_local.get_runtime_context().gcs_address,
                          filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2
    os.kill(workers[1].pid, signal.SIGKILL)  # mid-epoch 2: its all-reduce partner fails too
    fit.join(timeout=240)
    result = outcome["result"]
    assert result.error is None
    with result.checkpoint.as_directory() as latest:
        rows = json.loads((Path(latest) / "history.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["start_epoch"] for r in rows] == [1, 2, 2]  # epoch 2 rerun by a group restored from epoch 1


@pytest.mark.timeout(300)
def test_run_on_object_storage_exports_a_model_with_its_report(tiny_model, sst2_small, tmp_path, monkeypatch):
    """`--storage-path s3://...`, as cluster.yaml has it, against a real S3 server (moto) on localhost: the
    checkpoints, the exported model, its card and its evaluation report all land in the bucket, and the
    model read back from there loads in `pipeline`."""
    from pyarrow.fs import copy_files
    from transformers import pipeline

    with moto_s3(monkeypatch, "runs") as store:
        job = _run_train_job(["--model", tiny_model, "--data", str(sst2_small), "--num-workers", "1",
                              "--cpus-per-worker", "1", "--epochs", "1", "--batch-size", "16", "--lr", "1e-3",
                              "--storage-path", "s3://runs/raysst", "--name", "s3run"])
        out, _ = job.communicate(timeout=240)
        assert job.returncode == 0, out
        assert "model exported to s3://runs/raysst/s3run/model" in out, out[-3000:]
        assert not (ROOT / "runs" / "raysst" / "s3run").exists()  # Result.path alone once sent the model there
        copy_files("runs/raysst/s3run", str(tmp_path / "run"), source_filesystem=store)
    model_dir = tmp_path / "run" / "model"
    assert (tmp_path / "run" / "checkpoint_epoch_001" / "validation_outputs.npy").exists()
    metrics = json.loads((model_dir / "metrics.json").read_text())
    report = json.loads((model_dir / "eval" / "report.json").read_text())
    assert report["n"] == 101 and report["accuracy"] == metrics["accuracy"]
    assert (model_dir / "eval" / "training_curves.png").exists() and (model_dir / "eval" / "report.md").exists()
    assert "## Evaluation report" in (model_dir / "README.md").read_text()
    assert pipeline("sentiment-analysis", model=str(model_dir))("a gripping film")[0]["label"] in ("negative", "positive")
