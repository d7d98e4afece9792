"""A local twin of cluster.yaml for tests: a CPU head whose autoscaler adds fake "GPU" nodes on this machine.

Ray's fake multi-node provider (`RAY_FAKE_CLUSTER=1`; here its subclass in fake_provider.py) runs inside the
head's autoscaler (the `monitor.py` process) and starts each worker node there as `ray._private.node.Node`:
a raylet (with its dashboard and runtime-env agents and, later, its workers under it) and a log monitor,
child processes of the monitor with no session of their own, so every fake node shares the head's process
group. The head is started in a process group of its own (raysst.local_head), and stopping that group ends
every fake node with it. Killing one node's process group would kill the head too, so a spot reclaim of one
node is SIGKILL for each of its processes: those under the head that carry its node id
(RAY_OVERRIDE_NODE_ID_FOR_TESTING, which the provider gives the node and its children inherit) and the
raylet's process tree.

`ray.cluster_utils.AutoscalingCluster` is not used: it runs `ray stop --force`, which ends every Ray here,
and the example config it reads is not shipped in the wheel.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from raysst.capacity import BOOTSTRAP_CONFIG
from raysst.local_head import RAY, Head, free_ports, start_head

PROVIDER = "fake_provider.ReclaimAwareFakeProvider"  # Ray's fake_multinode, aware of killed nodes
HEAD_TYPE = "ray.head.default"  # the name the fake provider gives its head node
GPU_TYPE = "ray.worker.gpu"
FAKE_NODE_PREFIX = "fffffffffffffffffffffffffffffffffffffffffffffffffff"  # the provider's node ids: prefix + 00001...
OBJECT_STORE = 300 * 1024**2  # the head's: a few small datasets and checkpoints
NODE_UP_TIMEOUT_S = 240
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the colors of Ray's `(Actor pid=...)` prefixes


def launcher_config(gcs: str, head_cpus: int, gpu_node: dict, min_workers: int, max_workers: int, hold: Path) -> dict:
    """A cluster launcher config in cluster.yaml's shape for the fake provider; no node starts while `hold` exists."""
    return {
        "cluster_name": "raysst-fake",
        "max_workers": max_workers,
        "provider": {"type": "external", "module": PROVIDER, "gcs_address": gcs, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True, "hold_launches_while": str(hold)},
        "available_node_types": {
            HEAD_TYPE: {"resources": {"CPU": head_cpus, "GPU": 0}, "node_config": {}, "max_workers": 0},
            GPU_TYPE: {"resources": {**gpu_node, "object_store_memory": OBJECT_STORE}, "node_config": {},
                       "min_workers": min_workers, "max_workers": max_workers},
        },
        "head_node_type": HEAD_TYPE,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,  # longer than any test: nodes a test waited for stay until it ends
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@dataclass
class FakeCluster:
    """A running fake cluster: its head, and the HOME whose ray_bootstrap_config.yaml names its node types."""
    head: Head
    home: Path
    config: dict
    killed: list = field(default_factory=list)

    @property
    def hold(self) -> Path:
        return Path(self.config["provider"]["hold_launches_while"])

    def hold_launches(self) -> None:
        """No new node starts (a cloud out of capacity) until release_launches."""
        self.hold.touch()

    def release_launches(self) -> None:
        self.hold.unlink(missing_ok=True)

    @property
    def env(self) -> dict:
        """Environment for a driver on this cluster's head, as `ray job submit` gives one on a `ray up` head."""
        return {**self.head.env, "RAY_ADDRESS": self.head.gcs, "HOME": str(self.home), "PYTHONUNBUFFERED": "1",
                "RAY_DEDUP_LOGS": "0"}  # Ray folds lines that differ in numbers only, such as step lines

    def worker_raylets(self) -> dict:
        """{fake node id: raylet pid} of the worker nodes whose raylet runs now."""
        found = {}
        for pid in _descendants(self.head.proc.pid):
            node_id = _environ(pid).get("RAY_OVERRIDE_NODE_ID_FOR_TESTING", "")
            if node_id.startswith(FAKE_NODE_PREFIX) and _name(pid) == "raylet" and not node_id.endswith("00000"):
                found[node_id] = pid
        return found

    def wait_for_nodes(self, count: int, timeout_s: float = NODE_UP_TIMEOUT_S) -> dict:
        """Block until `count` worker raylets run; {node id: pid}."""
        deadline = time.monotonic() + timeout_s
        while len(raylets := self.worker_raylets()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(raylets)} of {count} fake nodes up after {timeout_s:g} s:\n{self.status()}")
            time.sleep(1)
        return raylets

    def node_of(self, pid: int) -> Optional[str]:
        """The fake worker node whose raylet `pid` runs under (None: the head's)."""
        raylets = {p: node for node, p in self.worker_raylets().items()}
        while pid > 1 and pid not in raylets:
            pid = _ppid(pid)
        return raylets.get(pid)

    def kill_node(self, node_id: str) -> list:
        """A spot reclaim: SIGKILL every process of the node at once; the pids killed."""
        raylet = self.worker_raylets()[node_id]
        mine = {p for p in _descendants(self.head.proc.pid)
                if _environ(p).get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id}
        pids = sorted(mine | {raylet, *_descendants(raylet)})
        for pid in pids:
            _kill(pid)
        self.killed.append(node_id)
        return pids

    def status(self) -> str:
        """`ray status` of this cluster (what the autoscaler sees and plans)."""
        return subprocess.run([RAY, "status", "--address", self.head.gcs], env=self.head.env, capture_output=True,
                              text=True).stdout

    def stop(self) -> None:
        """End the head's process group: the head, its autoscaler and every fake node it started."""
        stray = _descendants(self.head.proc.pid)
        self.head.stop(grace=1)  # a throw-away cluster: Ray's own slow shutdown saves nothing worth 5 s a test
        for pid in stray:  # nothing of ours outlives the group (a worker in a session of its own would)
            _kill(pid)


def start_fake_cluster(home: Path, head_cpus: int = 2, gpu_node: Optional[dict] = None, min_workers: int = 0,
                       max_workers: int = 2, log: Optional[str] = None) -> FakeCluster:
    """Start the head on free ports with the fake provider's autoscaler; `home` gets ray_bootstrap_config.yaml."""
    from ray._private.services import get_node_ip_address

    ports = free_ports()
    gcs = f"{get_node_ip_address()}:{ports['port']}"  # where the provider's nodes join
    config = launcher_config(gcs, head_cpus, gpu_node or {"CPU": 1, "GPU": 1}, min_workers, max_workers,
                             home / "hold-launches")
    home.mkdir(parents=True, exist_ok=True)
    path = Path(BOOTSTRAP_CONFIG.replace("~", str(home)))
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "HOME": str(home),
           # the autoscaler imports PROVIDER from here
           "PYTHONPATH": os.pathsep.join(filter(None, (str(Path(__file__).parent), os.environ.get("PYTHONPATH"))))}
    head = start_head(head_cpus, log, env, ports, [f"--autoscaling-config={path}", "--num-gpus=0",
                                                   f"--object-store-memory={OBJECT_STORE}"])
    return FakeCluster(head, home, config)


