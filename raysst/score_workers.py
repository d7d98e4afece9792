"""What runs in the Ray Data actors when scoring: one call per chunk reads it, tokenizes, scores and writes its part.

A chunk's rows never leave the actor that scores them: the driver sees one small row of counts and timings
per chunk. Two calls run at once in each actor (`CHUNKS_IN_ACTOR`) and only the model step is serialized,
so reading and tokenizing the next chunk overlap the forward passes of this one (a GPU does not idle on I/O).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
import uuid
from collections import Counter
from typing import Optional

import numpy as np
import pyarrow as pa

from raysst.batching import encode_texts, model_inputs
from raysst.chunks import Chunk, read_chunk
from raysst.formats import UnreadableFile, is_missing, text_values
from raysst.storage import filesystem
from raysst.task import MULTI, SINGLE, Task

STATUSES = ("ok", "null_input", "empty_input", "non_string_input", "truncated")
STAGES = ("read", "tokenize", "model", "write")
TMP_PREFIX = "_tmp-"
CHUNKS_IN_ACTOR = 2
TOKENIZE_SLICE = 4096


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


class ChunkScorer:
    """Model stage (Ray Data actor, one per GPU or per `cpus_per_worker` CPUs): loads the model once."""

    def __init__(self, model: str, use_gpu: bool, precision: str, batch_size: int, threads: int, max_length: int,
                 output: str, task: dict, pair_column: Optional[str] = None, calibration: tuple = ()):
        import torch

        from raysst.batching import rust_tokenizer
        from raysst.models import describe_device, device_info, load_for_inference, load_tokenizer

        if not use_gpu:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        tokenizer = load_tokenizer(model)
        if not tokenizer.is_fast:
            raise ValueError(f"{model}: scoring needs a fast (Rust) tokenizer; this model has a Python one only")
        self.backend = rust_tokenizer(tokenizer.backend_tokenizer.to_str(), max_length)
        self.pad_id = tokenizer.pad_token_id or 0
        self.task, self.pair_column = Task.from_dict(task), pair_column
        self.type_ids = pair_column is not None and "token_type_ids" in tokenizer.model_input_names
        calibration_inputs = self.calibration_batches(list(calibration), batch_size)
        self.model = load_for_inference(model, use_gpu, precision, calibration_inputs)
        self.batch_size, self.output = batch_size, output
        self.model_lock = threading.Lock()
        # The driver may run on a CPU head node: what scored the rows is told by the actor itself.
        self.device_name = describe_device(device_info())

    def __call__(self, batch: dict) -> dict:
        c = Chunk.from_json(str(batch["chunk"][0]))
        took = dict.fromkeys(STAGES, 0.0)
        t = time.perf_counter()
        try:
            table, values = read_chunk(c)
        except UnreadableFile as e:  # the driver fails or skips the file, by --on-bad-file
            return _stats(c, 0, {}, {}, "", took, str(e))
        took["read"], t = time.perf_counter() - t, time.perf_counter()
        texts, status = zip(*map(text_status, values)) if values else ((), ())
        pairs = None
        if self.pair_column:  # a row scores only when both its texts do
            pairs, pair_status = zip(*map(text_status, text_values(table.column(self.pair_column)))) if values \
                else ((), ())
            status = [s if s != "ok" else p for s, p in zip(status, pair_status)]
        flat, types, lengths, status = self.tokenize(list(texts), list(status), pairs)
        took["tokenize"], t = time.perf_counter() - t, time.perf_counter()
        with self.model_lock:
            outputs = self.outputs(flat, types, lengths)
        took["model"], t = time.perf_counter() - t, time.perf_counter()
        scored = with_scores(table, outputs, status, self.task)
        write_part(scored, f"{self.output}/{c.file.rel}/{part_name(c.index)}")
        took["write"] = time.perf_counter() - t
        counts = count_statuses(scored, self.task)
        return _stats(c, scored.num_rows, counts["status"], counts["label"], self.device_name, took, None)

    def tokenize(self, texts: list, status: list, pairs: Optional[list] = None) -> tuple:
        """Token ids of the rows to score, flat, their segment ids (pairs, else None), and each row's length (0
        for the others); `truncated` where a text was cut. The Rust tokenizer is called directly (the
        transformers wrapper costs ~40% more), without offsets (`encode_batch_fast`, a third faster), and a
        slice at a time: its per-row Encoding objects are large, and a whole chunk of them would set the
        actor's peak memory."""
        todo = [i for i, s in enumerate(status) if s == "ok"]
        lengths, flat, types = np.zeros(len(status), np.int64), [], []
        for start in range(0, len(todo), TOKENIZE_SLICE):
            rows = todo[start:start + TOKENIZE_SLICE]
            encodings = encode_texts(self.backend, [texts[i] for i in rows],
                                     [pairs[i] for i in rows] if pairs is not None else None)
            lengths[rows] = [len(e.ids) for e in encodings]
            for i, e in zip(rows, encodings):
                if e.overflowing:  # what did not fit in max_length
                    status[i] = "truncated"
            flat.append(np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.int64))
            if self.type_ids:
                types.append(np.fromiter(itertools.chain.from_iterable(e.type_ids for e in encodings), np.int64))
        joined = [np.concatenate(x) if x else np.zeros(0, np.int64) for x in (flat, types)]
        return joined[0], (joined[1] if self.type_ids else None), lengths, status

    def calibration_batches(self, texts: list, batch_size: int) -> list[dict]:
        """Model inputs for int8's calibration texts, grouped by length (none for other precisions)."""
        ids = sorted((np.array(e.ids) for e in self.backend.encode_batch_fast(texts)), key=len)
        return [model_inputs(ids[i:i + batch_size], self.pad_id) for i in range(0, len(ids), batch_size)]

    def outputs(self, flat: np.ndarray, types: Optional[np.ndarray], lengths: np.ndarray) -> np.ndarray:
        """(rows, num_labels) outputs of the task (raysst.task); NaN for rows without tokens."""
        import torch

        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        outputs = np.full((len(lengths), self.task.num_labels), np.nan, np.float32)
        todo = np.flatnonzero(lengths)
        # Similar lengths in one micro-batch: padding to the longest then costs little.
        order = todo[np.argsort(lengths[todo], kind="stable")]
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                cut = [slice(offsets[i], offsets[i] + lengths[i]) for i in idx]
                batch = model_inputs([flat[c] for c in cut], self.pad_id,
                                     type_ids=None if types is None else [types[c] for c in cut])
                logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits
                outputs[idx] = self.task.outputs(logits).cpu().numpy()
        return outputs


