"""Batch scoring with Ray Data: read a corpus, tokenize in CPU tasks, classify on an actor pool, write per file.

Only (file, row, text) flows through the pipeline. When every row of a file has come back, a task re-reads
that file, attaches the scores and writes its part atomically, so a rerun skips the finished files and still
ends with exactly one output row per input row.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysst.capacity import CapacityError, wait_for_capacity
from raysst.config import Config, expand_path
from raysst.corpus import InputFile, UnreadableFile, list_input_files, scan_file
from raysst.data import LABEL_NAMES, DataError
from raysst.score_workers import (OUTPUT_COLUMNS, STATUSES, TASK_CPUS, TMP_PREFIX, UNREADABLE, ScoreModelActor,
                                  count_statuses, read_rows_task, tokenize_task, write_part_task)

SUMMARY_FILE = "_summary.json"
WINDOW_BATCHES = 16  # micro-batches per model call; rows are sorted by length across the window
PROGRESS_EVERY_S = 10.0
WRITES_IN_FLIGHT = 4
BLOCK_BYTES = 128 * 1024  # ~1,500 tokenized SST-2 rows
TASKS_PER_GPU_ACTOR = 4  # read+tokenize tasks per GPU actor; on CPU one per actor keeps up with the model


def build_pipeline(files: list[InputFile], cfg: Config, model: str):
    """The Ray Data pipeline: read and tokenize (tasks), then the model (actor pool); rows are not ordered."""
    import ray.data

    from raysst.models import load_tokenizer

    items = [{"file_id": i, "path": f.path, "rel": f.rel, "fmt": f.fmt, "text_column": f.text_column}
             for i, f in enumerate(files)]
    window = cfg.eval_batch_size * WINDOW_BATCHES
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 2000))
    # A block goes to one actor, and a task's output would be one block per file: small blocks spread a file
    # over all actors. This context is the dataset's own copy.
    ds.context.target_max_block_size = BLOCK_BYTES
    # Each task process imports transformers and loads a tokenizer once; a few per actor keep it fed.
    tasks = ray.data.TaskPoolStrategy(size=cfg.num_actors * (TASKS_PER_GPU_ACTOR if cfg.use_gpu else 1))
    ds = ds.map_batches(read_rows_task, batch_size=1, fn_kwargs={"on_bad_file": cfg.on_bad_file}, num_cpus=TASK_CPUS,
                        compute=tasks)
    ds = ds.map_batches(tokenize_task, batch_size=window, batch_format="pyarrow", num_cpus=TASK_CPUS, compute=tasks,
                        fn_kwargs={"model": model, "max_length": cfg.max_seq_length})
    return ds.map_batches(
        ScoreModelActor, batch_size=window, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        fn_constructor_kwargs={"model": model, "use_gpu": cfg.use_gpu, "precision": cfg.precision,
                               "batch_size": cfg.eval_batch_size, "threads": cfg.cpus_per_worker,
                               "pad_id": load_tokenizer(model).pad_token_id or 0},
        num_cpus=1 if cfg.use_gpu else cfg.cpus_per_worker - TASK_CPUS, num_gpus=1 if cfg.use_gpu else 0)


def part_path(output: Path, f: InputFile) -> Path:
    """Where a file's scores go: its path under the input root, as parquet."""
    rel = Path(f.rel)
    return output / (rel if f.fmt == "parquet" and rel.suffix == ".parquet" else rel.with_name(rel.name + ".parquet"))


