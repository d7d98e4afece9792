"""Evaluation: every figure against a hand computation, the files a person opens, bad labels, and the
end-to-end path through the batch scorer on a tiny real model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysst.config import EVAL, SCORE, TRAIN, Config
from raysst.cli import parse_config
from raysst.formats import DataError
from raysst.evaluate import compute_report, evaluate_frame, model_names, wilson_interval, write_report
from raysst.report import FIGURES, figures_for, with_card_section, write_comparison
from raysst.task import Task

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Ten rows worked out by hand. Predicted positive when p > 0.5:
#   gold 1 1 1 1 1 1 0 0 0 0
#   pred 1 1 1 1 0 0 0 0 1 0   -> TP 4, FN 2, FP 1, TN 3, accuracy 7/10
GOLD = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
PROB = [0.95, 0.85, 0.65, 0.72, 0.45, 0.15, 0.05, 0.25, 0.55, 0.35]
# Word counts 2, 5, 7, 12, 3, 6, 1, 25, 35, 50 -> buckets 1-5: rows 0,1,4,6; 6-10: rows 2,5; 11-20: row 3; ...
TEXTS = ["great fun", "a moving , funny film", "w " * 7, "w " * 12, "not so good", "not bad at all , really",
         "dull", "w " * 25, "w " * 35, "w " * 50]


SST2 = Task()  # negative, positive


def two(prob_positive) -> np.ndarray:
    """Binary probabilities (negative, positive) from the probability of `positive`."""
    p = np.asarray(prob_positive, dtype=float)
    return np.column_stack([1 - p, p])


def is_png(path: Path) -> bool:
    import matplotlib.image

    data = Path(path).read_bytes()
    image = matplotlib.image.imread(path)
    return data[:8] == PNG_SIGNATURE and image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


@pytest.fixture(scope="module")
def report() -> dict:
    return compute_report(TEXTS, GOLD, two(PROB), SST2)


def test_accuracy_and_wilson_interval(report):
    assert report["n"] == 10
    assert report["accuracy"] == pytest.approx(0.7)
    # Wilson, z=1.96, 7/10: (0.7 + z²/20) / (1 + z²/10) -+ z/(1 + z²/10) * sqrt(0.021 + z²/400)
    assert report["accuracy_ci95"] == pytest.approx([0.396778, 0.892209], abs=1e-6)
    assert wilson_interval(0, 10) == pytest.approx([0.0, 3.841459 / 13.841459], abs=1e-6)  # z²/(n+z²)
    assert wilson_interval(10, 10) == pytest.approx([10 / 13.841459, 1.0], abs=1e-6)
    assert wilson_interval(0, 0) == [None, None]


def test_per_class_scores_and_confusion_matrix(report):
    assert report["confusion_matrix"]["matrix"] == [[3, 1], [2, 4]]
    pos, neg = report["per_class"]["positive"], report["per_class"]["negative"]
    assert (pos["precision"], pos["recall"], pos["f1"], pos["support"]) == pytest.approx((4 / 5, 4 / 6, 8 / 11, 6))
    assert (neg["precision"], neg["recall"], neg["f1"], neg["support"]) == pytest.approx((3 / 5, 3 / 4, 2 / 3, 4))
    assert report["macro_f1"] == pytest.approx((8 / 11 + 2 / 3) / 2)


def test_calibration_ece_and_brier(report):
    cal = report["calibration"]
    # Confidences (prob of the predicted label): .95 .85 .65 .72 .55 .85 .95 .75 .55 .65; two rows per bin:
    # (.5,.6] acc 0 conf .55; (.6,.7] 1/.65; (.7,.8] 1/.735; (.8,.9] .5/.85; (.9,1] 1/.95
    assert [b["count"] for b in cal["bins"]] == [0, 0, 0, 0, 0, 2, 2, 2, 2, 2]
    assert [b["accuracy"] for b in cal["bins"][5:]] == pytest.approx([0, 1, 1, 0.5, 1])
    assert cal["ece"] == pytest.approx(0.2 * (0.55 + 0.35 + 0.265 + 0.35 + 0.05))
    squared = [(p - g) ** 2 for p, g in zip(PROB, GOLD)]
    assert cal["brier"] == pytest.approx(1.7409 / 10) and cal["brier"] == pytest.approx(np.mean(squared))


def test_bins_are_right_closed_and_ties_go_negative():
    r = compute_report(["a", "b", "c", "d"], [1, 1, 0, 0], two([0.7, 1.0, 0.5, 0.3]), SST2)
    counts = {(b["lo"], b["hi"]): b["count"] for b in r["calibration"]["bins"] if b["count"]}
    # 0.7 stays in (0.6, 0.7] (7 * 0.1 is 0.7000000000000001); 1.0 in (0.9, 1.0]; 0.5 -> negative at 0.5
    assert counts == {(0.6, 0.7): 2, (0.9, 1.0): 1, (0.4, 0.5): 1}
    assert r["confusion_matrix"]["matrix"] == [[2, 0], [0, 2]]


def test_accuracy_by_length_and_confident_mistakes(report):
    buckets = {b["words"]: (b["count"], b["accuracy"]) for b in report["accuracy_by_length"]["buckets"]}
    assert report["accuracy_by_length"]["unit"].startswith("words")
    assert buckets["1-5"] == (4, 0.75)  # rows 0, 1, 4, 6: right, right, wrong, right
    assert buckets["6-10"] == (2, 0.5)  # rows 2, 5: right, wrong
    assert buckets["31-40"] == (1, 0.0) and buckets["41-80"] == (1, 1.0) and buckets["81+"] == (0, None)
    mistakes = report["most_confident_mistakes"]
    # Wrong rows: 5 (conf .85), then 4 and 8 (both .55, kept in input order).
    assert [m["text"] for m in mistakes] == [TEXTS[5], TEXTS[4], TEXTS[8]]
    assert mistakes[0] == {"text": TEXTS[5], "gold": "positive", "predicted": "negative",
                           "confidence": pytest.approx(0.85), "prob_negative": pytest.approx(0.85),
                           "prob_positive": pytest.approx(0.15)}
    many = compute_report([f"t{i}" for i in range(30)], [0] * 30, two(np.linspace(0.6, 0.99, 30)), SST2)
    assert len(many["most_confident_mistakes"]) == 20
    assert many["most_confident_mistakes"][0]["confidence"] == pytest.approx(0.99)


@pytest.mark.parametrize("labels", [
    ["positive"] * 6 + ["negative"] * 4, ["1"] * 6 + ["0"] * 4, [1.0] * 6 + [0.0] * 4, ["POSITIVE"] * 6 + ["Negative"] * 4])
def test_labels_as_strings_or_numbers_give_the_same_report(report, labels):
    assert compute_report(TEXTS, labels, two(PROB), SST2) == report


def test_bad_labels_and_probabilities_are_named():
    with pytest.raises(DataError, match=r"eval.csv: column 'sentiment' must hold one of the labels.*neutral"):
        compute_report(["a", "b"], ["positive", "neutral"], two([0.2, 0.9]), SST2, "eval.csv", "sentiment")
    with pytest.raises(DataError, match=r"eval.csv: column 'label' has 1 null labels"):
        compute_report(["a", "b"], [1, None], two([0.2, 0.9]), SST2, "eval.csv")
    with pytest.raises(ValueError, match=r"outputs must be 2 finite probabilities in \[0, 1\] per row"):
        compute_report(["a", "b"], [1, 0], two([0.2, float("nan")]), SST2)
    with pytest.raises(DataError, match="no rows"):
        compute_report([], [], [], SST2)


def scored_frame(label_column: str = "input_label") -> pd.DataFrame:
    """A frame in the scorer's output layout: input columns kept, a clashing `label` renamed input_label."""
    probs = PROB + [None, None]
    return pd.DataFrame({
        "sentence": TEXTS + [None, "   "], label_column: GOLD + [1, 0],
        "label": ["positive" if p > 0.5 else "negative" for p in PROB] + [None, None],
        "score": [max(p, 1 - p) for p in PROB] + [None, None],
        "prob_negative": [1 - p for p in PROB] + [None, None], "prob_positive": probs,
        "status": ["ok"] * 9 + ["truncated", "null_input", "empty_input"]})


