"""Sweep learning rate and batch size with Ray Tune; every trial is a full run of the project's trainer.

Each trial launches a Ray Train run (`raysst.train.build_trainer`) whose `TuneReportCallback` forwards
each epoch's metrics to Tune. `<storage_path>/<name>/` holds Tune's state, each trial's Train run under
`train_runs/<trial id>/`, and trials.csv, best.json, best_model/ and sweep.png.
"""

from __future__ import annotations

import json
import posixpath
import tempfile
from pathlib import Path

import pandas as pd
from ray.tune import Callback

from raysst.capacity import Cluster, check_fits, current_cluster, fmt, lower_hint, workers_at_most, worker_resources
from raysst.config import TUNE, Config, check_job
from raysst.export import export_checkpoint, training_report
from raysst.storage import HISTORY_FILE, filesystem
from raysst.task import METRICS, Task, check_metric, describe, metric_mode

TRIAL_METRICS = sorted({m for names in METRICS.values() for m in names})  # what a progress line shows

TRIAL_RUNS = "train_runs"
# A trial's driver only launches and watches its Train run, so it reserves no CPU: one that held a
# CPU could leave another trial's workers pending. A bundle must hold something, so it holds memory.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 64 * 1024**2}
TRIAL = "a trial"  # how errors name one trial


def trial_columns(metric: str) -> list:
    """trials.csv's columns: `best_<metric>` holds each trial's best value of the sweep's metric."""
    return ["trial_id", "lr", "batch_size", "epochs_run", "best_epoch", f"best_{metric}",
            *(["eval_loss"] if metric != "eval_loss" else []), "status", "wall_time_s", "error"]


def concurrent_trials(cfg: Config, cluster: Cluster) -> int:
    """Trials to run at once: as many as the cluster holds once scaled up, capped by --max-concurrent-trials
    and the sample count; CapacityError if not even one trial ever fits."""
    need = worker_resources(cfg)
    check_fits(need, cfg.num_workers, TRIAL, lower_hint(cfg, TUNE), cluster, wait_s=cfg.wait_for_nodes)
    fit = workers_at_most(cluster, need) // cfg.num_workers
    return int(min(fit, cfg.max_concurrent_trials or fit, cfg.num_samples))


def search_space(cfg: Config) -> dict:
    """Tune's param_space: the searched learning rate and batch size, plus the fixed recipe values."""
    from ray import tune

    lr = tune.loguniform(cfg.lr_min, cfg.lr_max) if cfg.lr_min < cfg.lr_max else cfg.lr_min
    batch = tune.choice(cfg.batch_sizes) if len(cfg.batch_sizes) > 1 else cfg.batch_sizes[0]
    return {"lr": lr, "batch_size": batch, "epochs": cfg.epochs, "warmup_ratio": cfg.warmup_ratio,
            "weight_decay": cfg.weight_decay}


def train_driver_fn_per_trial(config: dict, base: Config, datasets: dict, n_train: int, task: Task) -> None:
    """Runs in each Tune trial: one training run with the trial's values; a rerun resumes its checkpoint."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raysst.train import build_trainer, fit

    trial_id = ray.tune.get_context().get_trial_id()
    # Train resumes a run by (storage_path, name): the trial id keeps both stable across sweep restarts.
    cfg = base.replace(**config, storage_path=posixpath.join(sweep_dir(base), TRIAL_RUNS), name=trial_id)
    fit(build_trainer(cfg, datasets, n_train, task, callbacks=[TuneReportCallback()]), cfg, TRIAL, TUNE)


def sweep_dir(cfg: Config) -> str:
    """`<storage_path>/<name>`: Tune's experiment, the trials' Train runs and the sweep's outputs."""
    return posixpath.join(cfg.storage_path, cfg.name)


def trial_run(cfg: Config, trial_id: str) -> str:
    """Where a trial's Train run lives (its checkpoints and state), named by the trial id."""
    return posixpath.join(sweep_dir(cfg), TRIAL_RUNS, trial_id)


