"""Training data: load and check the splits and their task, hand them to Ray, and batch them for a worker.

Splits come from a local directory (parquet, GLUE-style tsv, csv or jsonl) or from the Hugging Face Hub; a
GLUE task (`--data-config mrpc`) picks its columns and label names as run_glue.py does. Every bad input is
reported with the file, the column and what was found.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import pandas as pd

from raysst.batching import PAIR, TEXT, tokenize_rows
from raysst.corpus import FORMATS as READERS, read_file
from raysst.formats import TEXT_COLUMNS, DataError, InputFile, find_text_column
from raysst.task import MULTI, REGRESSION, SINGLE, VALUE, LabelError, Task, is_list, no_nulls

if TYPE_CHECKING:
    from raysst.config import Config

logger = logging.getLogger(__name__)

FORMATS = ("parquet", "tsv", "csv", "jsonl", "json")
# GLUE ships the validation split as dev.tsv.
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "dev", "val")}
# GLUE tasks by name, as run_glue.py's task_to_keys: (text column, pair column, label names; None: regression).
GLUE_TASKS = {
    "cola": ("sentence", None, ("unacceptable", "acceptable")),
    "sst2": ("sentence", None, ("negative", "positive")),
    "mrpc": ("sentence1", "sentence2", ("not_equivalent", "equivalent")),
    "qqp": ("question1", "question2", ("not_duplicate", "duplicate")),
    "stsb": ("sentence1", "sentence2", None),
    "mnli": ("premise", "hypothesis", ("entailment", "neutral", "contradiction")),
    "qnli": ("question", "sentence", ("entailment", "not_entailment")),
    "rte": ("sentence1", "sentence2", ("entailment", "not_entailment")),
    "wnli": ("sentence1", "sentence2", ("not_entailment", "entailment")),
}
GLUE_VALIDATION = {"mnli": "validation_matched"}


@dataclass(frozen=True)
class Columns:
    """Where a split's texts and labels are: the flags, else the GLUE task's keys, else `sentence` or `text`."""

    text: Optional[str] = None
    pair: Optional[str] = None
    label: str = "label"
    glue: Optional[str] = None  # the GLUE task the data is read as, if any
    config: Optional[str] = None  # the Hub dataset's config name

    @classmethod
    def of(cls, cfg: "Config") -> "Columns":
        glue = glue_task(cfg.data, cfg.data_config)
        text, pair, _ = GLUE_TASKS.get(glue, (None, None, None))
        return cls(cfg.text_column or text, cfg.text_pair_column or pair, cfg.label_column, glue,
                   glue or cfg.data_config)


def glue_task(data: str, data_config: Optional[str]) -> Optional[str]:
    """The GLUE task `data` is read as: `data_config` when it names one ("none": no task), else SST-2 for the
    GLUE Hub name, else a local directory named after a task (`.../sst2`, `mrpc_sample`), else None."""
    if data_config:
        return data_config.lower() if data_config.lower() in GLUE_TASKS else None
    name = Path(str(data).rstrip("/")).name.lower()
    if name == "glue":
        return "sst2"
    return next((t for t in GLUE_TASKS if name.startswith(t) and Path(data).expanduser().is_dir()), None)


def read_table(path: Path) -> pd.DataFrame:
    """Read one parquet, tsv, csv or jsonl file into a DataFrame, by the same rules as a scored corpus."""
    fmt = READERS.get(path.suffix.lower())
    if fmt is None or fmt == "txt":
        raise DataError(f"{path}: unsupported format {path.suffix.lstrip('.').lower()!r}; use one of {FORMATS}")
    return read_file(InputFile(str(path), path.name, fmt, text_column=TEXT_COLUMNS[0]))[0].to_pandas()


def check_texts(df: pd.DataFrame, column: str, source: str) -> pd.Series:
    """The column's texts, or DataError naming the nulls, non-strings or empty strings."""
    texts = df[column]
    bad = {"null values": texts.isna(), "non-string values": ~texts.map(lambda v: isinstance(v, str) or pd.isna(v))}
    bad["empty texts"] = ~bad["null values"] & ~bad["non-string values"] & (texts.astype(str).str.strip() == "")
    for what, rows in bad.items():
        if rows.any():
            found = f" ({sorted({type(v).__name__ for v in texts[rows]})})" if what == "non-string values" else ""
            raise DataError(f"{source}: column {column!r} has {int(rows.sum())} {what}{found} "
                            f"(rows {df.index[rows].tolist()[:5]})")
    return texts.astype(str)


