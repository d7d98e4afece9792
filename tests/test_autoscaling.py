"""Train and tune on a local twin of cluster.yaml: a CPU head whose autoscaler adds fake 1-GPU nodes (max 2).

Each test gets a fresh cluster (tests/fake_cluster.py) and runs the job as `ray job submit` would on a
`ray up` head: the driver on the head, HOME holding ray_bootstrap_config.yaml. The "GPUs" are resource
labels; `fake_gpu` makes the workers reserve them and compute on CPU. Figures (seconds, steps) are printed
with a `[figure]` prefix: run with -s to see them.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from corpora import corpus_rows, write_input
from fake_cluster import FakeCluster, Job, start_fake_cluster, _name as _comm
from raysst.config import TRAIN, TUNE, Config, check_job
from raysst.cli import parse_config

ROOT = Path(__file__).resolve().parents[1]
SST2 = str((ROOT.parent / "shared" / "data" / "sst2").resolve())
STEP = r"\(RayTrainWorker pid=(\d+)[^)]*\) \[raysst\] epoch (\d+) step (\d+)/(\d+)"


@pytest.fixture
def fake_cluster(tmp_path):
    """start(**options) -> a fresh FakeCluster (see start_fake_cluster); stopped, with all its nodes, at the end."""
    started: list = []

    def start(**options) -> FakeCluster:
        started.append(start_fake_cluster(tmp_path / "home", log=str(tmp_path / "head.log"), **options))
        return started[-1]

    yield start
    for cluster in started:
        cluster.stop()


def fake_gpu_config(tmp_path: Path, tiny_model: str, data, **values) -> str:
    """A --config file for a "GPU" job on the fake cluster (fake_gpu has no flag: it is for tests only)."""
    path = tmp_path / "fake-gpu.yaml"
    path.write_text(yaml.safe_dump({
        "model": tiny_model, "data": str(data), "storage_path": str(tmp_path / "runs"), "use_gpu": True,
        "fake_gpu": True, "cpus_per_worker": 1, "lr": 1e-3, "eval_batch_size": 64, "log_every": 1,
        "wait_for_nodes": 300, **values}))
    return str(path)


def figure(name: str, value: float, unit: str = "s") -> None:
    print(f"[figure] {name}: {value:.1f} {unit}", flush=True)


def steps(job: Job) -> list:
    """(seconds since start, worker pid, epoch, step) of each step line the job printed so far."""
    found = ((t, re.search(STEP, line)) for t, line in list(job.lines))
    return [(t, int(m.group(1)), int(m.group(2)), int(m.group(3))) for t, m in found if m]


def wait_for_new_step(job: Job, old_pids: set, timeout_s: float) -> tuple:
    """(seconds since start, epoch, step) of the first step line from a worker pid not in `old_pids`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and job.proc.poll() is None:
        new = [(t, epoch, step) for t, pid, epoch, step in steps(job) if pid not in old_pids]
        if new:
            return new[0]
        time.sleep(0.2)
    raise AssertionError(f"no step from a new worker within {timeout_s:g} s:\n{job.output[-4000:]}")


def checkpoint_registered(run_dir: Path, epoch: int) -> bool:
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    return snapshot.exists() and f"checkpoint_epoch_{epoch:03d}" in snapshot.read_text()


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "model" / "metrics.json").read_text())


def test_num_workers_takes_a_count_or_a_range_that_every_size_of_splits_the_batch(capsys):
    assert parse_config(TRAIN, ["--num-workers", "2-4", "--batch-size", "48"]).num_workers == "2-4"
    cfg = Config(num_workers="1-2", batch_size=16)
    assert (cfg.elastic, cfg.min_workers, cfg.max_workers, cfg.per_worker_batch(2)) == (True, 1, 2, 8)
    assert Config(num_workers="2-2").num_workers == 2 and not Config(num_workers=" 3 ", batch_size=24).elastic
    with pytest.raises(ValueError, match=r"num_workers must be a whole number of at least 1 such as 4, or a range "
                                         r"MIN-MAX with 1 <= MIN <= MAX such as 2-8, got '4-2'"):
        Config(num_workers="4-2")
    with pytest.raises(ValueError, match=r"batch_size must be divisible by num_workers \* grad_accum_steps for every "
                                         r"worker count in 2-8, but 3, 5, 6, 7 worker\(s\) do not split it; use a "
                                         r"multiple of 840 or a narrower range, got 32"):
        Config(num_workers="2-8")
    with pytest.raises(ValueError, match="batch_size must be divisible by num_workers \\* grad_accum_steps = 3"):
        Config(num_workers=3)
    with pytest.raises(ValueError, match="tune runs trials of a fixed size; give --workers-per-trial a number"):
        check_job(Config(num_workers="1-2"), TUNE)
    with pytest.raises(ValueError, match="fake_gpu must be false without use_gpu"):
        Config(fake_gpu=True)
    with pytest.raises(SystemExit):
        parse_config(TRAIN, ["--num-workers", "two"])
    assert "num_workers must be a whole number" in capsys.readouterr().err