def tune_driver_fn(cfg: Config) -> str:
    """Run the sweep, or resume it if `<storage_path>/<name>` holds one; write its outputs; return that dir."""
    from ray import tune

    from raysst.data import load_data, to_ray_datasets
    from raysst.runtime import init_ray

    check_job(cfg, TUNE)
    for b in cfg.batch_sizes:  # a size the workers cannot split fails now, not in the fifth trial
        cfg.replace(batch_size=b)
    train, validation, task = load_data(cfg)  # bad labels fail before Ray starts
    cfg = cfg.replace(metric=check_metric(task, cfg.metric))
    init_ray()
    concurrency = concurrent_trials(cfg, current_cluster())
    _say(f"data: {len(train)} train, {len(validation)} validation rows from {cfg.data}; {describe(task)}; "
         f"trials ranked by {cfg.metric}")
    # Loaded and tokenized once here; every trial's Train run reads the same Ray Datasets from the object store.
    datasets = to_ray_datasets(train, validation, cfg.model, cfg.max_seq_length)
    trainable = tune.with_resources(
        tune.with_parameters(train_driver_fn_per_trial, base=cfg, datasets=datasets,
                             n_train=len(train), task=task), TRIAL_DRIVER_RESOURCES)
    path = sweep_dir(cfg)
    if tune.Tuner.can_restore(path):
        _say(f"resuming the sweep in {path} with the settings it started with: finished trials stay")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        _say(f"sweep {cfg.name}: {cfg.num_samples} trials, {concurrency} at a time, each {cfg.num_workers} "
             f"worker(s) x {fmt(worker_resources(cfg))}; search {cfg.search}, scheduler {cfg.scheduler}")
        tuner = tune.Tuner(trainable, param_space=search_space(cfg), tune_config=_tune_config(cfg, concurrency),
                           run_config=tune.RunConfig(name=cfg.name, storage_path=cfg.storage_path, verbose=1,
                                                     callbacks=[ProgressLines()]))
    return write_outputs(cfg, summarize(cfg, tuner.fit()), validation)


