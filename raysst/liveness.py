"""Whether the job a lease names is still there: its process on this host, its Ray job on this cluster, and its
heartbeat. Used by raysst.lease; it imports no raysst module."""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Optional


def identity() -> dict:
    """Where this process runs: host, pid, the pid's start time (a reused pid has another) and its pid space."""
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": psutil.Process().create_time(),
            "pid_space": _pid_space()}


def _pid_space() -> str:
    """The boot and pid namespace: two containers may share a host name, and pids compare only within one."""
    found = []
    for path, read in (("/proc/sys/kernel/random/boot_id", lambda p: open(p).read().strip()),
                       ("/proc/self/ns/pid", os.readlink)):
        try:
            found.append(read(path))
        except OSError:
            found.append("")
    return "/".join(found)


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


def ray_info() -> Optional[dict]:
    """This driver's Ray job and its cluster's session, once Ray is up (None before)."""
    ray = sys.modules.get("ray")  # not imported: not up (and importing it here would cost a second)
    if ray is None or not ray.is_initialized():
        return None
    return {"cluster": ray._private.worker.global_worker.node.session_name, "job": ray.get_runtime_context().get_job_id()}


def _ray_job_ended(ray_job: dict) -> bool:
    """Whether the GCS of the cluster this process has joined records `ray_job` as ended (False if another cluster)."""
    import ray

    info = ray_info()
    if not info or info["cluster"] != ray_job.get("cluster"):
        return False
    try:
        jobs = ray._private.state.jobs()  # the GCS job table: a driver's job is dead once it disconnects
    except Exception:  # a table we cannot read proves nothing
        return False
    return any(j["JobID"] == ray_job.get("job") and j["IsDead"] for j in jobs)
