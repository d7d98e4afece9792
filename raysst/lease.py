"""One live job per output: `<output>/_lease.json` names the job writing there, and that job renews it.

A scoring or evaluation job takes the lease before it plans. A second job that finds a live lease fails at
once, naming the holder. A lease is dead, and the next job takes it without being told, as soon as its holder
is provably gone (it ran on this host and its process no longer exists, or its Ray job on the cluster this job
joins has ended) or once its heartbeat is older than its timeout; `--take-over` takes a live one. Either way
the new job goes on from the committed parts, as a resume does.

The lease is written with the parts' commit primitive (storage.commit_text: a temporary name and os.replace
locally, one PUT in an object store), which makes it whole, never last-writer-safe: pyarrow offers no
conditional PUT. So a job writes its own token, reads the lease back SETTLE_S later and holds it only if its
token is still there; locally a fresh lease is created with os.link, which fails if the name exists, so of
jobs racing on a fresh output exactly one gets it. What remains: a job whose read and write lie more than
SETTLE_S apart can overwrite a lease its holder has already read back. Every heartbeat reads the lease before
renewing it, so the overwritten job sees the other token within one heartbeat and stops; both wrote the same
chunks' parts under the same names, so the output still holds every row once, at the cost of that overlap.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator, Optional

from raysst.storage import commit_text, filesystem, read_text, write_text

LEASE_FILE = "_lease.json"
TMP_PREFIX = "_lease-tmp-"  # not score_workers' `_tmp-`: the holder's cleanup must not delete a rival's write
SETTLE_S = 1.0  # far longer than a job takes from reading the lease to writing its own
BEATS_PER_TIMEOUT = 4


class LeaseError(RuntimeError):
    """This job may not write to its output: another job holds it."""


class LeaseHeld(LeaseError):
    def __init__(self, lease: dict, output: str):
        super().__init__(f"another job (id {lease.get('job_id')}, host {lease.get('host')}, started "
                         f"{lease.get('started')}) is writing to {output}; wait for it, or pass --take-over if it is dead")


class LeaseLost(LeaseError):
    """The lease was taken from this job (or could not be renewed in time): it stops rather than write beside
    the new holder."""


def identity() -> dict:
    """Where this process runs: host, pid, the pid's start time (a reused pid has another) and its pid space."""
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": psutil.Process().create_time(),
            "pid_space": _pid_space()}


def _pid_space() -> str:
    """The boot and pid namespace: two containers may share a host name, and pids compare only within one."""
    found = []
    for path, read in (("/proc/sys/kernel/random/boot_id", lambda p: open(p).read().strip()), ("/proc/self/ns/pid",
                                                                                             os.readlink)):
        try:
            found.append(read(path))
        except OSError:
            found.append("")
    return "/".join(found)


def read_lease(path: str) -> Optional[dict]:
    """The lease at `path`, or None when there is none; ValueError naming the file for anything else there."""
    try:
        text = read_text(path)
    except FileNotFoundError:  # locally, and from pyarrow's S3 and GCS filesystems alike
        return None
    try:
        lease = json.loads(text)
        missing = {"token", "heartbeat", "timeout_s"} - set(lease)
    except (ValueError, TypeError) as e:
        missing = {str(e)}
    if missing:
        raise ValueError(f"{path}: not a lease raysst wrote (no {', '.join(sorted(missing))}); delete it, or pass "
                         "--take-over")
    return lease


def why_dead(lease: dict) -> Optional[str]:
    """Why the holder of `lease` is gone; None while it may be alive."""
    age = time.time() - float(lease["heartbeat"])
    if age > float(lease["timeout_s"]):
        return f"its heartbeat is {age:.0f} s old, past its {float(lease['timeout_s']):g} s timeout"
    me = identity()
    if (lease.get("host"), lease.get("pid_space")) == (me["host"], me["pid_space"]):
        if not _process_alive(int(lease["pid"]), float(lease["pid_started"])):
            return f"its process {lease['pid']} on {lease['host']} no longer exists"
        return None
    ray_job = lease.get("ray")
    if ray_job and _ray_job_ended(ray_job):
        return f"its Ray job {ray_job['job']} is no longer running on this cluster"
    return None


def _process_alive(pid: int, started: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < 1 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's process: it exists
        return True


def _ray_info() -> Optional[dict]:
    """This driver's Ray job and its cluster's session, once Ray is up (None before)."""
    import sys

    ray = sys.modules.get("ray")  # not imported: not up (and importing it here would cost a second)
    if ray is None or not ray.is_initialized():
        return None
    return {"cluster": ray._private.worker.global_worker.node.session_name, "job": ray.get_runtime_context().get_job_id()}


def _ray_job_ended(ray_job: dict) -> bool:
    """Whether the GCS of the cluster this process has joined records `ray_job` as ended (False if another cluster)."""
    import ray

    info = _ray_info()
    if not info or info["cluster"] != ray_job.get("cluster"):
        return False
    try:
        jobs = ray._private.state.jobs()  # the GCS job table: a driver's job is dead once it disconnects
    except Exception:  # noqa: BLE001 (a table we cannot read proves nothing)
        return False
    return any(j["JobID"] == ray_job.get("job") and j["IsDead"] for j in jobs)


def _job_id(job: str, token: str) -> str:
    """`ray job submit`'s id where it started this driver (what `ray job stop` takes), else `<job>-<token>`."""
    try:
        return json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])["metadata"]["job_submission_id"]
    except (KeyError, ValueError, TypeError):
        return f"{job}-{token[:8]}"


