"""Shared fixtures: a tiny BERT with the real tokenizer, small real SST-2 slices, and a local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_bert(directory: Path) -> str:
    from raysst.models import make_random_model

    return make_random_model(str(directory), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=128)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT classifier with random weights and the bert-base-uncased tokenizer."""
    return tiny_bert(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def sst2_small(tmp_path_factory) -> Path:
    """A directory of real SST-2 rows: 800 train (seeded sample) and 101 validation (not a divisor of 2 or 4)."""
    out = tmp_path_factory.mktemp("sst2_small")
    pd.read_parquet(SST2 / "train.parquet").sample(n=800, random_state=0).to_parquet(out / "train.parquet")
    pd.read_parquet(SST2 / "validation.parquet").head(101).to_parquet(out / "validation.parquet")
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the in-process tests; 4 logical CPUs so 2 workers and Ray Data fit on 2 cores.

    Started by `init_ray`, like the jobs' local Ray, so that Ray Train's placement-group cleaner finds
    this cluster and not another test's Ray on the same machine."""
    import ray

    from raysst.runtime import init_ray

    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()
