"""`ray job submit` against a `ray start --head` cluster that the test starts and stops itself."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# Jobs run `python` from the head's PATH: make it this interpreter, whatever the caller's PATH.
# Ray 2.60 starts heads with token auth, but its CLI only sends ~/.ray/auth_token in token mode.
# RAY_API_SERVER_ADDRESS (set for the in-process local Ray) would override `--address`: drop it.
ENV = {k: v for k, v in os.environ.items() if k != "RAY_API_SERVER_ADDRESS"}
ENV.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{ENV.get('PATH', '')}",
           RAY_AUTH_MODE=ENV.get("RAY_AUTH_MODE", "token"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real head node on free ports; the process group is killed at the end (not `ray stop`,
    which would stop every Ray on the machine)."""
    # Every port free and explicit: the defaults (agent 52365, ...) clash with any other Ray on the machine,
    # such as the in-process one of the other tests.
    port, dash = free_port(), free_port()
    ports = {f"--{name}": free_port() for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "metrics-export-port", "runtime-env-agent-port",
                                                   "ray-client-server-port", "node-manager-port",
                                                   "object-manager-port")}
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
                             "--dashboard-host=127.0.0.1", "--num-cpus=4", "--include-dashboard=true",
                             "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while subprocess.run([RAY, "job", "list", "--address", address], env=ENV, capture_output=True).returncode:
        assert head.poll() is None and time.time() < deadline, "ray start --head did not come up"
        time.sleep(2)
    yield address
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


def submit(address: str, *args: str, timeout: int = 400) -> str:
    """Submit a job from the project root as a user would; return its logs, failing on a non-zero exit."""
    env = {**ENV, "RAY_ADDRESS": address}
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--", "python", *args]
    for _ in range(20):
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
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
    assert (tmp_path / "scored" / "validation.parquet").exists()