def model_actors(cfg: Config) -> int:
    """`--num-workers` if given, else what the Ray cluster has: one actor per GPU, or one per
    `--cpus-per-worker` CPUs (each with that many torch threads), so the default uses the whole machine."""
    import ray

    if cfg.num_actors:
        return cfg.num_actors
    have = ray.cluster_resources()
    if not cfg.use_gpu:
        return max(1, int(have.get("CPU", 1) // cfg.cpus_per_worker))
    if have.get("GPU", 0) < 1:
        raise CapacityError(f"--use-gpu, but the Ray cluster has no GPU now ({_resources(have)}); drop --use-gpu, "
                            "or give --num-workers N to wait for the autoscaler to add N GPUs")
    return int(have["GPU"])


def plan(cfg: Config, output: Path) -> tuple[list[InputFile], list[Path], list[dict], list[str]]:
    """Files still to score (checked), parts already written, files skipped as unreadable, files ignored.

    Runs before any model loads: a missing text or id column fails here, naming the file and its columns.
    """
    files, ignored = list_input_files(cfg.input, exclude=str(output))
    parts = [part_path(output, f) for f in files]
    clash = [str(p) for p, n in Counter(parts).items() if n > 1]
    if clash:
        raise DataError(f"{cfg.input}: several input files would write the same output part {clash[:3]}; rename them")
    todo, done, skipped = [], [], []
    for f, part in zip(files, parts):
        if part.exists():
            done.append(part)
            continue
        try:
            todo.append(scan_file(f, cfg.text_column, cfg.id_column))
        except UnreadableFile as e:
            if cfg.on_bad_file == "fail":
                raise
            skipped.append({"file": f.path, "error": str(e)})
    return todo, done, skipped, ignored


def score_driver_fn(cfg: Config) -> dict:
    """Score `cfg.input` into parquet parts under `cfg.output`, resuming finished files; returns the summary."""
    import pyarrow.parquet as pq
    import ray

    from raysst.models import precision_name, resolve_model
    from raysst.runtime import init_ray

    t0 = time.perf_counter()
    if not cfg.input or not cfg.output:
        raise ValueError("score needs an input (--input FILE|DIR|GLOB) and an output directory (--output DIR)")
    output = Path(expand_path(cfg.output))
    todo, done, skipped, ignored = plan(cfg, output)
    model = resolve_model(cfg.model)
    for stale in output.rglob(f"{TMP_PREFIX}*"):  # left by an interrupted run; their files are scored again
        stale.unlink()
    if done:
        print(f"[raysst] score: resuming; {len(done)} of {len(done) + len(todo) + len(skipped)} files are "
              "already scored", flush=True)
    totals = {"rows_in": 0, "rows": 0, "status": Counter(), "label": Counter(), "files": 0, "scored": 0,
              "devices": Counter()}
    for part in done:
        rows = pq.read_metadata(part).num_rows
        _add(totals, {"rows": rows, **count_statuses(pq.read_table(part, columns=["status", "label"]))}, rows)
    init_ray()
    cfg = cfg.replace(num_actors=model_actors(cfg))
    # Ray Data would wait without end for actors that find no room: fail now, or wait for the autoscaler.
    wait_for_capacity({"CPU": 1, "GPU": 1} if cfg.use_gpu else {"CPU": cfg.cpus_per_worker}, cfg.num_actors,
                      "scoring", "Lower --num-workers or --cpus-per-worker" + (", or drop --use-gpu" * cfg.use_gpu),
                      cfg.wait_for_nodes)
    decoded: dict = {}
    if todo:
        _run(cfg, todo, model, output, skipped, totals, decoded, t0)
    wall = time.perf_counter() - t0
    summary = {
        "model": cfg.model, "input": cfg.input, "output": str(output),
        "rows_in": totals["rows_in"], "rows_out": sum(pq.read_metadata(p).num_rows for p in _parts(output)),
        "rows_scored_this_run": totals["scored"], "status_counts": {s: totals["status"][s] for s in STATUSES},
        "label_counts": {k: totals["label"][k] for k in (*LABEL_NAMES.values(), "null")},
        "files_read": totals["files"], "files_resumed": len(done), "files_skipped": skipped,
        "files_ignored": ignored, "files_decoded": decoded, "wall_seconds": round(wall, 3),
        "rows_per_second": round(totals["scored"] / wall, 1),
        "hardware": {"model_actors": cfg.num_actors, "rows_by_actor_device": dict(totals["devices"]),
                     "device": "cuda" if cfg.use_gpu else "cpu",
                     "dtype": precision_name(cfg.use_gpu, cfg.precision),
                     "cpus_per_actor": cfg.cpus_per_worker, "gpus_per_actor": int(cfg.use_gpu),
                     "cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}},
    }
    output.mkdir(parents=True, exist_ok=True)
    tmp = output / f"{TMP_PREFIX}{uuid.uuid4().hex}{SUMMARY_FILE}"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, output / SUMMARY_FILE)
    print(f"[raysst] score: {summary['rows_out']:,} rows in {output} ({totals['scored']:,} scored now, "
          f"{summary['rows_per_second']:,} rows/s, {len(skipped)} files skipped); "
          f"statuses {summary['status_counts']}", flush=True)
    return summary


def _run(cfg: Config, todo: list[InputFile], model: str, output: Path, skipped: list, totals: dict,
         decoded: dict, t0: float) -> None:
    """Drive the pipeline: gather each file's rows and hand a complete file to a writer task."""
    import ray

    writer = ray.remote(num_cpus=0)(write_part_task)  # I/O-bound; must not wait behind the model actors
    known = sum(f.num_rows for f in todo) if all(f.num_rows is not None for f in todo) else None
    pending: dict[int, list[pa.Table]] = {}
    got: Counter = Counter()
    writes: dict = {}
    rows, last = 0, time.perf_counter()

    def collect(num_returns: int) -> None:
        for ref in ray.wait(list(writes), num_returns=num_returns)[0]:
            f, n_rows, result = *writes.pop(ref), ray.get(ref)
            _add(totals, result, n_rows)
            totals["files"] += 1
            totals["scored"] += result["rows"]
            if result["encoding"] != "utf-8":
                decoded[f.rel] = result["encoding"]

    try:
        for block in build_pipeline(todo, cfg, model).iter_batches(batch_size=None, batch_format="pyarrow"):
            file_ids = block.column("file_id").to_numpy()
            devices = block.column("device").to_pandas().value_counts()
            totals["devices"].update({str(k): int(v) for k, v in devices.items() if v})
            for file_id in np.unique(file_ids).tolist():
                part = block.filter(pa.array(file_ids == file_id))
                first = part.slice(0, 1).to_pylist()[0]
                if first["status"] == UNREADABLE:
                    skipped.append({"file": todo[file_id].path, "error": first["error"]})
                    continue
                part = part.filter(pc.greater_equal(part.column("row"), 0))
                pending.setdefault(file_id, []).append(part.select(["row", *OUTPUT_COLUMNS]))
                got[file_id] += part.num_rows
                rows += part.num_rows
                if got[file_id] == first["n_rows"]:
                    f = todo[file_id]
                    results = pa.concat_tables(pending.pop(file_id))
                    writes[writer.remote(f, results, str(part_path(output, f)))] = (f, first["n_rows"])
                    if len(writes) > WRITES_IN_FLIGHT:
                        collect(len(writes) - WRITES_IN_FLIGHT)
            if time.perf_counter() - last > PROGRESS_EVERY_S:
                last = time.perf_counter()
                print(f"[raysst] score: {rows:,}{f'/{known:,}' if known else ''} rows, "
                      f"{rows / (last - t0):,.0f} rows/s", flush=True)
        collect(len(writes))
    except Exception as e:
        cause = _user_error(e)
        if cause is not None:
            raise type(cause)(str(cause)) from e
        raise
    if pending:
        raise RuntimeError(f"rows of {[todo[i].path for i in pending]} are missing from the pipeline's output")


def _resources(have: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in have.items() if k in ("CPU", "GPU")) or "nothing"


def _user_error(e: BaseException) -> Optional[DataError]:
    """The data error (e.g. an unreadable file) inside a Ray task failure, if that is what failed."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DataError):
            return e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def _add(totals: dict, result: dict, rows_in: int) -> None:
    totals["rows_in"] += rows_in
    totals["rows"] += result["rows"]
    totals["status"].update(result["status"])
    totals["label"].update(result["label"])


def _parts(output: Path) -> list[Path]:
    return sorted(p for p in output.rglob("*.parquet")
                  if not any(part.startswith(("_", ".")) for part in p.relative_to(output).parts))


def read_scored(output_dir: str):
    """A scored output directory as one pandas DataFrame (parts may differ in schema; each is read alone)."""
    import pandas as pd
    import pyarrow.parquet as pq

    parts = _parts(Path(expand_path(output_dir)))
    if not parts:
        raise DataError(f"{output_dir}: no scored parquet parts (run jobs/score.py with --output {output_dir})")
    return pd.concat([pq.read_table(p).to_pandas() for p in parts], ignore_index=True)
