"""Any task shape through train, score and evaluate on a tiny BERT: N classes with string labels and custom
columns, sentence pairs, multi-label and regression; classifiers from elsewhere; bad labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysst.config import Config
from raysst.formats import DataError
from raysst.task import MULTI, REGRESSION, SINGLE, Task

WORDS = ["film", "story", "day", "plot", "scene", "music", "time", "end", "cast", "light", "city", "road"]
FRUIT = {"anger": "apple", "fear": "cherry", "joy": "banana"}  # each class is told by one keyword


def filler(rng, n: int) -> list:
    return list(rng.choice(WORDS, n))


def write_splits(directory: Path, frames: dict) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    for split, frame in frames.items():
        frame.to_json(directory / f"{split}.jsonl", orient="records", lines=True)
    return str(directory)


def three_class(rng, n: int) -> pd.DataFrame:
    names = rng.choice(sorted(FRUIT), n)
    texts = [" ".join(filler(rng, rng.integers(0, 4)) + [FRUIT[c]] + filler(rng, rng.integers(0, 4))) for c in names]
    return pd.DataFrame({"review": texts, "feeling": names})


def cfg_for(tiny_model: str, data: str, tmp_path: Path, **kw) -> Config:
    base = dict(model=tiny_model, data=data, storage_path=str(tmp_path / "runs"), name="run", num_workers=1,
                epochs=4, lr=3e-3, batch_size=16, eval_batch_size=64, log_every=100, num_actors=1, cpus_per_worker=1)
    return Config(**{**base, **kw})


@pytest.fixture(scope="module")
def three_class_run(ray_local, tiny_model, tmp_path_factory):
    from raysst.train import train_driver_fn

    tmp = tmp_path_factory.mktemp("three")
    rng = np.random.default_rng(0)
    data = write_splits(tmp / "data", {"train": three_class(rng, 480), "validation": three_class(rng, 90)})
    cfg = cfg_for(tiny_model, data, tmp, text_column="review", label_column="feeling", epochs=8)
    return cfg, Path(train_driver_fn(cfg)), tmp


@pytest.mark.timeout(300)
def test_three_string_labels_train_export_score_evaluate(three_class_run):
    from transformers import pipeline

    from raysst.evaluate import evaluate_driver_fn
    from raysst.score import read_scored, score_driver_fn

    cfg, model_dir, tmp = three_class_run
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["task"] == {"kind": SINGLE, "labels": ["anger", "fear", "joy"], "threshold": 0.5}
    assert metrics["metric"] == "accuracy" and metrics["accuracy"] > 0.6  # chance is a third
    config = json.loads((model_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "anger", "1": "fear", "2": "joy"}
    assert config["problem_type"] == "single_label_classification"
    assert "| Epoch | Training Loss | Validation Loss | Accuracy | Workers |" in (
        model_dir / "README.md").read_text()

    scored_dir = tmp / "scored"
    corpus = tmp / "corpus.csv"
    pd.DataFrame({"review": ["the banana scene", "cherry road", None]}).to_csv(corpus, index=False)
    summary = score_driver_fn(Config(model=str(model_dir), input=str(corpus), output=str(scored_dir),
                                     text_column="review", num_actors=1))
    out = read_scored(str(scored_dir))
    assert list(out.columns) == ["review", "label", "score", "prob_anger", "prob_fear", "prob_joy", "windows",
                                 "status"]
    assert out.status.tolist() == ["ok", "ok", "null_input"]
    # pipeline names the same labels, with the scorer's probabilities
    classify = pipeline("text-classification", model=str(model_dir))
    for (_, row), got in zip(out.iloc[:2].iterrows(), classify(out.review.iloc[:2].tolist())):
        assert got["label"] == row.label and got["score"] == pytest.approx(row.score, abs=1e-4)
    assert np.allclose(out[["prob_anger", "prob_fear", "prob_joy"]].iloc[:2].sum(1), 1, atol=1e-5)
    assert summary["task"]["labels"] == ["anger", "fear", "joy"] and summary["label_counts"]["joy"] == 1

    report = evaluate_driver_fn(cfg.replace(model=str(model_dir), input=str(tmp / "data" / "validation.jsonl"),
                                            output=str(tmp / "eval"), models=[]))
    report = next(iter(report.values()))
    assert report["confusion_matrix"]["labels"] == ["anger", "fear", "joy"]
    assert np.array(report["confusion_matrix"]["matrix"]).shape == (3, 3)
    assert report["accuracy"] == pytest.approx(metrics["accuracy"], abs=0.02)
    assert "| gold \\ predicted | anger | fear | joy |" in (tmp / "eval" / "report.md").read_text()


def pairs(rng, n: int) -> pd.DataFrame:
    """The label is `both` when the first text names an apple and the second a cherry: a reader of one text
    alone can do no better than 75% (it knows `neither` for sure only when its own fruit is wrong)."""
    a, b = rng.choice(["apple", "cherry"], n), rng.choice(["apple", "cherry"], n)
    return pd.DataFrame({"sentence1": [f"{x} {w}" for x, w in zip(a, rng.choice(WORDS, n))],
                         "sentence2": [f"{w} {y}" for y, w in zip(b, rng.choice(WORDS, n))],
                         "label": np.where((a == "apple") & (b == "cherry"), "both", "neither")})


@pytest.mark.timeout(300)
def test_pairs_are_learned_from_both_texts(ray_local, tiny_model, tmp_path):
    from raysst.score import read_scored, score_driver_fn
    from raysst.train import train_driver_fn

    rng = np.random.default_rng(1)
    val = pairs(rng, 120)
    data = write_splits(tmp_path / "data", {"train": pairs(rng, 640), "validation": val})
    cfg = cfg_for(tiny_model, data, tmp_path, text_column="sentence1", text_pair_column="sentence2", epochs=6)
    model_dir = train_driver_fn(cfg)
    metrics = json.loads(Path(model_dir, "metrics.json").read_text())
    # The best a reader of the first text alone can do: `neither` for a cherry, the majority for an apple.
    first = val.sentence1.str.startswith("apple")
    alone = ((~first).sum() + val[first].label.value_counts().max()) / len(val)
    assert metrics["accuracy"] > alone + 0.1, (metrics["accuracy"], alone)
    val.to_parquet(tmp_path / "val.parquet")
    score_driver_fn(Config(model=model_dir, input=str(tmp_path / "val.parquet"), output=str(tmp_path / "out"),
                           text_column="sentence1", text_pair_column="sentence2", num_actors=1))
    out = read_scored(str(tmp_path / "out"))
    assert (out.label == val.label).mean() == pytest.approx(metrics["accuracy"], abs=1e-9)  # scored as trained


def multi_label(rng, n: int) -> pd.DataFrame:
    picks = [sorted(set(rng.choice(sorted(FRUIT), rng.integers(0, 3)))) for _ in range(n)]
    return pd.DataFrame({"text": [" ".join(filler(rng, 2) + [FRUIT[c] for c in p] + filler(rng, 2)) for p in picks],
                         "label": picks})


def regression(rng, n: int) -> pd.DataFrame:
    k = rng.integers(0, 4, n)  # the value is the number of "good"s
    return pd.DataFrame({"text": [" ".join(filler(rng, 3) + ["good"] * int(c)) for c in k],
                         "label": k.astype(float) + rng.normal(0, 0.1, n)})


@pytest.mark.timeout(400)
@pytest.mark.parametrize("kind, make, metric, floor, epochs", [(MULTI, multi_label, "micro_f1", 0.7, 10),
                                                               (REGRESSION, regression, "pearson", 0.7, 5)])
def test_multi_label_and_regression_train_export_score_evaluate(ray_local, tiny_model, tmp_path, kind, make,
                                                                metric, floor, epochs):
    from transformers import pipeline

    from raysst.evaluate import evaluate_driver_fn
    from raysst.score import read_scored, score_driver_fn

    from raysst.train import train_driver_fn

    rng = np.random.default_rng(2)
    data = write_splits(tmp_path / "data", {"train": make(rng, 480), "validation": make(rng, 90)})
    model_dir = train_driver_fn(cfg_for(tiny_model, data, tmp_path, epochs=epochs))
    metrics = json.loads(Path(model_dir, "metrics.json").read_text())
    assert metrics["task"]["kind"] == kind and metrics["metric"] == metric and metrics[metric] > floor
    assert json.loads(Path(model_dir, "config.json").read_text())["problem_type"] == Task(kind).hf_config()[
        "problem_type"]
    report = json.loads(Path(model_dir, "eval", "report.json").read_text())
    assert report[metric] == pytest.approx(metrics[metric], abs=1e-6)  # the card's figure, from the workers
    score_driver_fn(Config(model=model_dir, input=str(tmp_path / "data" / "validation.jsonl"),
                           output=str(tmp_path / "out"), num_actors=1))
    out = read_scored(str(tmp_path / "out"))
    evaluated = next(iter(evaluate_driver_fn(Config(model=model_dir, input=str(tmp_path / "data" / "validation.jsonl"),
                                                    output=str(tmp_path / "eval"), num_actors=1)).values()))
    assert evaluated[metric] == pytest.approx(metrics[metric], abs=0.02)
    if kind == MULTI:
        assert {"labels", "prob_anger", "prob_fear", "prob_joy", "status"} <= set(out.columns)
        # pipeline(top_k=None) gives every label's own sigmoid score: the scorer's probabilities, by name.
        first = out.iloc[0]
        scores = pipeline("text-classification", model=model_dir, top_k=None)([first["text"]])[0]
        assert {d["label"]: round(d["score"], 4) for d in scores} == {
            n: round(first[f"prob_{n}"], 4) for n in ("anger", "fear", "joy")}
        assert list(first["labels"]) == [n for n in ("anger", "fear", "joy") if first[f"prob_{n}"] > 0.5]
        assert (Path(tmp_path, "eval", "per_label_f1.png")).is_file()
    else:
        assert {"value", "status"} <= set(out.columns) and "label" in out.columns  # the input's own label
        assert (Path(tmp_path, "eval", "scatter.png")).is_file()


@pytest.mark.timeout(200)
def test_classifiers_from_elsewhere_give_their_columns(ray_local, tmp_path, sst2_small):
    from raysst.models import make_random_model
    from raysst.score import read_scored, score_driver_fn

    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=128)
    topics = make_random_model(str(tmp_path / "topics"), task=Task(SINGLE, ("sport", "world", "tech")), **shape)
    tags = make_random_model(str(tmp_path / "tags"), task=Task(MULTI, ("toxic", "insult")), **shape)
    data = str(sst2_small / "validation.parquet")
    for model, columns in ((topics, ["label", "score", "prob_sport", "prob_world", "prob_tech", "windows", "status"]),
                           (tags, ["labels", "prob_toxic", "prob_insult", "windows", "status"])):
        out = tmp_path / Path(model).name / "out"
        summary = score_driver_fn(Config(model=model, input=data, output=str(out), num_actors=1))
        scored = read_scored(str(out))
        assert list(scored.columns) == ["sentence", "input_label", "idx", *columns] or \
            list(scored.columns) == ["sentence", "label", "idx", *columns]
        assert len(scored) == 101 and summary["output_columns"] == columns
    labels = read_scored(str(tmp_path / "tags" / "out"))["labels"]
    assert all(isinstance(v, (list, np.ndarray)) for v in labels)
    # --labels renames a checkpoint's labels; a wrong count is refused before any actor starts.
    with pytest.raises(ValueError, match=r"--labels names 2 labels \(a, b\), but the model has 3 outputs"):
        score_driver_fn(Config(model=topics, input=data, output=str(tmp_path / "bad"), labels="a,b", num_actors=1))


@pytest.mark.parametrize("train, validation, kw, message", [
    (["x", "y", "x", "y"], ["x", "z", "x", "z"], {}, r"validation.jsonl: column 'label' must hold one of the labels "
     r"\['x', 'y'\].*found 2 rows with \['z'\].*training split"),
    (["x", "y", "w", "y"], ["x", "y", "x", "y"], {"labels": "x,y"}, r"train.jsonl: column 'label' must hold one of "
     r"the labels \['x', 'y'\].*\['w'\]"),
    (["x", None, "x", "y"], ["x", "y", "x", "y"], {}, r"train.jsonl: column 'label' has 1 null labels"),
    (["x", "x", "x", "x"], ["x", "y", "x", "y"], {}, r"holds only one class \('x' in 4 rows\)"),
])
def test_bad_labels_fail_before_ray(tmp_path, tiny_model, train, validation, kw, message):
    from raysst.train import train_driver_fn

    data = write_splits(tmp_path / "data", {"train": pd.DataFrame({"text": list("abcd"), "label": train}),
                                            "validation": pd.DataFrame({"text": list("abcd"), "label": validation})})
    cfg = cfg_for(tiny_model, data, tmp_path, **kw)
    with pytest.raises(DataError, match=message):
        train_driver_fn(cfg)
    assert not (tmp_path / "runs").exists()  # nothing partial written


def test_glue_tasks_pick_their_columns(tmp_path):
    from raysst.data import load_data

    rng = np.random.default_rng(3)
    frame = pairs(rng, 20).assign(label=lambda f: (f.label == "both").astype(int))
    data = write_splits(tmp_path / "mrpc", {"train": frame, "validation": frame})
    train, validation, task = load_data(Config(data=data))  # named after the task: read as MRPC
    assert task.labels == ("not_equivalent", "equivalent") and "sentence_pair" in train
    stsb = write_splits(tmp_path / "x", {"train": frame.assign(label=frame.label * 2.5),
                                        "validation": frame.assign(label=frame.label * 2.5)})
    assert load_data(Config(data=stsb, data_config="stsb"))[2].kind == REGRESSION
