"""Fine-tune a BERT encoder on a text task with Ray Train: the driver (its per-worker loop is raysst.train_worker)."""

from __future__ import annotations

import os
import uuid
from typing import Optional

from raysst.capacity import check_fits, lower_hint, timed_out, wait_for_capacity, worker_resources
from raysst.config import TRAIN, Config, check_job
from raysst.task import Task, check_metric, describe, metric_mode
from raysst.train_worker import train_fn_per_worker

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train V2's placement-group wait
RUN = "the run"  # how errors name one training run


def build_trainer(cfg: Config, datasets: dict, n_train: int, task: Task, callbacks: Optional[list] = None):
    """The TorchTrainer for one training run (used directly by train and inside each Tune trial).

    Ray Train V2 waits 60 s for a worker group's placement group (what asks the autoscaler for nodes), then
    retries it without end. Here its tries (1 + max_failures, the run's retry budget) share `wait_for_nodes`
    s, so a group that finds no room fails in time. Train reads the timeout from this process's environment
    at fit() and passes it on to its controller.

    A range MIN-MAX is Train V2's elastic ScalingConfig(num_workers=(MIN, MAX)): its ElasticScalingPolicy
    asks the autoscaler for MAX workers, starts once MIN fit (with as many as fit), and every
    `elastic_resize_interval` s compares what fits with the running group; a difference restarts the group
    at the new size from the latest checkpoint (steps since it are redone). A lost node restarts it the same way.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = cfg.replace(metric=check_metric(task, cfg.metric))
    os.environ[START_TIMEOUT_ENV] = str(cfg.wait_for_nodes / (cfg.max_failures + 1))
    loop_config = {**cfg.to_dict(), "n_train": n_train, "task": task.to_dict(), "run_id": uuid.uuid4().hex[:8]}
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=(cfg.min_workers, cfg.max_workers) if cfg.elastic else cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker=worker_resources(cfg), elastic_resize_monitor_interval_s=cfg.elastic_resize_interval),
        # Train picks NCCL for workers that hold a GPU; a fake one is a label, so CPU torch talks gloo.
        torch_config=TorchConfig(backend="gloo") if cfg.fake_gpu else None,
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=cfg.storage_path, callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                         checkpoint_score_attribute=cfg.metric,
                                                         checkpoint_score_order=metric_mode(cfg.metric)),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures,
                                                   controller_failure_limit=cfg.max_failures),
            worker_runtime_env={"env_vars": worker_env(cfg)},
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def fit(trainer, cfg: Config, what: str, job: str):
    """`trainer.fit()`; a worker group that found no room within `wait_for_nodes` s raises CapacityError."""
    import ray.train
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    try:
        return trainer.fit()
    except ray.train.ControllerError as e:
        if isinstance(e.controller_failure, WorkerGroupStartupTimeoutError):
            raise timed_out(worker_resources(cfg), cfg.min_workers, what, lower_hint(cfg, job),
                            cfg.wait_for_nodes) from e
        raise


def worker_env(cfg: Config) -> dict:
    """Environment for workers: quiet tokenizers, no Hub calls for a local model."""
    from raysst.models import model_is_local
    from raysst.runtime import QUIET_ENV

    # Train's print patch echoes every line twice in `ray job logs`; plain print is enough here.
    env = {**QUIET_ENV, "OMP_NUM_THREADS": str(cfg.cpus_per_worker), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if model_is_local(cfg.model):
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def even_rows(train, cfg: Config):
    """The training rows cut to a multiple of every world size the run may have (at most that less one row
    dropped; a fixed size drops what streaming_split(equal=True) would): every size then gives its workers
    the same rows each and the epoch the same optimizer steps, so a resized run keeps its schedule."""
    return train.iloc[: len(train) - len(train) % cfg.worker_multiple]


def train_driver_fn(cfg: Config) -> str:
    """Load data, run the trainer (resuming a run of the same name), export the best model."""
    from raysst.data import load_data, to_ray_datasets
    from raysst.export import export_run, training_report
    from raysst.runtime import init_ray
    from raysst.tracking import require_mlflow

    check_job(cfg, TRAIN)
    require_mlflow(cfg)
    # Labels and columns are checked before Ray starts: a bad file fails in seconds, and no worker starts.
    train, validation, task = load_data(cfg)
    cfg = cfg.replace(metric=check_metric(task, cfg.metric))
    init_ray()
    if cfg.elastic:  # Train V2's elastic policy waits without end for MIN workers' room: wait here, in bounds
        wait_for_capacity(worker_resources(cfg), cfg.min_workers, RUN, lower_hint(cfg, TRAIN), cfg.wait_for_nodes)
    else:  # a fixed-size group's own start times out (build_trainer)
        check_fits(worker_resources(cfg), cfg.num_workers, RUN, lower_hint(cfg, TRAIN), wait_s=cfg.wait_for_nodes)
    train = even_rows(train, cfg)
    if cfg.elastic:
        print(f"[raysst] elastic: starts with {cfg.min_workers} to {cfg.max_workers} workers, as many as fit; every "
              f"{cfg.elastic_resize_interval:g} s it grows (or shrinks) to what fits, resuming from its latest "
              f"checkpoint", flush=True)
    print(f"[raysst] data: {len(train)} train, {len(validation)} validation rows from {cfg.data}; {describe(task)}; "
          f"best checkpoint by {cfg.metric}", flush=True)
    datasets = to_ray_datasets(train, validation, cfg.model, cfg.max_seq_length)
    result = fit(build_trainer(cfg, datasets, len(train), task), cfg, RUN, TRAIN)
    model_dir = export_run(result, cfg)
    print(f"[raysst] model exported to {model_dir}", flush=True)
    # Evaluation scores on what training computed on: a fake GPU's run evaluates on CPU.
    training_report(model_dir, validation, cfg=cfg.replace(use_gpu=cfg.compute_on_gpu, fake_gpu=False))
    print(f"[raysst] evaluation report in {model_dir}/eval/report.md", flush=True)
    return model_dir
