"""How a file's bytes become rows: the formats (parquet, csv, tsv, jsonl, txt), text decoding, and the errors
that name a bad file or column. Shared by training data and scored corpora (`raysst.corpus`, `raysst.chunks`).

Text that is not UTF-8 is decoded as cp1252, else latin-1 (which decodes any bytes), and the encoding used is
reported. A file that cannot be parsed raises `UnreadableFile` naming it and what the parser found.
"""

from __future__ import annotations

import io
import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa

TXT_COLUMN = "text"  # plain text: one document per line
TEXT_COLUMNS = ("sentence", "text")  # looked for, in this order, when no --text-column is given
# utf-8-sig also reads UTF-8 with a byte-order mark (Excel's csv); latin-1 decodes any bytes, so one always fits.
ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")


class DataError(ValueError):
    """Input data that cannot be used as it is; the message names the file and column."""


class UnreadableFile(DataError):
    """A corrupt or unparsable input file; the message names it."""


@dataclass(frozen=True)
class InputFile:
    """One file of the corpus; `rel` (its path under the input root) names its output directory.

    `path` is a local absolute path or a URI. `encoding`, `bom` and `head` (the byte where rows start,
    after a byte-order mark and a csv header) are found by `raysst.chunks.plan_chunks` for text formats.
    """

    path: str
    rel: str
    fmt: str
    text_column: str = TXT_COLUMN
    num_rows: Optional[int] = None  # known up front for parquet only
    encoding: str = "utf-8"
    bom: int = 0
    head: int = 0


def find_text_column(columns, source: str, text_column: Optional[str] = None) -> str:
    """The text column: the one asked for, else `sentence` or `text`."""
    wanted = (text_column,) if text_column else TEXT_COLUMNS
    for name in wanted:
        if name in columns:
            return name
    raise DataError(f"{source}: no text column {' or '.join(map(repr, wanted))}; columns are {list(columns)}")


def parse_text(f: InputFile, content: str, first_line: int = 1) -> tuple[pa.Table, list]:
    """Rows of decoded csv/tsv/jsonl/txt content: the table of its columns, and the text column's raw values."""
    with reading(f):
        if f.fmt == "txt":
            lines = _lines(content)
            return pa.table({TXT_COLUMN: pa.array(lines, pa.string())}), lines
        if f.fmt == "jsonl":
            records = parse_jsonl(f, content, first_line)
            columns = list(dict.fromkeys(k for r in records for k in r))
            table = pa.table({c: _to_arrow([r.get(c) for r in records]) for c in columns})
            return table, [r.get(f.text_column) for r in records]
        df = read_csv(f, content)
        table = pa.table({str(c): _to_arrow(df[c].tolist()) for c in df.columns})
        return table, df[f.text_column].tolist() if f.text_column in df.columns else [None] * len(df)


@contextmanager
def reading(f: InputFile):
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


def read_csv(f: InputFile, content: str, nrows: Optional[int] = None):
    import pandas as pd

    # The text column stays a string ("1", "NA" are text); an empty field is a missing value.
    return pd.read_csv(io.StringIO(content), sep="\t" if f.fmt == "tsv" else ",", quoting=3 if f.fmt == "tsv" else 0,
                       keep_default_na=False, na_values=[""], dtype={f.text_column: str}, nrows=nrows)


def _lines(content: str) -> list[str]:
    lines = content.split("\n")
    if lines[-1] == "":  # a final newline ends the last line; it does not start a new one
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def parse_jsonl(f: InputFile, content: str, first_line: int = 1) -> list[dict]:
    records = []
    for number, line in enumerate(content.split("\n"), first_line):
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
