"""Batch scoring with Ray Data: plan the corpus into chunks, score each chunk in one actor call, resume by chunk.

Output: `<output>/<rel>/part-NNNNN.parquet`, one part per chunk of input file `<rel>` (a parquet row-group
slice or at most `chunk_rows` records), holding that chunk's own columns plus the scores, committed
atomically by the actor that scored it. A rerun lists the committed parts and scores only the other chunks,
so a run killed at any moment ends, rerun, with exactly one output row per input row.

Why not `ray.data.checkpoint` or `write_parquet`: Ray Data's checkpoint is row-level and keyed by an id
column from the source (many corpora have none), and `write_parquet` commits a dataset's blocks under
names of its own, whose boundaries are not stable across runs; neither keeps a part per input chunk
beside its input's layout. A chunk per actor call keeps its rows together for its write without
re-assembling them in the driver, and makes the commit (one file) the resume record.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Optional

from raysst.capacity import CapacityError, wait_for_capacity
from raysst.chunks import Chunk
from raysst.config import Config, expand_path
from raysst.formats import DataError, UnreadableFile
from raysst.lease import Lease, holding
from raysst.score_plan import (calibration_texts, check_plan_file, committed_parts, count_parts, plan,
                               remove_temporaries)
from raysst.score_workers import CHUNKS_IN_ACTOR, STAGES, STATUSES, TMP_PREFIX, ChunkScorer, add_counts
from raysst.storage import commit_text, filesystem
from raysst.task import Task

SUMMARY_FILE = "_summary.json"
PROGRESS_EVERY_S = 10.0


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


def build_pipeline(todo: list[Chunk], cfg: Config, model: str, output: str, calibration: list[str], task: Task):
    """One row per chunk through an actor pool; each call scores and writes its chunk (see score_workers)."""
    import ray.data

    ds = ray.data.from_items([{"chunk": c.to_json()} for c in todo], override_num_blocks=len(todo))
    return ds.map_batches(
        ChunkScorer, batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors, max_tasks_in_flight_per_actor=CHUNKS_IN_ACTOR,
                                           max_concurrent_calls_per_actor=CHUNKS_IN_ACTOR,
                                           enable_true_multi_threading=True),
        fn_constructor_kwargs={"model": model, "use_gpu": cfg.compute_on_gpu, "precision": cfg.precision,
                               "batch_size": cfg.eval_batch_size, "threads": cfg.cpus_per_worker,
                               "max_length": cfg.max_seq_length, "output": output, "task": task.to_dict(),
                               "pair_column": cfg.text_pair_column, "calibration": tuple(calibration),
                               "long_text": cfg.long_text, "stride": cfg.window_stride,
                               "max_windows": cfg.max_windows, "combine": cfg.combine},
        num_cpus=1 if cfg.use_gpu else cfg.cpus_per_worker, num_gpus=1 if cfg.use_gpu else 0)


def score_driver_fn(cfg: Config, lease: Optional[Lease] = None) -> dict:
    """Score `cfg.input` into parquet parts under `cfg.output`, resuming committed chunks; returns the summary.
    The job holds the output's lease (raysst.lease) throughout, or runs under the `lease` its caller holds."""
    t0 = time.perf_counter()
    if not cfg.input or not cfg.output:
        raise ValueError("score needs an input (--input FILE|DIR|GLOB|URI) and an output (--output DIR|URI)")
    output = expand_path(cfg.output).rstrip("/")
    if lease:
        return _score(cfg, output, lease, t0)
    with holding(output, "score", cfg.lease_timeout, cfg.take_over) as held:  # a live holder: refused at once
        return _score(cfg, output, held, t0)


