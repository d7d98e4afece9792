"""The output lease on real files and on a real S3 server (moto): one holder among racing jobs, a dead holder's
lease taken at once, another host's only once stale, --take-over stopping the old holder, an ended Ray job."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid

import pytest

from servers import moto_s3
from raysst.lease import LEASE_FILE, LeaseHeld, LeaseLost, acquire, read_lease
from raysst.liveness import identity, why_dead
from raysst.storage import commit_text, read_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path, monkeypatch) -> str:
    """An output directory, local or on a moto S3 server."""
    if request.param == "local":
        yield str(tmp_path / "out")
        return
    bucket = f"leases-{uuid.uuid4().hex[:8]}"  # raysst.storage keeps a filesystem per bucket, this one per server
    with moto_s3(monkeypatch, bucket):
        yield f"s3://{bucket}/out"


def held_message(output: str, host: str) -> str:
    """The refusal, as a pattern: the holder's id, host and start time, and what to do."""
    return (rf"another job \(id score-[0-9a-f]{{8}}, host {re.escape(host)}, started \d{{4}}-\d\d-\d\dT[\d:]+\+00:00\) "
            rf"is writing to {re.escape(output)}; wait for it, or pass --take-over if it is dead")


def eventually(condition, within_s: float = 10.0) -> bool:
    """Whether `condition()` holds within `within_s` (a loaded machine delays the heartbeat thread)."""
    deadline = time.time() + within_s
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.05)
    return True


def forge(output: str, **fields) -> dict:
    """A lease as another job would have written it: this process's identity unless `fields` say otherwise."""
    lease = {"token": "f" * 32, "job_id": "score-ffffffff", "job": "score", **identity(),
             "started": "2026-01-01T00:00:00+00:00", "heartbeat": time.time(), "timeout_s": 60.0, "ray": None, **fields}
    commit_text(f"{output}/{LEASE_FILE}", json.dumps(lease))
    return lease


def test_a_second_job_is_refused_while_the_holder_renews(output):
    first = acquire(output, "score", timeout_s=2)
    first.confirm()
    with pytest.raises(LeaseHeld, match=held_message(output, identity()["host"])):
        acquire(output, "score", timeout_s=2)
    beat = read_lease(f"{output}/{LEASE_FILE}")["heartbeat"]
    assert eventually(lambda: read_lease(f"{output}/{LEASE_FILE}")["heartbeat"] > beat)  # renewed every 0.5 s
    first.release()
    assert read_lease(f"{output}/{LEASE_FILE}") is None
    acquire(output, "score", timeout_s=2).release()  # free again


