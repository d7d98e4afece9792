"""SST-2 data: load and check the splits, hand them to Ray, and batch them for a worker.

Splits come from a local directory (parquet, GLUE-style tsv, csv or jsonl) or from the
Hugging Face Hub. Every bad input is reported with the file, the column and what was found.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from raysst.corpus import FORMATS as READERS, read_file
from raysst.formats import TEXT_COLUMNS, DataError, InputFile, find_text_column

if TYPE_CHECKING:
    from raysst.config import Config

logger = logging.getLogger(__name__)

FORMATS = ("parquet", "tsv", "csv", "jsonl", "json")
# GLUE ships the validation split as dev.tsv.
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "dev", "val")}


def read_table(path: Path) -> pd.DataFrame:
    """Read one parquet, tsv, csv or jsonl file into a DataFrame, by the same rules as a scored corpus."""
    fmt = READERS.get(path.suffix.lower())
    if fmt is None or fmt == "txt":
        raise DataError(f"{path}: unsupported format {path.suffix.lstrip('.').lower()!r}; use one of {FORMATS}")
    return read_file(InputFile(str(path), path.name, fmt, text_column=TEXT_COLUMNS[0]))[0].to_pandas()


def normalize_labels(labels: pd.Series, source: str, column: str = "label") -> pd.Series:
    """Labels as int 0/1; accepts 0/1 (any int, float or string spelling) and negative/positive."""
    if labels.isna().any():
        rows = labels.index[labels.isna()].tolist()[:5]
        raise DataError(f"{source}: column {column!r} has {int(labels.isna().sum())} missing labels (rows {rows})")
    by_name = {"negative": 0, "positive": 1, "neg": 0, "pos": 1, "0": 0, "1": 1, "0.0": 0, "1.0": 1}
    mapped = labels.map(lambda v: by_name.get(str(v).strip().lower()))
    bad = mapped.isna()
    if bad.any():
        found = sorted(map(str, labels[bad].unique()))[:10]
        raise DataError(f"{source}: column {column!r} must hold 0/1 or negative/positive labels; found {found}")
    return mapped.astype("int64")


def check_frame(df: pd.DataFrame, source: str, text_column: Optional[str] = None,
                label_column: str = "label") -> pd.DataFrame:
    """Return a clean (sentence, label) frame, or raise naming what is wrong."""
    text = find_text_column(df.columns, source, text_column)
    if label_column not in df.columns:
        raise DataError(f"{source}: no label column {label_column!r}; columns are {list(df.columns)}")
    sentences = df[text]
    missing = sentences.isna()
    if missing.any():
        raise DataError(f"{source}: column {text!r} has {int(missing.sum())} null values "
                        f"(rows {df.index[missing].tolist()[:5]})")
    not_str = ~sentences.map(lambda v: isinstance(v, str))
    if not_str.any():
        raise DataError(f"{source}: column {text!r} must hold strings; found "
                        f"{sorted({type(v).__name__ for v in sentences[not_str]})} (rows {df.index[not_str].tolist()[:5]})")
    empty = sentences.str.strip() == ""
    if empty.any():
        raise DataError(f"{source}: column {text!r} has {int(empty.sum())} empty sentences "
                        f"(rows {df.index[empty].tolist()[:5]})")
    if len(df) == 0:
        raise DataError(f"{source}: has no rows")
    labels = normalize_labels(df[label_column], source, label_column)
    return pd.DataFrame({"sentence": sentences.astype(str).to_numpy(), "label": labels.to_numpy()})


def find_split_file(directory: Path, split: str) -> Path:
    candidates = [directory / f"{stem}.{fmt}" for stem in SPLIT_ALIASES[split] for fmt in FORMATS]
    found = [p for p in candidates if p.is_file()]
    if not found:
        present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        raise DataError(f"{directory}: no {split} split; expected one of "
                        f"{[p.name for p in candidates[:4]]}... (parquet, tsv, csv or jsonl); found {present}")
    return found[0]


def load_split(data: str, split: str) -> pd.DataFrame:
    """One checked split as a (sentence, label) DataFrame, from a local directory or the Hub."""
    path = Path(data).expanduser()
    if path.is_dir():
        file = find_split_file(path, split)
        return check_frame(read_table(file), str(file))
    if path.exists() or data.startswith((".", "/", "~")):
        raise DataError(f"{data}: not a directory of SST-2 splits (and not a Hub dataset name)")
    return _load_hub_split(data, split)


def _load_hub_split(name: str, split: str) -> pd.DataFrame:
    import datasets  # heavy; only the Hub path needs it

    config = "sst2" if name.split("/")[-1] == "glue" else None
    logger.info("loading %s split %s from the Hugging Face Hub", name, split)
    ds = datasets.load_dataset(name, config, split=split)
    return check_frame(ds.to_pandas(), f"{name}[{split}]")


def load_sst2(data: str, max_train_samples: Optional[int] = None, seed: int = 42):
    """Train and validation frames. Train comes back in a seeded random order (the slice, if any, is its
    head): workers only shuffle within windows, and a file sorted by label must not train in that order."""
    train, validation = load_split(data, "train"), load_split(data, "validation")
    n = min(max_train_samples or len(train), len(train))
    return train.sample(n=n, random_state=seed).reset_index(drop=True), validation


def to_ray_datasets(train: pd.DataFrame, validation: pd.DataFrame, model: str, max_length: int,
                    num_blocks: int = 16) -> dict:
    """Ray Datasets for the trainer, tokenized once: a Ray Data stage on CPU turns `sentence` into
    `input_ids`, materialized before training, so every epoch (and every trial of a sweep) reads token
    ids and no worker tokenizes in its step. Validation rows carry their position so workers split it exactly."""
    import ray.data

    from raysst.models import load_tokenizer

    # The tokenizer travels as its JSON (no files needed on the node that tokenizes).
    tokenize = {"tokenizer_json": load_tokenizer(model).backend_tokenizer.to_str(), "max_length": max_length}
    stage = {"batch_format": "pyarrow", "batch_size": 4096}
    validation = validation.assign(row=np.arange(len(validation)))
    # Sorted by length: a validation batch pads to its longest row, and in file order that is twice the mean.
    validation = validation.iloc[np.argsort(validation["sentence"].str.len().to_numpy(), kind="stable")]
    train_ds = ray.data.from_pandas([train.iloc[part] for part in
                                     np.array_split(np.arange(len(train)), min(num_blocks, len(train)))])
    validation_ds = ray.data.from_pandas(validation).map_batches(
        tokenize_rows, fn_kwargs={**tokenize, "mark_truncated": True}, **stage)  # the report counts them
    return {"train": train_ds.map_batches(tokenize_rows, fn_kwargs=tokenize, **stage).materialize(),
            "validation": validation_ds.materialize()}


@functools.lru_cache(maxsize=4)
def rust_tokenizer(tokenizer_json: str, max_length: int):
    """The Rust tokenizer behind a fast HF tokenizer, truncating at `max_length` and never padding (its
    JSON may carry padding and truncation settings of its own; the HF wrapper overrides them per call)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.enable_truncation(max_length)
    tokenizer.no_padding()
    return tokenizer