def text_status(value) -> tuple[Optional[str], str]:
    """The text to score (None if none) and the row's status."""
    if is_missing(value):
        return None, "null_input"
    if not isinstance(value, str):
        return None, "non_string_input"
    return (value, "ok") if value.strip() else (None, "empty_input")


def with_scores(table: pa.Table, outputs: np.ndarray, status: list, task: Task) -> pa.Table:
    """The input's own columns plus the task's output columns; an input column named like an output column
    becomes `input_<name>`."""
    columns = task.output_columns()
    taken, names = set(table.column_names) | set(columns), []
    for name in table.column_names:
        if name in columns:
            while name in taken:
                name = f"input_{name}"
            taken.add(name)
        names.append(name)
    table = table.rename_columns(names)
    for name, column in task.output_arrays(outputs, ~np.isnan(outputs[:, 0])).items():
        table = table.append_column(name, column)
    return table.append_column("status", pa.array(status, pa.string()))


def write_part(table: pa.Table, part: str) -> None:
    """Commit a part atomically: locally a temporary name then os.replace; in an object store a single object
    (one PUT, or a multipart upload, which is invisible until it completes)."""
    import pyarrow.parquet as pq

    fs, path = filesystem(part)
    directory, name = path.rsplit("/", 1)
    fs.create_dir(directory, recursive=True)
    if "://" in part:
        pq.write_table(table, path, filesystem=fs)
        return
    tmp = f"{directory}/{TMP_PREFIX}{uuid.uuid4().hex}-{name}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def count_statuses(table: pa.Table, task: Task) -> dict:
    """Rows per status and per label (`null` for rows without one; multi-label: rows with each label; none for
    regression) in a scored table."""
    import pyarrow.compute as pc

    def counts(column: pa.ChunkedArray) -> dict:
        return {str(v["values"]) if v["values"] is not None else "null": v["counts"]
                for v in pc.value_counts(column).to_pylist()}
    labels = {}
    if task.kind == SINGLE:
        labels = counts(table.column("label"))
    elif task.kind == MULTI:
        labels = counts(pc.list_flatten(table.column("labels")))
    return {"status": counts(table.column("status")), "label": labels}


def _stats(c: Chunk, rows: int, status: dict, label: dict, device: str, took: dict, error: Optional[str]) -> dict:
    """The one row per chunk that reaches the driver."""
    return {"rel": [c.file.rel], "path": [c.file.path], "index": [c.index], "rows": [rows],
            "counts": [json.dumps({"status": status, "label": label, "device": {device: rows} if rows else {},
                                   "seconds": took})], "error": [error or ""]}


def add_counts(totals: Counter, counts: dict) -> None:
    """Fold one chunk's counts (from `_stats` or a committed part) into the run's totals."""
    totals["rows"] += counts.get("rows", 0)
    for key in ("status", "label", "device"):
        for k, v in counts.get(key, {}).items():
            totals[(key, k)] += v
    for k, v in counts.get("seconds", {}).items():
        totals[("seconds", k)] += v
