"""The one reading layer, for corpora and training data: find files (local paths, globs, s3://, gs://, any
pyarrow filesystem), check their columns, and read them whatever their format or encoding.

Parquet, csv, tsv, jsonl and plain text (one document per line, column `text`); how bytes become rows is in
`raysst.formats`. A file that cannot be read raises `UnreadableFile` naming it; a missing column raises
`DataError` naming the file and its columns. Reading a file in chunks (bounded memory, the resume grain of
scoring) is in `raysst.chunks`.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import posixpath
from typing import Optional

import pyarrow as pa

from raysst.formats import (TXT_COLUMN, DataError, InputFile, decode, find_text_column, parse_jsonl, parse_text,
                            read_csv, reading, text_values)
from raysst.storage import filesystem

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl",
           ".json": "jsonl", ".txt": "txt"}
SCAN_RECORDS = 1000  # jsonl: the up-front column check looks at the keys of this many records


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


def open_input(f: InputFile):
    """A random-access pyarrow file for an input file, local or behind a URI."""
    fs, path = filesystem(f.path)
    return fs.open_input_file(path)


def file_columns(f: InputFile) -> tuple[list, Optional[int]]:
    """A file's column names (and, for parquet, its row count) without reading its rows."""
    import pyarrow.parquet as pq

    with reading(f), open_input(f) as fh:
        if f.fmt == "parquet":
            meta = pq.ParquetFile(fh).metadata
            return meta.schema.to_arrow_schema().names, meta.num_rows
        if f.fmt in ("csv", "tsv"):
            return list(read_csv(f, decode(_first_lines(fh, 1))[0], nrows=0).columns), None
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


def scan_file(f: InputFile, text_column: Optional[str] = None, id_column: Optional[str] = None,
              pair_column: Optional[str] = None) -> InputFile:
    """Check a file's columns without reading its rows; returns it with its text column (and parquet row count)."""
    columns, num_rows = file_columns(f)
    text = TXT_COLUMN if f.fmt == "txt" else find_text_column(columns, f.path, text_column)
    for name, what in ((id_column, "id"), (pair_column, "text pair")):
        if name and name not in columns:
            raise DataError(f"{f.path}: no {what} column {name!r}; columns are {columns}")
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

    with reading(f), open_input(f) as fh:
        if f.fmt == "parquet":
            table = pq.read_table(fh)
            values = text_values(table.column(f.text_column)) if f.text_column in table.column_names else []
            return table, values, "utf-8"
        content, encoding = decode(fh.read())
    return (*parse_text(f, content), encoding)