def tokenize_rows(batch: pa.Table, tokenizer_json: str, max_length: int, mark_truncated: bool = False) -> pa.Table:
    """Ray Data stage: the `sentence` column becomes `input_ids` (a list of int32 per row, special tokens
    included), the same ids as `tokenizer(texts, truncation=True, max_length=max_length)`; with
    `mark_truncated`, also a `truncated` column: the rows cut at `max_length`."""
    encodings = rust_tokenizer(tokenizer_json, max_length).encode_batch_fast(batch.column("sentence").to_pylist())
    ids = pa.array([e.ids for e in encodings], pa.list_(pa.int32()))
    batch = batch.drop_columns(["sentence"]).append_column("input_ids", ids)
    if mark_truncated:
        batch = batch.append_column("truncated", pa.array([bool(e.overflowing) for e in encodings]))
    return batch


def pad_ids(seqs, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token id sequences right-padded to the longest one, and the mask of real tokens (both (rows, width))."""
    lengths = np.fromiter(map(len, seqs), np.int64, len(seqs))
    mask = np.arange(lengths.max()) < lengths[:, None]
    ids = np.full(mask.shape, pad_id, np.int64)
    ids[mask] = np.concatenate(seqs)  # row-major: each row's tokens land in its own leading positions
    return ids, mask


def model_inputs(seqs, pad_id: int, labels=None) -> dict:
    """A padded batch as the model's tensors (`labels` too where given)."""
    import torch  # here, not at the top: the tokenizing stage's Ray workers need none of it

    ids, mask = pad_ids(seqs, pad_id)
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}
    if labels is not None:
        batch["labels"] = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return batch


def length_grouped_batches(input_ids, labels, pad_id: int, batch_size: int, rng: np.random.Generator,
                           group_by_length: bool = True) -> Iterator[dict]:
    """Split a pool of tokenized examples into batches of similar length, yielded in random order.

    Sorting inside a pool of many batches cuts padding (SST-2 phrases run from 2 to 60 tokens);
    shuffling the batches keeps the gradient noise of random order.
    """
    labels = np.asarray(labels)
    order = np.arange(len(input_ids))
    if group_by_length:
        order = np.argsort(np.fromiter(map(len, input_ids), np.int64, len(input_ids)), kind="stable")
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(chunks)
    for idx in chunks:
        yield model_inputs([input_ids[i] for i in idx], pad_id, labels[idx])


def epoch_batches(train_shard, cfg: Config, per_worker: int, epoch: int, rank: int, pad_id: int) -> Iterator[dict]:
    """This worker's batches of one epoch: its shard's token ids shuffled in pools of 64 batches (seeded by
    run, epoch and rank), each pool grouped by length into padded batches."""
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


def as_rows(column) -> np.ndarray:
    """A batch's token-id column as a 1-D array of per-row arrays (a pool of equal lengths may come as 2-D)."""
    rows = np.empty(len(column), object)
    for i, row in enumerate(column):
        rows[i] = row
    return rows
