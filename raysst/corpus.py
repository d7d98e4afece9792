"""The one reading layer, for corpora and training data: find files (local paths, globs, s3://, gs://, any
pyarrow filesystem), check their columns, and read them whatever their format or encoding.

Parquet, csv, tsv, jsonl and plain text (one document per line, column `text`). Text files that are
not UTF-8 are decoded as cp1252, else latin-1, and the encoding used is reported. A file that cannot be
read raises `UnreadableFile` naming it; a missing column raises `DataError` naming the file and its columns.
Reading a file in chunks (bounded memory, the resume grain of scoring) is in `raysst.chunks`.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import json
import posixpath
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa

from raysst.storage import filesystem

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl",
           ".json": "jsonl", ".txt": "txt"}
TXT_COLUMN = "text"
# utf-8-sig also reads UTF-8 with a byte-order mark (Excel's csv); latin-1 decodes any bytes, so one always fits.
ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")
SCAN_RECORDS = 1000  # jsonl: the up-front column check looks at the keys of this many records
TEXT_COLUMNS = ("sentence", "text")


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


def list_input_files(spec: str, exclude: Optional[str] = None) -> tuple[list[InputFile], list[str]]:
    """The files to score under a directory (recursive), glob or single file, and the ones ignored.

    Hidden and `_`-prefixed files (`_SUCCESS`, `_summary.json`) and anything under `exclude` (the output
    directory) are left out; in a directory or glob, files of other formats are ignored and listed.
    A glob's `*` may match across `/` (it is matched against every file under the glob's fixed prefix).
    """
    import pyarrow.fs as pafs

    fs, path = filesystem(spec)
    uri = spec.split("://")[0] + "://" if "://" in spec else ""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        if posixpath.splitext(path)[1].lower() not in FORMATS:
            raise DataError(f"{spec}: unsupported format {posixpath.splitext(path)[1]!r}; use one of {sorted(FORMATS)}")
        root, paths = posixpath.dirname(path), [path]
    elif info.type == pafs.FileType.Directory:
        root, paths = path, _files_under(fs, path)
    elif glob.has_magic(path):
        base = path[:min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
        patterns = {path, path.replace("**/", "")}  # `**/` also matches no directory, as in glob
        paths = [p for p in _files_under(fs, base)
                 if any(fnmatch.fnmatchcase(q, pat) for q in _self_and_parents(p, base) for pat in patterns)]
        root = posixpath.commonpath([posixpath.dirname(p) for p in paths]) if paths else base
    else:
        raise FileNotFoundError(f"input {spec} does not exist (expected a file, a directory or a glob)")
    skip_under = (filesystem(exclude)[1].rstrip("/") + "/") if exclude else None
    files, ignored = [], []
    for p in sorted(paths):
        rel = posixpath.relpath(p, root)
        if any(part.startswith((".", "_")) for part in rel.split("/")) or (skip_under and p.startswith(skip_under)):
            continue
        fmt = FORMATS.get(posixpath.splitext(p)[1].lower())
        if fmt:
            files.append(InputFile(uri + p if uri else p, rel, fmt))
        else:
            ignored.append(uri + p)
    if not files:
        raise DataError(f"{spec}: no files to score ({', '.join(sorted(set(FORMATS.values())))}); "
                        f"ignored {ignored[:5]}")
    return files, ignored


def _files_under(fs, path: str) -> list[str]:
    import pyarrow.fs as pafs

    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    return [i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]


def _self_and_parents(path: str, base: str) -> list[str]:
    """A glob may name a directory: its files match too."""
    out = [path]
    while len(path) > len(base) + 1:
        path = posixpath.dirname(path)
        out.append(path)
    return out


def find_text_column(columns, source: str, text_column: Optional[str] = None) -> str:
    """The text column: the one asked for, else `sentence` or `text`."""
    wanted = (text_column,) if text_column else TEXT_COLUMNS
    for name in wanted:
        if name in columns:
            return name
    raise DataError(f"{source}: no text column {' or '.join(map(repr, wanted))}; columns are {list(columns)}")


def open_input(f: InputFile):
    """A random-access pyarrow file for an input file, local or behind a URI."""
    fs, path = filesystem(f.path)
    return fs.open_input_file(path)


def file_columns(f: InputFile) -> tuple[list, Optional[int]]:
    """A file's column names (and, for parquet, its row count) without reading its rows."""
    import pyarrow.parquet as pq

    with _reading(f), open_input(f) as fh:
        if f.fmt == "parquet":
            meta = pq.ParquetFile(fh).metadata
            return meta.schema.to_arrow_schema().names, meta.num_rows
        if f.fmt in ("csv", "tsv"):
            return list(_read_csv(f, decode(_first_lines(fh, 1))[0], nrows=0).columns), None
        if f.fmt == "jsonl":
            content = decode(_first_lines(fh, SCAN_RECORDS))[0]
            return list(dict.fromkeys(k for r in parse_jsonl(f, content) for k in r)), None
    return [TXT_COLUMN], None


def _first_lines(fh, n: int) -> bytes:
    out = io.BytesIO()
    while out.getvalue().count(b"\n") < n:
        block = fh.read(1 << 16)
        if not block:
            break
        out.write(block)
    return b"\n".join(out.getvalue().split(b"\n", n)[:n])


def scan_file(f: InputFile, text_column: Optional[str] = None, id_column: Optional[str] = None) -> InputFile:
    """Check a file's columns without reading its rows; returns it with its text column (and parquet row count)."""
    columns, num_rows = file_columns(f)
    text = TXT_COLUMN if f.fmt == "txt" else find_text_column(columns, f.path, text_column)
    if id_column and f.fmt != "txt" and id_column not in columns:
        raise DataError(f"{f.path}: no id column {id_column!r}; columns are {columns}")
    return InputFile(f.path, f.rel, f.fmt, text, num_rows)


def read_file(f: InputFile) -> tuple[pa.Table, str]:
    """A whole (small) file as an Arrow table, and the encoding its text was decoded with: training data."""
    table, _, encoding = _read_whole(f)
    return table, encoding


def read_text(f: InputFile) -> list:
    """The text column of a whole file as Python values, one per row, as found (None, numbers and all)."""
    return _read_whole(f)[1]


def _read_whole(f: InputFile) -> tuple[pa.Table, list, str]:
    import pyarrow.parquet as pq

    with _reading(f), open_input(f) as fh:
        if f.fmt == "parquet":
            table = pq.read_table(fh)
            values = text_values(table.column(f.text_column)) if f.text_column in table.column_names else []
            return table, values, "utf-8"
        content, encoding = decode(fh.read())
    return (*parse_text(f, content), encoding)


def parse_text(f: InputFile, content: str, first_line: int = 1) -> tuple[pa.Table, list]:
    """Rows of decoded csv/tsv/jsonl/txt content: the table of its columns, and the text column's raw values."""
    with _reading(f):
        if f.fmt == "txt":
            lines = _lines(content)
            return pa.table({TXT_COLUMN: pa.array(lines, pa.string())}), lines
        if f.fmt == "jsonl":
            records = parse_jsonl(f, content, first_line)
            columns = list(dict.fromkeys(k for r in records for k in r))
            table = pa.table({c: _to_arrow([r.get(c) for r in records]) for c in columns})
            return table, [r.get(f.text_column) for r in records]
        df = _read_csv(f, content)
        table = pa.table({str(c): _to_arrow(df[c].tolist()) for c in df.columns})
        return table, df[f.text_column].tolist() if f.text_column in df.columns else [None] * len(df)


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


def _read_csv(f: InputFile, content: str, nrows: Optional[int] = None):
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
