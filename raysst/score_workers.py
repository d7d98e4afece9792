"""What runs in Ray workers when scoring: the read and tokenize tasks, the model actor, the part writer.

Rows carry (file_id, row, n_rows) from the read stage to the driver, which hands each complete file to
`write_part_task`; a file that is skipped or empty sends one marker row (row -1) instead.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from raysst.corpus import InputFile, UnreadableFile, is_missing, read_file, read_text
from raysst.data import LABEL_NAMES, DataError

STATUSES = ("ok", "null_input", "empty_input", "non_string_input", "truncated")
OUTPUT_COLUMNS = ("label", "score", "prob_positive", "status")
TMP_PREFIX = "_tmp-"
UNREADABLE, NO_ROWS = "_unreadable", "_no_rows"  # marker rows (row -1) for a skipped and an empty file
READ_CHUNK = 4096  # rows per block out of the read stage
# Reading and tokenizing cost a few percent of the model's time. They reserve a quarter CPU, and a CPU model
# actor leaves that quarter of its `cpus_per_worker` free, so the tasks feeding it always fit beside it
# (and Ray Data does not fuse them into the actor, which would serialize tokenizing and inference).
TASK_CPUS = 0.25

_TOKENIZERS: dict = {}  # per worker process: Ray reuses workers, so each loads a tokenizer once


def read_rows_task(batch: dict, on_bad_file: str) -> Iterator[pa.Table]:
    """Read stage (Ray Data task): the text of each file in the batch, one row per input row, with its status."""
    for path, rel, fmt, column, file_id in zip(batch["path"], batch["rel"], batch["fmt"], batch["text_column"],
                                               batch["file_id"]):
        try:
            values = read_text(InputFile(str(path), str(rel), str(fmt), str(column)))
        except UnreadableFile as e:
            if on_bad_file == "fail":
                raise
            yield _rows(file_id, [-1], 0, [None], [UNREADABLE], [str(e)])
            continue
        if not values:
            yield _rows(file_id, [-1], 0, [None], [NO_ROWS], [None])
            continue
        texts, status = zip(*map(text_status, values))
        for start in range(0, len(values), READ_CHUNK):
            end = min(start + READ_CHUNK, len(values))
            yield _rows(file_id, np.arange(start, end), len(values), texts[start:end], status[start:end],
                        [None] * (end - start))


def text_status(value) -> tuple[Optional[str], str]:
    """The text to score (None if none) and the row's status."""
    if is_missing(value):
        return None, "null_input"
    if not isinstance(value, str):
        return None, "non_string_input"
    return (value, "ok") if value.strip() else (None, "empty_input")


def _rows(file_id, rows, n_rows: int, texts, status, errors) -> pa.Table:
    return pa.table({"file_id": pa.array(np.full(len(rows), file_id), pa.int32()), "row": pa.array(rows, pa.int64()),
                     "n_rows": pa.array(np.full(len(rows), n_rows), pa.int64()), "text": pa.array(texts, pa.string()),
                     "status": pa.array(status, pa.string()), "error": pa.array(errors, pa.string())})


def tokenize_task(batch: pa.Table, model: str, max_length: int) -> pa.Table:
    """Tokenize stage (Ray Data task): token ids of the rows to score; `truncated` where the text was cut."""
    from raysst.models import load_tokenizer

    if model not in _TOKENIZERS:
        _TOKENIZERS[model] = load_tokenizer(model)
    status = batch.column("status").to_pylist()
    todo = [i for i, s in enumerate(status) if s == "ok"]
    ids: list = [[] for _ in status]
    if todo:
        enc = _TOKENIZERS[model](batch.column("text").take(todo).to_pylist(), truncation=True, max_length=max_length,
                                 return_overflowing_tokens=True, return_attention_mask=False,
                                 return_token_type_ids=False)
        # A text longer than max_length comes back as several chunks; its first one is what gets scored.
        for seq, j in zip(enc["input_ids"], enc["overflow_to_sample_mapping"]):
            if ids[todo[j]]:
                status[todo[j]] = "truncated"
            else:
                ids[todo[j]] = seq
    return (batch.drop_columns(["text", "status"]).append_column("status", pa.array(status, pa.string()))
            .append_column("input_ids", pa.array(ids, pa.list_(pa.int32()))))


