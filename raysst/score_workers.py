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
from raysst.windows import Windower, combine, head_cut

STATUSES = ("ok", "null_input", "empty_input", "non_string_input", "truncated", "capped")
SCORED = ("ok", "truncated", "capped")  # the statuses of rows that have outputs
STAGES = ("read", "tokenize", "model", "write")
TMP_PREFIX = "_tmp-"
CHUNKS_IN_ACTOR = 2
TOKENIZE_SLICE = 4096
HEAD_CHARS = 16  # characters per token past which a text's head is read from a prefix


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


class ChunkScorer:
    """Model stage (Ray Data actor, one per GPU or per `cpus_per_worker` CPUs): loads the model once."""

    def __init__(self, model: str, use_gpu: bool, precision: str, batch_size: int, threads: int, max_length: int,
                 output: str, task: dict, pair_column: Optional[str] = None, calibration: tuple = (),
                 long_text: str = "truncate", stride: int = 0, max_windows: int = 64, combine: str = "mean-probs"):
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
        # Texts that overflow one window go to the windower (none under truncate: today's head-only scoring).
        self.windower = None if long_text == "truncate" else Windower(
            tokenizer.backend_tokenizer.to_str(), max_length, long_text, stride, max_windows, pair_column is not None)
        self.combine = combine
        self.pad_id = tokenizer.pad_token_id or 0
        self.task, self.pair_column = Task.from_dict(task), pair_column
        self.type_ids = pair_column is not None and "token_type_ids" in tokenizer.model_input_names
        calibration_inputs = self.calibration_batches(list(calibration), batch_size)
        self.model = load_for_inference(model, use_gpu, precision, calibration_inputs)
        self.batch_size, self.output, self.max_length = batch_size, output, max_length
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
        flat, types, lengths, owner, status = self.tokenize(list(texts), list(status), pairs)
        took["tokenize"], t = time.perf_counter() - t, time.perf_counter()
        with self.model_lock:
            logits = self.logits(flat, types, lengths)
        # A row's windows all stay in this chunk, so its one result is written, and resumed, as a whole.
        outputs, windows = combine(logits, owner, len(status), self.task, self.combine)
        took["model"], t = time.perf_counter() - t, time.perf_counter()
        scored = with_scores(table, outputs, status, self.task, windows)
        write_part(scored, f"{self.output}/{c.file.rel}/{part_name(c.index)}")
        took["write"] = time.perf_counter() - t
        counts = count_statuses(scored, self.task)
        return _stats(c, scored.num_rows, counts["status"], counts["label"], self.device_name, took, None,
                      {"windows": len(lengths), "tokens": int(lengths.sum())})

    def tokenize(self, texts: list, status: list, pairs: Optional[list] = None) -> tuple:
        """Token ids of the windows to score, flat, their segment ids (pairs, else None), each window's length
        and row (`owner`); the rows' statuses (`truncated` where text was dropped, `capped` at --max-windows).
        Rows that fit one window are windows themselves. The Rust tokenizer is called directly (the
        transformers wrapper costs ~40% more), without offsets (`encode_batch_fast`, a third faster), and a
        slice at a time: its per-row Encoding objects are large, and a whole chunk of them would set the
        actor's peak memory."""
        todo = [i for i, s in enumerate(status) if s == "ok"]
        parts: list[tuple] = []  # (owner, flat ids, lengths, flat segment ids or None) per group of windows
        for start in range(0, len(todo), TOKENIZE_SLICE):
            rows = todo[start:start + TOKENIZE_SLICE]
            encodings = self.heads([texts[i] for i in rows], [pairs[i] for i in rows] if pairs is not None else None)
            long = [i for i, e in zip(rows, encodings) if e.overflowing]  # what did not fit in max_length
            if self.windower is None:
                for i in long:
                    status[i] = "truncated"
            elif long:
                rows, encodings = map(list, zip(*[(i, e) for i, e in zip(rows, encodings) if not e.overflowing])) \
                    if len(long) < len(rows) else ([], [])
            parts.append((np.asarray(rows, np.int64), _flat(e.ids for e in encodings),
                          np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings)),
                          _flat(e.type_ids for e in encodings) if self.type_ids else None))
            if self.windower is not None and long:
                docs = self.windower.documents([texts[i] for i in long],
                                               [pairs[i] for i in long] if pairs is not None else None)
                for i, (windows, st) in zip(long, docs):
                    status[i] = st
                    parts.append((np.full(len(windows), i, np.int64), np.concatenate([w[0] for w in windows]),
                                  np.fromiter((len(w[0]) for w in windows), np.int64, len(windows)),
                                  np.concatenate([w[1] for w in windows]) if self.type_ids else None))
        owner, flat, lengths, segments = ([None if x[0] is None else np.concatenate(x) for x in zip(*parts)] if parts else
                                          [np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64),
                                           np.zeros(0, np.int32)])
        return flat, segments if self.type_ids else None, lengths, owner, status

    def heads(self, texts: list, pairs: Optional[list]) -> list:
        """Encodings truncated at max_length. A text of more than HEAD_CHARS characters per token of the window
        is encoded from a prefix (cut at whitespace) that holds its head: a 5 MB text is not tokenized whole
        here, nor anywhere. A prefix that does not overflow (giant words) is encoded whole after all."""
        limit = self.max_length * HEAD_CHARS
        cut = [t[:head_cut(t, limit)] if len(t) > limit else t for t in texts]
        cut_pairs = [t[:head_cut(t, limit)] if len(t) > limit else t for t in pairs] if pairs is not None else None
        encodings = encode_texts(self.backend, cut, cut_pairs)
        for k, e in enumerate(encodings):
            if not e.overflowing and (cut[k] is not texts[k] or (pairs is not None and cut_pairs[k] is not pairs[k])):
                encodings[k] = encode_texts(self.backend, [texts[k]], None if pairs is None else [pairs[k]])[0]
        return encodings

    def calibration_batches(self, texts: list, batch_size: int) -> list[dict]:
        """Model inputs for int8's calibration texts, grouped by length (none for other precisions)."""
        ids = sorted((np.array(e.ids) for e in self.backend.encode_batch_fast(texts)), key=len)
        return [model_inputs(ids[i:i + batch_size], self.pad_id) for i in range(0, len(ids), batch_size)]

    def logits(self, flat: np.ndarray, types: Optional[np.ndarray], lengths: np.ndarray) -> np.ndarray:
        """(windows, num_labels) float32 logits, for the windows of a whole chunk at once."""
        import torch

        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        logits = np.zeros((len(lengths), self.task.num_labels), np.float32)
        # Similar lengths in one micro-batch: padding to the longest then costs little. Windows of many rows
        # share batches: full windows of long texts fill them.
        order = np.argsort(lengths, kind="stable")
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                cut = [slice(offsets[i], offsets[i] + lengths[i]) for i in idx]
                batch = model_inputs([flat[c] for c in cut], self.pad_id,
                                     type_ids=None if types is None else [types[c] for c in cut])
                logits[idx] = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits.float().cpu().numpy()
        return logits


