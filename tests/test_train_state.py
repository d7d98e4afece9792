"""Checkpoint state without pickle: the new files round-trip a real optimizer, a legacy torch.save file still
resumes through torch's weights-only allow-list, and a state file whose pickle runs code is refused unrun."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from raysst.models import load_classifier
from raysst.train_state import LEGACY_FILE, STRUCTURE_FILE, TENSORS_FILE, UnsafeCheckpoint, load_state, save_state


class Payload:
    """Unpickled, it runs a shell command that creates `marker`: what a planted state file could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def trained_state(model_dir: str, steps: int = 3) -> tuple:
    """A tiny BERT's fused AdamW, warmup schedule and an enabled GradScaler after a few real steps, as the
    worker builds them, and the state dict the worker checkpoints."""
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(0)
    model = load_classifier(model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, 2, 10)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    batch = {"input_ids": torch.randint(1000, 2000, (4, 12)), "labels": torch.tensor([0, 1, 1, 0])}
    for _ in range(steps):
        scaler.scale(model(**batch).loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad()
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
             "epoch": 1, "steps_per_epoch": 10, "history": [{"epoch": 1, "accuracy": 0.5, "rate": float("inf")}]}
    return model, optimizer, state, batch


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


def test_new_state_files_round_trip_and_hold_no_pickle(tiny_model, tmp_path):
    model, optimizer, state, batch = trained_state(tiny_model)
    save_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([TENSORS_FILE, STRUCTURE_FILE])
    json.loads((tmp_path / STRUCTURE_FILE).read_text())  # plain JSON, and the rest safetensors: no pickle anywhere
    loaded = load_state(tmp_path)
    assert same(loaded, state)
    assert loaded["scaler"]["scale"] > 0 and loaded["optimizer"]["state"][0]["exp_avg"].abs().sum() > 0
    # The loaded state drives a fresh optimizer exactly as the original one goes on.
    twin = load_classifier(tiny_model)
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3, fused=True)
    twin_opt.load_state_dict(loaded["optimizer"])
    for m, opt in ((model, optimizer), (twin, twin_opt)):
        m(**batch).loss.backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_state_with_anything_but_tensors_and_plain_values_is_not_written(tmp_path):
    import numpy as np

    with pytest.raises(TypeError, match=r"checkpoint state state.history.0.steps: int64 np.int64\(3\) is not a tensor"):
        save_state(tmp_path, {"history": [{"loss": np.float64(0.5), "steps": np.int64(3)}]})


def test_legacy_state_loads_through_the_weights_only_allow_list(tiny_model, tmp_path):
    _, _, state, _ = trained_state(tiny_model)
    torch.save(state, tmp_path / LEGACY_FILE)  # what raysst wrote before the new files
    assert same(load_state(tmp_path), state)
    # torch's list admits a dtype, which raysst never wrote: its own list (tensors and plain values) does not.
    torch.save({**state, "epoch": torch.float16}, tmp_path / LEGACY_FILE)
    with pytest.raises(UnsafeCheckpoint, match=rf"{tmp_path / LEGACY_FILE}: refused: .*state.epoch: dtype"):
        load_state(tmp_path)


def test_state_that_runs_code_when_unpickled_is_refused_unrun(tiny_model, tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control)))  # the payload is live: unpickled, it runs
    assert control.exists()
    marker = tmp_path / "marker"
    _, _, state, _ = trained_state(tiny_model, steps=1)
    torch.save({**state, "scheduler": Payload(marker)}, tmp_path / LEGACY_FILE)
    with pytest.raises(UnsafeCheckpoint, match=rf"{tmp_path / LEGACY_FILE}: refused: .*GLOBAL posix.system"):
        load_state(tmp_path)
    assert not marker.exists()


def latest_checkpoint(run_dir: Path) -> Path:
    return max(run_dir.glob("checkpoint_epoch_*"))


@pytest.mark.timeout(300)
def test_restarted_run_resumes_from_new_and_legacy_state_and_refuses_a_planted_one(ray_local, tiny_model, sst2_small,
                                                                                  tmp_path, capfd):
    """A run of 1 epoch, rerun under the same name to 2 epochs (resuming from the new files), its latest
    checkpoint rewritten as today's torch.save file and rerun to 3 (resuming from it), then that file
    replaced by one that runs code when unpickled: the rerun to 4 fails naming the file, and the code never ran."""
    from raysst.config import Config
    from raysst.data import load_data, to_ray_datasets
    from raysst.train import build_trainer

    cfg = Config(model=tiny_model, data=str(sst2_small), storage_path=str(tmp_path / "runs"), name="run", num_workers=1,
                 epochs=1, lr=1e-3, batch_size=16, eval_batch_size=64, max_failures=0)
    train, validation, task = load_data(cfg)
    datasets = to_ray_datasets(train, validation, cfg.model, cfg.max_seq_length)
    run_dir = tmp_path / "runs" / "run"

    def run_to(epochs: int) -> list:
        """(epoch, the epoch its run started at) for every epoch of the run's history, after training to `epochs`."""
        result = build_trainer(cfg.replace(epochs=epochs), datasets, len(train), task).fit()
        with result.checkpoint.as_directory() as latest:
            return [(r["epoch"], r["start_epoch"]) for r in json.loads((Path(latest) / "history.json").read_text())]

    assert run_to(1) == [(1, 1)]
    assert not (latest_checkpoint(run_dir) / LEGACY_FILE).exists()
    assert run_to(2) == [(1, 1), (2, 2)]
    assert "resuming from the checkpoint of epoch 1" in capfd.readouterr().out

    legacy = latest_checkpoint(run_dir)  # epoch 2's, in the new files: rewritten as raysst wrote it before
    torch.save(load_state(legacy), legacy / LEGACY_FILE)
    (legacy / TENSORS_FILE).unlink()
    (legacy / STRUCTURE_FILE).unlink()
    assert run_to(3) == [(1, 1), (2, 2), (3, 3)]
    assert "resuming from the checkpoint of epoch 2" in capfd.readouterr().out

    planted, marker = latest_checkpoint(run_dir), tmp_path / "marker"
    state = load_state(planted)
    (planted / TENSORS_FILE).unlink()
    (planted / STRUCTURE_FILE).unlink()
    torch.save({**state, "optimizer": Payload(marker)}, planted / LEGACY_FILE)
    with pytest.raises(Exception, match=rf"{planted / LEGACY_FILE}: refused"):
        run_to(4)
    assert not marker.exists()