def test_evaluate_frame_counts_rows_it_cannot_score():
    r = evaluate_frame(scored_frame(), "val.parquet", SST2)
    assert r["rows"] == {"total": 12, "evaluated": 10, "not_scored": {"null_input": 1, "empty_input": 1},
                         "truncated": 1}
    assert r["accuracy"] == pytest.approx(0.7)
    other = evaluate_frame(scored_frame("sentiment"), "val.parquet", SST2, label_column="sentiment")
    assert other["accuracy"] == r["accuracy"]


def test_missing_label_column_is_a_clear_error():
    frame = scored_frame().drop(columns=["input_label"])
    with pytest.raises(DataError) as e:
        evaluate_frame(frame, "data/val.parquet", SST2, label_column="label")
    assert "data/val.parquet: no label column 'label'; columns are ['sentence']" in str(e.value)
    with pytest.raises(DataError, match=r"no label column 'gold'; columns are \['sentence', 'label'\]"):
        evaluate_frame(scored_frame(), "data/val.parquet", SST2, label_column="gold")


def test_report_files_are_written_and_readable(report, tmp_path):
    names = write_report({"model": "tiny", "data": "x.parquet", **report}, str(tmp_path / "out"))
    out = tmp_path / "out"
    assert sorted(names) == sorted(["report.json", "report.md", *figures_for(report).values()])
    for png in figures_for(report).values():
        assert is_png(out / png), png
    assert json.loads((out / "report.json").read_text())["accuracy"] == pytest.approx(0.7)
    md = (out / "report.md").read_text()
    for text in ("0.7000 (95% CI 0.3968 to 0.8922", "| positive | 0.8000 | 0.6667 | 0.7273 | 6 |",
                 "| negative | 3 | 1 |", "calibration error (10 bins) | 0.3130", "Brier score | 0.1741",
                 "| 1-5 | 4 | 0.7500 |", "not bad at all , really", *(f"]({png})" for png in figures_for(report).values())):
        assert text in md, text


