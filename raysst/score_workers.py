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

from raysst.chunks import Chunk, read_chunk
from raysst.formats import UnreadableFile, is_missing
from raysst.config import LABEL_NAMES
from raysst.data import model_inputs
from raysst.storage import filesystem

STATUSES = ("ok", "null_input", "empty_input", "non_string_input", "truncated")
OUTPUT_COLUMNS = ("label", "score", "prob_positive", "status")
STAGES = ("read", "tokenize", "model", "write")
TMP_PREFIX = "_tmp-"
CHUNKS_IN_ACTOR = 2
TOKENIZE_SLICE = 4096


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


class ChunkScorer:
    """Model stage (Ray Data actor, one per GPU or per `cpus_per_worker` CPUs): loads the model once."""

    def __init__(self, model: str, use_gpu: bool, precision: str, batch_size: int, threads: int, max_length: int,
                 output: str, calibration: tuple = ()):
        import torch

        from raysst.data import rust_tokenizer
        from raysst.models import describe_device, device_info, load_for_inference, load_tokenizer

        if not use_gpu:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        tokenizer = load_tokenizer(model)
        if not tokenizer.is_fast:
            raise ValueError(f"{model}: scoring needs a fast (Rust) tokenizer; this model has a Python one only")
        self.backend = rust_tokenizer(tokenizer.backend_tokenizer.to_str(), max_length)
        self.pad_id = tokenizer.pad_token_id or 0
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
        flat, lengths, status = self.tokenize(list(texts), list(status))
        took["tokenize"], t = time.perf_counter() - t, time.perf_counter()
        with self.model_lock:
            probs = self.probabilities(flat, lengths)
        took["model"], t = time.perf_counter() - t, time.perf_counter()
        scored = with_scores(table, probs, status)
        write_part(scored, f"{self.output}/{c.file.rel}/{part_name(c.index)}")
        took["write"] = time.perf_counter() - t
        counts = count_statuses(scored)
        return _stats(c, scored.num_rows, counts["status"], counts["label"], self.device_name, took, None)

    def tokenize(self, texts: list, status: list) -> tuple[np.ndarray, np.ndarray, list]:
        """Token ids of the rows to score, flat, and each row's length (0 for the others); `truncated` where
        the text was cut. The Rust tokenizer is called directly (the transformers wrapper costs ~40% more),
        without offsets (`encode_batch_fast`, a third faster), and a slice at a time: its per-row Encoding
        objects are large, and a whole chunk of them would set the actor's peak memory."""
        todo = [i for i, s in enumerate(status) if s == "ok"]
        lengths, flat = np.zeros(len(status), np.int64), []
        for start in range(0, len(todo), TOKENIZE_SLICE):
            rows = todo[start:start + TOKENIZE_SLICE]
            encodings = self.backend.encode_batch_fast([texts[i] for i in rows])
            lengths[rows] = [len(e.ids) for e in encodings]
            for i, e in zip(rows, encodings):
                if e.overflowing:  # what did not fit in max_length
                    status[i] = "truncated"
            flat.append(np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.int64))
        return (np.concatenate(flat) if flat else np.zeros(0, np.int64)), lengths, status

    def calibration_batches(self, texts: list, batch_size: int) -> list[dict]:
        """Model inputs for int8's calibration texts, grouped by length (none for other precisions)."""
        ids = sorted((np.array(e.ids) for e in self.backend.encode_batch_fast(texts)), key=len)
        return [model_inputs(ids[i:i + batch_size], self.pad_id) for i in range(0, len(ids), batch_size)]

    def probabilities(self, flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """(rows, 2) class probabilities; NaN for rows without tokens."""
        import torch

        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        probs = np.full((len(lengths), 2), np.nan, np.float32)
        todo = np.flatnonzero(lengths)
        # Similar lengths in one micro-batch: padding to the longest then costs little.
        order = todo[np.argsort(lengths[todo], kind="stable")]
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = model_inputs([flat[offsets[i]:offsets[i] + lengths[i]] for i in idx], self.pad_id)
                logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits
                probs[idx] = logits.float().softmax(-1).cpu().numpy()
        return probs


def text_status(value) -> tuple[Optional[str], str]:
    """The text to score (None if none) and the row's status."""
    if is_missing(value):
        return None, "null_input"
    if not isinstance(value, str):
        return None, "non_string_input"
    return (value, "ok") if value.strip() else (None, "empty_input")


def with_scores(table: pa.Table, probs: np.ndarray, status: list) -> pa.Table:
    """The input's own columns plus the scores; an input column named like a score column becomes `input_<name>`."""
    taken, names = set(table.column_names) | set(OUTPUT_COLUMNS), []
    for name in table.column_names:
        if name in OUTPUT_COLUMNS:
            while name in taken:
                name = f"input_{name}"
            taken.add(name)
        names.append(name)
    invalid = np.isnan(probs[:, 0])
    labels = np.where(probs.argmax(1) == 1, LABEL_NAMES[1], LABEL_NAMES[0]).astype(object)
    return (table.rename_columns(names)
            .append_column("label", pa.array(labels, pa.string(), mask=invalid))
            .append_column("score", pa.array(probs.max(1).astype(np.float64), mask=invalid))
            .append_column("prob_positive", pa.array(probs[:, 1].astype(np.float64), mask=invalid))
            .append_column("status", pa.array(status, pa.string())))


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


def count_statuses(table: pa.Table) -> dict:
    """Rows per status and per label (`null` for rows without one) in a scored table."""
    import pyarrow.compute as pc

    return {column: {str(v["values"]) if v["values"] is not None else "null": v["counts"]
                     for v in pc.value_counts(table.column(column)).to_pylist()} for column in ("status", "label")}


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