def check_frame(df: pd.DataFrame, source: str, columns: Columns = Columns()) -> pd.DataFrame:
    """A clean (sentence[, sentence_pair], label) frame with the labels as found, or DataError naming what is
    wrong; the labels are checked against the task by raysst.task."""
    if len(df) == 0:
        raise DataError(f"{source}: has no rows")
    text = find_text_column(df.columns, source, columns.text)
    for name, what in ((columns.pair, "text pair"), (columns.label, "label")):
        if name and name not in df.columns:
            raise DataError(f"{source}: no {what} column {name!r}; columns are {list(df.columns)}")
    out = {TEXT: check_texts(df, text, source).to_numpy()}
    if columns.pair:
        out[PAIR] = check_texts(df, columns.pair, source).to_numpy()
    out["label"] = df[columns.label].to_numpy()
    return pd.DataFrame(out)


def find_split_file(directory: Path, split: str) -> Path:
    stems = SPLIT_ALIASES.get(split, (split,))
    candidates = [directory / f"{stem}.{fmt}" for stem in stems for fmt in FORMATS]
    found = [p for p in candidates if p.is_file()]
    if not found:
        present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        raise DataError(f"{directory}: no {split} split; expected one of "
                        f"{[p.name for p in candidates[:4]]}... (parquet, tsv, csv or jsonl); found {present}")
    return found[0]


def load_split(data: str, split: str, columns: Columns = Columns()) -> pd.DataFrame:
    """One checked split, labels as found, from a local directory or the Hub."""
    return _read_split(data, split, columns)[0]


def _read_split(data: str, split: str, columns: Columns) -> tuple[pd.DataFrame, str, Optional[list]]:
    """One checked split: the frame, its source (for errors) and the label names the source declares (a Hub
    ClassLabel), if any."""
    path = Path(data).expanduser()
    if path.is_dir():
        file = find_split_file(path, split)
        return check_frame(read_table(file), str(file), columns), str(file), None
    if path.exists() or data.startswith((".", "/", "~")):
        raise DataError(f"{data}: not a directory of train/validation splits (and not a Hub dataset name)")
    import datasets  # heavy; only the Hub path needs it

    logger.info("loading %s (%s) split %s from the Hugging Face Hub", data, columns.glue, split)
    ds = datasets.load_dataset(data, columns.config, split=split)
    names = getattr(ds.features.get(columns.label), "names", None)
    source = f"{data}[{split}]"
    return check_frame(ds.to_pandas(), source, columns), source, names


def load_data(cfg: "Config") -> tuple[pd.DataFrame, pd.DataFrame, Task]:
    """Train and validation frames with their labels encoded for the task, and the task: label names from
    --labels, the GLUE task or the Hub's ClassLabel, else the training split's sorted values. Train comes
    back in a seeded random order (a slice, if any, is its head): workers only shuffle within windows, and a
    file sorted by label must not train in that order."""
    columns = Columns.of(cfg)
    train, source, declared = _read_split(cfg.data, cfg.train_split, columns)
    validation_split = cfg.validation_split or GLUE_VALIDATION.get(columns.glue, "validation")
    validation, val_source, _ = _read_split(cfg.data, validation_split, columns)
    glue_labels = GLUE_TASKS.get(columns.glue, (None, None, ()))[2]
    kind = cfg.task or (REGRESSION if columns.glue and glue_labels is None else None)
    task = infer_task(train["label"], source, columns.label, kind, cfg.labels or declared or glue_labels or None,
                      cfg.threshold)
    n = min(cfg.max_train_samples or len(train), len(train))
    train = train.sample(n=n, random_state=cfg.seed).reset_index(drop=True)
    try:
        encoded = [task.encode(frame["label"], src, columns.label) for frame, src in ((train, source),
                                                                                     (validation, val_source))]
    except LabelError as e:
        raise LabelError(f"{e}; the labels come from the training split ({source}) or --labels") from None
    train, validation = (frame.assign(label=list(y) if y.ndim > 1 else y) for frame, y in zip((train, validation),
                                                                                            encoded))
    return train, validation, task


