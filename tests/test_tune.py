"""Ray Tune sweeps of the project's own trainer on a tiny BERT: ASHA, outputs, resume after kill, fail-fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from raysst.config import TUNE, Config
from raysst.cli import parse_config

ROOT = Path(__file__).resolve().parents[1]


def sweep_cfg(tiny_model, data, storage, **kw) -> Config:
    base = dict(model=tiny_model, data=str(data), storage_path=str(storage), name="sweep", num_samples=4, epochs=2,
                lr_min=5e-4, lr_max=5e-3, batch_sizes=[16, 32], eval_batch_size=64, log_every=1000)
    return Config(**{**base, **kw})


def finished_trials(sweep: Path) -> set:
    """Trials that Tune's saved experiment state records as finished."""
    from ray.tune import ExperimentAnalysis

    if not list(sweep.glob("experiment_state-*.json")):
        return set()
    try:
        return {t.trial_id for t in ExperimentAnalysis(str(sweep)).trials if t.status == "TERMINATED"}
    except Exception:  # the state file is being rewritten; look again
        return set()


@pytest.fixture(scope="module")
def asha_sweep(tiny_model, sst2_small, tmp_path_factory):
    """A 4-trial, 2-epoch ASHA sweep on 400 rows, run as `python jobs/tune.py`, killed (the driver and its
    local Ray, as a lost machine would be) once a trial has finished, then rerun with the same command.

    One sweep serves every assertion below: each costs minutes of process start-up on 2 cores."""
    storage = tmp_path_factory.mktemp("tune")
    cfg = sweep_cfg(tiny_model, sst2_small, storage)
    sweep = storage / cfg.name
    argv = [sys.executable, "jobs/tune.py", "--model", tiny_model, "--data", str(sst2_small), "--storage-path",
            str(storage), "--name", cfg.name, "--num-samples", "4", "--epochs", "2", "--scheduler", "asha",
            "--lr-min", str(cfg.lr_min), "--lr-max", str(cfg.lr_max), "--batch-sizes", "16,32",
            "--max-train-samples", "400", "--eval-batch-size", "64", "--log-every", "1000"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with open(storage / "first.log", "w") as log:
        first = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            while not (finished := finished_trials(sweep)):
                assert first.poll() is None, (storage / "first.log").read_text()[-3000:]
                time.sleep(2)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    histories = {t: _latest_history(sweep, t) for t in finished}
    # Trials caught between epochs: their Train runs should go on from the checkpoint, not from scratch.
    caught = {t.name: len(json.loads(_latest_history(sweep, t.name))) for t in (sweep / "train_runs").iterdir()
              if t.name not in finished and list(t.glob("checkpoint_epoch_*/history.json"))}
    second = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    return cfg, sweep, finished, histories, out, caught


def _latest_history(sweep: Path, trial_id: str) -> str:
    return max((sweep / "train_runs" / trial_id).glob("checkpoint_epoch_*/history.json")).read_text()


@pytest.mark.timeout(600)
def test_asha_sweep_runs_every_trial_to_the_end_or_an_early_stop(asha_sweep):
    cfg, sweep, *_ = asha_sweep
    trials = pd.read_csv(sweep / "trials.csv")
    assert len(trials) == 4 and trials["trial_id"].is_unique
    assert set(trials["status"]) <= {"completed", "early-stopped"}, trials.to_string()
    for row in trials.itertuples():
        assert row.epochs_run == (2 if row.status == "completed" else 1)
        assert cfg.lr_min <= row.lr <= cfg.lr_max and row.batch_size in (16, 32)
        assert 0 < row.best_accuracy < 1 and row.eval_loss > 0 and row.wall_time_s > 0
        assert 1 <= row.best_epoch <= row.epochs_run
        # Each trial is a real Train run of the project's trainer, with its own checkpoints.
        history = json.loads(_latest_history(sweep, row.trial_id))
        assert [h["epoch"] for h in history] == list(range(1, row.epochs_run + 1))
        assert all(h["train_samples"] == 400 and h["eval_samples"] == 101 for h in history)
        assert max(h["accuracy"] for h in history) == row.best_accuracy
    assert (sweep / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(60)
def test_killed_sweep_resumes_without_rerunning_finished_trials(asha_sweep):
    _, sweep, finished, histories, out, caught = asha_sweep
    assert "resuming the sweep" in out
    assert 1 <= len(finished) < 4, "the sweep ended before it could be killed"
    for t in finished:  # not run again: no new start, the same checkpoints
        assert f"trial {t} started" not in out
        assert _latest_history(sweep, t) == histories[t]
    unfinished = set(pd.read_csv(sweep / "trials.csv")["trial_id"]) - finished
    assert unfinished and all(f"trial {t} started" in out for t in unfinished)
    for t, epochs_done in caught.items():
        history = json.loads(_latest_history(sweep, t))
        if epochs_done < len(history):
            assert history[epochs_done]["start_epoch"] == epochs_done + 1, history


@pytest.mark.timeout(60)
def test_best_json_is_the_best_row_of_trials_csv(asha_sweep):
    _, sweep, *_ = asha_sweep
    trials = pd.read_csv(sweep / "trials.csv")
    best = json.loads((sweep / "best.json").read_text())
    assert best["accuracy"] == trials["best_accuracy"].max()
    row = trials.set_index("trial_id").loc[best["trial_id"]]
    assert (best["accuracy"], best["epoch"]) == (row["best_accuracy"], row["best_epoch"])
    assert (best["config"]["lr"], best["config"]["batch_size"]) == (row["lr"], row["batch_size"])
    assert best["trials"] == 4 and sum(best["trials_by_status"].values()) == 4


@pytest.mark.timeout(120)
def test_best_model_loads_in_pipeline_and_scores_its_reported_accuracy(asha_sweep, sst2_small):
    from transformers import pipeline

    _, sweep, *_ = asha_sweep
    best = json.loads((sweep / "best.json").read_text())
    model_dir = sweep / "best_model"
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["config"]["lr"] == best["config"]["lr"] and (model_dir / "README.md").exists()
    classifier = pipeline("text-classification", model=str(model_dir), device=-1)
    validation = pd.read_parquet(sst2_small / "validation.parquet")
    predicted = classifier(list(validation["sentence"]), batch_size=64, truncation=True, max_length=128)
    assert {p["label"] for p in predicted} <= {"negative", "positive"}
    # The exported weights are the best checkpoint's: they score exactly the accuracy the sweep reported.
    correct = sum((p["label"] == "positive") == bool(y) for p, y in zip(predicted, validation["label"]))
    assert correct / len(validation) == pytest.approx(best["accuracy"], abs=1e-9)
    # Its evaluation report, as a training run's: made of the trial's own validation predictions.
    report = json.loads((model_dir / "eval" / "report.json").read_text())
    assert report["accuracy"] == pytest.approx(best["accuracy"], abs=1e-9) and report["n"] == len(validation)
    assert "## Evaluation report" in (model_dir / "README.md").read_text()


@pytest.mark.timeout(300)
def test_optuna_search_runs(ray_local, tiny_model, sst2_small, tmp_path):
    from raysst.tune import tune_driver_fn

    cfg = sweep_cfg(tiny_model, sst2_small, tmp_path, name="optuna", num_samples=2, epochs=1, search="optuna",
                    scheduler="none", max_train_samples=200)
    sweep = Path(tune_driver_fn(cfg))
    trials = pd.read_csv(sweep / "trials.csv")
    assert len(trials) == 2 and set(trials["status"]) == {"completed"}
    assert trials["lr"].between(cfg.lr_min, cfg.lr_max).all() and trials["lr"].nunique() == 2
    # Tune saved Optuna's searcher state (random search saves a basic-variant state instead).
    assert list(sweep.glob("searcher-state-*.pkl")) and not list(sweep.glob("basic-variant-state-*"))
    assert (sweep / "best_model" / "model.safetensors").exists()


@pytest.mark.timeout(60)
def test_trial_too_big_for_the_cluster_fails_at_once_with_needs_and_haves(ray_local, tiny_model, sst2_small,
                                                                          tmp_path):
    from raysst.capacity import CapacityError
    from raysst.tune import tune_driver_fn

    cfg = sweep_cfg(tiny_model, sst2_small, tmp_path, num_workers=2, cpus_per_worker=3)
    started = time.monotonic()
    with pytest.raises(CapacityError) as e:
        tune_driver_fn(cfg)
    assert time.monotonic() - started < 30
    assert ("a trial needs 2 worker(s) x {CPU: 3} = {CPU: 6}; the cluster has {CPU: 4} on 1 node, room for 1 "
            "such worker(s), and no autoscaler to add more. Lower --workers-per-trial" in str(e.value))
    with pytest.raises(CapacityError, match=r"x \{CPU: 1, GPU: 1\} = \{CPU: 1, GPU: 1\}.*has \{CPU: 4\}.*--no-use-gpu"):
        tune_driver_fn(cfg.replace(num_workers=1, cpus_per_worker=1, use_gpu=True))
    assert not (tmp_path / "sweep").exists()  # nothing was started


def test_concurrency_counts_whole_workers_per_node():
    from raysst.capacity import CapacityError, Cluster
    from raysst.tune import concurrent_trials

    cfg = Config(num_workers=2, cpus_per_worker=2)
    assert concurrent_trials(cfg, Cluster([{"CPU": 3}, {"CPU": 3}])) == 1  # 6 CPUs, but a node holds one worker
    assert concurrent_trials(cfg, Cluster([{"CPU": 8}, {"CPU": 4}])) == 3
    gpu = cfg.replace(use_gpu=True)
    assert concurrent_trials(gpu, Cluster([{"CPU": 64, "GPU": 8}, {"CPU": 16}])) == 4
    assert concurrent_trials(gpu.replace(max_concurrent_trials=2), Cluster([{"CPU": 64, "GPU": 8}])) == 2
    assert concurrent_trials(gpu.replace(num_samples=3), Cluster([{"CPU": 64, "GPU": 8}])) == 3
    with pytest.raises(CapacityError, match=r"has \{CPU: 64\} on 1 node"):
        concurrent_trials(gpu, Cluster([{"CPU": 64}]))


def test_bad_sweep_settings_fail_before_anything_starts(tiny_model, sst2_small, tmp_path, capsys):
    from raysst.tune import tune_driver_fn

    cfg = sweep_cfg(tiny_model, sst2_small, tmp_path, num_workers=4)
    with pytest.raises(ValueError, match="batch_size must be divisible by num_workers"):
        tune_driver_fn(cfg.replace(batch_sizes=[16, 30]))
    for argv, message in ((["--batch-sizes", "16,x"], "batch_sizes must be comma-separated whole numbers"),
                          (["--batch-sizes", "0"], "batch_sizes must be a non-empty list of positive sizes"),
                          (["--lr-min", "1e-3", "--lr-max", "1e-4"], "0 < lr_min <= lr_max"),
                          (["--scheduler", "hyperband"], "scheduler must be asha or none"),
                          (["--search", "grid"], "search must be random or optuna")):
        with pytest.raises(SystemExit):
            parse_config(TUNE, argv)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()
