"""`ray job submit` against a `ray start --head` cluster that the test starts and stops itself."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raysst.local_head import Head, start_head

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_head():
    """A real head node on free ports, with a token of its own when this HOME has none (as on a fresh machine);
    only its process group is ended afterwards."""
    head = start_head(num_cpus=4)
    yield head
    head.stop()


def submit(head: Head, *args: str, timeout: int = 400) -> str:
    """Submit a job from the project root as a user would; return its logs, failing on a non-zero exit."""
    cmd = [RAY, "job", "submit", "--address", head.dashboard, "--working-dir", ".", "--", "python", *args]
    for _ in range(20):
        done = subprocess.run(cmd, cwd=ROOT, env=head.env, capture_output=True, text=True, timeout=timeout)
        if "No available agent to submit job" not in done.stderr + done.stdout:
            break
        time.sleep(3)  # the head's job agent starts a little after its dashboard answers
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


@pytest.mark.timeout(600)
def test_submit_train_job(ray_head, tiny_model, sst2_small, tmp_path):
    out = submit(ray_head, "jobs/train.py", "--model", tiny_model, "--data", str(sst2_small),
                 "--num-workers", "2", "--epochs", "1", "--batch-size", "16",
                 "--storage-path", str(tmp_path), "--name", "submitted")
    model_dir = tmp_path / "submitted" / "model"
    assert f"model exported to {model_dir}" in out
    assert json.loads((model_dir / "metrics.json").read_text())["epochs"][0]["eval_samples"] == 101
    assert (model_dir / "model.safetensors").exists() and (model_dir / "README.md").exists()
    # Read on the rank-0 worker (one torch thread), not on the driver.
    hardware = json.loads((model_dir / "metrics.json").read_text())["hardware"]
    assert hardware.startswith("2 worker(s), each on CPU (") and "1 thread(s) of" in hardware, hardware
    assert hardware in (model_dir / "README.md").read_text()


@pytest.mark.timeout(600)
def test_submit_tune_job(ray_head, tiny_model, sst2_small, tmp_path):
    submit(ray_head, "jobs/tune.py", "--model", tiny_model, "--data", str(sst2_small), "--num-samples", "2",
           "--epochs", "1", "--batch-sizes", "16", "--max-train-samples", "200", "--workers-per-trial", "1",
           "--storage-path", str(tmp_path), "--name", "sweep")
    sweep = tmp_path / "sweep"
    assert len((sweep / "trials.csv").read_text().strip().splitlines()) == 3  # header + 2 trials
    assert json.loads((sweep / "best.json").read_text())["accuracy"] > 0
    assert (sweep / "best_model" / "model.safetensors").exists() and (sweep / "sweep.png").exists()


@pytest.mark.timeout(600)
def test_submit_score_job(ray_head, tiny_model, sst2_small, tmp_path):
    submit(ray_head, "jobs/score.py", "--model", tiny_model, "--input", str(sst2_small / "validation.parquet"),
           "--output", str(tmp_path / "scored"))
    summary = json.loads((tmp_path / "scored" / "_summary.json").read_text())
    assert summary["rows_in"] == summary["rows_out"] == 101
    assert (tmp_path / "scored" / "validation.parquet" / "part-00000.parquet").exists()


@pytest.mark.timeout(600)
def test_make_run_on_a_fresh_home_stops_only_its_own_head(ray_head, tiny_model, sst2_small, tmp_path):
    """The README's first command, as a newcomer runs it: no ~/.ray, another Ray already on the machine."""
    home, runs = tmp_path / "home", tmp_path / "runs"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    done = subprocess.run(["make", "-o", "setup", "run", f"VENV={Path(sys.executable).parents[1]}",
                           f"DATA={sst2_small}", f"RUNS={runs}",
                           f"ARGS=--max-train-samples 300 --model {tiny_model} --name smoke"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert (runs / "smoke" / "model" / "model.safetensors").exists() and "model exported to" in done.stdout
    assert "Ray head stopped" in done.stdout and "ray stop" not in done.stdout + done.stderr
    gcs = re.search(r"Ray head at (\S+),", done.stdout).group(1)
    status = subprocess.run([RAY, "status", "--address", gcs], env={**env, "RAY_gcs_rpc_server_reconnect_timeout_s": "3"},
                            capture_output=True, text=True, timeout=120)
    assert status.returncode != 0, status.stdout  # its head is gone ...
    listed = subprocess.run([RAY, "job", "list", "--address", ray_head.dashboard], env=ray_head.env,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr[-2000:]  # ... and the other Ray still answers
    assert not (home / ".ray" / "auth_token").exists()  # its token lived and died with its head
