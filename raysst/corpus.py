"""A corpus to score: find its files, check their columns, and read them whatever their format or encoding.

Parquet, csv, tsv, jsonl and plain text (one document per line, column `text`). Text files that are
not UTF-8 are decoded as cp1252, else latin-1, and the encoding used is reported. A file that cannot be
read raises `UnreadableFile` naming it; a missing column raises `DataError` naming the file and its columns.
"""

from __future__ import annotations

import glob
import io
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pyarrow as pa

from raysst.data import DataError, find_text_column

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl",
           ".json": "jsonl", ".txt": "txt"}
TXT_COLUMN = "text"
# utf-8-sig also reads UTF-8 with a byte-order mark (Excel's csv); latin-1 decodes any bytes, so one always fits.
ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")
SCAN_RECORDS = 1000  # jsonl: the up-front column check looks at the keys of this many records


class UnreadableFile(DataError):
    """A corrupt or unparsable input file; the message names it."""


@dataclass(frozen=True)
class InputFile:
    """One file of the corpus; `rel` (its path under the input root) names its output part."""

    path: str
    rel: str
    fmt: str
    text_column: str = TXT_COLUMN
    num_rows: Optional[int] = None  # known up front for parquet only


def list_input_files(spec: str, exclude: Optional[str] = None) -> tuple[list[InputFile], list[str]]:
    """The files to score under a directory (recursive), glob or single file, and the ones ignored.

    Hidden and `_`-prefixed files (`_SUCCESS`, `_summary.json`) and anything under `exclude` (the output
    directory) are left out; in a directory or glob, files of other formats are ignored and listed.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() not in FORMATS:
            raise DataError(f"{spec}: unsupported format {path.suffix!r}; use one of {sorted(FORMATS)}")
        root, paths = path.parent, [path]
    elif path.is_dir():
        root, paths = path, [p for p in path.rglob("*") if p.is_file()]
    elif glob.has_magic(spec):
        matches = [Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=True)]
        paths = [q for m in matches for q in ([m] if m.is_file() else m.rglob("*")) if q.is_file()]
        root = Path(os.path.commonpath([str(p.parent.absolute()) for p in paths])) if paths else Path(".")
    else:
        raise FileNotFoundError(f"input {spec} does not exist (expected a file, a directory or a glob)")
    root, skip_under = root.absolute(), Path(exclude).absolute() if exclude else None
    files, ignored = [], []
    for p in sorted(p.absolute() for p in paths):
        rel = p.relative_to(root)
        if any(part.startswith((".", "_")) for part in rel.parts) or (skip_under and p.is_relative_to(skip_under)):
            continue
        if p.suffix.lower() in FORMATS:
            files.append(InputFile(str(p), str(rel), FORMATS[p.suffix.lower()]))
        else:
            ignored.append(str(p))
    if not files:
        raise DataError(f"{spec}: no files to score ({', '.join(sorted(set(FORMATS.values())))}); "
                        f"ignored {ignored[:5]}")
    return files, ignored


def file_columns(f: InputFile) -> tuple[list, Optional[int]]:
    """A file's column names (and, for parquet, its row count) without reading its rows."""
    import pyarrow.parquet as pq

    with _reading(f):
        if f.fmt == "parquet":
            meta = pq.ParquetFile(f.path).metadata
            return meta.schema.to_arrow_schema().names, meta.num_rows
        if f.fmt in ("csv", "tsv"):
            with open(f.path, "rb") as fh:
                header = fh.readline()
            return list(_read_csv(f, decode(header)[0], nrows=0).columns), None
        if f.fmt == "jsonl":
            with open(f.path, "rb") as fh:
                lines = [line for _, line in zip(range(SCAN_RECORDS), fh)]
            return list(dict.fromkeys(k for r in _parse_jsonl(f, decode(b"".join(lines))[0]) for k in r)), None
    return [TXT_COLUMN], None


def scan_file(f: InputFile, text_column: Optional[str] = None, id_column: Optional[str] = None) -> InputFile:
    """Check a file's columns without reading its rows; returns it with its text column (and parquet row count)."""
    columns, num_rows = file_columns(f)
    text = TXT_COLUMN if f.fmt == "txt" else find_text_column(columns, f.path, text_column)
    if id_column and f.fmt != "txt" and id_column not in columns:
        raise DataError(f"{f.path}: no id column {id_column!r}; columns are {columns}")
    return InputFile(f.path, f.rel, f.fmt, text, num_rows)