class Lease:
    """This job's lease on `output`, read back after SETTLE_S, then checked and renewed by a thread until released."""

    def __init__(self, output: str, record: dict):
        self.output, self.path, self.record = output, f"{output}/{LEASE_FILE}", record
        self.every = float(record["timeout_s"]) / BEATS_PER_TIMEOUT
        self.lost: Optional[LeaseError] = None
        self._written, self._stopped = time.time(), False
        self._checked, self._wake = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._beat, name="raysst-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        renewed = self._written
        while not self._stopped and time.time() < self._written + SETTLE_S:  # the read-back waits out the settle
            self._wake.wait(self._written + SETTLE_S - time.time())
            self._wake.clear()
        while not self._stopped:
            try:
                held = read_lease(self.path)
                if held is None:
                    self.lost = LeaseLost(f"{self.path} was deleted while this job held it; it stops")
                    return
                if held["token"] != self.record["token"]:  # at the read-back: a rival's write came last
                    self.lost = LeaseHeld(held, self.output) if not self._checked.is_set() else LeaseLost(
                        f"another job (id {held.get('job_id')}, host {held.get('host')}) took over {self.output}; "
                        "this job stops so that one job writes there")
                    return
                self.record.update(heartbeat=time.time(), ray=_ray_info() or self.record.get("ray"))
                commit_text(self.path, json.dumps(self.record), TMP_PREFIX)
                renewed = time.time()
            except (OSError, ValueError) as e:  # a storage hiccup: try again until the lease would be stale
                if time.time() - renewed > float(self.record["timeout_s"]):
                    self.lost = LeaseLost(f"{self.output}: its lease could not be renewed for "
                                          f"{time.time() - renewed:.0f} s ({e}); it stops")
                    return
            finally:
                self._checked.set()
            self._wake.wait(self.every)
            self._wake.clear()

    def confirm(self) -> None:
        """Wait for the read-back (at most SETTLE_S after the write): LeaseHeld if another job's token is there."""
        self._checked.wait()
        self.check()

    def check(self) -> None:
        """Raise if the lease is no longer this job's."""
        if self.lost:
            raise self.lost

    def note_ray(self) -> None:
        """Record this driver's Ray job in the lease now (Ray is up), not at the next heartbeat."""
        self._wake.set()

    def release(self) -> None:
        """Stop renewing; delete the lease if it is still this job's."""
        self._stopped = True
        self._wake.set()
        self._thread.join()
        self._checked.set()
        try:
            held = read_lease(self.path)
            if held and held["token"] == self.record["token"]:
                fs, p = filesystem(self.path)
                fs.delete_file(p)
        except (OSError, ValueError) as e:  # left behind, it is dead to a rerun on this host, stale elsewhere
            print(f"[raysst] {self.path}: could not remove this job's lease ({e})", flush=True)


def acquire(output: str, job: str, timeout_s: float, take_over: bool = False) -> Lease:
    """Take the lease on `output` for `job`; LeaseHeld if a live job holds it (unless `take_over`)."""
    from raysst.runtime import init_ray

    path, token = f"{output}/{LEASE_FILE}", uuid.uuid4().hex
    record = {"token": token, "job_id": _job_id(job, token), "job": job, **identity(),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "timeout_s": float(timeout_s)}
    for _ in range(3):  # a fresh lease created by another job in between: judge that one
        try:
            held = read_lease(path)
        except ValueError:
            if not take_over:
                raise
            held = {"job_id": "unknown", "host": "unknown"}
        if held:
            reason = why_dead(held) if "heartbeat" in held else None
            if reason is None and held.get("ray") and os.environ.get("RAY_ADDRESS", "local") != "local":
                init_ray()  # only the cluster that ran its Ray job can say whether that job ended
                reason = why_dead(held)
            if reason is None and not take_over:
                raise LeaseHeld(held, output)
            print(f"[raysst] {output}: taking over the lease of job {held.get('job_id')} on {held.get('host')}: "
                  f"{reason or '--take-over'}", flush=True)
        record.update(heartbeat=time.time(), ray=_ray_info())
        if _write(path, json.dumps(record), fresh=not held):
            return Lease(output, record)
    raise LeaseHeld(read_lease(path) or {}, output)


def _write(path: str, text: str, fresh: bool) -> bool:
    """Commit the lease; a fresh local one only if no other job made one first (False then)."""
    if not fresh or "://" in path:
        commit_text(path, text, TMP_PREFIX)
        return True
    tmp = f"{os.path.dirname(path)}/{TMP_PREFIX}{uuid.uuid4().hex}"
    write_text(tmp, text)
    try:
        os.link(tmp, path)  # atomic, and fails if the name exists: no second job gets past this
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: the read-back decides, as in an object store
        os.replace(tmp, path)
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


@contextmanager
def holding(output: str, job: str, timeout_s: float, take_over: bool = False) -> Iterator[Lease]:
    """The lease on `output` while the block runs; released (deleted if still ours) however it ends."""
    lease = acquire(output, job, timeout_s, take_over)
    try:
        yield lease
    finally:
        lease.release()
