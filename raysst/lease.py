"""One live job per output: `<output>/_lease.json` names the job writing there, and that job renews it.

A scoring or evaluation job looks at the lease before it plans, and a live one fails it at once, naming the
holder; it writes its own lease before its first write to the output. A lease is dead, and the next job takes
it without being told, as soon as its holder is provably gone (raysst.liveness: it ran on this host and its
process no longer exists, or its Ray job on the cluster this job joins has ended) or once its heartbeat is
older than its timeout; `--take-over` takes a live one. Either way the new job goes on from the committed
parts, as a resume does.

The lease is written with the parts' commit primitive (storage.commit_text: a temporary name and os.replace
locally, one PUT in an object store): whole, but last writer wins, and pyarrow offers no conditional PUT. So
a job writes its own token, reads the lease back SETTLE_S later, and holds it only if its token is still
there; locally a fresh lease is made with os.link, which fails if the name exists, so of jobs racing on a
fresh output exactly one makes it. What remains: a job whose read and write lie more than SETTLE_S apart can
overwrite a lease its holder has already read back. Every heartbeat reads the lease before renewing it, so
that holder sees the other token within a heartbeat and stops; both wrote the same chunks' parts under the
same names, so the output still holds every row once, at the cost of that overlap.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from typing import Iterator, Optional

from raysst.liveness import identity, ray_info, why_dead
from raysst.storage import commit_text, filesystem, read_text, write_text

LEASE_FILE = "_lease.json"
TMP_PREFIX = "_lease-tmp-"  # not score_workers' `_tmp-`: the holder's cleanup must not delete a rival's write
SETTLE_S = 1.0  # far longer than a job takes from reading the lease to writing its own
BEATS_PER_TIMEOUT = 4
FIELDS = ("token", "job_id", "host", "pid", "pid_started", "started", "heartbeat", "timeout_s")  # what judging reads


class LeaseError(RuntimeError):
    """This job may not write to its output: another job holds it."""


class LeaseHeld(LeaseError):
    def __init__(self, lease: dict, output: str):
        super().__init__(f"another job (id {lease.get('job_id')}, host {lease.get('host')}, started "
                         f"{lease.get('started')}) is writing to {output}; wait for it, or pass --take-over if it is dead")


class LeaseLost(LeaseError):
    """The lease was taken from this job (or could not be renewed in time): it stops rather than write beside
    the new holder."""


def read_lease(path: str) -> Optional[dict]:
    """The lease at `path`, or None when there is none; ValueError naming the file for anything else there."""
    try:
        text = read_text(path)
    except FileNotFoundError:  # locally, and from pyarrow's S3 and GCS filesystems alike
        return None
    try:
        lease = json.loads(text)
        missing = set(FIELDS) - set(lease)
    except (ValueError, TypeError) as e:
        missing = {str(e)}
    if missing:
        raise ValueError(f"{path}: not a lease raysst wrote (no {', '.join(sorted(missing))}); delete it, or pass "
                         "--take-over")
    return lease


def _job_id(job: str, token: str) -> str:
    """`ray job submit`'s id where it started this driver (what `ray job stop` takes), else `<job>-<token>`."""
    try:
        return json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])["metadata"]["job_submission_id"]
    except (KeyError, ValueError, TypeError):
        return f"{job}-{token[:8]}"


def judge(path: str, output: str, take_over: bool) -> Optional[dict]:
    """The lease at `path` that this job may replace (its holder is gone, or `take_over`), with why; None if
    there is none; LeaseHeld if a live job holds it. Reads only."""
    from raysst.runtime import init_ray

    try:
        held = read_lease(path)
    except ValueError:
        if not take_over:
            raise
        return {"job_id": "unknown", "host": "unknown", "why": "--take-over"}
    if held is None:
        return None
    reason = why_dead(held)
    if reason is None and held.get("ray") and os.environ.get("RAY_ADDRESS", "local") != "local":
        init_ray()  # only the cluster that ran its Ray job can say whether that job ended
        reason = why_dead(held)
    if reason is None and not take_over:
        raise LeaseHeld(held, output)
    return {**held, "why": reason or "--take-over"}


class Lease:
    """A job's lease on `output`: written by take(), read back SETTLE_S later, then checked and renewed by a
    thread (every quarter of `timeout_s`) until released."""

    def __init__(self, output: str, job: str, timeout_s: float, take_over: bool = False):
        token = uuid.uuid4().hex
        self.output, self.path, self.take_over = output, f"{output}/{LEASE_FILE}", take_over
        self.record = {"token": token, "job_id": _job_id(job, token), "job": job, **identity(),
                       "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "timeout_s": float(timeout_s)}
        self.every = float(timeout_s) / BEATS_PER_TIMEOUT
        self.lost: Optional[LeaseError] = None
        self._thread: Optional[threading.Thread] = None
        self._written, self._stopped, self._made_dir = 0.0, False, False
        self._checked, self._wake = threading.Event(), threading.Event()

    def take(self) -> None:
        """Write this job's lease (once); LeaseHeld if a live job holds the output."""
        if self._thread:
            return
        self._made_dir = "://" not in self.output and not os.path.isdir(self.output)
        for _ in range(3):  # a fresh lease made by another job in between: judge that one
            held = judge(self.path, self.output, self.take_over)
            if held:
                print(f"[raysst] {self.output}: taking over the lease of job {held.get('job_id')} on "
                      f"{held.get('host')}: {held['why']}", flush=True)
            self.record.update(heartbeat=time.time(), ray=ray_info())
            if _write(self.path, json.dumps(self.record), fresh=not held):
                self._written = time.time()
                self._thread = threading.Thread(target=self._beat, name="raysst-lease", daemon=True)
                self._thread.start()
                return
        raise LeaseHeld(read_lease(self.path) or {}, self.output)

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
                self.record.update(heartbeat=time.time(), ray=ray_info() or self.record.get("ray"))
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
        """Take the lease if not yet taken, and wait for its read-back (SETTLE_S after the write): LeaseHeld if
        another job's write came last. Called before the job's first write."""
        self.take()
        self._checked.wait()
        self.check()

    def check(self) -> None:
        """Raise if the lease is no longer this job's."""
        if self.lost:
            raise self.lost

    def note_ray(self) -> None:
        """Record this driver's Ray job in the lease now that Ray is up, not at the next heartbeat."""
        self._wake.set()

    def release(self) -> None:
        """Stop renewing; delete the lease if it is still this job's (and the output directory it made, if empty)."""
        if not self._thread:
            return
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
        if self._made_dir:  # a job that failed before its first write leaves nothing behind
            with suppress(OSError):  # not empty: the job wrote there, and that stays
                os.rmdir(self.output)


def acquire(output: str, job: str, timeout_s: float, take_over: bool = False) -> Lease:
    """The lease on `output` for `job`, written; LeaseHeld if a live job holds it (unless `take_over`)."""
    lease = Lease(output, job, timeout_s, take_over)
    lease.take()
    return lease


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
    """The job's lease on `output` while the block runs. A live holder is refused here, before anything is
    written; the job writes its own lease with take() or confirm() before it writes to the output, and it is
    released (deleted if still the job's) however the block ends."""
    lease = Lease(output, job, timeout_s, take_over)
    judge(lease.path, output, take_over)
    try:
        yield lease
    finally:
        lease.release()
