"""Batch scoring on a real local Ray with a tiny random BERT: bad rows, bad files, resume, the job's command line."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysst.config import Config
from raysst.corpus import list_input_files, read_text, scan_file
from raysst.formats import DataError, decode
from raysst.score import SUMMARY_FILE, read_scored, score_driver_fn
from raysst.score_plan import CALIBRATION_FILE

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 16  # short enough that some SST-2 sentences are truncated
LATIN1 = ["un film très réussi , plein de charme", "naïve et déçu", "café crème à la française"]


@pytest.fixture(scope="module")
def scoring_model(tmp_path_factory) -> str:
    """A tiny BERT whose random head gives both labels (the default init scores every text ~0.5)."""
    import torch

    from raysst.models import make_random_model

    torch.manual_seed(0)
    return make_random_model(str(tmp_path_factory.mktemp("scoring_model")), hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                             initializer_range=0.5)


def _sentences(sst2_small: Path) -> list[str]:
    return pd.read_parquet(sst2_small / "validation.parquet").sentence.tolist()


def make_corpus(root: Path, sst2_small: Path) -> dict:
    """Files of every supported format and kind of bad row; returns {rel: [(text or None, status), ...]}."""
    s = _sentences(sst2_small)
    expect: dict = {}
    root.mkdir(parents=True)
    a = pd.read_parquet(sst2_small / "validation.parquet").head(40)
    texts = a.sentence.tolist()
    texts[3], texts[7], texts[8] = None, "", "   \t"
    a["sentence"] = pd.Series(texts, dtype=object)
    a.to_parquet(root / "a.parquet")  # has SST-2's own `label`: kept as `input_label`
    expect["a.parquet"] = [(t, "null_input" if t is None else "empty_input" if not t.strip() else "ok")
                           for t in texts]
    (root / "nested").mkdir()
    # Same columns, other types: `idx` is text here, `label` is all null (Arrow type null).
    pq.write_table(pa.table({"sentence": pa.array(s[40:60]), "idx": pa.array([f"id-{i}" for i in range(20)]),
                             "label": pa.nulls(20)}), root / "nested" / "b.parquet")
    expect["nested/b.parquet"] = [(t, "ok") for t in s[40:60]]
    pq.write_table(pa.table({"sentence": pa.nulls(5)}), root / "nested" / "all_null.parquet")
    expect["nested/all_null.parquet"] = [(None, "null_input")] * 5
    pq.write_table(pa.table({"sentence": pa.array([7, 8], pa.int64())}), root / "numbers.parquet")
    expect["numbers.parquet"] = [(None, "non_string_input")] * 2
    # Not UTF-8: a latin-1 csv, and latin-1 bytes in a binary parquet column.
    csv_rows = LATIN1 + s[60:70]
    (root / "c.csv").write_bytes(("sentence,idx\n" + "".join(f'"{t}",{i}\n' for i, t in enumerate(csv_rows))
                                  + ",99\n").encode("latin-1"))
    expect["c.csv"] = [(t, "ok") for t in csv_rows] + [(None, "null_input")]
    pq.write_table(pa.table({"sentence": pa.array([t.encode("latin-1") for t in LATIN1], pa.binary())}),
                   root / "binary.parquet")
    expect["binary.parquet"] = [(t, "ok") for t in LATIN1]
    jsonl = [{"text": s[70]}, {"text": 5}, {"other": "no text key"}, {"text": None}, {"text": ["a"]}, {"text": s[71]}]
    (root / "d.jsonl").write_text("\n".join(json.dumps(r) for r in jsonl) + "\n")
    expect["d.jsonl"] = [(s[70], "ok"), (None, "non_string_input"), (None, "null_input"), (None, "null_input"),
                         (None, "non_string_input"), (s[71], "ok")]
    (root / "e.txt").write_text(f"{s[72]}\n\n{s[73]}\r\n")
    expect["e.txt"] = [(s[72], "ok"), (None, "empty_input"), (s[73], "ok")]
    (root / "empty.csv").write_text("sentence,idx\n")
    expect["empty.csv"] = []
    # Bad files: one caught by the up-front check, one only when its rows are read.
    (root / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    (root / "ragged.csv").write_text('sentence,idx\n"fine",1\n"unterminated,2\n')
    (root / "notes.md").write_text("ignored: not a format the job reads")
    (root / "_SUCCESS").write_text("")
    return expect


def _direct_probs(model_dir: str, texts: list[str]) -> np.ndarray:
    """prob_positive from a plain forward pass of the model, no Ray, no length sorting."""
    import torch

    from hf_reference import collate
    from raysst.models import load_classifier, load_tokenizer

    model, tok = load_classifier(model_dir).eval(), load_tokenizer(model_dir)
    with torch.inference_mode():
        return model(**collate(tok, texts, MAX_LEN)).logits.softmax(-1)[:, 1].numpy()


@pytest.fixture(scope="module")
def scored(tmp_path_factory, scoring_model, sst2_small, ray_local):
    """One skip-mode run over the whole bad corpus (shared by the tests below: each run costs an actor start)."""
    root = tmp_path_factory.mktemp("score")
    expect = make_corpus(root / "in", sst2_small)
    cfg = Config(model=scoring_model, input=str(root / "in"), output=str(root / "out"), on_bad_file="skip",
                 max_seq_length=MAX_LEN, eval_batch_size=8, num_actors=2, long_text="truncate")
    return cfg, expect, score_driver_fn(cfg)


def test_every_input_row_is_scored_once_with_its_status(scored):
    cfg, expect, summary = scored
    n_rows = sum(map(len, expect.values()))
    assert summary["rows_in"] == summary["rows_out"] == summary["rows_scored_this_run"] == n_rows
    assert len(read_scored(cfg.output)) == n_rows
    statuses = {}
    for rel, rows in expect.items():
        part = read_scored(f"{cfg.output}/{rel}")
        got = part.status.tolist()
        want = ["truncated" if st == "ok" and _n_tokens(cfg.model, t) > MAX_LEN else st for t, st in rows]
        assert got == want, rel
        for st in got:
            statuses[st] = statuses.get(st, 0) + 1
        invalid = part.status.isin(["null_input", "empty_input", "non_string_input"])
        assert part.label[invalid].isna().all() and part.score[invalid].isna().all()
        assert part.label[~invalid].isin(["negative", "positive"]).all()
    assert statuses["truncated"] > 0 and summary["status_counts"] == {k: statuses.get(k, 0) for k in
                                                                      summary["status_counts"]}
    assert summary["files_read"] == len(expect) and summary["files_ignored"][0].endswith("notes.md")
    skipped = {Path(s["file"]).name: s["error"] for s in summary["files_skipped"]}
    assert set(skipped) == {"broken.parquet", "ragged.csv"}
    assert "broken.parquet" in skipped["broken.parquet"] and "ragged.csv" in skipped["ragged.csv"]
    assert summary["files_decoded"] == {"c.csv": "cp1252"}
    assert json.loads((Path(cfg.output) / SUMMARY_FILE).read_text()) == summary


@functools.lru_cache
def _tokenizer(model_dir: str):
    from raysst.models import load_tokenizer

    return load_tokenizer(model_dir)


def _n_tokens(model_dir: str, text: str) -> int:
    return len(_tokenizer(model_dir)(text)["input_ids"])


def test_labels_equal_a_direct_forward_pass(scored):
    cfg, expect, _ = scored
    texts, labels, probs = [], [], []
    for rel, rows in expect.items():
        part = read_scored(f"{cfg.output}/{rel}")
        for (text, _), label, p in zip(rows, part.label, part.prob_positive):
            if text is not None and text.strip():
                texts.append(text)
                labels.append(label)
                probs.append(p)
    direct = _direct_probs(cfg.model, texts)
    np.testing.assert_allclose(probs, direct, atol=1e-4)  # batches padded differently: float noise only
    assert labels == ["positive" if p > 0.5 else "negative" for p in direct]
    assert {"positive", "negative"} <= set(labels)  # the comparison means something
    out = read_scored(cfg.output)
    assert "input_label" in out.columns and "sentence" in out.columns and "text" in out.columns
    assert np.allclose(out.score.dropna(), np.maximum(out.prob_positive.dropna(), 1 - out.prob_positive.dropna()))


def test_rerun_after_interruption_gives_one_row_per_input_row(scored):
    cfg, expect, first = scored
    out = Path(cfg.output)
    # An interrupted run leaves some files unwritten and, at worst, a half-written temporary part.
    (out / "nested" / "b.parquet" / "part-00000.parquet").unlink()
    (out / "d.jsonl" / "part-00000.parquet").unlink()
    (out / "nested" / "b.parquet" / "_tmp-deadbeef-part-00000.parquet").write_bytes(b"PAR1 half a file")
    summary = score_driver_fn(cfg.replace(num_actors=1))
    assert summary["files_resumed"] == len(expect) - 2 and summary["files_read"] == 2
    assert summary["rows_scored_this_run"] == len(expect["nested/b.parquet"]) + len(expect["d.jsonl"])
    assert summary["rows_out"] == first["rows_out"] and summary["status_counts"] == first["status_counts"]
    assert len(read_scored(cfg.output)) == first["rows_out"]
    assert not list(out.rglob("_tmp-*"))
    # Finished parts were not rewritten.
    assert summary["label_counts"] == first["label_counts"]


def test_auto_chunks_split_a_small_corpus_for_every_actor_and_a_rerun_keeps_them(tmp_path):
    """--chunk-rows 0 (the default) cuts ~64 chunks of 2,000 to 100,000 rows, from the corpus's row count: one
    file of 20,000 rows is 10 chunks, not one chunk for one actor while the others idle. A text file scanned
    before the size is chosen gets the same byte ranges as one scanned at that size, and a rerun reads the
    size back from _plan.json rather than choosing again."""
    from raysst.chunks import auto_chunk_rows
    from raysst.score_plan import PLAN_FILE, check_plan_file, plan

    assert [auto_chunk_rows(n) for n in (0, 20_000, 1_000_000, 4_000_000, 10**9)] == [2_000, 2_000, 16_000,
                                                                                      63_000, 100_000]
    (tmp_path / "in").mkdir()
    texts = [f"phrase number {i}, \"quoted\"\nacross a line" if i % 7 == 0 else f"phrase {i}" for i in range(20_000)]
    pd.DataFrame({"sentence": texts}).to_csv(tmp_path / "in" / "a.csv", index=False)
    pq.write_table(pa.table({"sentence": texts[:5_000]}), tmp_path / "in" / "b.parquet", row_group_size=3_000)
    out = str(tmp_path / "out")
    auto = plan(Config(input=str(tmp_path / "in"), output=out), out)
    todo, rows = auto[0], auto[-1]
    assert rows == 2_000  # 25,000 rows / 64, at least 2,000
    by_file = {rel: [c for c in todo if c.file.rel == rel] for rel in ("a.csv", "b.parquet")}
    assert len(by_file["a.csv"]) == 10 and len(by_file["b.parquet"]) == 3  # row groups of 3,000 (2 chunks) and 2,000
    explicit = plan(Config(input=str(tmp_path / "in"), output=out, chunk_rows=2_000), out)[0]
    assert [(c.file.rel, c.start, c.stop, c.row_group) for c in todo] == \
        [(c.file.rel, c.start, c.stop, c.row_group) for c in explicit]
    check_plan_file(out, rows)
    assert json.loads((tmp_path / "out" / PLAN_FILE).read_text()) == {"chunk_rows": 2_000}
    pd.DataFrame({"sentence": texts * 10}).to_csv(tmp_path / "in" / "c.csv", index=False)  # 225,000 rows now
    assert plan(Config(input=str(tmp_path / "in"), output=out), out)[-1] == 2_000  # the first run's size
    with pytest.raises(ValueError, match=r"cut with --chunk-rows 2000, not 5000; rerun with --chunk-rows 2000"):
        check_plan_file(out, plan(Config(input=str(tmp_path / "in"), output=out, chunk_rows=5_000), out)[-1])


def test_unreadable_file_fails_naming_it(tmp_path, scoring_model, sst2_small, ray_local):
    (tmp_path / "in").mkdir()
    pd.read_parquet(sst2_small / "validation.parquet").head(5).to_parquet(tmp_path / "in" / "good.parquet")
    (tmp_path / "in" / "ragged.csv").write_text('sentence\n"fine"\n"unterminated\n')
    cfg = Config(model=scoring_model, input=str(tmp_path / "in"), output=str(tmp_path / "out"), num_actors=1)
    with pytest.raises(DataError, match=r"ragged\.csv: could not be read as csv"):
        score_driver_fn(cfg)
    (tmp_path / "in" / "ragged.csv").unlink()
    (tmp_path / "in" / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"broken\.parquet: could not be read as parquet"):
        score_driver_fn(cfg)  # found by the up-front check, before any model loads


@pytest.mark.timeout(240)
def test_int8_scores_every_row_like_fp32(tmp_path, scoring_model, sst2_small, ray_local):
    """--precision int8 over 500 SST-2 rows: one row out per row in, fp32's statuses, and (almost) its labels."""
    import hashlib

    from raysst.models import INT8_DYNAMIC

    rows = pd.read_parquet(sst2_small / "train.parquet").head(500).reset_index(drop=True)  # a seeded sample
    texts = rows.sentence.tolist()
    texts[5], texts[9] = None, "  "
    rows["sentence"] = pd.Series(texts, dtype=object)
    rows.to_parquet(tmp_path / "in.parquet")
    weights = sorted(Path(scoring_model).glob("*.safetensors"))
    saved = [hashlib.sha256(w.read_bytes()).hexdigest() for w in weights]
    cfg = Config(model=scoring_model, input=str(tmp_path / "in.parquet"), max_seq_length=MAX_LEN,
                 eval_batch_size=8, num_actors=1)
    out, dtypes = {}, {}
    for precision in ("fp32", "int8"):
        summary = score_driver_fn(cfg.replace(precision=precision, output=str(tmp_path / precision)))
        assert summary["rows_in"] == summary["rows_out"] == 500
        dtypes[precision] = summary["hardware"]["dtype"]
        out[precision] = read_scored(str(tmp_path / precision)).sort_values("idx").reset_index(drop=True)
    assert dtypes == {"fp32": "float32", "int8": INT8_DYNAMIC}
    fp32, int8 = out["fp32"], out["int8"]
    assert int8.idx.tolist() == rows.idx.sort_values().tolist()
    assert int8.status.tolist() == fp32.status.tolist()
    assert {"ok", "null_input", "empty_input", "truncated"} <= set(int8.status)
    assert not np.allclose(int8.prob_positive.dropna(), fp32.prob_positive.dropna())  # it did quantize
    # This random tiny model puts a few rows within a hair of 0.5, where int8's rounding flips a label on
    # some batchings and not others; rows fp32 scores at least 0.05 away from a tie agree on 97-99%.
    clear = (fp32.prob_positive - 0.5).abs() > 0.05
    assert clear.mean() > 0.9
    assert (int8.label == fp32.label)[clear].mean() >= 0.95
    assert [hashlib.sha256(w.read_bytes()).hexdigest() for w in weights] == saved  # quantized in memory only
    # The scales came from the corpus's own first scorable texts, recorded for a rerun to reuse.
    calibration = json.loads((tmp_path / "int8" / CALIBRATION_FILE).read_text())["texts"]
    assert calibration == [t for t in texts if isinstance(t, str) and t.strip()][:256]