def test_elastic_and_fake_gpu_reach_ray_train(tiny_model):
    import pandas as pd

    from raysst.task import Task
    from raysst.train import build_trainer, even_rows

    cfg = Config(model=tiny_model, num_workers="2-4", batch_size=48, use_gpu=True, fake_gpu=True,
                 elastic_resize_interval=7)
    assert len(even_rows(pd.DataFrame({"x": range(100)}), cfg)) == 96  # a multiple of 2, 3 and 4
    trainer = build_trainer(cfg, {}, 96, Task())
    scaling = trainer.scaling_config
    assert (scaling.num_workers, scaling.use_gpu, scaling.elastic_resize_monitor_interval_s) == ((2, 4), True, 7)
    assert scaling.resources_per_worker == {"CPU": 1, "GPU": 1}  # the fake GPU is still reserved
    assert trainer.backend_config.backend == "gloo" and cfg.compute_on_gpu is False
    assert build_trainer(cfg.replace(fake_gpu=False), {}, 96, Task()).backend_config.backend == "nccl"  # Train's


@pytest.mark.timeout(600)
def test_two_gpu_workers_train_once_the_autoscaler_adds_their_nodes(fake_cluster, tiny_model, sst2_small, tmp_path):
    cluster = fake_cluster()
    assert cluster.worker_raylets() == {}  # scale from zero: no GPU node yet
    job = Job(cluster, "jobs/train.py", "--config", fake_gpu_config(tmp_path, tiny_model, sst2_small, epochs=1,
              batch_size=16, name="zero"), "--num-workers", "2", cwd=ROOT, log=tmp_path / "job.log")
    waited, _ = job.wait_for(r"waiting for the autoscaler: needs 2 x \{CPU: 1, GPU: 1\}", 120)
    first_step, _ = job.wait_for(STEP, 420)
    assert job.finish(300) == 0, job.output[-4000:]
    assert len(cluster.worker_raylets()) == 2
    figure("scale from zero: submit -> first training step", first_step)
    figure("scale from zero: capacity check -> first training step", first_step - waited)
    done = metrics(tmp_path / "runs" / "zero")
    assert [(r["epoch"], r["workers"], r["global_batch_size"]) for r in done["epochs"]] == [(1, 2, 16)]
    assert done["hardware"].startswith("2 worker(s), each on CPU")  # a fake GPU computes on CPU
    assert done["workers_per_epoch"] == [2]
    card = (tmp_path / "runs" / "zero" / "model" / "README.md").read_text()
    assert "| Epoch | Training Loss | Validation Loss | Accuracy | Workers |" in card
    assert "global batch size: 16 (2 worker(s) x 8 x 1 accumulation step(s))" in card


@pytest.mark.timeout(180)
def test_more_gpus_than_max_workers_allow_fail_at_once_naming_the_limit(fake_cluster, tiny_model, sst2_small,
                                                                         tmp_path):
    cluster = fake_cluster()
    started = time.monotonic()
    job = Job(cluster, "jobs/train.py", "--config", fake_gpu_config(tmp_path, tiny_model, sst2_small, batch_size=24),
              "--num-workers", "3", cwd=ROOT, log=tmp_path / "job.log")
    assert job.finish(120) != 0
    elapsed = time.monotonic() - started
    figure("3 GPU workers on max_workers 2: submit -> exit", elapsed)
    assert elapsed < 60
    out = job.output
    assert "train: the run needs 3 worker(s) x {CPU: 1, GPU: 1} = {CPU: 3, GPU: 3}; " in out, out[-3000:]
    assert ("could scale to {CPU: 4, GPU: 2} on 3 node(s), room for 2 (ray.worker.gpu {CPU: 1, GPU: 1} x "
            "max_workers 2; cluster max_workers 2). Lower --num-workers or --cpus-per-worker, or use --no-use-gpu."
            in out), out[-3000:]
    assert "Traceback" not in out and cluster.worker_raylets() == {}
    # An elastic run that fits only after scale-up, with no node coming (a cloud out of capacity): Train V2's
    # elastic policy would wait for MIN workers without end; the run gives up after --wait-for-nodes.
    cluster.hold_launches()
    started = time.monotonic()
    job = Job(cluster, "jobs/train.py", "--config", fake_gpu_config(tmp_path, tiny_model, sst2_small, batch_size=24,
              wait_for_nodes=5), "--num-workers", "1-2", cwd=ROOT, log=tmp_path / "elastic.log")
    assert job.finish(120) != 0
    figure("elastic 1-2, no node comes, --wait-for-nodes 5: submit -> exit", time.monotonic() - started)
    assert ("the run needs 1 worker(s) x {CPU: 1, GPU: 1} = {CPU: 1, GPU: 1}; the cluster has {CPU: 2} on "
            "1 node, room for 0 such worker(s)" in job.output), job.output[-3000:]
    assert "after 5 s the workers still had no room. Raise --wait-for-nodes" in job.output, job.output[-3000:]
    assert "Traceback" not in job.output


