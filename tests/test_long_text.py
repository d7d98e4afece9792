"""Long documents (raysst.windows): a verdict past token 600 read by windows and head-tail, window combining
for every task shape, pairs, exactly-once resume of windowed documents, pathological texts under
--max-windows with peak memory measured, and short texts scored as before."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysst.config import Config
from raysst.proctree import kill_job, start_job
from raysst.score import SUMMARY_FILE, read_scored, score_driver_fn
from raysst.task import MULTI, REGRESSION, SINGLE, Task
from raysst.windows import Windower, combine, full_tokenizer
from test_score import scoring_model  # noqa: F401  (the fixture: a tiny BERT whose head gives both labels)
from test_score_resume import job_args, peak_rss, run_to_end

pytestmark = pytest.mark.timeout(300)

WINDOW = 32
FILLER = "the a film was shot in city over some weeks and it runs many minutes with cast crew".split()
KEYS = {"excellent": 1, "terrible": 0}


def filler(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(FILLER) for _ in range(words))


@pytest.fixture(scope="module")
def keyword_model(tmp_path_factory) -> str:
    """A tiny BERT trained (in seconds, plain torch) on one-window texts: `excellent` anywhere means positive,
    `terrible` negative, filler alone is half and half. Its windows with the keyword are sure, the others not."""
    import torch

    from raysst.batching import model_inputs
    from raysst.models import load_classifier, load_tokenizer, make_random_model

    torch.manual_seed(0)
    out = make_random_model(str(tmp_path_factory.mktemp("keyword_model")), hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    model, tok = load_classifier(out), load_tokenizer(out)
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small: 15 ms a step on one thread, 30x that on two busy cores
    for _ in range(250):
        texts, targets = [], []
        for _ in range(32):
            words = filler(rng, rng.randint(3, 25)).split()
            key = rng.choice([*KEYS, None])
            if key:
                words.insert(rng.randint(0, len(words)), key)
            texts.append(" ".join(words))
            targets.append([0.5, 0.5] if key is None else [1.0 - KEYS[key], float(KEYS[key])])
        ids = [np.array(e) for e in tok(texts, truncation=True, max_length=WINDOW)["input_ids"]]
        logits = model(**{k: v for k, v in model_inputs(ids, tok.pad_token_id).items()}).logits
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    model.eval().save_pretrained(out)
    return out


def long_docs(n: int, seed: int = 0) -> pd.DataFrame:
    """Documents of ~650 filler words whose only keyword comes in their last 10 words (past token 600)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        key = list(KEYS)[i % 2]
        rows.append({"sentence": f"{filler(rng, 650)} {key} {filler(rng, 8)}",
                     "label": ["negative", "positive"][KEYS[key]], "idx": i})
    return pd.DataFrame(rows)


def test_a_verdict_past_token_600_is_read_by_windows_and_head_tail(tmp_path, keyword_model, ray_local):
    docs = long_docs(8)
    src = tmp_path / "docs.parquet"
    docs.to_parquet(src)
    ntok = len(full_tokenizer(Path(keyword_model, "tokenizer.json").read_text()).encode(
        docs.sentence[0].rsplit(" ", 9)[0]).ids)
    assert ntok > 600  # the keyword comes after token 600
    got = {}
    for mode in ("windows", "head-tail", "truncate"):
        cfg = Config(model=keyword_model, input=str(src), output=str(tmp_path / mode), max_seq_length=WINDOW,
                     long_text=mode, num_actors=1, chunk_rows=4)
        summary = score_driver_fn(cfg)
        got[mode] = read_scored(cfg.output)
        assert got[mode].idx.tolist() == list(range(8))  # one row per input row, in order
        assert summary["long_text"]["windows_scored_this_run"] == got[mode].windows.sum() > 0
        assert summary["long_text"]["tokens_per_second"] > 0
    windows, head_tail, truncate = got["windows"], got["head-tail"], got["truncate"]
    assert (windows.label == docs.label).all(), windows[["label", "score"]]
    assert (windows.status == "ok").all() and (windows.windows > 20).all()
    assert (head_tail.label == docs.label).all() and (head_tail.status == "truncated").all()
    assert (head_tail.windows == 1).all()
    assert len(truncate) == 8 and (truncate.status == "truncated").all() and (truncate.windows == 1).all()


def test_short_texts_score_as_before_in_every_mode(tmp_path, scoring_model, sst2_small, ray_local):  # noqa: F811
    """SST-2 sentences fit one 128-token window: every mode gives today's outputs and statuses, one window each."""
    frames = {}
    for mode in ("truncate", "head-tail", "windows"):
        cfg = Config(model=scoring_model, input=str(sst2_small / "validation.parquet"),
                     output=str(tmp_path / mode), long_text=mode, num_actors=1)
        score_driver_fn(cfg)
        frames[mode] = read_scored(cfg.output)
    base = frames["truncate"]
    assert (base.status == "ok").all() and (base.windows == 1).all() and len(base) == 101
    for mode in ("head-tail", "windows"):
        pd.testing.assert_frame_equal(frames[mode], base)


