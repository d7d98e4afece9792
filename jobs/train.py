"""Fine-tune a BERT classifier (SST-2 by default; any labels, pairs, multi-label or regression) with Ray Train.

    python jobs/train.py --config configs/local.yaml
    ray job submit --working-dir . -- python jobs/train.py --config configs/bert-base-a100.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir of `ray job submit`

from raysst.capacity import CapacityError  # noqa: E402
from raysst.formats import DataError  # noqa: E402
from raysst.config import TRAIN  # noqa: E402
from raysst.cli import parse_config  # noqa: E402
from raysst.train import train_driver_fn  # noqa: E402

if __name__ == "__main__":
    try:
        train_driver_fn(parse_config(TRAIN, description=__doc__))
    except (CapacityError, DataError) as e:  # said in the user's words, without a traceback
        sys.exit(f"train: {e}")