def test_smoothed_int8_keeps_the_sentence_vector_of_a_real_bert(sst2_small):
    """On the packaged MiniLM's real weights, whose hidden states carry outlier channels, the [CLS] vector
    that the classifier reads drifts far less from fp32 under raysst's int8 than under plain quantize_dynamic,
    on sentences other than the calibration ones."""
    import copy

    import torch
    from torch.ao.quantization import quantize_dynamic

    from raysst.config import PACKAGED_MINILM
    from raysst.models import load_classifier, load_tokenizer, resolve_model
    from raysst.quantize import quantize_int8

    path = resolve_model(PACKAGED_MINILM)
    tok = load_tokenizer(path)
    texts = pd.read_parquet(sst2_small / "train.parquet").sentence.tolist()[:192]
    calibration = [dict(tok(texts[i:i + 64], padding=True, return_tensors="pt")) for i in (0, 64)]
    held_out = dict(tok(texts[128:], padding=True, return_tensors="pt"))
    fp32 = load_classifier(path).eval()

    def cls_vectors(model):
        with torch.inference_mode():
            return model.bert(**held_out).last_hidden_state[:, 0]

    ref = cls_vectors(fp32)
    error = {name: float((cls_vectors(m) - ref).norm() / ref.norm()) for name, m in (
        ("plain", quantize_dynamic(copy.deepcopy(fp32), {torch.nn.Linear}, dtype=torch.qint8)),
        ("uncalibrated", quantize_int8(copy.deepcopy(fp32), [])),
        ("smoothed", quantize_int8(copy.deepcopy(fp32), calibration)))}
    # Measured: plain 0.25, per-channel full-range weights without smoothing 0.10, smoothed 0.06.
    assert error["smoothed"] < error["uncalibrated"] < error["plain"]
    assert error["smoothed"] < error["plain"] / 3, error