def _flat(seqs) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(seqs), np.int32)


def text_status(value) -> tuple[Optional[str], str]:
    """The text to score (None if none) and the row's status."""
    if is_missing(value):
        return None, "null_input"
    if not isinstance(value, str):
        return None, "non_string_input"
    return (value, "ok") if value.strip() else (None, "empty_input")


def with_scores(table: pa.Table, outputs: np.ndarray, status: list, task: Task, windows: np.ndarray) -> pa.Table:
    """The input's own columns plus the task's output columns, `windows` (the windows scored for the row) and
    `status`; an input column named like an output column becomes `input_<name>`."""
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
    table = table.append_column("windows", pa.array(np.asarray(windows, np.int32)))
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


def _stats(c: Chunk, rows: int, status: dict, label: dict, device: str, took: dict, error: Optional[str],
           scored: Optional[dict] = None) -> dict:
    """The one row per chunk that reaches the driver (`scored`: the windows and tokens through the model)."""
    return {"rel": [c.file.rel], "path": [c.file.path], "index": [c.index], "rows": [rows],
            "counts": [json.dumps({"status": status, "label": label, "device": {device: rows} if rows else {},
                                   "seconds": took, **(scored or {})})], "error": [error or ""]}


def add_counts(totals: Counter, counts: dict) -> None:
    """Fold one chunk's counts (from `_stats` or a committed part) into the run's totals."""
    for key in ("rows", "windows", "tokens"):
        totals[key] += counts.get(key, 0)
    for key in ("status", "label", "device"):
        for k, v in counts.get(key, {}).items():
            totals[(key, k)] += v
    for k, v in counts.get("seconds", {}).items():
        totals[("seconds", k)] += v
