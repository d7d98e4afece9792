"""Data formats, bad inputs and the config: no Ray needed."""

import json
from pathlib import Path

import pandas as pd
import pytest

from raysst.config import TRAIN, SCORE, TUNE, Config
from raysst.cli import build_parser, load_config, parse_config
from raysst.formats import DataError
from raysst.batching import length_grouped_batches
from raysst.data import load_data, load_split
from raysst.models import load_tokenizer

ROWS = pd.DataFrame({"sentence": ["a fine film", "dull and long", "great", "bad"], "label": [1, 0, 1, 0]})


def write(df: pd.DataFrame, path, fmt: str) -> None:
    if fmt == "parquet":
        df.to_parquet(path)
    elif fmt == "tsv":
        df.to_csv(path, sep="\t", index=False)
    elif fmt == "csv":
        df.to_csv(path, index=False)
    else:
        path.write_text("\n".join(json.dumps(r) for r in df.to_dict("records")))


@pytest.mark.parametrize("fmt", ["parquet", "tsv", "csv", "jsonl"])
def test_each_format_loads(tmp_path, fmt):
    write(ROWS, tmp_path / f"train.{fmt}", fmt)
    write(ROWS.rename(columns={"sentence": "text"}), tmp_path / f"validation.{fmt}", fmt)
    train, validation, _ = load_data(Config(data=str(tmp_path)))
    assert train.sort_values("sentence").to_dict("list") == ROWS.sort_values("sentence").to_dict("list")
    assert validation.to_dict("list") == ROWS.to_dict("list")


def test_train_rows_sorted_by_label_come_back_mixed(tmp_path):
    rows = pd.DataFrame({"sentence": [f"review {i}" for i in range(400)], "label": [0] * 200 + [1] * 200})
    write(rows, tmp_path / "train.csv", "csv")
    write(rows, tmp_path / "validation.csv", "csv")
    train, validation, _ = load_data(Config(data=str(tmp_path), seed=3))
    assert sorted(train.sentence) == sorted(rows.sentence)  # nothing lost or repeated
    assert 0.3 < train.label[:100].mean() < 0.7  # the first windows a worker sees hold both labels
    assert train.equals(load_data(Config(data=str(tmp_path), seed=3))[0])
    assert validation.equals(rows)  # validation keeps its order


def test_glue_dev_tsv_and_string_labels(tmp_path):
    write(ROWS, tmp_path / "train.tsv", "tsv")
    write(ROWS.assign(label=["positive", "negative", "positive", "negative"]), tmp_path / "dev.tsv", "tsv")
    _, validation, task = load_data(Config(data=str(tmp_path), labels="negative,positive"))
    assert validation["label"].tolist() == [1, 0, 1, 0] and task.labels == ("negative", "positive")


def test_real_sst2_and_seeded_slice():
    train, validation, task = load_data(Config(data="../shared/data/sst2", max_train_samples=500, seed=1))
    assert len(train) == 500 and len(validation) == 872
    assert task.labels == ("negative", "positive")  # a directory named after its GLUE task takes its names
    again = load_data(Config(data="../shared/data/sst2", max_train_samples=500, seed=1))[0]
    assert train.equals(again)


@pytest.mark.parametrize("change, message", [
    (lambda df: df.drop(columns="label"), "no label column 'label'"),
    (lambda df: df.rename(columns={"sentence": "review"}), "no text column 'sentence' or 'text'"),
    (lambda df: df.assign(label=[0, 1, None, 1]), "1 null labels"),
    (lambda df: df.assign(label=[1, 1, 1, 1]), "holds only one class ('1' in 4 rows)"),
    (lambda df: df.assign(sentence=["ok", None, "x", "y"]), "1 null values"),
    (lambda df: df.assign(sentence=["ok", "  ", "x", "y"]), "1 empty texts"),
    (lambda df: df.iloc[:0], "has no rows"),
])
def test_bad_input_names_file_and_column(tmp_path, change, message):
    write(ROWS, tmp_path / "validation.parquet", "parquet")
    write(change(ROWS), tmp_path / "train.parquet", "parquet")
    with pytest.raises(DataError) as err:
        load_data(Config(data=str(tmp_path)))
    assert str(tmp_path / "train.parquet") in str(err.value) and message in str(err.value)


def test_mixed_label_types_are_named(tmp_path):
    write(ROWS, tmp_path / "validation.jsonl", "jsonl")
    # A file that mixes names and numbers: jsonl keeps each type, csv turns both into text.
    write(ROWS.assign(label=["positive", "negative", "positive", 1]), tmp_path / "train.jsonl", "jsonl")
    with pytest.raises(DataError, match=r"train.jsonl: column 'label' mixes label types \(3 str, 1 int\)"):
        load_data(Config(data=str(tmp_path)))


def test_missing_split_lists_what_is_there(tmp_path):
    write(ROWS, tmp_path / "train.parquet", "parquet")
    with pytest.raises(DataError, match=r"no validation split.*found \['train.parquet'\]"):
        load_data(Config(data=str(tmp_path)))


