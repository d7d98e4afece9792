"""GPU check: short bf16 training runs (ours, then HF Trainer's) and a batch-scoring run of a bert-base-shaped
model on one GPU.

    python bench/gpu_check.py                # needs a CUDA GPU; a few minutes, at most 10
    python bench/gpu_check.py --cpu-smoke    # the same steps on CPU with a tiny model and tiny data (tests)
    python bench/gpu_check.py --kit .gpu-kit --print-command   # the device tool's `run` arguments, as JSON

With --kit (bench/gpu_kit.py builds one: `make gpu-kit`) the data and tokenizer come from the kit, which
is checked against its manifest first; with --out the table and the JSON line are also written there.

The model has bert-base-uncased's shape and random weights (the Hub is out of reach): its speed is real,
its accuracy is not. Training is bench/bench_train.py's `gpu` part (the project's Ray Train trainer, one
worker, bf16, full SST-2 for one epoch), then HF `Trainer(group_by_length)` on the same model, data,
batch and precision (`hf-gpu`), so the check prints our speed as a ratio to it; scoring is raysst.score
(Ray Data, one GPU model actor, bf16) over ~200k SST-2 sentences. Each step runs in its own process group
under a time limit, so a step that fails or hangs still leaves the others' figures. Prints the versions,
then a table, then the table as one JSON line. Exit status: 0 when every step passed, 1 when one failed,
2 without a CUDA device, 3 when the kit does not match its manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
BENCH_TRAIN = ROOT / "bench" / "bench_train.py"

from bench_train import SST2  # noqa: E402  (the training benchmark's SST-2 default)
from gpu_kit import KitError, kit_paths  # noqa: E402
from gpu_plan import run_arguments  # noqa: E402
from gpu_report import describe, speedup, table, versions  # noqa: E402
from raysst.config import PACKAGED_MINILM  # noqa: E402

# The full check and the CPU smoke run take the same steps; only the sizes differ.
SIZES = {
    "gpu": {"train_batch": 128, "train_samples": 0, "score_rows": 200_000, "score_files": 8, "score_batch": 1024,
            "train_timeout": 225, "score_timeout": 120},  # each training step, ours and HF's: 10 minutes in all
    # Generous limits: on a 2-core machine shared with other test runs, one step took up to 4 minutes.
    "cpu": {"train_batch": 16, "train_samples": 0, "score_rows": 300, "score_files": 3, "score_batch": 32,
            "train_timeout": 420, "score_timeout": 420},
}
SMOKE_SPLITS = {"train": 64, "validation": 32}  # rows of each split that the CPU smoke run trains and evaluates on
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 128}


def write_corpus(data: str, directory: Path, rows: int, files: int) -> Path:
    """`rows` SST-2 train sentences (repeated as needed) as `files` parquet files, with an id column."""
    import numpy as np
    import pandas as pd

    from raysst.data import load_split

    sentences = load_split(data, "train")["sentence"].to_numpy()
    texts = np.resize(sentences, rows)  # repeats the split until `rows` are filled
    directory.mkdir(parents=True)
    for i, part in enumerate(np.array_split(np.arange(rows), files)):
        pd.DataFrame({"id": part, "sentence": texts[part]}).to_parquet(directory / f"part-{i:03d}.parquet")
    return directory


def write_smoke_data(data: str, directory: Path) -> str:
    """The first rows of each split, so the smoke run's training and evaluation take seconds."""
    from raysst.data import find_split_file, read_table

    directory.mkdir(parents=True)
    for split, rows in SMOKE_SPLITS.items():  # as read, unchecked: checking the data is the trainer's job
        read_table(find_split_file(Path(data), split)).head(rows).to_parquet(directory / f"{split}.parquet")
    return str(directory)


def score_step(model: str, corpus: str, output: str, batch_size: int, on_gpu: bool) -> dict:
    """The scoring step (in its own process): raysst.score over the corpus, one model actor."""
    from raysst.cli import load_config
    from raysst.score import score_driver_fn

    cfg = load_config(None, model=model, input=corpus, output=output, id_column="id", eval_batch_size=batch_size,
                      num_workers=1, use_gpu=on_gpu, precision="bf16" if on_gpu else "fp32")
    s = score_driver_fn(cfg)
    return {"rows": s["rows_out"], "rows_per_second": s["rows_per_second"], "wall_seconds": s["wall_seconds"],
            "dtype": s["hardware"]["dtype"], "batch_size": batch_size, "status_counts": s["status_counts"]}


def run_step(name: str, cmd: list[str], timeout: int) -> dict:
    """Run one step as a child process group; its last stdout line is its JSON result. Never raises."""
    start = time.perf_counter()
    print(f"[gpu_check] {name}: {' '.join(cmd)}", flush=True)
    # A new session, so a timeout also kills the local Ray that the step started.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        out, err = proc.communicate(timeout=timeout)
        error = None if proc.returncode == 0 else f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        error = f"timed out after {timeout} s"
    wall = round(time.perf_counter() - start, 1)
    result = _last_json(out) if error is None else None
    if error is None and result is None:
        error = "printed no JSON result"
    if error:
        tail = "\n".join((err or out or "").strip().splitlines()[-15:])
        print(f"[gpu_check] {name} FAILED ({error}); its last lines:\n{tail}", file=sys.stderr, flush=True)
    return {"step": name, "ok": error is None, "wall_seconds": wall, "error": error, "result": result}


