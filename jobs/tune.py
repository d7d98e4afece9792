"""Sweep learning rate and batch size with Ray Tune; each trial is a full raysst training run.

    python jobs/tune.py --config configs/local.yaml --num-samples 8 --name sweep
    ray job submit --working-dir . -- python jobs/tune.py --config configs/local.yaml --name sweep

Rerunning the same command with the same --name resumes an interrupted sweep.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir of `ray job submit`

from raysst.capacity import CapacityError  # noqa: E402
from raysst.formats import DataError  # noqa: E402
from raysst.config import TUNE  # noqa: E402
from raysst.cli import parse_config  # noqa: E402
from raysst.tune import tune_driver_fn  # noqa: E402

if __name__ == "__main__":
    try:
        tune_driver_fn(parse_config(TUNE, description=__doc__))
    except (CapacityError, DataError) as e:  # said in the user's words, without a traceback
        sys.exit(f"tune: {e}")
