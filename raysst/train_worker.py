"""What runs on every Ray Train worker: the training loop, validation, and the checkpoint of each epoch."""

from __future__ import annotations

import json
import math
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from raysst.config import Config
from raysst.storage import HISTORY_FILE, PREDICTIONS_FILE
from raysst.task import Task
from raysst.train_state import load_state, save_state


def train_fn_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: train, evaluate, report and checkpoint each epoch."""
    import ray.train
    import torch.distributed as dist
    from transformers import get_linear_schedule_with_warmup

    from raysst.batching import epoch_batches
    from raysst.models import (count_parameters, describe_device, device_dtype, device_info, fetch_once_per_node,
                               load_classifier, load_tokenizer, set_dropout)
    from raysst.tracking import Tracker

    run_id, n_train, task = config.pop("run_id"), config.pop("n_train"), Task.from_dict(config.pop("task"))
    cfg = Config(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.compute_on_gpu:
        torch.set_num_threads(cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed + rank)

    # Resume: the checkpoint holds the weights in Hugging Face form plus optimizer state, both read without pickle.
    model_path = fetch_once_per_node(cfg.model, ctx.get_local_rank())
    checkpoint, state = ray.train.get_checkpoint(), None
    with (checkpoint.as_directory() if checkpoint else nullcontext()) as ckpt_dir:
        model = load_classifier(ckpt_dir or model_path, task=task)
        if ckpt_dir:
            state = load_state(Path(ckpt_dir))
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
                    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                loss = task.loss(logits, batch["labels"])
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

        val, outputs = evaluate_shard(model, val_shard, task, pad_id, cfg, rank, world, device, autocast)
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
        _report(history, outputs, epoch, steps_per_epoch, model, tokenizer, optimizer, scheduler, scaler, rank)
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


@torch.inference_mode()
def evaluate_shard(model, val_shard, task: Task, pad_id: int, cfg: Config, rank: int, world: int, device,
                   autocast) -> tuple[dict, np.ndarray]:
    """Validation over the whole set, each row scored by exactly one worker and gathered by all: the task's
    metrics, the loss, and every row's outputs in file order (what the evaluation report is made of)."""
    import torch.distributed as dist
    from raysst.batching import model_inputs

    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, truncated rows
    rows, outs, gold = [], [], {}
    for b in val_shard.iter_batches(batch_size=cfg.eval_batch_size, batch_format="numpy"):
        gold.update(zip(b["row"].tolist(), b["label"]))  # every worker keeps every row's target
        mine = b["row"] % world == rank
        if not mine.any():
            continue
        batch = model_inputs(b["input_ids"][mine], pad_id, b["label"][mine],
                             b["token_type_ids"][mine] if "token_type_ids" in b else None)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        totals += torch.stack([task.loss(logits, batch["labels"], reduction="sum").double(),
                               torch.tensor(b["truncated"][mine].sum(), device=device, dtype=torch.float64)])
        rows.append(torch.as_tensor(b["row"][mine], device=device))
        outs.append(task.outputs(logits))
    # Each worker writes its rows into a zero matrix; the sum holds every row once.
    outputs = torch.zeros((len(gold), task.num_labels), dtype=torch.float32, device=device)
    if rows:
        outputs[torch.cat(rows)] = torch.cat(outs)
    if dist.is_initialized():
        dist.all_reduce(totals)
        dist.all_reduce(outputs)
    loss_sum, truncated = totals.tolist()
    outputs = outputs.cpu().numpy()
    targets = np.stack([gold[i] for i in range(len(gold))])
    return ({"eval_loss": loss_sum / len(gold), **task.score(outputs, targets), "eval_samples": len(gold),
             "eval_truncated": int(truncated)}, outputs)


def _report(history, outputs, epoch, steps_per_epoch, model, tokenizer, optimizer, scheduler, scaler,
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
        save_state(Path(tmp), {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                               "scaler": scaler.state_dict(), "epoch": epoch, "steps_per_epoch": steps_per_epoch,
                               "history": history})
        (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history, indent=2))
        np.save(Path(tmp) / PREDICTIONS_FILE, outputs)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_epoch_{epoch:03d}")
