"""Files cut into chunks: the unit that scoring reads, scores, writes and resumes by.

A parquet chunk is a slice of at most `chunk_rows` rows of one row group. A csv/tsv/jsonl/txt chunk is a byte
range holding at most `chunk_rows` records, cut where a record ends: one streaming pass over the file (in
blocks, so memory does not grow with the file) finds those ends (for csv, newlines outside quotes) and the
file's encoding. A chunk reads only its own bytes (plus the csv header), so any worker can read any chunk.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raysst.corpus import open_input
from raysst.formats import InputFile, parse_text, reading, text_values

SCAN_BLOCK = 8 << 20  # bytes per read of the boundary scan
BOM = codecs.BOM_UTF8
GRAIN = 1_000  # records between the cuts a text scan keeps while the chunk size is still to be chosen
AUTO_CHUNKS = 64  # 4 chunks an actor up to 16 actors: actors that start late still get their share
MAX_AUTO_ROWS = 100_000


@dataclass(frozen=True)
class Chunk:
    """Rows [start, stop) of `row_group` (parquet), or bytes [start, stop) (text formats)."""

    file: InputFile
    index: int
    start: int
    stop: int
    row_group: int = -1
    first_row: int = 0  # rows of the file before this chunk (text formats: line numbers in errors)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> "Chunk":
        d = json.loads(text)
        return Chunk(**{**d, "file": InputFile(**d["file"])})


@dataclass(frozen=True)
class Layout:
    """What planning needs of one file: its rows, and for a text format the byte after every `grain`-th record."""

    file: InputFile
    rows: int
    grain: int = 0
    cuts: tuple = ()
    size: int = 0


def scan_layout(f: InputFile, grain: int) -> Layout:
    """One pass over a text file (none for parquet, whose footer counts its rows); raises UnreadableFile."""
    if f.fmt == "parquet":
        return Layout(f, f.num_rows or 0)
    with reading(f), open_input(f) as fh:
        encoding, bom, head, cuts, size, records = _scan_text(fh, f.fmt, grain)
    return Layout(dataclasses.replace(f, encoding=encoding, bom=bom, head=head), records, grain, tuple(cuts), size)


def auto_chunk_rows(total_rows: int) -> int:
    """Rows per chunk for `--chunk-rows 0`: the corpus in about AUTO_CHUNKS chunks, so no actor idles while
    another holds the only chunk, of 2 to 100 x GRAIN rows (a chunk is also the pool sorted by length to cut
    padding: a smaller one pads more)."""
    per_chunk = -(-total_rows // AUTO_CHUNKS)
    return GRAIN * min(max(-(-per_chunk // GRAIN), 2), MAX_AUTO_ROWS // GRAIN)


def plan_chunks(layout: Layout, chunk_rows: int) -> list[Chunk]:
    """A file's chunks, at least one (an empty file still gets its empty part); `chunk_rows` is a multiple of
    the layout's grain. Raises UnreadableFile."""
    f = layout.file
    if f.fmt == "parquet":
        return _parquet_chunks(f, chunk_rows)
    every = chunk_rows // layout.grain
    edges = [f.head, *layout.cuts[every - 1::every]]
    if edges[-1] < layout.size:
        edges.append(layout.size)
    if len(edges) == 1:
        edges.append(f.head)
    return [Chunk(f, i, a, b, first_row=i * chunk_rows) for i, (a, b) in enumerate(zip(edges, edges[1:]))]


def _parquet_chunks(f: InputFile, chunk_rows: int) -> list[Chunk]:
    import pyarrow.parquet as pq

    with reading(f), open_input(f) as fh:
        meta = pq.ParquetFile(fh).metadata
    chunks, first = [], 0
    for rg in range(meta.num_row_groups):
        n = meta.row_group(rg).num_rows
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            chunks.append(Chunk(f, len(chunks), start, stop, rg, first))
            first += stop - start
    return chunks or [Chunk(f, 0, 0, 0)]


def _scan_text(fh, fmt: str, chunk_rows: int) -> tuple[str, int, int, list[int], int, int]:
    """One pass: (encoding, BOM length, byte where rows start, cut offsets every chunk_rows records, size,
    records that end in a newline)."""
    decoders = {name: codecs.getincrementaldecoder(name)() for name in ("utf-8", "cp1252")}
    quoted = fmt == "csv"  # tsv is read with quoting off; jsonl and txt escape their newlines
    offset, bom, head, parity, records, cuts = 0, 0, None if fmt in ("csv", "tsv") else 0, 0, 0, []
    while True:
        block = fh.read(SCAN_BLOCK)
        if not block:
            break
        if offset == 0 and block.startswith(BOM):
            bom = len(BOM)
        for name, dec in list(decoders.items()):
            try:
                dec.decode(block[bom:] if offset == 0 else block)
            except UnicodeDecodeError:
                del decoders[name]
        arr = np.frombuffer(block, np.uint8)
        newlines = np.flatnonzero(arr == 10)
        if quoted:
            quotes = np.flatnonzero(arr == 34)
            inside = (parity + np.searchsorted(quotes, newlines)) % 2 == 1
            parity = (parity + len(quotes)) % 2
            newlines = newlines[~inside]
        ends = newlines + offset + 1
        if head is None and len(ends):
            head, ends = int(ends[0]), ends[1:]
        # Record n (1-based, counted after the header) ends a chunk when n % chunk_rows == 0.
        picks = np.flatnonzero((records + np.arange(1, len(ends) + 1)) % chunk_rows == 0)
        cuts.extend(int(e) for e in ends[picks])
        records += len(ends)
        offset += len(block)
    for name, dec in list(decoders.items()):
        try:
            dec.decode(b"", final=True)  # a multi-byte character cut off at the end
        except UnicodeDecodeError:
            del decoders[name]
    if fmt not in ("csv", "tsv"):
        head = bom
    return next(iter(decoders), "latin-1"), bom, offset if head is None else head, cuts, offset, records


def read_chunk(c: Chunk) -> tuple[pa.Table, list]:
    """A chunk's rows with all the file's columns, and the text column's raw values (None, numbers and all)."""
    import pyarrow.parquet as pq

    f = c.file
    with reading(f), open_input(f) as fh:
        if f.fmt == "parquet":
            pf = pq.ParquetFile(fh)
            if c.row_group < 0:
                table = pf.schema_arrow.empty_table()
            else:
                table = _rows_of_group(pf, c)
            return table, text_values(table.column(f.text_column))
        header = fh.read_at(f.head - f.bom, f.bom) if f.fmt in ("csv", "tsv") else b""
        body = fh.read_at(c.stop - c.start, c.start) if c.stop > c.start else b""
    return parse_text(f, (header + body).decode(f.encoding), first_line=c.first_row + 1)


def _rows_of_group(pf, c: Chunk) -> pa.Table:
    """Rows [start, stop) of a row group, streamed in batches so a big row group is not held whole."""
    batches, seen = [], 0
    for batch in pf.iter_batches(batch_size=max(c.stop - c.start, 1), row_groups=[c.row_group], use_threads=False):
        lo, hi = max(c.start - seen, 0), min(c.stop - seen, batch.num_rows)
        if hi > lo:
            batches.append(batch.slice(lo, hi - lo))
        seen += batch.num_rows
        if seen >= c.stop:
            break
    return pa.Table.from_batches(batches, pf.schema_arrow)