def test_report_to_a_uri(report, tmp_path):
    write_report(report, (tmp_path / "remote").as_uri())
    assert is_png(tmp_path / "remote" / FIGURES["reliability"])
    assert (tmp_path / "remote" / "report.md").is_file()


def test_training_curves_png(tmp_path):
    from raysst.plots import plot_training_curves

    history = [{"epoch": 1, "train_loss": 0.6, "eval_loss": 0.5, "accuracy": 0.8},
               {"epoch": 2, "train_loss": 0.3, "eval_loss": 0.4, "accuracy": 0.85}]
    assert is_png(plot_training_curves(history, tmp_path / "curves.png", "run"))


def test_comparison_table(report, tmp_path):
    worse = compute_report(TEXTS, GOLD, two([1 - p for p in PROB]), SST2)  # every prediction flipped: accuracy 0.3
    md = write_comparison({"new": {"model": "runs/new/model", **report}, "old": {"model": "runs/old", **worse}},
                          str(tmp_path))
    assert "| Metric | new | old | old - new |" in md
    assert "| accuracy | 0.7000 | 0.3000 | -0.4000 |" in md
    assert "[new/report.md](new/report.md)" in md
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["models"]["old"]["accuracy"] == pytest.approx(0.3)
    assert (tmp_path / "comparison.md").read_text() == md


def test_card_section_is_inserted_once():
    card = "# m\n\n## Training results\n\nrows\n\n## Intended uses and limitations\n\nEnglish.\n"
    first = with_card_section(card, "## Evaluation report\n\nold\n")
    again = with_card_section(first, "## Evaluation report\n\nnew\n")  # a rerun replaces its section
    assert again == card.replace("## Intended", "## Evaluation report\n\nnew\n\n## Intended")
    assert with_card_section("# m\n", "## Evaluation report\n") == "# m\n\n## Evaluation report\n"


def test_model_names_are_short_and_distinct():
    assert model_names(["runs/a/model", "runs/b/model"]) == ["a_model", "b_model"]
    assert model_names(["sentence-transformers/all-MiniLM-L6-v2"]) == ["all-MiniLM-L6-v2"]
    assert model_names(["/x/m/", "./m2"]) == ["m", "m2"]


def test_config_for_evaluate():
    cfg = parse_config(EVAL, ["--model", "a", "--model", "b", "--data", "v.csv", "--output", "o",
                              "--label-column", "sentiment"])
    assert (cfg.eval_models, cfg.input, cfg.output, cfg.label_column) == (["a", "b"], "v.csv", "o", "sentiment")
    assert parse_config(EVAL, ["--data", "v.csv"]).eval_models == [Config().model]
    assert parse_config(TRAIN, ["--model", "m"]).eval_models == ["m"]
    with pytest.raises(ValueError, match="distinct"):
        Config(models=["a", "a"])
    with pytest.raises(SystemExit):
        parse_config(SCORE, ["--label-column", "x"])  # scoring needs no labels


# ---- end to end through the batch scorer (Ray Data) on a tiny real model ----