def test_of_jobs_that_start_together_exactly_one_holds(output):
    """Eight jobs at once, on a fresh output and then on one whose lease is dead: one goes on, the others
    are refused (at acquire, or at the read-back when a later write replaced theirs)."""
    for round_, dead in enumerate((None, {"host": "elsewhere", "heartbeat": 0.0})):
        out = f"{output}/{round_}"
        if dead:
            forge(out, **dead)
        # Racers are threads of this process, and so is the moto server: under load they share one GIL, and
        # eight HTTP clients with the server can stall a write past the 1 s read-back. Jobs are processes.
        racers = 8 if "://" not in output else 4
        start, outcomes = threading.Barrier(racers), []

        def job():
            start.wait()
            try:
                lease = acquire(out, "score", timeout_s=30)
                lease.confirm()
                outcomes.append(lease)
            except LeaseHeld as e:
                outcomes.append(e)

        threads = [threading.Thread(target=job) for _ in range(racers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        holders = [o for o in outcomes if not isinstance(o, LeaseHeld)]
        assert len(outcomes) == racers and len(holders) == 1, outcomes
        assert read_lease(f"{out}/{LEASE_FILE}")["token"] == holders[0].record["token"]
        holders[0].release()


def test_a_killed_holder_on_this_host_is_taken_at_once(tmp_path):
    out = str(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from raysst.lease import acquire; "
                               "acquire(sys.argv[1], 'score', 60).confirm(); print('held', flush=True); time.sleep(600)",
                               out], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LeaseHeld):
        acquire(out, "score", 60)
    holder.kill()
    holder.wait()
    t = time.monotonic()
    lease = acquire(out, "score", 60)  # well inside the 60 s timeout: the pid is gone
    assert time.monotonic() - t < 5
    lease.release()
    # A pid that exists again, but started at another time, is another process.
    assert "no longer exists" in why_dead(forge(out, pid_started=identity()["pid_started"] - 100))


def test_a_lease_from_another_host_is_dead_only_once_stale(output, capsys):
    forge(output, host="elsewhere", timeout_s=2.0)
    with pytest.raises(LeaseHeld, match=held_message(output, "elsewhere")):
        acquire(output, "score", 60)
    time.sleep(2.2)
    lease = acquire(output, "score", 60)
    lease.confirm()
    assert "taking over the lease of job score-ffffffff on elsewhere: its heartbeat is 2 s old, past its 2 s timeout" \
        in capsys.readouterr().out
    lease.release()


def test_take_over_of_a_live_lease_stops_the_old_holder(output):
    old = acquire(output, "score", timeout_s=2)
    old.confirm()
    new = acquire(output, "score", timeout_s=60, take_over=True)
    new.confirm()
    assert eventually(lambda: old.lost is not None)  # at its next heartbeat (every 0.5 s)
    with pytest.raises(LeaseLost, match=rf"another job \(id {new.record['job_id']}, host .*\) took over"):
        old.check()
    old.release()  # not its lease any more: left alone
    assert read_lease(f"{output}/{LEASE_FILE}")["token"] == new.record["token"]
    new.release()


def test_what_is_not_a_lease_is_refused_naming_the_file_unless_taken_over(tmp_path):
    out = str(tmp_path / "out")
    commit_text(f"{out}/{LEASE_FILE}", "{}")
    with pytest.raises(ValueError, match=rf"{out}/{LEASE_FILE}: not a lease raysst wrote .*pass --take-over"):
        acquire(out, "score", 60)
    acquire(out, "score", 60, take_over=True).release()


def test_a_lease_whose_ray_job_ended_on_this_cluster_is_dead(ray_local, tmp_path):
    """A driver that joined this cluster and left: its Ray job is dead in the GCS, so its lease is, though
    its heartbeat is fresh and its host is not this one; the live job's own lease is not."""
    import ray

    address = ray.get_runtime_context().gcs_address
    ended = subprocess.run([sys.executable, "-c", "import ray, sys; ray.init(address=sys.argv[1]); "
                            "print(ray.get_runtime_context().get_job_id())", address],
                           capture_output=True, text=True, check=True).stdout.split()[-1]
    cluster = ray._private.worker.global_worker.node.session_name
    out = str(tmp_path / "out")
    lease = forge(out, host="elsewhere", ray={"cluster": cluster, "job": ended})
    deadline = time.time() + 20  # the GCS marks the job dead once the driver's connection closes
    while why_dead(lease) is None and time.time() < deadline:
        time.sleep(0.2)
    assert why_dead(lease) == f"its Ray job {ended} is no longer running on this cluster"
    alive = forge(out, host="elsewhere", ray={"cluster": cluster, "job": ray.get_runtime_context().get_job_id()})
    assert why_dead(alive) is None
    assert why_dead({**lease, "ray": {"cluster": "another-cluster", "job": ended}}) is None
    assert json.loads(read_text(f"{out}/{LEASE_FILE}"))["host"] == "elsewhere"


def test_an_evaluation_is_refused_before_it_empties_the_scores_being_written(tiny_model, sst2_small, tmp_path):
    """evaluate empties its scored directory first: under another job's live lease it must not get that far."""
    from raysst.config import Config
    from raysst.evaluate import evaluate_driver_fn, model_names

    out = tmp_path / "eval"
    part = out / "scored" / model_names([tiny_model])[0] / "part-00000.parquet"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"PAR1 being written by the holder")
    forge(str(out), host="elsewhere")
    cfg = Config(model=tiny_model, input=str(sst2_small / "validation.parquet"), output=str(out), num_actors=1)
    with pytest.raises(LeaseHeld, match=held_message(str(out), "elsewhere")):
        evaluate_driver_fn(cfg)
    assert part.exists()


def test_score_and_evaluate_take_the_lease_flags_and_check_them(capsys):
    from raysst.cli import parse_config
    from raysst.config import EVAL, SCORE, TRAIN

    for job in (SCORE, EVAL):
        cfg = parse_config(job, ["--take-over", "--lease-timeout", "5"])
        assert cfg.take_over and cfg.lease_timeout == 5.0
    with pytest.raises(SystemExit):
        parse_config(SCORE, ["--lease-timeout", "0"])
    assert "lease_timeout must be a positive number of seconds, got 0.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(TRAIN, ["--take-over"])
