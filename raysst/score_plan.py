"""The scorer's plan: what is committed under the output, and which chunks of the input are still to score."""

from __future__ import annotations

import json
import re
from collections import Counter

from raysst.chunks import GRAIN, Chunk, auto_chunk_rows, plan_chunks, read_chunk, scan_layout
from raysst.config import Config
from raysst.corpus import list_input_files, scan_file
from raysst.formats import UnreadableFile
from raysst.score_workers import TMP_PREFIX, add_counts, count_statuses, text_status
from raysst.task import Task
from raysst.storage import filesystem, read_text, write_text

PLAN_FILE = "_plan.json"  # the chunk size the parts were cut with: a rerun must cut the same chunks
CALIBRATION_FILE = "_int8_calibration.json"  # the texts int8's scales came from: a rerun quantizes the same way
CALIBRATION_TEXTS = 256  # the corpus's own first texts: 8 generic sentences gave 96% agreement, not 99%
PART = re.compile(r"^part-(\d{5,})\.parquet$")  # matched to the whole name: `_tmp-...-part-00001.parquet` is none


def committed_parts(output: str) -> dict[str, dict[int, str]]:
    """{input rel: {chunk index: part path}} of the parts under `output` (temporary files are not parts)."""
    import pyarrow.fs as pafs

    fs, root = filesystem(output)
    uri = output.split("://")[0] + "://" if "://" in output else ""
    found: dict = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        directory, _, name = info.path[len(root) + 1:].rpartition("/")
        match = PART.match(name)
        if info.type != pafs.FileType.File or not match or directory.startswith(("_", ".")):
            continue
        found.setdefault(directory, {})[int(match.group(1))] = uri + info.path
    return found


def plan(cfg: Config, output: str) -> tuple[list[Chunk], dict, list[dict], list[str], dict, int]:
    """Chunks still to score, committed parts by file, files skipped as unreadable, files ignored, the
    encoding of each file not read as UTF-8, and the rows per chunk (`--chunk-rows`, else what an earlier
    run of this output chose, else chosen from the corpus's rows: auto_chunk_rows).

    Runs before any model loads: a missing text or id column fails here, naming the file and its columns.
    """
    files, ignored = list_input_files(cfg.input, exclude=output)
    done = committed_parts(output)
    rows = cfg.chunk_rows or recorded_chunk_rows(output)
    skipped: list[dict] = []

    def unless_unreadable(f, step, *args):  # None for a file skipped with --on-bad-file skip
        try:
            return step(*args)
        except UnreadableFile as e:
            if cfg.on_bad_file == "fail":
                raise
            skipped.append({"file": f.path, "error": str(e)})

    def scan(f):
        return scan_layout(scan_file(f, cfg.text_column, cfg.id_column, cfg.text_pair_column), rows or GRAIN)

    layouts = [layout for layout in (unless_unreadable(f, scan, f) for f in files) if layout]
    rows = rows or auto_chunk_rows(sum(layout.rows for layout in layouts))
    todo, decoded, resumed = [], {}, {}
    for layout in layouts:
        f = layout.file
        chunks = unless_unreadable(f, plan_chunks, layout, rows)
        if chunks is None:
            continue
        if f.encoding != "utf-8":
            decoded[f.rel] = f.encoding
        have = done.get(f.rel, {})
        if have:
            resumed[f.rel] = {c.index: have[c.index] for c in chunks if c.index in have}
        todo.extend(c for c in chunks if c.index not in have)
    return todo, resumed, skipped, ignored, decoded, rows


def recorded_chunk_rows(output: str) -> int:
    """The rows per chunk that an earlier run of `output` cut its parts with (0: none ran)."""
    try:
        return int(json.loads(read_text(f"{output}/{PLAN_FILE}"))["chunk_rows"])
    except (FileNotFoundError, OSError):
        return 0


def check_plan_file(output: str, chunk_rows: int) -> None:
    """Parts cut with another chunk size would overlap the new ones: refuse rather than duplicate rows."""
    before = recorded_chunk_rows(output)
    if not before:
        write_text(f"{output}/{PLAN_FILE}", json.dumps({"chunk_rows": chunk_rows}))
    elif before != chunk_rows:
        raise ValueError(f"{output}: its parts were cut with --chunk-rows {before}, not {chunk_rows}; rerun with "
                         f"--chunk-rows {before} (or without the flag) to resume, or use a new --output")


def calibration_texts(output: str, todo: list[Chunk], limit: int = CALIBRATION_TEXTS) -> list[str]:
    """The texts `--precision int8` measures its scales on: those an earlier run of `output` used, else the
    first `limit` scorable texts of the chunks still to score, recorded so that every actor, and a rerun
    after a kill, quantizes alike. The driver reads them, a chunk at a time, and keeps `limit` of them."""
    path = f"{output}/{CALIBRATION_FILE}"
    try:
        return json.loads(read_text(path))["texts"]
    except (FileNotFoundError, OSError):
        pass
    texts: list[str] = []
    for c in todo:
        try:
            _, values = read_chunk(c)
        except UnreadableFile:  # the pipeline fails or skips it, by --on-bad-file
            continue
        texts += [t for t, status in map(text_status, values) if status == "ok"][:limit - len(texts)]
        if len(texts) == limit:
            break
    write_text(path, json.dumps({"texts": texts}))
    return texts


def count_parts(parts: dict, task: Task) -> Counter:
    """Rows, statuses and labels of a file's committed parts (one part in memory at a time)."""
    import pyarrow.parquet as pq

    totals: Counter = Counter()
    columns = [c for c in ("label", "labels") if c in task.output_columns()]
    for path in parts.values():
        fs, p = filesystem(path)
        table = pq.read_table(p, columns=["status", *columns], filesystem=fs)
        add_counts(totals, {**count_statuses(table, task), "rows": table.num_rows})
    return totals


def remove_temporaries(output: str) -> None:
    """Half-written parts of a killed run (local output only: an object store shows no partial object)."""
    if "://" not in output:
        from pathlib import Path

        for stale in Path(output).rglob(f"{TMP_PREFIX}*"):
            stale.unlink()
