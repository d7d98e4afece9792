"""Long documents (issue 31): accuracy of `--long-text truncate|head-tail|windows` and of each `--combine` rule
on documents built from SST-2 validation sentences, by where the opinion sits, against the same model on the
opinion sentences alone; and the tokens/s of windows against short sentences.

    python bench/bench_long.py accuracy --model runs/sst2-local/model [--docs 2000]
    python bench/bench_long.py speed --model runs/sst2-local/model [--docs 500]

Documents: 3 to 5 validation sentences of one polarity, with plain factual filler before them (`last`), after
them (`first`) or between them (`spread`), 300 to 1,000 tokens in all (seeded). Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from raysst.config import Config  # noqa: E402
from raysst.score import read_scored, score_driver_fn  # noqa: E402

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
PLACES = ("first", "last", "spread")
CITIES = ("Toronto", "Prague", "Lyon", "Osaka", "Denver", "Glasgow", "Perth", "Bilbao")
FACTS = ("The film was shot in {city} over {n} weeks in {year}.", "Its running time is {n} minutes.",
         "The production used {n} sets built in {city}.", "Principal photography began in {year}.",
         "The screenplay went through {n} drafts before filming.", "It was released in {n} countries in {year}.",
         "The score was recorded in {city} with an orchestra of {n} players.",
         "The distributor opened it on {n} screens.", "Casting took place in {city} in {year}.",
         "The crew numbered about {n} people.")


def filler(rng: np.random.Generator, words: int) -> list[str]:
    out, count = [], 0
    while count < words:
        s = FACTS[rng.integers(len(FACTS))].format(city=CITIES[rng.integers(len(CITIES))],
                                                   n=int(rng.integers(2, 400)), year=int(rng.integers(1960, 2024)))
        out.append(s)
        count += len(s.split())
    return out


def build_docs(n: int, seed: int = 0) -> pd.DataFrame:
    """n documents: text, gold label (0/1), where the opinion sits, and the opinion sentences alone."""
    val = pd.read_parquet(SST2 / "validation.parquet")
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label, place = int(rng.integers(2)), PLACES[i % 3]
        pool = val.sentence[val.label == label].tolist()
        opinion = [pool[k] for k in rng.choice(len(pool), int(rng.integers(3, 6)), replace=False)]
        facts = filler(rng, int(rng.integers(220, 750)))
        if place == "first":
            parts = opinion + facts
        elif place == "last":
            parts = facts + opinion
        else:
            parts = list(facts)
            for sentence in opinion:  # each at a seeded random place among the facts
                parts.insert(int(rng.integers(len(parts) + 1)), sentence)
        rows.append({"text": " ".join(parts), "label": label, "place": place, "opinion": " ".join(opinion)})
    return pd.DataFrame(rows)


def score(model: str, src: Path, out: Path, column: str, **options) -> tuple[pd.DataFrame, dict]:
    cfg = Config(model=model, input=str(src), output=str(out), text_column=column, **options)
    summary = score_driver_fn(cfg)
    return read_scored(str(out)), summary


def accuracy(args) -> None:
    docs = build_docs(args.docs)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "docs.parquet"
        docs.to_parquet(src)
        runs = [("opinion alone", "opinion", {"long_text": "truncate"}),
                ("truncate", "text", {"long_text": "truncate"}), ("head-tail", "text", {"long_text": "head-tail"})]
        runs += [(f"windows {c}", "text", {"long_text": "windows", "combine": c})
                 for c in ("mean-probs", "mean-logits", "max-confidence")]
        for name, column, options in runs:
            t = time.perf_counter()
            scored, _ = score(args.model, src, Path(tmp) / name.replace(" ", "_"), column,
                              max_seq_length=args.max_seq_length, **options)
            right = (scored.prob_positive.to_numpy() > 0.5).astype(int) == docs.label.to_numpy()
            results[name] = {"all": round(100 * right.mean(), 1), "seconds": round(time.perf_counter() - t, 1),
                             **{p: round(100 * right[docs.place == p].mean(), 1) for p in PLACES}}
            print(f"[figure] {name}: {results[name]}", flush=True)
    print(json.dumps(results, indent=2))


def speed(args) -> None:
    docs = build_docs(args.docs)
    val = pd.read_parquet(SST2 / "validation.parquet")
    with tempfile.TemporaryDirectory() as tmp:
        for name, frame, column in (("SST-2 sentences", val, "sentence"), ("long documents", docs, "text")):
            src = Path(tmp) / f"{name.replace(' ', '_')}.parquet"
            frame.to_parquet(src)
            _, s = score(args.model, src, Path(tmp) / src.stem, column, max_seq_length=args.max_seq_length,
                         long_text="windows")  # sentences fit one window: the same as any mode for them
            lt = s["long_text"]
            print(f"[figure] {name}: {lt['tokens_per_second']:,} tokens/s ({lt['model_tokens_per_second']:,} in "
                  f"the model stage), {lt['windows_per_second']:,} windows/s, {s['rows_per_second']} rows/s",
                  flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("accuracy", "speed"))
    parser.add_argument("--model", required=True)
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--max-seq-length", type=int, default=128)
    a = parser.parse_args()
    {"accuracy": accuracy, "speed": speed}[a.what](a)