def _score(cfg: Config, output: str, lease: Lease, t0: float) -> dict:
    import ray

    from transformers import AutoConfig

    from raysst.models import model_task, precision_name, resolve_model
    from raysst.runtime import init_ray

    todo, done, skipped, ignored, decoded, chunk_rows = plan(cfg, output)
    cfg = cfg.replace(chunk_rows=chunk_rows)
    model = resolve_model(cfg.model)
    # The model's task (labels, kind, output columns), read from its config.json before any actor starts.
    task = model_task(AutoConfig.from_pretrained(model), cfg.task, cfg.labels, cfg.threshold)
    per_file: dict[str, Counter] = {rel: count_parts(parts, task) for rel, parts in done.items()}
    n_resumed = sum(map(len, done.values()))
    if done:
        print(f"[raysst] score: resuming; {n_resumed} chunks of {len(done)} files are already scored, "
              f"{len(todo)} to go", flush=True)
    plan_s = time.perf_counter() - t0
    lease.take()  # after the plan: a job that cannot run leaves nothing behind; read back while Ray starts
    init_ray()
    lease.note_ray()
    # An actor without a chunk would only load the model: a small input (an evaluation set) starts fewer.
    cfg = cfg.replace(num_actors=min(model_actors(cfg), max(1, len(todo))))
    # Ray Data would wait without end for actors that find no room: fail now, or wait for the autoscaler.
    wait_for_capacity({"CPU": 1, "GPU": 1} if cfg.use_gpu else {"CPU": cfg.cpus_per_worker}, cfg.num_actors,
                      "scoring", "Lower --num-workers or --cpus-per-worker" + (", or drop --use-gpu" * cfg.use_gpu),
                      cfg.wait_for_nodes)
    lease.confirm()  # of two jobs started together, one goes on
    check_plan_file(output, cfg.chunk_rows)  # the first write: a job that cannot run leaves nothing behind
    remove_temporaries(output)
    scored = Counter()
    if todo:
        calibration = calibration_texts(output, todo) if cfg.precision == "int8" else []
        scored = _run(build_pipeline(todo, cfg, model, output, calibration, task), todo, per_file, skipped,
                      cfg.on_bad_file == "fail", t0, lease)
    remove_temporaries(output)  # an actor lost mid-write (its node gone) leaves one; its chunk was redone
    failed = {s.pop("rel") for s in skipped if "rel" in s}
    if failed:  # a file found unreadable part-way keeps no parts: its rows are all or nothing
        parts = committed_parts(output)
        for rel in failed:
            for part in parts.get(rel, {}).values():
                fs, path = filesystem(part)
                fs.delete_file(path)
            per_file.pop(rel, None)
    files_read = set(_keyed(scored, "file")) - failed
    totals = sum(per_file.values(), Counter())
    wall = time.perf_counter() - t0
    summary = {
        "model": cfg.model, "input": cfg.input, "output": output,
        "rows_in": totals["rows"], "rows_out": totals["rows"], "rows_scored_this_run": scored["rows"],
        "status_counts": {s: totals[("status", s)] for s in STATUSES},
        "task": task.to_dict(), "output_columns": list(task.output_columns()),
        "label_counts": {k: totals[("label", k)] for k in (*task.labels, "null")} if task.kind != "regression"
        else {},
        "files_read": len(files_read), "files_resumed": len(done), "files_skipped": skipped,
        "files_ignored": ignored, "files_decoded": decoded,
        "chunks": {"rows_per_chunk": cfg.chunk_rows, "resumed": n_resumed, "scored_this_run": scored["chunks"]},
        "wall_seconds": round(wall, 3), "rows_per_second": round(scored["rows"] / wall, 1),
        "long_text": long_text_summary(cfg, scored, wall),
        # Where the time went: the driver's planning, and each stage summed over the actors' calls.
        "seconds_by_stage": {"plan": round(plan_s, 3),
                             **{s: round(scored[("seconds", s)], 3) for s in STAGES}},
        "hardware": {"model_actors": cfg.num_actors,
                     "rows_by_actor_device": _keyed(scored, "device"),
                     "device": "cuda" if cfg.compute_on_gpu else "cpu",
                     "dtype": precision_name(cfg.compute_on_gpu, cfg.precision),
                     "cpus_per_actor": cfg.cpus_per_worker, "gpus_per_actor": int(cfg.use_gpu),
                     "cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}},
    }
    lease.check()
    _write_summary(output, summary)
    print(f"[raysst] score: {summary['rows_out']:,} rows in {output} ({scored['rows']:,} scored now, "
          f"{summary['rows_per_second']:,} rows/s, {len(skipped)} files skipped); "
          f"statuses {summary['status_counts']}; seconds by stage {summary['seconds_by_stage']}", flush=True)
    return summary


def long_text_summary(cfg: Config, scored: Counter, wall: float) -> dict:
    """How long texts were read, and the windows and tokens through the model this run, per second of the
    whole run and of the actors' model stage."""
    model_s = scored[("seconds", "model")]
    return {"mode": cfg.long_text, "max_seq_length": cfg.max_seq_length, "stride": cfg.window_stride,
            "max_windows": cfg.max_windows, "combine": cfg.combine,
            "windows_scored_this_run": scored["windows"], "tokens_scored_this_run": scored["tokens"],
            "windows_per_second": round(scored["windows"] / wall, 1),
            "tokens_per_second": round(scored["tokens"] / wall, 1),
            "model_windows_per_second": round(scored["windows"] / model_s, 1) if model_s else 0.0,
            "model_tokens_per_second": round(scored["tokens"] / model_s, 1) if model_s else 0.0}


def _run(ds, todo: list[Chunk], per_file: dict, skipped: list, fail: bool, t0: float, lease: Lease) -> Counter:
    """Drive the pipeline; the driver sees one row of counts per chunk. Returns this run's counts; stops
    (LeaseLost) once another job has taken the output's lease."""
    known = sum(c.stop - c.start for c in todo if c.file.fmt == "parquet")
    scored: Counter = Counter()
    last = time.perf_counter()
    for row in ds.iter_rows():
        lease.check()
        rel = str(row["rel"])
        if row["error"]:
            if fail:  # raised here, not in the actor: a Ray task error would hide the UnreadableFile
                raise UnreadableFile(str(row["error"]))
            if rel not in {s.get("rel") for s in skipped}:
                skipped.append({"file": str(row["path"]), "error": str(row["error"]), "rel": rel})
            continue
        counts = {**json.loads(row["counts"]), "rows": int(row["rows"])}
        for target in (per_file.setdefault(rel, Counter()), scored):
            add_counts(target, counts)
        scored[("file", rel)] = 1
        scored["chunks"] += 1
        if time.perf_counter() - last > PROGRESS_EVERY_S:
            last = time.perf_counter()
            print(f"[raysst] score: {scored['rows']:,} rows ({scored['chunks']}/{len(todo)} chunks"
                  f"{f', {known:,} parquet rows in all' if known else ''}), "
                  f"{scored['rows'] / (last - t0):,.0f} rows/s", flush=True)
    return scored


def _write_summary(output: str, summary: dict) -> None:
    commit_text(f"{output}/{SUMMARY_FILE}", json.dumps(summary, indent=2), TMP_PREFIX)


def _keyed(counts: Counter, kind: str) -> dict:
    """{name: count} of the (kind, name) keys of `counts`."""
    return {k[1]: v for k, v in counts.items() if isinstance(k, tuple) and k[0] == kind}


def _resources(have: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in have.items() if k in ("CPU", "GPU")) or "nothing"


def read_scored(output_dir: str):
    """A scored output (directory or URI) as one pandas DataFrame: files in name order, each file's rows in
    input order (parts may differ in schema; each is read alone)."""
    import pandas as pd
    import pyarrow.parquet as pq

    output = expand_path(output_dir).rstrip("/")
    parts = [p for _, chunks in sorted(committed_parts(output).items()) for _, p in sorted(chunks.items())]
    if not parts:
        raise DataError(f"{output_dir}: no scored parquet parts (run jobs/score.py with --output {output_dir})")
    return pd.concat([pq.read_table(filesystem(p)[1], filesystem=filesystem(p)[0]).to_pandas() for p in parts],
                     ignore_index=True)
