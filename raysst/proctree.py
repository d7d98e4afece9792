"""Peak memory and CPU time of a process tree (a job and the local Ray it started), and jobs run as marked
process groups that can be killed whole: for the benchmarks and tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Optional

MARK = "RAYSST_JOB_MARK"  # every process of a started job inherits it, wherever Ray re-parents it
ROOT = Path(__file__).resolve().parents[1]


def start_job(args: list[str], **popen) -> tuple[subprocess.Popen, str]:
    """`python <args>` from the repository root in a new session, with its own local Ray (RAY_ADDRESS unset)."""
    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({MARK: mark, "PYTHONPATH": str(ROOT)})
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, start_new_session=True, **popen), mark


def kill_job(proc: subprocess.Popen, mark: str) -> None:
    """SIGKILL the job's process group, then any of its processes that left the group (Ray's own daemons)."""
    import psutil

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARK) == mark:
                p.kill()
        except psutil.Error:
            pass


class ProcessTree:
    """Samples a process (default: this one) and its descendants (a local Ray's workers) in a thread: peak RSS,
    CPU seconds.

    CPU seconds do not depend on what else the machine runs as much as rows/s do; processes that exit
    between samples (e.g. an actor at the end) lose at most one sampling interval.
    """

    def __init__(self, every_s: float = 0.25, pid: Optional[int] = None):
        import psutil

        self.me, self.every_s, self.peak_total, self.peak_driver = psutil.Process(pid), every_s, 0, 0
        self._cpu: dict = {}
        self._start = self._cpu_now()
        self._stop = threading.Event()

    def _cpu_now(self) -> dict:
        import psutil

        seen = {}
        try:
            tree = [self.me, *self.me.children(recursive=True)]
        except psutil.Error:  # the job has exited (or was killed)
            return seen
        for proc in tree:
            try:
                t = proc.cpu_times()
                seen[(proc.pid, proc.create_time())] = (t.user + t.system, proc.memory_info().rss)
            except psutil.Error:
                pass
        return seen

    def _sample(self) -> None:
        while not self._stop.is_set():
            now = self._cpu_now()
            self._cpu.update(now)
            self.peak_total = max(self.peak_total, sum(rss for _, rss in now.values()))
            self.peak_driver = max(self.peak_driver, self.me.memory_info().rss)
            self._stop.wait(self.every_s)

    @property
    def cpu_seconds(self) -> float:
        return sum(cpu - self._start.get(key, (0.0, 0))[0] for key, (cpu, _) in self._cpu.items())

    def __enter__(self) -> "ProcessTree":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._cpu.update(self._cpu_now())