class Job:
    """A driver run as `ray job submit` runs one on the head (cluster.env), its output lines time-stamped."""

    def __init__(self, cluster: FakeCluster, *args: str, cwd: Path, log: Optional[Path] = None):
        self.started, self.log = time.monotonic(), log
        self.proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=cluster.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list = []  # (seconds since start, line)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.log, "w") if self.log else open(os.devnull, "w") as out:
            for line in self.proc.stdout:
                self.lines.append((time.monotonic() - self.started, ANSI.sub("", line.rstrip("\n"))))
                out.write(f"{self.lines[-1][0]:8.2f} {self.lines[-1][1]}\n")
                out.flush()

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for(self, pattern: str, timeout_s: float, after: float = 0.0) -> tuple:
        """(seconds since start, match) of the first line after `after` s that matches `pattern`."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            for t, line in self.lines[seen:]:
                found = re.search(pattern, line)
                if found and t >= after:
                    return t, found
            seen = len(self.lines)
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} within {timeout_s:g} s:\n{self.output[-4000:]}")

    def finish(self, timeout_s: float) -> int:
        """The driver's exit code; killed with what it started (its own process group) after `timeout_s`."""
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._reader.join(10)
        return self.proc.returncode


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _descendants(pid: int) -> list:
    """Every live process under `pid`, from /proc (children before grandchildren)."""
    children: dict = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            children.setdefault(_ppid(int(entry.name)), []).append(int(entry.name))
    out, queue = [], list(children.get(pid, []))
    while queue:
        p = queue.pop(0)
        out.append(p)
        queue.extend(children.get(p, []))
    return out


def _environ(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