def read_file(f: InputFile) -> tuple[pa.Table, str]:
    """A whole file as an Arrow table, and the encoding its text was decoded with."""
    import pyarrow.parquet as pq

    with _reading(f):
        if f.fmt == "parquet":
            return pq.read_table(f.path), "utf-8"
        content, encoding = decode(Path(f.path).read_bytes())
        if f.fmt == "txt":
            return pa.table({TXT_COLUMN: pa.array(_lines(content), pa.string())}), encoding
        if f.fmt == "jsonl":
            records = _parse_jsonl(f, content)
            columns = list(dict.fromkeys(k for r in records for k in r))
            return pa.table({c: _to_arrow([r.get(c) for r in records]) for c in columns}), encoding
        df = _read_csv(f, content)
        return pa.table({str(c): _to_arrow(df[c].tolist()) for c in df.columns}), encoding


def read_text(f: InputFile) -> list:
    """The text column of a file as Python values, one per row, as found (None, numbers and all)."""
    import pyarrow.parquet as pq

    with _reading(f):
        if f.fmt == "parquet":
            return text_values(pq.read_table(f.path, columns=[f.text_column]).column(0))
        content = decode(Path(f.path).read_bytes())[0]
        if f.fmt == "txt":
            return _lines(content)
        if f.fmt == "jsonl":
            return [r.get(f.text_column) for r in _parse_jsonl(f, content)]
        return _read_csv(f, content, usecols=[f.text_column])[f.text_column].tolist()


@contextmanager
def _reading(f: InputFile):
    try:
        yield
    except UnreadableFile:
        raise
    except Exception as e:  # the reader's own message says what is wrong inside the file
        raise UnreadableFile(f"{f.path}: could not be read as {f.fmt}: {type(e).__name__}: {e}") from e


def text_values(column: pa.ChunkedArray) -> list:
    """A text column as Python values; invalid UTF-8 and binary values are decoded like text files."""
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return [None if v is None else decode(v)[0] for v in column.to_pylist()]
    try:
        return column.to_pylist()
    except UnicodeDecodeError:  # parquet strings that are not valid UTF-8
        return text_values(column.cast(pa.binary()))


def decode(raw: bytes) -> tuple[str, str]:
    """Text and the first encoding of ENCODINGS that decodes it."""
    for encoding in ENCODINGS:
        try:
            return raw.decode(encoding), encoding.removesuffix("-sig")
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes every byte string")


def _read_csv(f: InputFile, content: str, nrows: Optional[int] = None, usecols: Optional[list] = None):
    import pandas as pd

    # The text column stays a string ("1", "NA" are text); an empty field is a missing value.
    return pd.read_csv(io.StringIO(content), sep="\t" if f.fmt == "tsv" else ",", quoting=3 if f.fmt == "tsv" else 0,
                       keep_default_na=False, na_values=[""], dtype={f.text_column: str}, nrows=nrows,
                       usecols=usecols)


def _lines(content: str) -> list[str]:
    lines = content.split("\n")
    if lines[-1] == "":  # a final newline ends the last line; it does not start a new one
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _parse_jsonl(f: InputFile, content: str) -> list[dict]:
    records = []
    for number, line in enumerate(content.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UnreadableFile(f"{f.path}: line {number} is not valid JSON: {e}") from e
        if not isinstance(record, dict):
            raise UnreadableFile(f"{f.path}: line {number} is a JSON {type(record).__name__}, not an object")
        records.append(record)
    return records


def _to_arrow(values: list) -> pa.Array:
    """An Arrow column from Python values; a column of mixed types keeps each value as its text."""
    try:
        return pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array([None if is_missing(v) else v if isinstance(v, str) else json.dumps(v, default=str)
                         for v in values], pa.string())


def is_missing(v) -> bool:
    """None, or a NaN standing for a missing value (pandas, JSON)."""
    return v is None or (isinstance(v, float) and v != v)