def _last_json(out: str) -> Optional[dict]:
    for line in reversed(out.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def make_model(directory: Path, tokenizer: str, tiny: bool) -> dict:
    """The model every step uses: bert-base-uncased's shape (or a tiny BERT), random weights."""
    from raysst.models import make_random_model

    start = time.perf_counter()
    try:
        path = make_random_model(str(directory), tokenizer_from=tokenizer, **(TINY_BERT if tiny else {}))
        c = json.loads((directory / "config.json").read_text())
        shape = f"BERT, {c['num_hidden_layers']} layers x {c['hidden_size']} hidden, random weights"
        result, error = {"shape": shape, "path": path}, None
    except Exception as e:  # reported in the table like any other step
        result, error = None, f"{type(e).__name__}: {e}"
    return {"step": "model", "ok": error is None, "wall_seconds": round(time.perf_counter() - start, 1),
            "error": error, "result": result}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="CPU, tiny model, tiny data: the code path only")
    parser.add_argument("--data", default=SST2, help="SST-2 directory (train split also feeds the scoring corpus)")
    parser.add_argument("--tokenizer", default=PACKAGED_MINILM,
                        help="tokenizer for the random model (default: the packaged MiniLM's, bert-base-uncased's vocab)")
    parser.add_argument("--kit", type=Path,
                        help="a carry kit (bench/gpu_kit.py): its SST-2 and tokenizer, over --data and --tokenizer")
    parser.add_argument("--out", type=Path, help="also write gpu_check.txt (versions, table) and gpu_check.json here")
    parser.add_argument("--train-timeout", type=int, help="seconds each training step may take (default: by size)")
    parser.add_argument("--score-timeout", type=int, help="seconds the scoring step may take (default: by size)")
    parser.add_argument("--print-command", action="store_true", help="with --kit: print the device `run` arguments")
    parser.add_argument("--score-step", nargs=4, metavar=("MODEL", "CORPUS", "OUTPUT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.print_command:
        print(json.dumps(run_arguments(str(args.kit or ".gpu-kit")), indent=1))
        return 0
    if args.kit:
        try:
            args.data, args.tokenizer = kit_paths(args.kit)
        except KitError as e:
            print(f"gpu_check: {e}", file=sys.stderr)
            return 3
    import torch

    on_gpu = not args.cpu_smoke
    if args.score_step:
        model, corpus, output, batch = args.score_step
        print(json.dumps(score_step(model, corpus, output, int(batch), on_gpu)))
        return 0
    if on_gpu and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device is visible (torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
              "torch.cuda.is_available() is False). Run it on a machine with an NVIDIA GPU and its driver, "
              "or run `python bench/gpu_check.py --cpu-smoke` to try the code path on CPU.", file=sys.stderr)
        return 2
    size = {**SIZES["gpu" if on_gpu else "cpu"], **{k: v for k, v in (("train_timeout", args.train_timeout),
                                                                       ("score_timeout", args.score_timeout)) if v}}
    info = versions()
    print(describe(info), flush=True)
    smoke = [] if on_gpu else ["--device", "cpu"]
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        data = args.data if on_gpu else write_smoke_data(args.data, Path(tmp) / "sst2-smoke")
        rows = [make_model(Path(tmp) / "model", args.tokenizer, tiny=not on_gpu)]
        model = rows[0]["result"]["path"] if rows[0]["ok"] else str(Path(tmp) / "model")
        for step, part in (("train", "gpu"), ("hf", "hf-gpu")):  # ours, then HF's Trainer on the same work
            rows.append(run_step(step, [sys.executable, str(BENCH_TRAIN), part, "--batch-size", str(size["train_batch"]),
                                        "--model", model, "--data", data, "--samples", str(size["train_samples"]),
                                        *smoke], size["train_timeout"]))
        try:
            corpus = str(write_corpus(data, Path(tmp) / "corpus", size["score_rows"], size["score_files"]))
            rows.append(run_step("score", [sys.executable, __file__, *(["--cpu-smoke"] if not on_gpu else []),
                                           "--score-step", model, corpus, str(Path(tmp) / "scored"),
                                           str(size["score_batch"])], size["score_timeout"]))
        except Exception as e:
            rows.append({"step": "score", "ok": False, "wall_seconds": 0.0, "result": None,
                         "error": f"could not write the corpus: {type(e).__name__}: {e}"})
    report = f"{describe(info)}\n{table(rows)}"
    result = json.dumps({"gpu_check": rows, "speedup_vs_hf_trainer_grouped": speedup(rows), "versions": info})
    print(f"{report}\n{result}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.txt").write_text(report + "\n")
        (args.out / "gpu_check.json").write_text(result + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