def to_ray_datasets(train: pd.DataFrame, validation: pd.DataFrame, model: str, max_length: int,
                    num_blocks: int = 16) -> dict:
    """Ray Datasets for the trainer, tokenized once: a Ray Data stage on CPU turns `sentence` (and
    `sentence_pair`) into `input_ids` (and `token_type_ids`), materialized before training, so every epoch
    (and every trial of a sweep) reads token ids and no worker tokenizes in its step. Validation rows carry
    their position so workers split it exactly."""
    import ray.data

    from raysst.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    # The tokenizer travels as its JSON (no files needed on the node that tokenizes).
    tokenize = {"tokenizer_json": tokenizer.backend_tokenizer.to_str(), "max_length": max_length,
                "type_ids": PAIR in train.columns and "token_type_ids" in tokenizer.model_input_names}
    stage = {"batch_format": "pyarrow", "batch_size": 4096}
    validation = validation.assign(row=np.arange(len(validation)))
    # Sorted by length: a validation batch pads to its longest row, and in file order that is twice the mean.
    length = validation[TEXT].str.len() + (validation[PAIR].str.len() if PAIR in validation else 0)
    validation = validation.iloc[np.argsort(length.to_numpy(), kind="stable")]
    train_ds = ray.data.from_pandas([train.iloc[part] for part in
                                     np.array_split(np.arange(len(train)), min(num_blocks, len(train)))])
    validation_ds = ray.data.from_pandas(validation).map_batches(
        tokenize_rows, fn_kwargs={**tokenize, "mark_truncated": True}, **stage)  # the report counts them
    return {"train": train_ds.map_batches(tokenize_rows, fn_kwargs=tokenize, **stage).materialize(),
            "validation": validation_ds.materialize()}


def infer_task(values: pd.Series, source: str, column: str, kind: Optional[str] = None,
               labels: Optional[Sequence[str]] = None, threshold: float = 0.5) -> Task:
    """The task that training labels define: list labels are multi-label, float labels regression, int or
    string labels single-label, unless `kind` says otherwise. Label names are `labels` if given, else the
    sorted unique values. LabelError for nulls, mixed types, or fewer than two classes."""
    no_nulls(values, source, column)
    types = values.map(_label_type)
    found = types.value_counts()
    if len(found) > 1 and set(found.index) != {"int", "float"}:
        raise LabelError(f"{source}: column {column!r} mixes label types ({', '.join(f'{n} {t}' for t, n in found.items())}"
                         f"); use one type (names, ids, lists of names, or numbers)")
    if kind is None:
        kind = {"list": MULTI, "float": REGRESSION}.get(found.index[0], SINGLE)
        if set(found.index) == {"int", "float"}:
            kind = REGRESSION
    if kind == REGRESSION:
        return Task(REGRESSION, (VALUE,), threshold)
    if labels is None:
        flat = [x for v in values for x in v] if kind == MULTI else list(values)
        if kind == SINGLE and found.index[0] in ("int", "float"):
            labels = [str(int(v)) for v in sorted(set(float(x) for x in flat))]
        else:
            labels = sorted({str(x).strip() for x in flat})
    task = Task(kind, tuple(str(n) for n in labels), threshold)
    if kind == SINGLE:
        present = np.unique(task.encode(values, source, column))
        if len(present) < 2:
            raise LabelError(f"{source}: column {column!r} holds only one class ({task.labels[present[0]]!r} in "
                             f"{len(values)} rows); a classifier needs at least two (or pass --task regression)")
    elif kind == MULTI:
        task.encode(values, source, column)
    return task


def _label_type(v) -> str:
    """list, str, int, float or bool; a file that mixes numbers and names reaches us as text, so text that
    reads as a number counts as one."""
    if isinstance(v, str):
        v = v.strip()
        if re.fullmatch(r"[-+]?\d+", v):
            return "int"
        return "float" if re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?", v) else "str"
    if is_list(v):
        return "list"
    if isinstance(v, (bool, np.bool_)):
        return "bool"
    return "int" if isinstance(v, (int, np.integer)) else "float" if isinstance(v, (float, np.floating)) else \
        type(v).__name__
