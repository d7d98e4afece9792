"""Fine-tune a BERT encoder on SST-2 with Ray Train: the per-worker loop and the driver."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from raysst.capacity import check_fits, lower_hint, timed_out, wait_for_capacity, worker_resources
from raysst.config import TRAIN, Config, check_job
from raysst.storage import HISTORY_FILE, PREDICTIONS_FILE, STATE_FILE

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train V2's placement-group wait
RUN = "the run"  # how errors name one training run


def train_fn_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: train, evaluate, report and checkpoint each epoch."""
    import ray.train
    import torch.distributed as dist
    from transformers import get_linear_schedule_with_warmup

    from raysst.models import (count_parameters, describe_device, device_dtype, device_info, fetch_once_per_node,
                               load_classifier, load_tokenizer, set_dropout)
    from raysst.tracking import Tracker

    run_id, n_train = config.pop("run_id"), config.pop("n_train")
    cfg = Config(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.compute_on_gpu:
        torch.set_num_threads(cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed + rank)

    # Resume: the checkpoint holds the weights in Hugging Face form plus optimizer state.
    model_path = fetch_once_per_node(cfg.model, ctx.get_local_rank())
    checkpoint, state = ray.train.get_checkpoint(), None
    with (checkpoint.as_directory() if checkpoint else nullcontext()) as ckpt_dir:
        model = load_classifier(ckpt_dir or model_path)
        if ckpt_dir:
            state = torch.load(Path(ckpt_dir) / STATE_FILE, weights_only=False)
    set_dropout(model, cfg.dropout)
    # Fused SDPA attention is transformers' default for BERT; a model type without it falls back to eager,
    # which is slower: recorded in every epoch's metrics, and said once.
    attention = model.config._attn_implementation
    if attention != "sdpa" and rank == 0:
        print(f"[raysst] {cfg.model} runs {attention} attention, not SDPA: expect slower steps", flush=True)
    tokenizer = load_tokenizer(model_path)  # saved with each checkpoint; the data arrive tokenized
    n_params = count_parameters(model)
    # A fake GPU is only a resource label: Train's get_device would name cuda:0, which CPU torch cannot use.
    device = ray.train.torch.get_device() if cfg.compute_on_gpu else torch.device("cpu")
    model = ray.train.torch.prepare_model(model, move_to_device=device)

    # Fused AdamW is 6x faster than the default on CPU too; the step is a third of a small model's time.
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, fused=True)
    # The global batch is fixed; each worker takes its share of it at this run's world size. n_train is a
    # multiple of every world size the run may have (even_rows), so steps per epoch do not depend on it.
    per_worker = cfg.per_worker_batch(world)
    rows_per_worker = n_train // world  # streaming_split(equal=True) gives every worker this many
    micro_batches = math.ceil(rows_per_worker / per_worker)
    steps_per_epoch = math.ceil(micro_batches / cfg.grad_accum_steps)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)

    dtype = device_dtype(cfg.compute_on_gpu, cfg.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    history, start_epoch = [], 1
    if state:
        if state.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:  # what even_rows guarantees
            raise RuntimeError(f"{world} worker(s) would run {steps_per_epoch} steps per epoch, but the checkpoint's "
                               f"schedule has {state['steps_per_epoch']}: resume with the rows it trained on")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history, start_epoch = state["history"], state["epoch"] + 1
        if rank == 0:
            print(f"[raysst] resuming from the checkpoint of epoch {state['epoch']} on {world} worker(s)", flush=True)

    tracker = Tracker(cfg, enabled=rank == 0)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    pad_id = tokenizer.pad_token_id or 0

    for epoch in range(start_epoch, cfg.epochs + 1):
        model.train()
        samples, tokens, micro, step, waited = 0, 0, 0, 0, [0.0]
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: no host sync per step
        t0 = time.perf_counter()
        for batch in timed(epoch_batches(train_shard, cfg, per_worker, epoch, rank, pad_id), waited):
            n = len(batch["labels"])
            samples, tokens = samples + n, tokens + int(batch["attention_mask"].sum())  # host tensors: no sync
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            micro += 1
            last = micro % cfg.grad_accum_steps == 0 or micro == micro_batches
            # Skip the gradient all-reduce on accumulation steps; it runs once per optimizer step.
            with nullcontext() if last or world == 1 else model.no_sync():
                with autocast():
                    loss = model(**batch).loss
                scaler.scale(loss / cfg.grad_accum_steps).backward()
            loss_sum += loss.detach().double() * n
            if not last:
                continue
            if cfg.max_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if rank == 0 and step % cfg.log_every == 0:
                rate = samples * world / (time.perf_counter() - t0)
                tracker.log({"loss": loss.item(), "lr": scheduler.get_last_lr()[0], "samples_per_second": rate},
                            (epoch - 1) * steps_per_epoch + step, "train/")
                print(f"[raysst] epoch {epoch} step {step}/{steps_per_epoch} loss {loss.item():.4f} "
                      f"lr {scheduler.get_last_lr()[0]:.2e} samples/s {rate:.1f}", flush=True)
        train_time = time.perf_counter() - t0

        val, prob_positive = evaluate_shard(model, val_shard, pad_id, cfg, rank, world, device, autocast)
        totals = torch.stack([torch.tensor(samples, dtype=torch.float64, device=device),
                              torch.tensor(tokens, dtype=torch.float64, device=device), loss_sum])
        if dist.is_initialized():
            dist.all_reduce(totals)
        samples, tokens, loss_sum = totals.tolist()
        # Rank 0's own time in the input path (shard, pooling, grouping, padding): the rate it could feed
        # steps at, which a GPU step must not outrun.
        input_rate = samples / world / waited[0] if waited[0] else float("inf")
        history.append({
            "epoch": epoch, "train_loss": loss_sum / samples, **val,
            "train_samples_per_second": samples / train_time, "train_tokens_per_second": tokens / train_time,
            "train_steps_per_second": step / train_time, "train_seconds": train_time,
            "input_seconds": waited[0], "input_samples_per_second_per_worker": input_rate,
            "train_samples": int(samples), "flops": 6 * n_params * tokens,
            "train_steps": step, "schedule_steps_per_epoch": steps_per_epoch, "start_epoch": start_epoch, "run_id": run_id,
            # Read here, on a worker: the driver may sit on a CPU head node while the workers hold the GPUs.
            "workers": world, "per_worker_batch_size": per_worker, "attention": attention,
            "precision": str(dtype or torch.float32).removeprefix("torch."),
            "global_batch_size": per_worker * world * cfg.grad_accum_steps, "hardware": describe_device(device_info()),
        })
        if rank == 0:
            tracker.log(history[-1], epoch * steps_per_epoch, "epoch/")
            print(f"[raysst] epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in history[-1].items()
                                                        if isinstance(v, float)), flush=True)
        _report(history, prob_positive, epoch, steps_per_epoch, model, tokenizer, optimizer, scheduler, scaler, rank)
    tracker.close()


