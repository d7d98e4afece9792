"""Training benchmarks (not run in CI). Each part prints its figures as one JSON line.

    python bench/bench_train.py vs-hf  [--samples 20000] [--grouped-only] [--precision bf16]  # vs the HF Trainer
    python bench/bench_train.py whole  [--samples 20000]  # jobs/train.py vs an HF Trainer script, whole processes
    python bench/bench_train.py ceiling [--samples 20000] # tiny BERT: the input path's samples/s per worker
    python bench/bench_train.py compile [--precision bf16] # MiniLM step: eager vs torch.compile(dynamic=True)
    python bench/bench_train.py local                     # configs/local.yaml: wall time, accuracy
    python bench/bench_train.py full                      # MiniLM, full SST-2, 1 epoch: accuracy, samples/s
    python bench/bench_train.py gpu   [--batch-size 128]  # bert-base-shaped model, bf16, one GPU: samples/s
    python bench/bench_train.py hf-gpu [--batch-size 128] # the same model and data through HF Trainer(group_by_length)
        [--model DIR] [--data DIR] [--samples N] [--device cpu]  # (bench/gpu_check.py passes these)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raysst.config import PACKAGED_MINILM  # noqa: E402
from raysst.cli import load_config  # noqa: E402
from raysst.data import load_data  # noqa: E402

SST2 = str((ROOT.parent / "shared" / "data" / "sst2").resolve())
LOCAL_CONFIG = str(ROOT / "configs" / "local.yaml")  # both contenders take its recipe


def run_ours(storage: str, **overrides) -> dict:
    """One job through the project's own driver; returns its metrics.json plus the wall time."""
    from raysst.train import train_driver_fn

    cfg = load_config(LOCAL_CONFIG, **{"data": SST2, "storage_path": storage, **overrides})
    start = time.perf_counter()
    model_dir = train_driver_fn(cfg)
    metrics = json.loads((Path(model_dir) / "metrics.json").read_text())
    return {**metrics, "wall_seconds": time.perf_counter() - start}


def run_hf_trainer(samples: int, strategy: str = "random", save_to: Optional[str] = None,
                   precision: str = "fp32", model: str = PACKAGED_MINILM, data: str = SST2,
                   batch_size: Optional[int] = None, device: str = "cpu", evaluate: bool = True) -> dict:
    """The baseline a user would pick: transformers.Trainer, dynamic padding, and local.yaml's model,
    batch size, threads and recipe; `save_to` also saves the model and tokenizer there, as our job does.
    `model`, `data`, `batch_size` and `device="cuda"` make it the GPU check's baseline."""
    import datasets
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from raysst.models import load_classifier, load_tokenizer, set_dropout

    cfg = load_config(LOCAL_CONFIG)
    if device == "cpu":
        torch.set_num_threads(cfg.cpus_per_worker)
    train, validation, _ = load_data(cfg.replace(data=data, max_train_samples=samples))
    tok = load_tokenizer(model)

    def encode(df):
        ds = datasets.Dataset.from_pandas(df.rename(columns={"label": "labels"}))
        return ds.map(lambda b: tok(b["sentence"], truncation=True, max_length=cfg.max_seq_length), batched=True,
                      remove_columns=["sentence"])

    classifier = load_classifier(model)
    set_dropout(classifier, cfg.dropout)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch_size or cfg.batch_size,
                                 per_device_eval_batch_size=128, num_train_epochs=1, learning_rate=cfg.lr,
                                 warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
                                 max_grad_norm=cfg.max_grad_norm, lr_scheduler_type="linear", use_cpu=device == "cpu",
                                 report_to=[], save_strategy="no", logging_steps=10_000, seed=cfg.seed,
                                 train_sampling_strategy=strategy, dataloader_num_workers=0,
                                 bf16=precision == "bf16")
        trainer = Trainer(model=classifier, args=args, train_dataset=encode(train),
                          eval_dataset=encode(validation) if evaluate else None, data_collator=DataCollatorWithPadding(tok),
                          compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())})
        start = time.perf_counter()
        stats = trainer.train().metrics
        wall = time.perf_counter() - start
        accuracy = trainer.evaluate()["eval_accuracy"] if evaluate else None
        if save_to:
            trainer.save_model(save_to)
            tok.save_pretrained(save_to)
    return {"train_samples_per_second": stats["train_samples_per_second"], "wall_seconds": wall,
            "accuracy": accuracy, "train_samples": len(train)}


