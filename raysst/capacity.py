"""Does a request fit the cluster: now, after the autoscaler adds nodes, or never.

One rule for train, tune and score. A worker's bundle must fit on one node, so the cluster holds as many
workers as its nodes do, counted node by node. What it could scale to is the nodes alive now plus, for each
node type the autoscaler may launch, `max_workers` copies of it (within the cluster's own `max_workers`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from raysst.config import Config
from raysst.cli import flag_name

NOW, AFTER_SCALE_UP = "fits now", "fits after scale-up"
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # written on the head by `ray up`; the autoscaler runs from it
POLL_S = 5.0
DERIVED = ("memory", "object_store_memory")  # sizes Ray derives on each node, not part of a node type's shape


class CapacityError(RuntimeError):
    """A request the cluster cannot hold, now or after any scale-up, or whose nodes did not come in time."""


@dataclass(frozen=True)
class NodeType:
    """A node the autoscaler may launch: its resources (None: not declared) and how many (None: no limit)."""
    name: str
    resources: Optional[dict]
    max_workers: Optional[int]


@dataclass
class Cluster:
    """The total resources of each node alive now, and what the autoscaler may add."""
    nodes: list
    node_types: list = field(default_factory=list)
    max_workers: Optional[int] = None  # the autoscaler's cap on worker nodes over all types


def worker_resources(cfg: Config) -> dict:
    """What one Ray Train worker reserves (for train, and for each trial of tune)."""
    return {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}


def lower_hint(cfg: Config, job: str) -> str:
    """The flags that shrink a job's request, in that job's spelling."""
    flags = f"Lower {flag_name(job, 'num_workers')} or {flag_name(job, 'cpus_per_worker')}"
    return flags + (", or use --no-use-gpu" if cfg.use_gpu else "")


def slots(node: dict, need: dict) -> float:
    """Whole workers of `need` that one node holds."""
    return min((math.floor(node.get(k, 0) / v + 1e-9) for k, v in need.items() if v > 0), default=math.inf)


def workers_now(cluster: Cluster, need: dict) -> float:
    """Workers of `need` that the nodes alive now hold."""
    return sum(slots(n, need) for n in cluster.nodes)


def scaled_up(cluster: Cluster, need: dict) -> list:
    """(resources, copies) of the nodes the cluster could have at most (copies may be math.inf): live nodes of
    an autoscaled type give way to its max_workers copies; the cluster-wide cap goes to the roomiest types."""
    types = [t for t in cluster.node_types if t.resources is not None]
    absorbed = dict.fromkeys((t.name for t in types), 0)
    groups = []
    for node in cluster.nodes:
        owner = next((t for t in types if _same_shape(node, t.resources)
                      and (t.max_workers is None or absorbed[t.name] < t.max_workers)), None)
        if owner:
            absorbed[owner.name] += 1
        else:
            groups.append((node, 1))
    room = math.inf if cluster.max_workers is None else cluster.max_workers
    for t in sorted(types, key=lambda t: -slots(t.resources, need)):
        copies = min(math.inf if t.max_workers is None else t.max_workers, room)
        room -= copies
        groups.append((t.resources, copies))
    return groups


def workers_at_most(cluster: Cluster, need: dict) -> float:
    """Workers of `need` the cluster holds once the autoscaler has added all it may (math.inf: no bound)."""
    if any(t.resources is None and t.max_workers != 0 for t in cluster.node_types):
        return math.inf  # a type of unknown size: it may hold anything, so never say never
    most = sum(slots(res, need) * copies for res, copies in scaled_up(cluster, need) if copies and slots(res, need))
    return max(most, workers_now(cluster, need))


def check_fits(need: dict, count: int, what: str, hint: str, cluster: Optional[Cluster] = None,
               wait_s: Optional[float] = None) -> str:
    """NOW or AFTER_SCALE_UP (printing that it waits for the autoscaler); CapacityError if it never fits."""
    cluster = cluster or current_cluster()
    need = {k: v for k, v in need.items() if v}
    if workers_now(cluster, need) >= count:
        return NOW
    if workers_at_most(cluster, need) < count:
        raise CapacityError(f"{explain(cluster, need, count, what)}. {hint}.")
    limit = f" (up to {wait_s:g} s, --wait-for-nodes)" if wait_s else ""
    print(f"[raysst] waiting for the autoscaler: needs {count} x {fmt(need)}{limit}", flush=True)
    return AFTER_SCALE_UP


def wait_for_capacity(need: dict, count: int, what: str, hint: str, timeout_s: float) -> None:
    """Return once the live nodes hold `count` workers of `need`; ask the autoscaler for them and poll
    for up to `timeout_s` if it must add nodes; CapacityError if it never can or they do not come."""
    need = {k: v for k, v in need.items() if v}
    if check_fits(need, count, what, hint, wait_s=timeout_s) == NOW:
        return
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[need] * count)  # nothing else asks for them until the workers start
    deadline = time.monotonic() + timeout_s
    try:
        while workers_now(current_cluster(), need) < count:
            if time.monotonic() > deadline:
                raise timed_out(need, count, what, hint, timeout_s)
            time.sleep(POLL_S)
    finally:
        request_resources(bundles=[])  # the workers' own requests hold the nodes from here


def timed_out(need: dict, count: int, what: str, hint: str, waited_s: float) -> CapacityError:
    """The error for workers that found no room within --wait-for-nodes (nodes did not come, or others hold them)."""
    return CapacityError(f"{explain(current_cluster(), need, count, what)}; after {waited_s:g} s the workers "
                         f"still had no room. Raise --wait-for-nodes, see `ray status`, or {hint[0].lower()}{hint[1:]}.")


def explain(cluster: Cluster, need: dict, count: int, what: str) -> str:
    """What is asked, what the cluster has now, and what it could scale to."""
    n = len(cluster.nodes)
    text = (f"{what} needs {count} worker(s) x {fmt(need)} = {fmt({k: v * count for k, v in need.items()})}; "
            f"the cluster has {fmt(_total([(r, 1) for r in cluster.nodes], need))} on {n} node{'s' * (n != 1)}, "
            f"room for {workers_now(cluster, need):g} such worker(s)")
    types = [t for t in cluster.node_types if t.max_workers != 0]
    if not types:
        return text + ", and no autoscaler to add more"
    groups = scaled_up(cluster, need)
    limits = ", ".join(f"{t.name} {fmt(t.resources) if t.resources else '{?}'} x max_workers "
                       f"{'unlimited' if t.max_workers is None else t.max_workers}" for t in types)
    cap = "" if cluster.max_workers is None else f"; cluster max_workers {cluster.max_workers}"
    return (text + f", and could scale to {fmt(_total(groups, need))} on {_count(sum(c for _, c in groups))} "
            f"node(s), room for {_count(workers_at_most(cluster, need))} ({limits}{cap})")


def current_cluster() -> Cluster:
    """The connected cluster: live nodes from `ray.nodes()` (public) and the autoscaler's node types."""
    import ray

    types, cap = autoscaler_node_types()
    return Cluster([n["Resources"] for n in ray.nodes() if n["Alive"]], types, cap)


