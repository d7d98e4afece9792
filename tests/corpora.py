"""Corpora for the scoring tests: real SST-2 phrases, each row unique, written as parquet, csv or jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
CHUNK = 1_000  # the tests' --chunk-rows; parquet inputs get row groups of twice that


def corpus_rows(n: int) -> pd.DataFrame:
    """n SST-2 train phrases, each made unique by its row number (rows without an id stay tellable apart)."""
    texts = pd.read_parquet(SST2 / "train.parquet").sentence.head(n).tolist()
    texts = (texts * (n // len(texts) + 1))[:n]
    return pd.DataFrame({"sentence": [f"{t} #{i}" for i, t in enumerate(texts)], "idx": range(n)})


def write_input(rows: pd.DataFrame, path: Path, fmt: str) -> None:
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), path, row_group_size=2 * CHUNK)
    elif fmt == "csv":
        rows[["sentence"]].to_csv(path, index=False)
    else:
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows.sentence))
