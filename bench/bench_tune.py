"""Benchmark: a Tune sweep on the `local` config against that config's own recipe, on the same data.

    python bench/bench_tune.py --config configs/local.yaml --data ../shared/data/sst2 \
        --max-train-samples 2000 --epochs 2 --num-samples 4 --storage-path /tmp/bench-tune --name bench

Runs the sweep (lr log-uniform in [--lr-min, --lr-max], batch size from --batch-sizes, ASHA), then
one plain training run with the config's lr and batch size (configs/local.yaml: 1e-4, 64) on the
same slice and epochs, in the same process and Ray, and prints both accuracies and wall times.
Not part of the tests: it takes minutes.
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from raysst.config import TUNE  # noqa: E402
from raysst.cli import parse_config  # noqa: E402
from raysst.runtime import init_ray  # noqa: E402
from raysst.train import train_driver_fn  # noqa: E402
from raysst.tune import tune_driver_fn  # noqa: E402


def main() -> None:
    cfg = parse_config(TUNE, description=__doc__)
    init_ray()
    load_before = os.getloadavg()
    started = time.perf_counter()
    sweep = Path(tune_driver_fn(cfg))
    sweep_s = time.perf_counter() - started
    started = time.perf_counter()
    default_dir = Path(train_driver_fn(cfg.replace(name=f"{cfg.name}-default")))
    default_s = time.perf_counter() - started

    trials = pd.read_csv(sweep / "trials.csv")
    best = json.loads((sweep / "best.json").read_text())
    default = json.loads((default_dir / "metrics.json").read_text())
    print("\n=== bench_tune ===")
    print(f"model {cfg.model}, {default['epochs'][-1]['train_samples']} train rows x {cfg.epochs} epoch(s), "
          f"{default['epochs'][-1]['eval_samples']} validation rows; {cfg.num_workers} worker(s) x "
          f"{cfg.cpus_per_worker} CPU per trial; search {cfg.search}, scheduler {cfg.scheduler}")
    print(trials[["trial_id", "lr", "batch_size", "epochs_run", "best_accuracy", "eval_loss", "status",
                  "wall_time_s"]].to_string(index=False))
    print(f"sweep: {len(trials)} trials ({trials['status'].value_counts().to_dict()}), wall {sweep_s:.0f} s")
    print(f"best trial: accuracy {best['accuracy']:.4f} (lr {best['config']['lr']:.3g}, "
          f"batch size {best['config']['batch_size']}, epoch {best['epoch']})")
    print(f"config's recipe (lr {cfg.lr:g}, batch size {cfg.batch_size}): accuracy {default['accuracy']:.4f}, "
          f"wall {default_s:.0f} s")
    print(f"best - default: {best['accuracy'] - default['accuracy']:+.4f} accuracy; "
          f"sweep / one run wall time: {sweep_s / default_s:.1f}x")
    print(f"load average before/after (2 shared cores): {load_before[0]:.1f} / {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