@pytest.fixture(scope="module")
def trained_model(sst2_small, tmp_path_factory) -> str:
    """A tiny model (seeded) fine-tuned for 3 epochs on the 800 training rows with plain torch, in seconds:
    it predicts both classes, about 70% right on the validation rows, so every cell of the report is filled."""
    import torch
    from conftest import tiny_bert

    from hf_reference import collate
    from raysst.models import load_classifier, load_tokenizer

    torch.manual_seed(0)
    start = tiny_bert(tmp_path_factory.mktemp("seeded"))
    model, tokenizer = load_classifier(start), load_tokenizer(start)
    train = pd.read_parquet(sst2_small / "train.parquet")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(3):
        for i in range(0, len(train), 32):
            batch = train.iloc[i:i + 32]
            model(**collate(tokenizer, batch["sentence"], 64, batch["label"].to_numpy().copy())).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    out = tmp_path_factory.mktemp("trained") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def direct_probabilities(model_dir: str, texts: list) -> np.ndarray:
    """prob_positive from a plain forward pass, independent of the scorer's pipeline."""
    import torch

    from hf_reference import collate
    from raysst.models import load_classifier, load_tokenizer

    model, tokenizer = load_classifier(model_dir).eval(), load_tokenizer(model_dir)
    with torch.inference_mode():
        logits = model(**collate(tokenizer, texts, max_length=128)).logits
    return torch.softmax(logits.float(), dim=-1)[:, 1].numpy()


@pytest.mark.timeout(240)
def test_evaluate_two_models_end_to_end(ray_local, tiny_model, trained_model, sst2_small, tmp_path):
    from raysst.score import read_scored

    from raysst.evaluate import evaluate_driver_fn

    data = sst2_small / "validation.parquet"
    cfg = Config(models=[trained_model, tiny_model], input=str(data), output=str(tmp_path / "eval"),
                 eval_batch_size=16, num_actors=1)
    reports = evaluate_driver_fn(cfg)
    names = model_names([trained_model, tiny_model])
    assert list(reports) == names
    rows = pd.read_parquet(data)
    direct = direct_probabilities(trained_model, rows["sentence"].tolist())
    scored = read_scored(str(tmp_path / "eval" / "scored" / names[0])).sort_values("idx")
    assert scored["prob_positive"].to_numpy() == pytest.approx(direct, abs=1e-5)  # the scorer is the model
    expected = compute_report(rows["sentence"], rows["label"], two(direct), SST2)
    got = json.loads((tmp_path / "eval" / names[0] / "report.json").read_text())
    assert got["n"] == len(rows) == 101 and got["rows"]["not_scored"] == {}
    if not np.any(np.abs(direct - 0.5) < 1e-4):  # a near-tie could fall either way by float noise
        assert got["confusion_matrix"] == expected["confusion_matrix"]
        assert got["accuracy"] == pytest.approx(expected["accuracy"])
    assert min(min(r) for r in got["confusion_matrix"]["matrix"]) > 0  # both classes predicted, both missed
    assert got["calibration"]["brier"] == pytest.approx(expected["calibration"]["brier"], abs=1e-5)
    assert got["calibration"]["ece"] == pytest.approx(expected["calibration"]["ece"], abs=1e-4)
    for name in names:
        for png in figures_for(reports[name]).values():
            assert is_png(tmp_path / "eval" / name / png)
    md = (tmp_path / "eval" / "comparison.md").read_text()
    new, old = reports[names[0]]["accuracy"], reports[names[1]]["accuracy"]
    assert f"| accuracy | {new:.4f} | {old:.4f} | {old - new:+.4f} |" in md


@pytest.mark.timeout(180)
def test_string_labels_and_missing_label_column_end_to_end(ray_local, trained_model, sst2_small, tmp_path):
    from raysst.evaluate import evaluate_driver_fn

    rows = pd.read_parquet(sst2_small / "validation.parquet")
    as_words = rows.assign(label=rows["label"].map({0: "negative", 1: "positive"})).rename(columns={"label": "gold"})
    as_words.to_csv(tmp_path / "words.csv", index=False)
    cfg = Config(model=trained_model, input=str(tmp_path / "words.csv"), output=str(tmp_path / "out"),
                 label_column="gold", num_actors=1)
    report = evaluate_driver_fn(cfg)[model_names([trained_model])[0]]
    direct = direct_probabilities(trained_model, rows["sentence"].tolist())
    expected = compute_report(rows["sentence"], rows["label"], two(direct), SST2)
    assert report["calibration"]["brier"] == pytest.approx(expected["calibration"]["brier"], abs=1e-5)
    assert report["precision"] == "float32"  # CPU scoring by default
    if not np.any(np.abs(direct - 0.5) < 1e-4):
        assert report["confusion_matrix"] == expected["confusion_matrix"]
    assert (tmp_path / "out" / "report.md").is_file() and is_png(tmp_path / "out" / FIGURES["confusion"])

    rows.drop(columns=["label"]).to_parquet(tmp_path / "nolabel.parquet")
    bad = cfg.replace(input=str(tmp_path / "nolabel.parquet"), label_column="label", output=str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"nolabel.parquet: no label column 'label'; columns are \['sentence', 'idx'\]"):
        evaluate_driver_fn(bad)
    assert not (tmp_path / "bad").exists()  # found before scoring a row, not after