def test_corrupt_file_and_missing_directory(tmp_path):
    (tmp_path / "train.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="train.parquet: could not be read as parquet"):
        load_split(str(tmp_path), "train")
    with pytest.raises(DataError, match="not a directory"):
        load_split(str(tmp_path / "nope"), "train")


def test_length_grouped_batches_cover_every_example_once(tiny_model):
    import numpy as np

    tok = load_tokenizer(tiny_model)
    ids = tok([" ".join(["word"] * n) for n in range(1, 41)], truncation=True, max_length=16)["input_ids"]
    batches = list(length_grouped_batches([np.asarray(x) for x in ids], list(range(40)), tok.pad_token_id, 8,
                                          np.random.default_rng(0)))
    labels = sorted(int(x) for b in batches for x in b["labels"])
    assert labels == list(range(40))
    # Grouped: each batch holds neighbours in length, so padding is small.
    assert all(int((b["attention_mask"] == 0).sum()) <= 8 * 7 for b in batches)
    assert max(b["input_ids"].shape[1] for b in batches) == 16  # truncated at max_length
    for b in batches:  # each row: its own ids, then padding
        for row, mask in zip(b["input_ids"].tolist(), b["attention_mask"].tolist()):
            n = sum(mask)
            assert mask == [1] * n + [0] * (len(mask) - n) and row[n:] == [tok.pad_token_id] * (len(row) - n)
            assert row[:n] in ids


def test_pretokenized_epochs_hold_the_tokens_of_their_sentences(tiny_model, sst2_small, ray_local):
    """The Ray Data token stage and a worker's epoch batches: per epoch, the multiset of token ids (and of
    labels) is what the transformers tokenizer gives for the training sentences, in a new order each epoch."""
    from collections import Counter

    from raysst.config import Config
    from raysst.batching import epoch_batches
    from raysst.data import to_ray_datasets

    cfg = Config(model=tiny_model, data=str(sst2_small), batch_size=16, max_seq_length=24, seed=3,
                 max_train_samples=300)
    train, validation, _ = load_data(cfg)
    datasets = to_ray_datasets(train, validation, cfg.model, cfg.max_seq_length)
    tok = load_tokenizer(tiny_model)
    expected = tok(train.sentence.tolist(), truncation=True, max_length=cfg.max_seq_length)["input_ids"]
    orders = []
    for epoch in (1, 2):
        batches = list(epoch_batches(datasets["train"].iterator(), cfg, 16, epoch, 0, tok.pad_token_id))
        seen = Counter(t for b in batches for t in b["input_ids"][b["attention_mask"].bool()].tolist())
        assert seen == Counter(t for ids in expected for t in ids)
        assert sorted(int(x) for b in batches for x in b["labels"]) == sorted(train.label.tolist())
        assert sum(len(b["labels"]) for b in batches) == len(train) and all(len(b["labels"]) <= 16 for b in batches)
        orders.append([b["input_ids"][0].tolist() for b in batches])
    assert orders[0] != orders[1]
    # Validation comes sorted by length (less padding); `row` is each sentence's place in the file.
    val = datasets["validation"].to_pandas()
    assert sorted(val.row) == list(range(len(validation))) and "sentence" not in val
    assert [list(x) for x in val.input_ids] == tok(validation.sentence[val.row].tolist(), truncation=True,
                                                    max_length=cfg.max_seq_length)["input_ids"]
    assert val.row.map(validation.sentence.str.len()).is_monotonic_increasing
    # The rows cut at max_seq_length are marked, for the evaluation report's count.
    full = tok(validation.sentence[val.row].tolist())["input_ids"]
    assert val.truncated.tolist() == [len(ids) > cfg.max_seq_length for ids in full] and val.truncated.any()


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 5\nlr: 1.0e-4\nbatch_size: 64\n")
    cfg = parse_config(TRAIN, ["--config", str(path), "--epochs", "2", "--no-group-by-length", "--dropout", "0"])
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.group_by_length, cfg.dropout) == (2, 1e-4, 64, False, 0.0)
    assert cfg.storage_path.startswith("/")


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_is_a_valid_training_config(path):
    cfg = parse_config(TRAIN, ["--config", str(path)])
    assert cfg.epochs >= 1 and cfg.batch_size % cfg.num_workers == 0


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be divisible by num_workers"):
        Config(batch_size=30, num_workers=4)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        Config(lr=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        Config(dropout=1.0)
    (tmp_path / "c.yaml").write_text("epoch: 3\n")
    with pytest.raises(ValueError, match=r"unknown keys \['epoch'\]"):
        load_config(str(tmp_path / "c.yaml"))
    with pytest.raises(SystemExit):
        parse_config(TRAIN, ["--precision", "fp8"])


def test_each_job_exposes_its_own_flags():
    def flags(job):
        return {a for action in build_parser(job)._actions for a in action.option_strings}
    assert {"--lr", "--batch-size", "--num-workers", "--use-gpu", "--no-use-gpu"} <= flags(TRAIN)
    assert {"--workers-per-trial", "--batch-sizes", "--lr-min"} <= flags(TUNE) and "--lr" not in flags(TUNE)
    assert {"--batch-size", "--input", "--output"} <= flags(SCORE) and "--epochs" not in flags(SCORE)