def test_int8_is_for_cpu_scoring_and_evaluation_only():
    from raysst.config import EVAL, SCORE, TRAIN, TUNE
    from raysst.cli import parse_config
    from raysst.train import train_driver_fn
    from raysst.tune import tune_driver_fn

    for job in (SCORE, EVAL):
        assert parse_config(job, ["--precision", "int8"]).precision == "int8"
        with pytest.raises(SystemExit):
            parse_config(job, ["--precision", "int8", "--use-gpu"])
    with pytest.raises(ValueError, match="--precision int8 quantizes for CPUs and cannot run with --use-gpu"):
        Config(precision="int8", use_gpu=True)
    for job, driver in ((TRAIN, train_driver_fn), (TUNE, tune_driver_fn)):
        with pytest.raises(SystemExit):
            parse_config(job, ["--precision", "int8"])
        with pytest.raises(ValueError, match=f"{job} cannot use --precision int8: it is for scoring"):
            driver(Config(precision="int8"))  # before Ray starts or any data loads


def test_missing_text_column_fails_before_the_model_loads(tmp_path, sst2_small):
    (tmp_path / "in").mkdir()
    pd.DataFrame({"review": ["great"], "idx": [1]}).to_csv(tmp_path / "in" / "r.csv", index=False)
    (tmp_path / "empty_model").mkdir()  # loading this would fail with a transformers error instead
    cfg = Config(model=str(tmp_path / "empty_model"), input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    columns = r"columns are \['review', 'idx'\]"
    with pytest.raises(DataError, match=r"r\.csv: no text column 'sentence' or 'text'; " + columns):
        score_driver_fn(cfg)
    with pytest.raises(DataError, match=r"r\.csv: no text column 'body'"):
        score_driver_fn(cfg.replace(text_column="body"))
    with pytest.raises(DataError, match=r"r\.csv: no id column 'id'; " + columns):
        score_driver_fn(cfg.replace(text_column="review", id_column="id"))
    assert not (tmp_path / "out").exists()


def test_input_forms_and_encodings(tmp_path, sst2_small):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("x.parquet", "sub/y.parquet"):
        pd.read_parquet(sst2_small / "validation.parquet").head(3).to_parquet(tmp_path / "d" / name)
    (tmp_path / "d" / "z.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    files, ignored = list_input_files(str(tmp_path / "d"))
    assert [f.rel for f in files] == ["sub/y.parquet", "x.parquet", "z.txt"] and ignored == []
    assert [f.rel for f in list_input_files(str(tmp_path / "d" / "**" / "*.parquet"))[0]] == ["sub/y.parquet",
                                                                                             "x.parquet"]
    single = list_input_files(str(tmp_path / "d" / "z.txt"))[0]
    assert [f.rel for f in single] == ["z.txt"] and read_text(single[0]) == ["café"]
    assert decode("naïve".encode("utf-8")) == ("naïve", "utf-8") and decode(b"\x81\xe9")[1] == "latin-1"
    (tmp_path / "bom.csv").write_bytes("\ufeffsentence,idx\nnaïve,1\n".encode("utf-8"))  # as Excel writes it
    bom = scan_file(list_input_files(str(tmp_path / "bom.csv"))[0][0])
    assert bom.text_column == "sentence" and read_text(bom) == ["naïve"]
    assert scan_file(files[1]).num_rows == 3
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_input_files(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="unsupported format"):
        (tmp_path / "a.xlsx").write_text("x")
        list_input_files(str(tmp_path / "a.xlsx"))


def test_job_command_line_end_to_end(tmp_path, scoring_model, sst2_small):
    (tmp_path / "in").mkdir()
    pd.read_parquet(sst2_small / "validation.parquet").to_parquet(tmp_path / "in" / "val.parquet")
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT)}  # its own Ray, not the test's
    proc = subprocess.run([sys.executable, "jobs/score.py", "--model", scoring_model, "--input",
                           str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--batch-size", "16",
                           "--id-column", "idx", "--chunk-rows", "40"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[raysst] score: 101 rows in" in proc.stdout
    out = read_scored(str(tmp_path / "out"))
    assert len(out) == 101 and out.idx.tolist() == list(range(101)) and out.status.eq("ok").all()
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert summary["rows_out"] == 101
    # No sizing flags: one single-threaded actor per CPU of the job's own local Ray (all of this machine's cores;
    # its 3 chunks are more than the CPUs here).
    hw = summary["hardware"]
    assert hw["model_actors"] == hw["cluster"]["CPU"] == os.cpu_count() and hw["cpus_per_actor"] == 1
    assert sum(hw["rows_by_actor_device"].values()) == 101
    assert all(name.startswith("CPU (") and "1 thread(s)" in name for name in hw["rows_by_actor_device"])