@pytest.mark.timeout(180)
def test_evaluate_in_int8_states_its_precision(ray_local, trained_model, sst2_small, tmp_path):
    from raysst.evaluate import evaluate_driver_fn
    from raysst.models import INT8_DYNAMIC

    data = sst2_small / "validation.parquet"
    cfg = Config(model=trained_model, input=str(data), output=str(tmp_path / "out"), precision="int8", num_actors=1)
    report = evaluate_driver_fn(cfg)[model_names([trained_model])[0]]
    assert report["precision"] == report["scoring"]["hardware"]["dtype"] == INT8_DYNAMIC
    assert json.loads((tmp_path / "out" / "report.json").read_text())["precision"] == INT8_DYNAMIC
    assert f"Scores computed in {INT8_DYNAMIC}." in (tmp_path / "out" / "report.md").read_text()
    rows = pd.read_parquet(data)
    direct = direct_probabilities(trained_model, rows["sentence"].tolist())
    fp32 = compute_report(rows["sentence"], rows["label"], two(direct), SST2)
    assert report["n"] == 101 and abs(report["accuracy"] - fp32["accuracy"]) <= 0.05  # int8 costs little


@pytest.mark.timeout(180)
def test_training_report_into_model_dir(ray_local, trained_model, sst2_small, tmp_path):
    from raysst.export import model_card, training_report

    model_dir = tmp_path / "run" / "model"
    shutil.copytree(trained_model, model_dir)
    history = [{"epoch": e, "train_loss": 0.7 / e, "eval_loss": 0.6 / e, "accuracy": 0.5 + 0.1 * e,
                "eval_samples": 101, "train_samples": 800} for e in (1, 2)]
    cfg = Config(name="tiny", model=trained_model, eval_batch_size=32, num_actors=1)
    metrics = {"epochs": history, "task": SST2.to_dict(), "accuracy": 0.7, "best_epoch": 2, "hardware": "CPU",
               "total_flops": 1.0,
               **{f"train_{k}_per_second": 1.0 for k in ("samples", "tokens", "steps")}}
    (model_dir / "metrics.json").write_text(json.dumps(metrics))
    (model_dir / "README.md").write_text(model_card(metrics, cfg, SST2))
    validation = pd.read_parquet(sst2_small / "validation.parquet")[["sentence", "label"]]

    section = training_report(str(model_dir), validation, cfg=cfg)
    assert section.startswith("## Evaluation report")
    eval_dir = model_dir / "eval"
    assert json.loads((eval_dir / "report.json").read_text())["n"] == 101
    for png in (*figures_for({}).values(), "training_curves.png"):
        assert is_png(eval_dir / png), png
    card = (model_dir / "README.md").read_text()
    assert card.count("## Evaluation report") == 1
    assert card.index("## Evaluation report") < card.index("## Intended uses and limitations")
    for link in ("eval/report.md", "eval/training_curves.png", "eval/reliability_diagram.png"):
        assert f"({link})" in card


@pytest.mark.timeout(300)
def test_evaluate_job_uses_every_cpu_by_default(tiny_model, sst2_small, tmp_path):
    """`jobs/evaluate.py` with no sizing flags, on its own local Ray: single-threaded actors, one per CPU up to
    one per chunk."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(root)}  # its own Ray, not the test's
    proc = subprocess.run([sys.executable, "jobs/evaluate.py", "--model", tiny_model, "--data",
                           str(sst2_small / "validation.parquet"), "--output", str(tmp_path / "out")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hw = json.loads((tmp_path / "out" / "report.json").read_text())["scoring"]["hardware"]
    # One single-threaded actor per CPU, but no more than there are chunks: 101 rows are one chunk.
    assert hw["cluster"]["CPU"] == os.cpu_count() and hw["cpus_per_actor"] == 1 and hw["model_actors"] == 1
    assert sum(hw["rows_by_actor_device"].values()) == 101