def vs_hf(samples: int, grouped_only: bool = False, precision: str = "fp32") -> dict:
    """Same slice, model, batch, recipe, threads and precision (configs/local.yaml): our Ray trainer, then the
    HF Trainer with length-grouped (and, unless `grouped_only`, random) sampling."""
    with tempfile.TemporaryDirectory() as storage:
        ours = run_ours(storage, max_train_samples=samples, name="vs-hf", precision=precision)
    hf_grouped = run_hf_trainer(samples, strategy="group_by_length", precision=precision)
    ours_sps = ours["train_samples_per_second"]
    result = {"bench": "train vs HF Trainer", "samples": samples, "model": "all-MiniLM-L6-v2",
              "batch_size": ours["config"]["batch_size"], "threads": ours["config"]["cpus_per_worker"],
              "precision": precision,
              "raysst_samples_per_second": ours_sps, "raysst_accuracy": ours["accuracy"],
              "raysst_wall_seconds_incl_ray_startup": ours["wall_seconds"],
              "hf_trainer_grouped_samples_per_second": hf_grouped["train_samples_per_second"],
              "hf_trainer_grouped_accuracy": hf_grouped["accuracy"],
              "speedup_vs_hf_trainer_grouped": ours_sps / hf_grouped["train_samples_per_second"]}
    if not grouped_only:
        hf = run_hf_trainer(samples, precision=precision)
        result.update(hf_trainer_samples_per_second=hf["train_samples_per_second"], hf_trainer_accuracy=hf["accuracy"],
                      speedup_vs_hf_trainer=ours_sps / hf["train_samples_per_second"])
    return result


