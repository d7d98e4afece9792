"""Connecting to Ray the same way from `python jobs/...` and from `ray job submit`."""

from __future__ import annotations

import os

# Workers log one line per N steps; library progress bars would bury those lines in `ray job logs`.
QUIET_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), or start a local Ray."""
    import ray
    import ray.data

    if not ray.is_initialized():
        # Without RAY_ADDRESS, start a fresh local Ray rather than joining whatever `ray start` left running.
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), runtime_env={"env_vars": QUIET_ENV})
    # Progress bars turn `ray job logs` into noise; the jobs print their own progress lines.
    ray.data.DataContext.get_current().enable_progress_bars = False