def param_groups(model: torch.nn.Module, cfg: Config) -> list:
    """AdamW parameter groups: no weight decay on biases and LayerNorm; the head at `head_lr_scale` x lr.

    The head is the pooler and the classifier. A sentence-transformers checkpoint such as all-MiniLM-L6-v2
    was trained through mean pooling, so its pooler took no part in that training (weights of std 0.009)
    and the classifier is new: at the encoder's learning rate they lag behind it for much of one epoch.
    """
    groups: dict = {}
    for name, param in model.named_parameters():
        decay = not (name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name)
        head = "pooler" in name or "classifier" in name
        groups.setdefault((decay, head), []).append(param)
    return [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0,
             "lr": cfg.lr * (cfg.head_lr_scale if head else 1.0)} for (decay, head), params in groups.items()]


def epoch_batches(train_shard, cfg: Config, per_worker: int, epoch: int, rank: int, pad_id: int):
    """This worker's batches of one epoch: its shard's token ids shuffled in pools of 64 batches (seeded by
    run, epoch and rank), each pool grouped by length into padded batches."""
    from raysst.data import length_grouped_batches

    rng = np.random.default_rng([cfg.seed, epoch, rank])
    pool = per_worker * (64 if cfg.group_by_length else 1)
    ids, labels = np.empty(0, object), np.empty(0, np.int64)
    for chunk in train_shard.iter_batches(batch_size=pool, batch_format="numpy", local_shuffle_buffer_size=pool,
                                          local_shuffle_seed=cfg.seed * 1000 + epoch):
        # Pools come short at block boundaries: only whole batches leave, the rest joins the next pool, so
        # every worker steps ceil(rows / per_worker) times and no DDP collective waits for a partner.
        ids, labels = np.concatenate([ids, as_rows(chunk["input_ids"])]), np.concatenate([labels, chunk["label"]])
        whole = len(ids) - len(ids) % per_worker
        yield from length_grouped_batches(ids[:whole], labels[:whole], pad_id, per_worker, rng, cfg.group_by_length)
        ids, labels = ids[whole:], labels[whole:]
    if len(ids):
        yield from length_grouped_batches(ids, labels, pad_id, per_worker, rng, cfg.group_by_length)


def timed(batches: Iterator, waited: list) -> Iterator:
    """`batches`, adding the seconds spent waiting for each to `waited[0]`."""
    batches = iter(batches)
    while True:
        t = time.perf_counter()
        batch = next(batches, None)
        waited[0] += time.perf_counter() - t
        if batch is None:
            return
        yield batch


def as_rows(column) -> np.ndarray:
    """A batch's token-id column as a 1-D array of per-row arrays (a pool of equal lengths may come as 2-D)."""
    rows = np.empty(len(column), object)
    for i, row in enumerate(column):
        rows[i] = row
    return rows


