"""Token ids in and batches out: the Rust tokenizer stage that training and scoring share, padding, and the
length-grouped batches a training worker steps on."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from raysst.config import Config

TEXT, PAIR = "sentence", "sentence_pair"  # the text columns of a checked training frame, beside `label`


@functools.lru_cache(maxsize=4)
def rust_tokenizer(tokenizer_json: str, max_length: int):
    """The Rust tokenizer behind a fast HF tokenizer, truncating at `max_length` (the longer text of a pair
    first, as `truncation=True` does) and never padding (its JSON may carry padding and truncation settings
    of its own; the HF wrapper overrides them per call)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.enable_truncation(max_length)
    tokenizer.no_padding()
    return tokenizer


def encode_texts(tokenizer, texts: list, pairs: Optional[list] = None) -> list:
    """Encodings of texts, or of (text, pair) as real pairs: special tokens and segment ids between them."""
    return tokenizer.encode_batch_fast(list(zip(texts, pairs)) if pairs is not None else texts)


def tokenize_rows(batch: pa.Table, tokenizer_json: str, max_length: int, type_ids: bool = False,
                  mark_truncated: bool = False) -> pa.Table:
    """Ray Data stage: `sentence` (and `sentence_pair`) become `input_ids` (a list of int32 per row, special
    tokens included), the same ids as `tokenizer(texts[, pairs], truncation=True, max_length=max_length)`;
    with `type_ids`, also their `token_type_ids`; with `mark_truncated`, a `truncated` column: the rows cut at
    `max_length`."""
    pairs = batch.column(PAIR).to_pylist() if PAIR in batch.column_names else None
    encodings = encode_texts(rust_tokenizer(tokenizer_json, max_length), batch.column(TEXT).to_pylist(), pairs)
    batch = batch.drop_columns([c for c in (TEXT, PAIR) if c in batch.column_names])
    batch = batch.append_column("input_ids", pa.array([e.ids for e in encodings], pa.list_(pa.int32())))
    if type_ids:
        batch = batch.append_column("token_type_ids", pa.array([e.type_ids for e in encodings], pa.list_(pa.int8())))
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


def model_inputs(seqs, pad_id: int, labels=None, type_ids=None) -> dict:
    """A padded batch as the model's tensors: `token_type_ids` where given (pairs), `labels` where given
    (class ids stay integers, multi-hot rows and regression values floats)."""
    import torch  # here, not at the top: the tokenizing stage's Ray workers need none of it

    ids, mask = pad_ids(seqs, pad_id)
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}
    if type_ids is not None:
        batch["token_type_ids"] = torch.from_numpy(pad_ids(type_ids, 0)[0])
    if labels is not None:
        labels = np.asarray(labels)
        batch["labels"] = torch.as_tensor(labels, dtype=torch.long if labels.dtype.kind in "iu" else torch.float32)
    return batch


def length_grouped_batches(input_ids, labels, pad_id: int, batch_size: int, rng: np.random.Generator,
                           group_by_length: bool = True, type_ids=None) -> Iterator[dict]:
    """Split a pool of tokenized examples into batches of similar length, yielded in random order.

    Sorting inside a pool of many batches cuts padding (SST-2 phrases run from 2 to 60 tokens; a pair counts
    both its texts); shuffling the batches keeps the gradient noise of random order.
    """
    labels = np.asarray(labels)
    order = np.arange(len(input_ids))
    if group_by_length:
        order = np.argsort(np.fromiter(map(len, input_ids), np.int64, len(input_ids)), kind="stable")
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(chunks)
    for idx in chunks:
        yield model_inputs([input_ids[i] for i in idx], pad_id, labels[idx],
                           None if type_ids is None else [type_ids[i] for i in idx])


def epoch_batches(train_shard, cfg: Config, per_worker: int, epoch: int, rank: int, pad_id: int) -> Iterator[dict]:
    """This worker's batches of one epoch: its shard's token ids shuffled in pools of 64 batches (seeded by
    run, epoch and rank), each pool grouped by length into padded batches."""
    rng = np.random.default_rng([cfg.seed, epoch, rank])
    pool = per_worker * (64 if cfg.group_by_length else 1)
    rows: dict = {}
    for chunk in train_shard.iter_batches(batch_size=pool, batch_format="numpy", local_shuffle_buffer_size=pool,
                                          local_shuffle_seed=cfg.seed * 1000 + epoch):
        # Pools come short at block boundaries: only whole batches leave, the rest joins the next pool, so
        # every worker steps ceil(rows / per_worker) times and no DDP collective waits for a partner.
        new = {k: as_rows(v) if k != "label" else np.asarray(v) for k, v in chunk.items()
               if k in ("input_ids", "token_type_ids", "label")}
        rows = {k: np.concatenate([rows[k], v]) if k in rows else v for k, v in new.items()}
        whole = len(rows["input_ids"]) - len(rows["input_ids"]) % per_worker
        yield from _grouped({k: v[:whole] for k, v in rows.items()}, pad_id, per_worker, rng, cfg.group_by_length)
        rows = {k: v[whole:] for k, v in rows.items()}
    if rows and len(rows["input_ids"]):
        yield from _grouped(rows, pad_id, per_worker, rng, cfg.group_by_length)


def _grouped(rows: dict, pad_id: int, per_worker: int, rng, group_by_length: bool) -> Iterator[dict]:
    return length_grouped_batches(rows["input_ids"], rows["label"], pad_id, per_worker, rng, group_by_length,
                                  rows.get("token_type_ids"))


def as_rows(column) -> np.ndarray:
    """A batch's token-id column as a 1-D array of per-row arrays (a pool of equal lengths may come as 2-D)."""
    rows = np.empty(len(column), object)
    for i, row in enumerate(column):
        rows[i] = row
    return rows
