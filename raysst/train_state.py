"""A training checkpoint's optimizer, schedule and scaler state, epoch and history, stored without pickle.

Checkpoints live in `--storage-path`, often a shared bucket: whatever a resume reads there must not be able to
run code. The state is written as `train_state.safetensors` (every tensor) plus `train_state.json` (everything
else, with a tensor's key where it stood); neither format can hold code. A checkpoint from before this format
has `train_state.pt`: it is read with `torch.load(weights_only=True)`, whose unpickler builds only tensors,
plain containers, numbers and a few torch types (torch's allow-list; raysst adds nothing to it), and what it
built must then be tensors and plain values alone, as in the new files (all raysst ever wrote there).
Anything else is refused, naming the file; a global outside torch's list is refused before it is built.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from raysst.storage import STATE_FILES

TENSORS_FILE, STRUCTURE_FILE, LEGACY_FILE = STATE_FILES  # the last: a torch.save pickle, as raysst wrote before
# Markers in the JSON: a dict with exactly one of these keys stands for a value JSON has no form for.
TENSOR, TUPLE, INT_KEYS = "__tensor__", "__tuple__", "__int_keys__"


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint state file that holds something other than tensors and plain values."""


def save_state(directory: Path, state: dict) -> None:
    """Write `state` (tensors, dicts, lists, tuples, numbers, strings, None) into `directory`."""
    from safetensors.torch import save_file

    tensors: dict = {}
    structure = _encode(state, tensors, "state")
    save_file(tensors, str(directory / TENSORS_FILE))
    (directory / STRUCTURE_FILE).write_text(json.dumps(structure))


def load_state(directory: Path) -> dict:
    """The state a checkpoint directory holds, in the format it was written in; UnsafeCheckpoint for a
    legacy file that holds anything but tensors and plain values."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if (directory / STRUCTURE_FILE).exists():
        return _decode(json.loads((directory / STRUCTURE_FILE).read_text()), load_file(str(directory / TENSORS_FILE)))
    legacy = directory / LEGACY_FILE
    try:
        state = torch.load(legacy, weights_only=True, map_location="cpu")
        _encode(state, {}, "state")  # raysst's own allow-list over torch's: what the new files can hold
        return state
    except (pickle.UnpicklingError, TypeError) as e:
        # torch's message opens with advice to load with weights_only=False; what matters is the global it met.
        reason = next((f"torch.load(weights_only=True): {line.strip()}" for line in str(e).splitlines()
                       if "GLOBAL" in line), str(e))
        raise UnsafeCheckpoint(
            f"{legacy}: refused: this checkpoint state holds objects other than tensors and plain values, which "
            f"raysst never writes ({reason}). Its storage may have been tampered with; nothing in it was run. "
            f"Restore the checkpoint from a copy you trust, or start the run afresh under another --name") from None


def _encode(value: Any, tensors: dict, key: str) -> Any:
    if isinstance(value, torch.Tensor):
        if key in tensors:  # two paths spelled alike ("a.b" and a -> b): one tensor would hide the other
            raise ValueError(f"checkpoint state: two tensors under the key {key}")
        tensors[key] = value.detach().cpu().contiguous()
        return {TENSOR: key}
    if isinstance(value, tuple):
        return {TUPLE: [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value), "").startswith("__")):
            return {k: _encode(v, tensors, f"{key}.{k}") for k, v in value.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in value):  # the optimizer's per-parameter state
            return {INT_KEYS: [[k, _encode(v, tensors, f"{key}.{k}")] for k, v in value.items()]}
    elif value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint state {key}: {type(value).__name__} {value!r:.80} is not a tensor or a plain value")


def _decode(value: Any, tensors: dict) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (marker, inner), = value.items()
        if marker == TENSOR:
            return tensors[inner]
        if marker == TUPLE:
            return tuple(_decode(v, tensors) for v in inner)
        if marker == INT_KEYS:
            return {int(k): _decode(v, tensors) for k, v in inner}
    return {k: _decode(v, tensors) for k, v in value.items()}