@torch.inference_mode()
def evaluate_shard(model, val_shard, pad_id: int, cfg: Config, rank: int, world: int, device,
                   autocast) -> tuple[dict, np.ndarray]:
    """Validation over the whole set, each row counted by exactly one worker, summed over all; and every
    row's probability of `positive`, in file order (what the evaluation report is made of)."""
    import torch.distributed as dist
    from raysst.data import model_inputs

    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # examples, correct, summed loss, truncated
    rows, probs = [], []
    for b in val_shard.iter_batches(batch_size=cfg.eval_batch_size, batch_format="numpy"):
        mine = b["row"] % world == rank
        if not mine.any():
            continue
        batch = {k: v.to(device) for k, v in model_inputs(b["input_ids"][mine], pad_id, b["label"][mine]).items()}
        with autocast():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")
        totals += torch.stack([torch.tensor(len(logits), device=device, dtype=torch.float64),
                               (logits.argmax(-1) == batch["labels"]).sum().double(), loss.double(),
                               torch.tensor(b["truncated"][mine].sum(), device=device, dtype=torch.float64)])
        rows.append(torch.as_tensor(b["row"][mine], device=device))
        probs.append(logits.softmax(-1)[:, 1])
    if dist.is_initialized():
        dist.all_reduce(totals)
    n, correct, loss_sum, truncated = totals.tolist()
    # Each worker writes its rows into a zero vector; the sum holds every row once.
    prob_positive = torch.zeros(int(n), dtype=torch.float32, device=device)
    if rows:
        prob_positive[torch.cat(rows)] = torch.cat(probs)
    if dist.is_initialized():
        dist.all_reduce(prob_positive)
    return ({"eval_loss": loss_sum / n, "accuracy": correct / n, "eval_samples": int(n),
             "eval_truncated": int(truncated)}, prob_positive.cpu().numpy())


def _report(history, prob_positive, epoch, steps_per_epoch, model, tokenizer, optimizer, scheduler, scaler,
            rank) -> None:
    """Report the epoch's metrics to Ray Train; rank 0 attaches the checkpoint, with the validation predictions."""
    import ray.train

    metrics = dict(history[-1])
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        unwrapped = getattr(model, "module", model)
        unwrapped.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "epoch": epoch, "steps_per_epoch": steps_per_epoch,
                    "history": history}, Path(tmp) / STATE_FILE)
        (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history, indent=2))
        np.save(Path(tmp) / PREDICTIONS_FILE, prob_positive)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_epoch_{epoch:03d}")


def build_trainer(cfg: Config, datasets: dict, n_train: int, callbacks: Optional[list] = None):
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

    os.environ[START_TIMEOUT_ENV] = str(cfg.wait_for_nodes / (cfg.max_failures + 1))
    loop_config = {**cfg.to_dict(), "n_train": n_train, "run_id": uuid.uuid4().hex[:8]}
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
                                                         checkpoint_score_attribute="accuracy",
                                                         checkpoint_score_order="max"),
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
    from raysst.data import load_sst2, to_ray_datasets
    from raysst.export import export_run, training_report
    from raysst.runtime import init_ray
    from raysst.tracking import require_mlflow

    check_job(cfg, TRAIN)
    require_mlflow(cfg)
    init_ray()
    if cfg.elastic:  # Train V2's elastic policy waits without end for MIN workers' room: wait here, in bounds
        wait_for_capacity(worker_resources(cfg), cfg.min_workers, RUN, lower_hint(cfg, TRAIN), cfg.wait_for_nodes)
    else:  # a fixed-size group's own start times out (build_trainer)
        check_fits(worker_resources(cfg), cfg.num_workers, RUN, lower_hint(cfg, TRAIN), wait_s=cfg.wait_for_nodes)
    train, validation = load_sst2(cfg.data, cfg.max_train_samples, cfg.seed)
    train = even_rows(train, cfg)
    if cfg.elastic:
        print(f"[raysst] elastic: starts with {cfg.min_workers} to {cfg.max_workers} workers, as many as fit; every "
              f"{cfg.elastic_resize_interval:g} s it grows (or shrinks) to what fits, resuming from its latest "
              f"checkpoint", flush=True)
    print(f"[raysst] data: {len(train)} train, {len(validation)} validation rows from {cfg.data}", flush=True)
    datasets = to_ray_datasets(train, validation, cfg.model, cfg.max_seq_length)
    result = fit(build_trainer(cfg, datasets, len(train)), cfg, RUN, TRAIN)
    model_dir = export_run(result, cfg)
    print(f"[raysst] model exported to {model_dir}", flush=True)
    # Evaluation scores on what training computed on: a fake GPU's run evaluates on CPU.
    training_report(model_dir, validation, cfg=cfg.replace(use_gpu=cfg.compute_on_gpu, fake_gpu=False))
    print(f"[raysst] evaluation report in {model_dir}/eval/report.md", flush=True)
    return model_dir
