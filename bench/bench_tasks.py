"""Task shapes on real text (not run in CI): the packaged MiniLM, one epoch, on a 3-class task and on a pair task
built from SST-2 sentences here. Prints one JSON line per task.

    python bench/bench_tasks.py [--samples 20000] [--tasks three,pair]

- three: two SST-2 sentences joined into one text, labelled by their polarities: `both_negative`, `mixed` or
  `both_positive` (string labels, custom column names `review`/`feeling`);
- pair: the two sentences as a real pair (`first`, `second`), labelled `same` or `different` polarity: neither
  text alone tells the label, so a model that beats 50% reads both.

Validation rows come from SST-2's validation split only, training rows from its training split only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raysst.cli import load_config  # noqa: E402

SST2 = (ROOT.parent / "shared" / "data" / "sst2").resolve()
LOCAL_CONFIG = str(ROOT / "configs" / "local.yaml")
THREE = {0: "both_negative", 1: "mixed", 2: "both_positive"}


def build(split: pd.DataFrame, n: int, kind: str, seed: int) -> pd.DataFrame:
    """`n` rows of one task from one SST-2 split: each row draws two sentences at random."""
    rng = np.random.default_rng(seed)
    a, b = (split.iloc[rng.integers(0, len(split), n)].reset_index(drop=True) for _ in range(2))
    if kind == "three":
        return pd.DataFrame({"review": a.sentence.str.strip() + " " + b.sentence.str.strip(),
                             "feeling": (a.label + b.label).map(THREE)})
    return pd.DataFrame({"first": a.sentence, "second": b.sentence,
                         "label": np.where(a.label == b.label, "same", "different")})


def run(kind: str, samples: int, tmp: Path) -> dict:
    from raysst.train import train_driver_fn

    train, validation = (pd.read_parquet(SST2 / f"{s}.parquet") for s in ("train", "validation"))
    data = tmp / kind
    data.mkdir()
    build(train, samples, kind, 0).to_parquet(data / "train.parquet")
    build(validation, 2000, kind, 1).to_parquet(data / "validation.parquet")
    columns = ({"text_column": "review", "label_column": "feeling"} if kind == "three" else
               {"text_column": "first", "text_pair_column": "second"})
    cfg = load_config(LOCAL_CONFIG, data=str(data), storage_path=str(tmp / "runs"), name=kind, max_train_samples=0,
                      **columns)
    start = time.perf_counter()
    metrics = json.loads((Path(train_driver_fn(cfg)) / "metrics.json").read_text())
    best = metrics["epochs"][metrics["best_epoch"] - 1]
    return {"task": kind, "labels": metrics["task"]["labels"], "train_rows": samples, "validation_rows": 2000,
            "accuracy": best["accuracy"], "macro_f1": best["macro_f1"],
            "train_samples_per_second": best["train_samples_per_second"],
            "wall_seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000, help="training rows per task (default %(default)s)")
    parser.add_argument("--tasks", default="three,pair", help="comma-separated: three, pair")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.tasks.split(","):
            print(json.dumps(run(kind, args.samples, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