class ScoreModelActor:
    """Model stage (Ray Data actor, one per GPU or per `cpus_per_worker` CPUs): loads the model once."""

    def __init__(self, model: str, use_gpu: bool, precision: str, batch_size: int, threads: int, pad_id: int):
        import torch

        from raysst.models import describe_device, device_info, load_for_inference

        if not use_gpu:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = load_for_inference(model, use_gpu, precision)
        self.batch_size, self.pad_id = batch_size, pad_id
        # The driver may run on a CPU head node: what scored the rows is told by the actor itself.
        self.device_name = pa.array([describe_device(device_info())])

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        ids = batch.column("input_ids").combine_chunks()
        offsets, flat = ids.offsets.to_numpy(), ids.values.to_numpy()
        lengths = np.diff(offsets)
        probs = np.full((len(lengths), 2), np.nan, np.float32)
        todo = np.flatnonzero(lengths)
        # Similar lengths in one micro-batch: padding to the longest then costs little.
        order = todo[np.argsort(lengths[todo], kind="stable")]
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                positions = np.arange(lengths[idx].max())
                mask = positions < lengths[idx, None]
                tokens = np.where(mask, flat[np.minimum(offsets[idx, None] + positions, len(flat) - 1)], self.pad_id)
                logits = self.model(input_ids=torch.from_numpy(tokens.astype(np.int64)).to(self.device),
                                    attention_mask=torch.from_numpy(mask.astype(np.int64)).to(self.device)).logits
                probs[idx] = logits.float().softmax(-1).cpu().numpy()
        invalid = np.isnan(probs[:, 0])
        labels = np.where(probs.argmax(1) == 1, LABEL_NAMES[1], LABEL_NAMES[0])
        return (batch.drop_columns(["input_ids"])
                .append_column("label", pa.array(labels.astype(object), pa.string(), mask=invalid))
                .append_column("score", pa.array(probs.max(1).astype(np.float64), mask=invalid))
                .append_column("prob_positive", pa.array(probs[:, 1].astype(np.float64), mask=invalid))
                .append_column("device", pa.DictionaryArray.from_arrays(np.zeros(len(lengths), np.int32),
                                                                         self.device_name)))


def write_part_task(f: InputFile, results: pa.Table, part: str) -> dict:
    """Writer (Ray task): the input file's own columns plus the scores, to `part` via a temporary name."""
    import pyarrow.parquet as pq

    table, encoding = read_file(f)
    results = results.sort_by("row")
    if not np.array_equal(results.column("row").to_numpy(), np.arange(table.num_rows)):
        raise DataError(f"{f.path}: has {table.num_rows} rows now but {results.num_rows} were scored; "
                        "did it change during the run?")
    taken, names = set(table.column_names) | set(OUTPUT_COLUMNS), []
    for name in table.column_names:
        if name in OUTPUT_COLUMNS:  # the input's own `label` survives as `input_label`
            while name in taken:
                name = f"input_{name}"
            taken.add(name)
        names.append(name)
    table = table.rename_columns(names)
    for name in OUTPUT_COLUMNS:
        table = table.append_column(name, results.column(name))
    tmp = Path(part).with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{Path(part).name}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, tmp)
    os.replace(tmp, part)
    return {"rows": table.num_rows, "encoding": encoding, **count_statuses(table)}


def count_statuses(table: pa.Table) -> dict:
    """Rows per status and per label (`null` for rows without one) in a scored table."""
    import pyarrow.compute as pc

    return {column: {str(v["values"]) if v["values"] is not None else "null": v["counts"]
                     for v in pc.value_counts(table.column(column)).to_pylist()} for column in ("status", "label")}