@pytest.mark.timeout(900)
def test_a_lost_node_restarts_the_run_from_its_checkpoint(fake_cluster, tiny_model, tmp_path):
    """A spot reclaim mid-epoch 2: the run goes on from epoch 1's checkpoint once a new node replaces it."""
    cluster = fake_cluster(min_workers=2)  # both nodes up first: the figures are about the loss alone
    cluster.wait_for_nodes(2)
    job = Job(cluster, "jobs/train.py", "--config", fake_gpu_config(
        tmp_path, tiny_model, SST2, epochs=3, batch_size=16, max_train_samples=3000, name="lost", max_failures=2),
        "--num-workers", "2", cwd=ROOT, log=tmp_path / "job.log")
    run_dir = tmp_path / "runs" / "lost"
    deadline = time.monotonic() + 480
    while not checkpoint_registered(run_dir, 1):  # Train resumes only from a checkpoint it has registered
        assert job.proc.poll() is None and time.monotonic() < deadline, job.output[-4000:]
        time.sleep(0.2)
    job.wait_for(r"epoch 2 step \d+/", 60, after=time.monotonic() - job.started)
    # Kill the node rank 0 is not on, so that rank 0's step lines keep coming until the kill.
    rank0_node = cluster.node_of(steps(job)[-1][1])
    victim = next(node for node in cluster.worker_raylets() if node != rank0_node)
    killed_at = time.monotonic() - job.started
    killed = cluster.kill_node(victim)
    print(f"killed node {victim[-5:]}: {[_comm(p) for p in killed]}", flush=True)
    before = steps(job)
    done_steps = max(step for _, _, epoch, step in before if epoch == 2)
    # The first step of the new group's workers (each node's log monitor also replays old lines).
    old_pids = {pid for _, pid, _, _ in before}
    next_step, epoch, step = wait_for_new_step(job, old_pids, 480)
    assert job.finish(480) == 0, job.output[-4000:]
    assert "resuming from the checkpoint of epoch 1 on 2 worker(s)" in job.output
    assert (epoch, step) == (2, 1)  # epoch 2 again, from its first step
    figure("node lost: kill -> next training step", next_step - killed_at)
    figure("node lost: steps of epoch 2 redone", done_steps, "steps")
    rows = metrics(tmp_path / "runs" / "lost")["epochs"]
    assert [(r["epoch"], r["start_epoch"], r["workers"]) for r in rows] == [(1, 1, 2), (2, 2, 2), (3, 2, 2)]
    assert victim in cluster.killed and len(cluster.worker_raylets()) == 2  # a new node took its place


@pytest.mark.timeout(900)
def test_elastic_run_grows_to_two_workers_with_the_same_global_batch(fake_cluster, tiny_model, tmp_path):
    """--num-workers 1-2 with one GPU node up: it starts on 1 worker, the autoscaler adds the second node,
    and Train V2 restarts the group on 2 workers from the latest checkpoint."""
    cluster = fake_cluster(min_workers=1)
    cluster.wait_for_nodes(1)
    # The second node comes only once epoch 1 is done on one worker. Seeing it takes the node's start (3-10 s
    # here), up to the autoscaling coordinator's 20 s refresh, the 5 s resize interval and a restart (about
    # 20 s): some 55 s when the machine is busy. 13 more epochs of about 5 s leave room to grow.
    cluster.hold_launches()
    job = Job(cluster, "jobs/train.py", "--config", fake_gpu_config(
        tmp_path, tiny_model, SST2, epochs=14, batch_size=16, max_train_samples=3200, name="elastic", log_every=20,
        elastic_resize_interval=5), "--num-workers", "1-2", cwd=ROOT, log=tmp_path / "job.log")
    first_step, _ = job.wait_for(STEP, 300)
    deadline = time.monotonic() + 300
    while not checkpoint_registered(tmp_path / "runs" / "elastic", 1):
        assert job.proc.poll() is None and time.monotonic() < deadline, job.output[-4000:]
        time.sleep(0.2)
    assert len(cluster.worker_raylets()) == 1
    released = time.monotonic() - job.started
    cluster.release_launches()
    resized, _ = job.wait_for(r"Deciding to resize the worker group from 1 -> 2 workers", 300)
    resumed, found = job.wait_for(r"resuming from the checkpoint of epoch (\d+) on 2 worker\(s\)", 300)
    assert job.finish(600) == 0, job.output[-4000:]
    figure("elastic: second node allowed -> resize decision", resized - released)
    figure("elastic: resize decision -> resumed on 2 workers", resumed - resized)
    rows = metrics(tmp_path / "runs" / "elastic")["epochs"]
    workers = [r["workers"] for r in rows]
    print(f"[figure] elastic: workers per epoch {workers}, resumed after epoch {found.group(1)}", flush=True)
    assert workers[0] == 1 and workers[-1] == 2 and workers == sorted(workers)
    assert [r["epoch"] for r in rows] == list(range(1, 15))
    assert {r["global_batch_size"] for r in rows} == {16}
    assert {(r["workers"], r["per_worker_batch_size"]) for r in rows} == {(1, 16), (2, 8)}
    # One schedule whatever the world size: 3200 rows / 16 = 200 optimizer steps per epoch.
    assert {r["schedule_steps_per_epoch"] for r in rows} == {200} and {r["train_samples"] for r in rows} == {3200}
    assert metrics(tmp_path / "runs" / "elastic")["workers_per_epoch"] == workers
    card = (tmp_path / "runs" / "elastic" / "model" / "README.md").read_text()
    assert "global batch size: 16 (1 worker(s) x 16 or 2 worker(s) x 8 x 1 accumulation step(s))" in card


