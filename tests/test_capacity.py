"""Does a request fit: per-node arithmetic on a cluster.yaml-shaped cluster, and jobs that fail fast on a real Ray."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raysst.capacity import (AFTER_SCALE_UP, NOW, CapacityError, Cluster, NodeType, check_fits, launcher_node_types,
                             workers_at_most, workers_now)
from raysst.config import Config

ROOT = Path(__file__).resolve().parents[1]
HEAD = {"CPU": 8.0, "GPU": 0.0, "memory": 2e10, "node:10.0.0.1": 1.0}  # as ray.nodes() reports it
A100 = {"CPU": 96.0, "GPU": 8.0, "memory": 9e11, "accelerator_type:A100": 1.0}
# cluster.yaml: a CPU head node type that adds no workers, and up to 4 autoscaled 8-GPU workers.
TYPES = [NodeType("ray.head.cpu", {"CPU": 8, "GPU": 0}, 0), NodeType("ray.worker.a100", {"CPU": 96, "GPU": 8}, 4)]


def aws(*workers: dict) -> Cluster:
    return Cluster([HEAD, *workers], TYPES, max_workers=4)


@pytest.mark.parametrize("launcher", ["cluster.yaml", "cluster-gcp.yaml"])
def test_node_types_read_from_the_cluster_launcher_config(launcher):
    types, cap = launcher_node_types(ROOT / launcher)
    assert [(t.resources, t.max_workers) for t in types] == [(t.resources, t.max_workers) for t in TYPES]
    assert cap == 4


def test_two_gpu_trials_on_cluster_yaml_run_sixteen_at_a_time(capsys):
    from raysst.tune import concurrent_trials

    cfg = Config(num_workers=2, cpus_per_worker=8, use_gpu=True, num_samples=40)
    assert concurrent_trials(cfg, aws()) == 16  # 4 nodes x 8 GPUs, though none is up yet
    assert "waiting for the autoscaler: needs 2 x {CPU: 8, GPU: 1}" in capsys.readouterr().out
    assert concurrent_trials(cfg, aws(A100)) == 16  # a live worker is one of the 4, not a fifth
    assert concurrent_trials(cfg.replace(max_concurrent_trials=5), aws()) == 5
    assert concurrent_trials(cfg.replace(num_samples=3), aws()) == 3
    # CPU-only trials: the head holds one 8-CPU worker, each A100 node twelve.
    assert concurrent_trials(Config(num_workers=2, cpus_per_worker=8, num_samples=40), aws()) == (1 + 48) // 2


def test_forty_gpus_never_fit_and_the_error_names_max_workers():
    need = {"CPU": 1, "GPU": 1}
    assert workers_now(aws(), need) == 0 and workers_at_most(aws(), need) == 32
    with pytest.raises(CapacityError) as e:
        check_fits(need, 40, "a trial", "Lower --workers-per-trial", aws(A100))
    message = str(e.value)
    assert message.startswith("a trial needs 40 worker(s) x {CPU: 1, GPU: 1} = {CPU: 40, GPU: 40}; "
                              "the cluster has {CPU: 104, GPU: 8} on 2 nodes, room for 8 such worker(s)")
    assert "could scale to {CPU: 392, GPU: 32} on 5 node(s), room for 32" in message
    assert "ray.worker.a100 {CPU: 96, GPU: 8} x max_workers 4" in message
    assert message.endswith("Lower --workers-per-trial.")


def test_a_worker_must_fit_on_one_node():
    assert check_fits({"CPU": 2}, 2, "the run", "Lower it", Cluster([{"CPU": 2}, {"CPU": 2}])) == NOW
    with pytest.raises(CapacityError, match=r"has \{CPU: 6\} on 2 nodes, room for 2 such worker\(s\), and no "
                                            r"autoscaler to add more\. Lower it\.$"):
        check_fits({"CPU": 2}, 3, "the run", "Lower it", Cluster([{"CPU": 3}, {"CPU": 3}]))
    with pytest.raises(CapacityError, match="room for 0"):  # 9 GPUs: more than one A100 node has
        check_fits({"GPU": 9}, 1, "the run", "Lower it", aws())
    assert check_fits({"CPU": 8, "GPU": 8}, 4, "the run", "Lower it", aws()) == AFTER_SCALE_UP


def test_the_cluster_wide_max_workers_and_unbounded_types():
    cpu = NodeType("cpu", {"CPU": 16}, 10)
    gpu = NodeType("gpu", {"CPU": 8, "GPU": 1}, 10)
    # The cap of 3 worker nodes goes to the type that holds the most workers of the request first.
    assert workers_at_most(Cluster([HEAD], [cpu, gpu], max_workers=3), {"CPU": 4}) == 2 + 3 * 4
    assert workers_at_most(Cluster([HEAD], [cpu, gpu], max_workers=3), {"GPU": 1}) == 3
    unbounded = Cluster([HEAD], [NodeType("gpu", {"CPU": 8, "GPU": 1}, None)])
    assert check_fits({"GPU": 1}, 1000, "the run", "Lower it", unbounded) == AFTER_SCALE_UP
    unknown = Cluster([HEAD], [NodeType("gpu", None, 2)])  # a type whose size the config does not say
    assert check_fits({"GPU": 1}, 1000, "the run", "Lower it", unknown) == AFTER_SCALE_UP


def run_job(*args: str) -> subprocess.CompletedProcess:
    """A job as a user starts it, with no RAY_ADDRESS: it starts a local Ray with all of this machine's CPUs."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    job = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = job.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)  # the job and the local Ray it started
        out, _ = job.communicate()
        pytest.fail(f"{args[0]} still ran after 60 s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(args, job.returncode, out)


def cpus_available(out: str, needed: int) -> None:
    """The job said what the cluster has: fewer CPUs than it needs, on the one local node."""
    found = re.search(r"the cluster has \{CPU: (\d+)\} on 1 node", out)
    assert found and int(found.group(1)) < needed, out[-3000:]


# Each job asks for more CPUs than this machine has. Tune takes 4 workers, not 3: it has no --batch-size flag,
# and the default 32 must split over the workers.
TOO_BIG = {
    "train": (["--num-workers", "3", "--cpus-per-worker", "2", "--batch-size", "24"],
              "train: the run needs 3 worker(s) x {CPU: 2} = {CPU: 6}; ", 6, "Lower --num-workers or --cpus-per-worker."),
    "tune": (["--workers-per-trial", "4", "--cpus-per-worker", "2", "--batch-sizes", "16,32"],
             "tune: a trial needs 4 worker(s) x {CPU: 2} = {CPU: 8}; ", 8,
             "Lower --workers-per-trial or --cpus-per-worker."),
    "score": (["--num-workers", "1", "--cpus-per-worker", "3"],
              "score: scoring needs 1 worker(s) x {CPU: 3} = {CPU: 3}; ", 3, "Lower --num-workers or --cpus-per-worker."),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("job", TOO_BIG)
def test_a_job_too_big_for_the_machine_exits_at_once(job, tiny_model, sst2_small, tmp_path):
    flags, needs, cpus, hint = TOO_BIG[job]
    data = (["--input", str(sst2_small / "validation.parquet"), "--output", str(tmp_path / "out")] if job == "score"
            else ["--data", str(sst2_small), "--storage-path", str(tmp_path)])
    done = run_job(f"jobs/{job}.py", "--model", tiny_model, *data, *flags)
    assert done.returncode != 0
    assert needs in done.stdout, done.stdout[-3000:]
    cpus_available(done.stdout, cpus)
    assert hint in done.stdout and "Traceback" not in done.stdout
    assert not list(tmp_path.iterdir())  # nothing written: no run directory, no output


@pytest.mark.timeout(180)
def test_a_worker_group_that_never_gets_room_fails_after_wait_for_nodes(ray_local, tiny_model, sst2_small, tmp_path):
    """Ray Train V2 alone retries such a group forever; the run gives up after --wait-for-nodes."""
    from ray.util import placement_group, remove_placement_group

    from raysst.config import TRAIN
    from raysst.data import load_data, to_ray_datasets
    from raysst.train import build_trainer, fit

    held = placement_group([{"CPU": 3}])  # of 4 CPUs: the worker's 2 fit the cluster, but not now
    ray_local.get(held.ready())
    cfg = Config(model=tiny_model, data=str(sst2_small), storage_path=str(tmp_path), name="stuck", epochs=1,
                 cpus_per_worker=2, batch_size=16, wait_for_nodes=5)
    train, validation, task = load_data(cfg.replace(max_train_samples=64))
    datasets = to_ray_datasets(train, validation, cfg.model, cfg.max_seq_length)
    started = time.monotonic()
    try:
        with pytest.raises(CapacityError, match=r"the run needs 1 worker\(s\) x \{CPU: 2\} = \{CPU: 2\}; the cluster "
                                                r"has \{CPU: 4\} on 1 node.*after 5 s the workers still had no room"):
            fit(build_trainer(cfg, datasets, len(train), task), cfg, "the run", TRAIN)
    finally:
        remove_placement_group(held)
    assert time.monotonic() - started < 90