def whole(samples: int, keep: Optional[str] = None) -> dict:
    """What a user waits for: `python jobs/train.py` (its own Ray start, data load, epochs, export and
    evaluation report) against a script that trains HF's Trainer(group_by_length), evaluates and saves,
    each a fresh process on the same slice. Also what our job spends outside its epochs."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    with tempfile.TemporaryDirectory() as tmp:
        storage = keep or tmp
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "jobs/train.py", "--config", LOCAL_CONFIG, "--data", SST2, "--storage-path",
                        storage, "--max-train-samples", str(samples), "--name", "whole"], cwd=ROOT, env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ours_s = time.perf_counter() - t0
        metrics = json.loads((Path(storage) / "whole" / "model" / "metrics.json").read_text())
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "hf-process", "--samples", str(samples), "--out",
                        str(Path(tmp) / "hf")], env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        hf_s = time.perf_counter() - t0
    epochs_s = sum(row["train_seconds"] for row in metrics["epochs"])
    return {"bench": "train, whole processes", "samples": samples, "raysst_process_seconds": ours_s,
            "raysst_epoch_seconds": epochs_s, "raysst_seconds_outside_epochs": ours_s - epochs_s,
            "raysst_accuracy": metrics["accuracy"], "hf_trainer_grouped_process_seconds": hf_s,
            "speedup_whole_process": hf_s / ours_s}


def ceiling(samples: int) -> dict:
    """The input path alone, per worker: our trainer with a tiny BERT (hidden 64, 2 layers), whose step
    costs little, so samples/s is bounded by the shard, pooling, length grouping and padding; and the same
    batches iterated with no model at all."""
    from raysst.batching import epoch_batches
    from raysst.data import to_ray_datasets
    from raysst.models import make_random_model

    with tempfile.TemporaryDirectory() as d:
        model = make_random_model(str(Path(d) / "tiny64"), hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=128, max_position_embeddings=128)
        m = run_ours(d, model=model, max_train_samples=samples, name="ceiling", epochs=2)
        cfg = load_config(LOCAL_CONFIG, data=SST2)
        train, validation, _ = load_data(cfg.replace(max_train_samples=samples))
        shard = to_ray_datasets(train, validation, model, cfg.max_seq_length)["train"]
        t0, n = time.perf_counter(), 0
        for batch in epoch_batches(shard, cfg, cfg.batch_size, 1, 0, 0):
            n += len(batch["labels"])
        data_only = n / (time.perf_counter() - t0)
    return {"bench": "input-path ceiling, 1 worker, tiny BERT (hidden 64, 2 layers)", "samples": samples,
            "batch_size": cfg.batch_size, "threads": cfg.cpus_per_worker,
            "train_samples_per_second_by_epoch": [row["train_samples_per_second"] for row in m["epochs"]],
            # Inside the worker: the seconds the loop waited for its batches (streaming split included).
            "input_path_samples_per_second_by_epoch": [row["input_samples_per_second_per_worker"]
                                                       for row in m["epochs"]],
            "batches_only_samples_per_second": data_only}


def compile_step(precision: str, steps: int = 64) -> dict:
    """What `torch.compile(dynamic=True)` would buy the training step: MiniLM, one pool of length-grouped
    SST-2 batches (local.yaml's batch and threads), eager then compiled, each on a fresh model and AdamW.
    Compile time is the first steps' excess; the speed ratio is over the same later steps."""
    import numpy as np
    import torch

    from raysst.batching import length_grouped_batches, rust_tokenizer
    from raysst.models import load_classifier, load_tokenizer, resolve_model

    cfg = load_config(LOCAL_CONFIG, data=SST2)
    torch.set_num_threads(cfg.cpus_per_worker)
    path = resolve_model(cfg.model)
    train = load_data(cfg.replace(max_train_samples=cfg.batch_size * steps))[0]
    tok = rust_tokenizer(load_tokenizer(path).backend_tokenizer.to_str(), cfg.max_seq_length)
    ids = np.empty(len(train), object)
    ids[:] = [np.array(e.ids) for e in tok.encode_batch_fast(train.sentence.tolist())]
    batches = list(length_grouped_batches(ids, train.label.to_numpy(), 0, cfg.batch_size, np.random.default_rng(0)))

    def step_seconds(compiled: bool) -> list:
        model = load_classifier(path).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=True)
        forward = torch.compile(model, dynamic=True) if compiled else model
        took = []
        for batch in batches:
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = forward(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            took.append(time.perf_counter() - t)
        return took

    eager, compiled = step_seconds(False), step_seconds(True)
    later = slice(8, None)  # past the compiled model's recompiles for its first shapes
    return {"bench": "torch.compile(dynamic=True) vs eager, MiniLM training step", "precision": precision,
            "steps": len(batches), "batch_size": cfg.batch_size, "threads": cfg.cpus_per_worker,
            "eager_seconds_later_steps": sum(eager[later]), "compiled_seconds_later_steps": sum(compiled[later]),
            "speedup_later_steps": sum(eager[later]) / sum(compiled[later]),
            "compile_seconds": sum(compiled[:8]) - sum(eager[:8])}


def local() -> dict:
    with tempfile.TemporaryDirectory() as storage:
        m = run_ours(storage)
    return {"bench": "configs/local.yaml", "wall_seconds": m["wall_seconds"], "accuracy": m["accuracy"],
            "train_samples": m["epochs"][-1]["train_samples"], "samples_per_second": m["train_samples_per_second"]}


def full() -> dict:
    with tempfile.TemporaryDirectory() as storage:
        m = run_ours(storage, max_train_samples=0, name="full")
    return {"bench": "MiniLM, full SST-2, 1 epoch", "wall_seconds": m["wall_seconds"], "accuracy": m["accuracy"],
            "eval_loss": m["eval_loss"], "samples_per_second": m["train_samples_per_second"],
            "tokens_per_second": m["train_tokens_per_second"]}


@contextmanager
def gpu_model(part: str, model: Optional[str], device: str) -> Iterator[tuple[str, str]]:
    """(a scratch directory, `model` or a fresh bert-base-shaped random model in it) for the GPU parts;
    exits at once when `device` is cuda and no GPU is visible."""
    import torch

    from raysst.models import make_random_model

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench_train.py {part}: no CUDA GPU is visible (torch.cuda.is_available() is False)")
    with tempfile.TemporaryDirectory() as d:
        yield d, model or make_random_model(str(Path(d) / "bert-base-random"))


def gpu(batch_size: int, model: Optional[str] = None, data: str = SST2, samples: int = 0, device: str = "cuda") -> dict:
    """The project's trainer on one GPU: bert-base-shaped random weights (the Hub is out of reach), bf16,
    full SST-2 (or `samples` of it) for one epoch. Speed is real; accuracy is not (random weights).

    `model` replaces the fresh bert-base; `device="cpu"` runs the same path in fp32 on one CPU, which is
    how bench/gpu_check.py's smoke test keeps this code alive without a GPU."""
    from raysst.models import describe_device, device_info

    on_gpu = device == "cuda"
    with gpu_model("gpu", model, device) as (d, model):
        m = run_ours(d, model=model, data=data, max_train_samples=samples, use_gpu=on_gpu,
                     precision="bf16" if on_gpu else "fp32", cpus_per_worker=4 if on_gpu else 1,
                     batch_size=batch_size, eval_batch_size=512, name="gpu", log_every=100)
    return {"bench": f"bert-base-shaped {'bf16' if on_gpu else 'fp32'} training, 1 {device.upper()} worker, "
                     "raysst trainer", "gpu": describe_device(device_info()),
            "batch_size": batch_size, "train_samples": m["epochs"][-1]["train_samples"],
            "samples_per_second": m["train_samples_per_second"], "tokens_per_second": m["train_tokens_per_second"],
            "wall_seconds_incl_ray_startup": m["wall_seconds"]}


def hf_gpu(batch_size: int, model: Optional[str] = None, data: str = SST2, samples: int = 0,
           device: str = "cuda") -> dict:
    """The GPU check's baseline: HF `Trainer(group_by_length)` on what `gpu` trains (same model shape, data,
    batch and precision, one epoch), so the check prints our speed as a ratio to it."""
    on_gpu = device == "cuda"
    with gpu_model("hf-gpu", model, device) as (_, model):
        m = run_hf_trainer(samples, "group_by_length", precision="bf16" if on_gpu else "fp32", model=model,
                           data=data, batch_size=batch_size, device=device, evaluate=False)
    return {"bench": f"HF Trainer(group_by_length), {'bf16' if on_gpu else 'fp32'}, 1 {device.upper()}",
            "batch_size": batch_size, "train_samples": m["train_samples"],
            "samples_per_second": m["train_samples_per_second"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["vs-hf", "whole", "ceiling", "compile", "local", "full", "gpu", "hf-gpu",
                                         "hf-process"])
    parser.add_argument("--samples", type=int, help="vs-hf, whole, ceiling: training slice (default 20000); "
                                                    "gpu: 0 = all (default)")
    parser.add_argument("--grouped-only", action="store_true", help="vs-hf: skip the HF Trainer's random sampling")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="vs-hf, compile: the precision (bf16: CPU autocast, HF's bf16=True)")
    parser.add_argument("--out", help="hf-process: save the HF Trainer's model here; whole: keep our run here")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model", help="gpu, hf-gpu: this model directory instead of a fresh random bert-base")
    parser.add_argument("--data", default=SST2, help="gpu, hf-gpu: SST-2 directory (default: %(default)s)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="gpu, hf-gpu: cpu for a smoke run")
    a = parser.parse_args()
    result = {"vs-hf": lambda: vs_hf(a.samples or 20000, a.grouped_only, a.precision),
              "whole": lambda: whole(a.samples or 20000, a.out), "ceiling": lambda: ceiling(a.samples or 20000),
              "compile": lambda: compile_step(a.precision),
              "hf-process": lambda: run_hf_trainer(a.samples or 20000, "group_by_length", a.out),
              "local": local, "full": full,
              "gpu": lambda: gpu(a.batch_size, a.model, a.data, a.samples or 0, a.device),
              "hf-gpu": lambda: hf_gpu(a.batch_size, a.model, a.data, a.samples or 0, a.device)}[a.part]()
    print(json.dumps(result))