def autoscaler_node_types() -> tuple:
    """(node types, cluster max_workers) the autoscaler works with; ([], None) where there is none.

    Ray 2.60 has no public API for this: `ray.autoscaler.sdk` only requests resources or drives the cluster
    launcher from a local YAML, and `ray.autoscaler.v2.sdk.get_cluster_status` lists live, pending and failed
    nodes but no node type or limit. Two private sources have them, tried in turn:
    1. the cluster config in the GCS, `ray._private.state.state.get_cluster_config()`: what Ray Train V2's own
       worker-group check and Ray Data's autoscaler read. Only autoscalers that report it fill it in (no
       Python code of Ray 2.60 itself does), so on a `ray up` cluster it is empty;
    2. `~/ray_bootstrap_config.yaml`, the cluster launcher's config that the head's autoscaler runs from
       (Ray Tune checks it too): `ray job submit` runs the driver on the head, where it lies.
    A plain local Ray has neither: only live nodes count.
    """
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # a private API: its absence must not stop a run
        config = None
    if config is not None and config.node_group_configs:
        return [NodeType(g.name, dict(g.resources) or None, None if g.max_count == -1 else g.max_count)
                for g in config.node_group_configs], None
    path = Path(BOOTSTRAP_CONFIG).expanduser()
    return launcher_node_types(path) if path.is_file() else ([], None)


def launcher_node_types(path: Path) -> tuple:
    """(node types, cluster max_workers) of a cluster launcher YAML such as cluster.yaml."""
    import yaml

    launcher = yaml.safe_load(Path(path).read_text()) or {}
    return [NodeType(name, dict(t.get("resources") or {}) or None, t.get("max_workers", 0))  # Ray's defaults
            for name, t in (launcher.get("available_node_types") or {}).items()], launcher.get("max_workers")


def fmt(resources: dict) -> str:
    """`{CPU: 2, GPU: 1}`: zero amounts left out, except CPU, and so are sizes Ray derives (see _same_shape)."""
    return "{" + ", ".join(f"{k}: {_count(v)}" for k, v in resources.items()
                           if (v or k == "CPU") and k not in DERIVED) + "}"


def _count(v: float) -> str:
    return "unlimited" if v == math.inf else f"{v:g}"


def _total(groups: list, need: dict) -> dict:
    return {k: sum(r.get(k, 0) * c for r, c in groups if c and r.get(k, 0)) for k in need}


def _same_shape(node: dict, resources: dict) -> bool:
    return all(abs(node.get(k, 0) - v) < 1e-6 for k, v in resources.items() if k not in DERIVED)