@pytest.mark.timeout(900)
def test_two_gpu_trials_sweep_after_scale_up(fake_cluster, tiny_model, sst2_small, tmp_path):
    cluster = fake_cluster()
    job = Job(cluster, "jobs/tune.py", "--config", fake_gpu_config(tmp_path, tiny_model, sst2_small, epochs=1,
              name="sweep"), "--workers-per-trial", "1", "--num-samples", "2", "--batch-sizes", "16",
              "--scheduler", "none", cwd=ROOT, log=tmp_path / "job.log")
    job.wait_for(r"sweep sweep: 2 trials, 2 at a time, each 1 worker\(s\) x \{CPU: 1, GPU: 1\}", 180)
    first_step, _ = job.wait_for(STEP, 600)
    assert job.finish(780) == 0, job.output[-4000:]
    figure("sweep from zero: submit -> first training step", first_step)
    trials = (tmp_path / "runs" / "sweep" / "trials.csv").read_text()
    assert trials.count("completed") == 2, trials
    assert len(cluster.worker_raylets()) == 2


@pytest.mark.timeout(600)
def test_score_job_that_loses_a_node_mid_run_writes_every_row_once(fake_cluster, tiny_model, tmp_path):
    """Two "GPU" scoring actors, one per fake node; one node is reclaimed after the first parts commit. Ray Data
    restarts its actor on the replacement node and retries its chunks, whose parts overwrite any half-done
    one: every input row is in the output exactly once."""

    from raysst.score import SUMMARY_FILE, read_scored

    cluster = fake_cluster()
    n, chunk = 60_000, 2_000
    rows = corpus_rows(n)
    src, out = tmp_path / "in.parquet", tmp_path / "out"
    write_input(rows, src, "parquet")  # row groups of 2,000: one chunk each
    job = Job(cluster, "jobs/score.py", "--config", fake_gpu_config(tmp_path, tiny_model, SST2), "--input", str(src),
              "--output", str(out), "--num-workers", "2", "--chunk-rows", str(chunk), "--id-column", "idx",
              "--batch-size", "64", "--max-seq-length", "32", cwd=ROOT, log=tmp_path / "job.log")
    job.wait_for(r"waiting for the autoscaler: needs 2 x \{CPU: 1, GPU: 1\}", 120)
    deadline = time.monotonic() + 400
    while len(list(out.glob("*/part-*.parquet"))) < 2:
        assert job.proc.poll() is None and time.monotonic() < deadline, job.output[-4000:]
        time.sleep(0.05)
    victim = next(iter(cluster.worker_raylets()))
    killed_at = time.monotonic() - job.started
    committed = len(list(out.glob("*/part-*.parquet")))
    cluster.kill_node(victim)
    assert job.finish(400) == 0, job.output[-4000:]
    figure("score, node lost: kill -> job done", time.monotonic() - job.started - killed_at)
    print(f"[figure] score, node lost: {committed} of {n // chunk} chunks committed at the kill", flush=True)
    scored = read_scored(str(out))
    assert sorted(scored.idx) == list(range(n)) and scored.sentence.tolist() == rows.sentence.tolist()
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["rows_out"] == n and summary["chunks"]["scored_this_run"] == n // chunk
    assert victim in cluster.killed and not list(out.rglob("_tmp-*"))
