"""Score a corpus (files, a directory or a glob) with any sequence classifier, with Ray Data.

    python jobs/score.py --model runs/sst2/model --input corpus/ --output scored/
    ray job submit --working-dir . -- python jobs/score.py --model DIR --input PATH --output DIR --use-gpu
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir of `ray job submit`

from raysst.capacity import CapacityError  # noqa: E402
from raysst.formats import DataError  # noqa: E402
from raysst.config import SCORE  # noqa: E402
from raysst.cli import parse_config  # noqa: E402
from raysst.lease import LeaseError  # noqa: E402
from raysst.score import score_driver_fn  # noqa: E402

if __name__ == "__main__":
    try:
        score_driver_fn(parse_config(SCORE, description=__doc__))
    except (CapacityError, DataError, LeaseError) as e:  # said in the user's words, without a traceback
        sys.exit(f"score: {e}")
