"""Connecting to Ray the same way from `python jobs/...` and from `ray job submit`."""

from __future__ import annotations

import os
import socket

# Workers log one line per N steps; library progress bars would bury those lines in `ray job logs`.
QUIET_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def init_ray(**local_options) -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`; `auto` joins this machine's `ray start`
    cluster), or start a local Ray with `local_options` (e.g. num_cpus) passed to `ray.init`."""
    import ray
    import ray.data

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "local"
        if address == "local" and not dashboard_installed():
            # Ray without its dashboard's packages (the GPU machine's carry kit): a local Ray with none.
            ray.init(address="local", runtime_env={"env_vars": QUIET_ENV}, include_dashboard=False, **local_options)
        elif address == "local":
            local_options = {**pin_dashboard(), **local_options}
            ray.init(address="local", runtime_env={"env_vars": {
                **QUIET_ENV, "RAY_API_SERVER_ADDRESS": os.environ["RAY_API_SERVER_ADDRESS"]}}, **local_options)
        else:
            ray.init(address=address, runtime_env={"env_vars": QUIET_ENV})
    # Progress bars turn `ray job logs` into noise; the jobs print their own progress lines.
    ray.data.DataContext.get_current().enable_progress_bars = False


def dashboard_installed() -> bool:
    """Whether Ray's dashboard can start: `ray[default]` brings its packages, a bare `ray` wheel does not."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401  (the check Ray itself makes before starting one)
    except ImportError:
        return False
    return True


def pin_dashboard() -> dict:
    """`ray.init` options for a local Ray whose dashboard every process of it can find.

    Ray's helpers inside a cluster (Ray Train's placement-group cleaner, the state API) look the
    cluster up by address; with several Ray instances on one machine they find none, or another
    one (then the cleaner frees a live run's workers). Exported before the local Ray starts, the
    address reaches all of its processes.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}