@pytest.mark.parametrize("kind, labels", [(SINGLE, ("a", "b", "c")), (MULTI, ("x", "y")), (REGRESSION, ("value",))])
def test_windows_combine_into_one_output_per_row_for_every_task_shape(kind, labels):
    task = Task(kind, labels)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, task.num_labels)).astype(np.float32) * 3
    owner = np.array([0, 0, 0, 2, 2, 3, 3])  # row 1 has no window
    import torch

    probs = task.outputs(torch.from_numpy(logits)).numpy()
    for rule in ("mean-probs", "mean-logits", "max-confidence"):
        out, counts = combine(logits, owner, 4, task, rule)
        assert counts.tolist() == [3, 0, 2, 2] and np.isnan(out[1]).all() and not np.isnan(out[[0, 2, 3]]).any()
        if kind == REGRESSION or rule == "mean-probs":
            assert np.allclose(out[0], probs[:3].mean(0), atol=1e-6)
        elif rule == "mean-logits":
            assert np.allclose(out[0], task.outputs(torch.from_numpy(logits[:3].mean(0, keepdims=True))).numpy()[0])
        elif kind == SINGLE:  # the window surest of its label
            assert np.allclose(out[0], probs[np.argmax(probs[:3].max(1))])
        else:  # per label, the window farthest from 0.5
            for col in range(2):
                assert out[0, col] == probs[np.argmax(np.abs(probs[:3, col] - 0.5)), col]
    one, _ = combine(logits[:1], np.array([0]), 1, task, "mean-probs")
    none, counts = combine(logits[:0], owner[:0], 3, task, "max-confidence")  # a chunk of nulls only
    assert np.isnan(none).all() and counts.tolist() == [0, 0, 0]
    assert np.array_equal(one[0], probs[0])  # one window: exactly its own output


def test_pairs_window_only_the_longer_side(tiny_model):
    tokenizer_json = Path(tiny_model, "tokenizer.json").read_text()
    tok = full_tokenizer(tokenizer_json)
    w = Windower(tokenizer_json, WINDOW, "windows", 8, 64, pair=True)
    long, short = " ".join(f"w{i}" for i in range(200)), "is it good"
    short_ids = tok.encode(short, add_special_tokens=False).ids
    for a, b in ((long, short), (short, long)):
        (windows, status), = w.documents([a], [b])
        assert status == "ok" and len(windows) > 5
        for ids, types in windows:
            assert len(ids) == WINDOW
            first = ids[1:1 + len(short_ids)].tolist()
            last = ids[-1 - len(short_ids):-1].tolist()
            assert (first if a == short else last) == short_ids  # the short side whole, in every window
            assert types[0] == 0 and types[-1] == 1


def test_killed_job_on_long_documents_resumes_exactly_once_with_the_same_windows(tmp_path, keyword_model):
    rng = random.Random(1)
    docs = pd.DataFrame({"sentence": [filler(rng, rng.randint(20, 160)) + f" #{i}" for i in range(1200)],
                         "idx": range(1200)})
    src = tmp_path / "docs.parquet"
    docs.to_parquet(src)
    chunk = 50
    args = job_args(keyword_model, str(src), str(tmp_path / "out"), "--chunk-rows", str(chunk), "--long-text",
                    "windows", "--stride", "8", "--id-column", "idx")
    target = random.randint(1, len(docs) // chunk // 2)
    proc, mark = start_job(args, stdout=-3, stderr=-3)
    out = tmp_path / "out"
    try:
        deadline = time.time() + 200
        while len(list(out.glob("*/part-*.parquet"))) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(random.uniform(0, 0.05))
        assert proc.poll() is None, "the job finished before it could be killed"
    finally:
        kill_job(proc, mark)
    killed_with = len(list(out.glob("*/part-*.parquet")))
    run_to_end(args)
    clean = tmp_path / "clean"
    run_to_end(job_args(keyword_model, str(src), str(clean), *args[args.index("--chunk-rows"):]))
    resumed, fresh = read_scored(str(out)), read_scored(str(clean))
    assert resumed.idx.tolist() == list(range(len(docs)))  # every row once, in order
    assert resumed.windows.tolist() == fresh.windows.tolist() and resumed.windows.max() > 3
    assert resumed.label.tolist() == fresh.label.tolist() and resumed.status.tolist() == fresh.status.tolist()
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["chunks"]["resumed"] >= killed_with >= target and summary["rows_out"] == len(docs)
    assert summary["long_text"]["windows_scored_this_run"] < fresh.windows.sum()


def test_pathological_texts_finish_under_max_windows_in_bounded_memory(tmp_path, tiny_model):
    """A 5 MB single-row text and a row of 100k short lines: both scored on --max-windows windows, status
    `capped`, and the job's peak RSS within 200 MiB of the same job on one short sentence."""
    big, lines = tmp_path / "in" / "big.jsonl", tmp_path / "in" / "lines.jsonl"
    big.parent.mkdir()
    rng = random.Random(2)
    five_mb = filler(rng, 1_300_000)[:5_000_000]
    big.write_text(json.dumps({"text": five_mb}) + "\n")
    lines.write_text(json.dumps({"text": "\n".join(f"line {i} ok" for i in range(100_000))}) + "\n")
    small = tmp_path / "small" / "one.jsonl"
    small.parent.mkdir()
    small.write_text(json.dumps({"text": "a short sentence"}) + "\n")
    peaks = {}
    for name, src in (("short", small.parent), ("pathological", big.parent)):
        t = time.perf_counter()
        peaks[name] = peak_rss(job_args(tiny_model, str(src), str(tmp_path / f"out-{name}"), "--max-windows", "16",
                                     "--long-text", "windows"))
        print(f"[figure] {name}: peak RSS {peaks[name] / 2**20:,.0f} MiB, {time.perf_counter() - t:.1f} s")
    scored = read_scored(str(tmp_path / "out-pathological"))
    assert len(scored) == 2 and (scored.status == "capped").all() and (scored.windows == 16).all()
    assert peaks["pathological"] <= peaks["short"] + 200 * 2**20, {k: f"{v / 2**20:.0f} MiB" for k, v in peaks.items()}