def _tune_config(cfg: Config, concurrency: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    if cfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # TPE sampler by default
        search, limit = OptunaSearch(seed=cfg.seed), concurrency  # Tune wraps it in a ConcurrencyLimiter
    else:
        search, limit = BasicVariantGenerator(max_concurrent=concurrency, random_state=cfg.seed), None
    # Halving (not Ray's quartering) suits small sweeps. A trial at its last epoch ends by itself: one that
    # Tune stops takes its Train run down abruptly, leaving Ray's cleaner to free the run's workers.
    scheduler = (ASHAScheduler(time_attr="epoch", grace_period=1, max_t=cfg.epochs, reduction_factor=2,
                               stop_last_trials=False) if cfg.scheduler == "asha" else None)
    return tune.TuneConfig(metric=cfg.metric, mode=metric_mode(cfg.metric), search_alg=search, scheduler=scheduler,
                           num_samples=cfg.num_samples, max_concurrent_trials=limit,
                           trial_name_creator=_trial_id, trial_dirname_creator=_trial_id)


def _trial_id(trial) -> str:
    return trial.trial_id


def summarize(cfg: Config, results) -> pd.DataFrame:
    """One row per trial, from the history in its latest Train checkpoint (which spans resumes)."""
    rows = []
    for result in results:
        trial_id = result.path.rstrip("/").rsplit("/", 1)[-1]
        history, kept = _run_history(trial_run(cfg, trial_id))
        # Ties go to the later epoch: the latest checkpoint is always kept.
        sign = -1 if metric_mode(cfg.metric) == "min" else 1
        best = max((r for r in history if r["epoch"] in kept), key=lambda r: (sign * r[cfg.metric], r["epoch"]),
                   default={})
        epochs_run = history[-1]["epoch"] if history else 0
        status = ("error" if result.error else "completed" if epochs_run >= result.config["epochs"]
                  else "early-stopped")
        rows.append({"trial_id": trial_id, "lr": result.config["lr"], "batch_size": result.config["batch_size"],
                     "epochs_run": epochs_run, "best_epoch": best.get("epoch"),
                     f"best_{cfg.metric}": best.get(cfg.metric), "eval_loss": best.get("eval_loss"), "status": status,
                     "wall_time_s": (result.metrics or {}).get("time_total_s"),
                     "error": str(result.error).strip().splitlines()[0] if result.error else ""})
    return pd.DataFrame(rows, columns=trial_columns(cfg.metric)).sort_values("trial_id", ignore_index=True)


def _run_history(run: str) -> tuple:
    """(history, epochs with a checkpoint) of one Train run, from its latest complete checkpoint."""
    import pyarrow.fs

    fs, root = filesystem(run)
    found = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    kept = {int(f.base_name.rsplit("_", 1)[-1]): f.path for f in found
            if f.type == pyarrow.fs.FileType.Directory and f.base_name.startswith("checkpoint_epoch_")}
    for epoch in sorted(kept, reverse=True):  # a run killed while saving leaves a checkpoint without history
        if fs.get_file_info(f"{kept[epoch]}/{HISTORY_FILE}").type == pyarrow.fs.FileType.File:
            with fs.open_input_stream(f"{kept[epoch]}/{HISTORY_FILE}") as f:
                return json.loads(f.read()), set(kept)
    return [], set()


def write_outputs(cfg: Config, trials: pd.DataFrame, validation: pd.DataFrame) -> str:
    """trials.csv, sweep.png, best.json and best_model/ (with its evaluation report on `validation`) in the sweep
    dir; fails if no trial trained."""
    from ray.train import Checkpoint

    path, column = sweep_dir(cfg), f"best_{cfg.metric}"
    scored = trials.dropna(subset=[column])
    with tempfile.TemporaryDirectory() as tmp:
        trials.to_csv(Path(tmp) / "trials.csv", index=False)
        plot_sweep(trials, Path(tmp) / "sweep.png", cfg.name, cfg.metric)
        if scored.empty:
            _publish(Path(tmp), path)
            raise RuntimeError(f"sweep {cfg.name}: no trial reported a result; see {path}/trials.csv:\n"
                               + trials[["trial_id", "status", "error"]].to_string(index=False))
        best = scored.loc[scored[column].idxmin() if metric_mode(cfg.metric) == "min" else scored[column].idxmax()]
        best_cfg = cfg.replace(lr=float(best["lr"]), batch_size=int(best["batch_size"]))
        run = trial_run(cfg, best["trial_id"])
        checkpoint = posixpath.join(run, f"checkpoint_epoch_{int(best['best_epoch']):03d}")
        history = _run_history(run)[0]
        model_dir = export_checkpoint(Checkpoint(checkpoint), history, best_cfg, posixpath.join(path, "best_model"))
        training_report(model_dir, validation, history, best_cfg.replace(use_gpu=best_cfg.compute_on_gpu,
                                                                          fake_gpu=False))
        keys = ("lr", "batch_size", "epochs", "warmup_ratio", "weight_decay", "model", "num_workers")
        summary = {"trial_id": best["trial_id"], "metric": cfg.metric, cfg.metric: float(best[column]),
                   "eval_loss": float(best.get("eval_loss", best[column])), "epoch": int(best["best_epoch"]),
                   "config": {k: getattr(best_cfg, k) for k in keys}, "checkpoint": checkpoint,
                   "best_model": model_dir, "trials": len(trials),
                   "trials_by_status": trials["status"].value_counts().to_dict()}
        (Path(tmp) / "best.json").write_text(json.dumps(summary, indent=2))
        _publish(Path(tmp), path)
    _say(f"best trial {best['trial_id']}: {cfg.metric} {best[column]:.4f} at epoch {int(best['best_epoch'])} "
         f"(lr {best['lr']:.3g}, batch size {int(best['batch_size'])}); model in {model_dir}")
    return path


def _publish(local: Path, dest: str) -> None:
    """Copy the output files into the sweep dir (a local path or a pyarrow URI such as s3://)."""
    import pyarrow.fs

    fs, root = filesystem(dest)
    pyarrow.fs.copy_files(str(local), root, destination_filesystem=fs)


def plot_sweep(trials: pd.DataFrame, out: Path, title: str, metric: str = "accuracy") -> None:
    """Each trial's best validation metric against learning rate (log scale), colored by batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    scored = trials.dropna(subset=[f"best_{metric}"])
    sizes = sorted(scored["batch_size"].unique())
    for (size, status), part in scored.groupby(["batch_size", "status"]):
        ax.scatter(part["lr"], part[f"best_{metric}"], s=60, label=f"batch {size}, {status}",
                   color=plt.get_cmap("viridis")(sizes.index(size) / max(len(sizes) - 1, 1)),
                   marker={"completed": "o", "early-stopped": "x"}.get(status, "s"))
    early = int((trials["status"] == "early-stopped").sum())
    ax.set(xscale="log", xlabel="learning rate", ylabel=f"best validation {metric}",
           title=f"{title}: {len(trials)} trials, {early} early-stopped (x)")
    ax.grid(alpha=0.3)
    if len(scored):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


class ProgressLines(Callback):
    """One log line per trial event, readable in `ray job logs` among the workers' lines."""

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        _say(f"trial {trial.trial_id} started: lr {trial.config['lr']:.3g}, batch size {trial.config['batch_size']}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        _say(f"trial {trial.trial_id} epoch {result.get('epoch')}: "
             + ", ".join(f"{m} {result[m]:.4f}" for m in TRIAL_METRICS if m in result))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        _say(f"trial {trial.trial_id} finished")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        _say(f"trial {trial.trial_id} failed; see {trial.local_path}")


def _say(line: str) -> None:
    print(f"[raysst] {line}", flush=True)
