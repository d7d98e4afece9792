"""Evaluate classifiers on labeled data: metrics, calibration, mistakes, plots and report.md.

    python jobs/evaluate.py --model runs/sst2/model --data ../shared/data/sst2/validation.parquet --output eval/
    python jobs/evaluate.py --model NEW --model PREVIOUS --data DIR --output eval/   # side-by-side comparison
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir of `ray job submit`

from raysst.capacity import CapacityError  # noqa: E402
from raysst.formats import DataError  # noqa: E402
from raysst.config import EVAL  # noqa: E402
from raysst.cli import parse_config  # noqa: E402
from raysst.lease import LeaseError  # noqa: E402
from raysst.evaluate import evaluate_driver_fn  # noqa: E402

if __name__ == "__main__":
    try:
        evaluate_driver_fn(parse_config(EVAL, description=__doc__))
    except (CapacityError, DataError, LeaseError) as e:  # said in the user's words, without a traceback
        sys.exit(f"evaluate: {e}")
