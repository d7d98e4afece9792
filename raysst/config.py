"""One config for every job: defaults here, a YAML file over them, flags over the file.

Each field says which jobs expose it as a flag (`jobs`) and, where a job names the
flag differently, under which name (`flag`). Validation happens once, in
`Config.__post_init__`, so a bad value fails where it enters. The YAML file and the flags
are read by `raysst.cli`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from raysst.task import KINDS as TASK_KINDS
from raysst.windows import COMBINES, MODES as LONG_TEXT_MODES


TRAIN, TUNE, SCORE, EVAL = "train", "tune", "score", "evaluate"
ALL = (TRAIN, TUNE, SCORE, EVAL)
TRAINING = (TRAIN, TUNE)

PACKAGED_MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TRAINING_PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PRECISIONS = (*TRAINING_PRECISIONS, "int8")  # int8: dynamic quantization, for CPU scoring and evaluation only
DEFAULT_STORAGE = "~/raysst-runs"


def _f(default: Any, help: str, jobs: Sequence[str] = TRAINING, flag: Optional[dict] = None, repeat: bool = False):
    kwargs = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(metadata={"help": help, "jobs": tuple(jobs), "flag": flag or {}, "repeat": repeat}, **kwargs)


@dataclass
class Config:
    # What to train on, and where results go.
    model: str = _f(PACKAGED_MINILM, "Hugging Face checkpoint: Hub name or local directory", (TRAIN, TUNE, SCORE))
    data: str = _f("nyu-mll/glue", "a Hub dataset name or a local directory with train/validation splits")
    data_config: Optional[str] = _f(None, "the Hub dataset's config; a GLUE task name (sst2, mrpc, stsb, mnli, ...) "
                                    "also picks its text columns and label names as run_glue.py does (default: sst2 "
                                    "for nyu-mll/glue, or the GLUE task a local directory is named after; none: no "
                                    "GLUE task)")
    train_split: str = _f("train", "name of the training split")
    validation_split: Optional[str] = _f(None, "name of the validation split (default: validation, dev or val; "
                                         "validation_matched for mnli)")
    # The task: columns and labels (raysst.task).
    text_column: Optional[str] = _f(None, "text column (default: the GLUE task's, else `sentence` or `text`)", ALL)
    text_pair_column: Optional[str] = _f(None, "second text of a pair (encoded as a real pair, with segment ids)",
                                         ALL)
    label_column: str = _f("label", "label column: class names or ids, lists of names (multi-label) or numbers "
                           "(regression)", TRAINING + (EVAL,))
    labels: list = _f([], "comma-separated label names: fixes their order (ids index it) and rejects any other "
                      "(default: the training split's sorted values; score and evaluate: the model's, renamed)", ALL)
    task: Optional[str] = _f(None, "single, multi-label or regression (default: inferred from the labels; "
                             "score and evaluate: the model's problem_type)", ALL)
    threshold: float = _f(0.5, "multi-label: a label is on when its probability exceeds this", ALL)
    metric: Optional[str] = _f(None, "the validation metric that picks the best checkpoint and that tune "
                               "optimizes (default: accuracy, micro_f1 or pearson, by task)")
    storage_path: str = _f(DEFAULT_STORAGE, "where runs, checkpoints and models are written (local path or s3://...)")
    name: str = _f("sst2", "run name; rerunning with the same name and storage path resumes")
    # Scale.
    num_workers: Union[int, str] = _f(1, "training workers (one per GPU); a range MIN-MAX such as 2-8 starts with what "
                                      "fits (at least MIN) and grows towards MAX as nodes come", (TRAIN,),
                                      flag={TUNE: "workers-per-trial"})
    elastic_resize_interval: float = _f(60.0, "with --num-workers MIN-MAX: seconds between checks whether a running "
                                        "run can grow (a resize restarts it from its latest checkpoint)", (TRAIN,))
    num_actors: Optional[int] = _f(None, "model actors (default: one per GPU with --use-gpu, else one per "
                                   "--cpus-per-worker CPUs that Ray has)", (), flag={SCORE: "num-workers",
                                                                                 EVAL: "num-workers"})
    use_gpu: bool = _f(False, "run on GPUs", ALL)
    fake_gpu: bool = _f(False, "tests only: reserve Ray's GPU resource (a fake cluster's GPU is a label) but compute "
                        "on CPU with gloo; needs use_gpu; YAML only", ())
    cpus_per_worker: int = _f(1, "CPUs reserved per worker; on CPU also its torch threads", ALL)
    # Recipe.
    epochs: int = _f(3, "training epochs")
    lr: float = _f(5e-5, "peak learning rate", (TRAIN,))
    batch_size: int = _f(32, "global training batch size (over all workers and accumulation steps)", (TRAIN,))
    grad_accum_steps: int = _f(1, "micro-batches accumulated per optimizer step")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases and LayerNorm)")
    warmup_ratio: float = _f(0.06, "fraction of optimizer steps spent in linear warmup")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 turns it off)")
    head_lr_scale: float = _f(1.0, "learning-rate multiplier for the classification head (pooler and classifier)")
    dropout: Optional[float] = _f(None, "dropout rate of every dropout layer while training (default: the checkpoint's)")
    max_seq_length: int = _f(128, "tokens per model input: longer texts are truncated, or scored in windows of "
                             "this size (--long-text)", ALL)
    max_train_samples: Optional[int] = _f(None, "train on a random slice of this many examples (0: all)")
    group_by_length: bool = _f(True, "batch examples of similar length together to cut padding")
    precision: str = _f("auto", "auto (bf16 on GPUs that have it, else fp16; fp32 on CPU), bf16 (on a CPU too), "
                        "fp16, fp32, or int8 (score and evaluate on CPU only: the encoder's Linear layers in dynamic int8)",
                        ALL)
    seed: int = _f(42, "random seed")
    eval_batch_size: int = _f(128, "batch size for validation and scoring", TRAINING + (EVAL,), flag={SCORE: "batch-size"})
    # Fault tolerance and logging.
    keep_checkpoints: int = _f(2, "checkpoints kept, best by the validation --metric")
    max_failures: int = _f(3, "worker-group restarts from the latest checkpoint before giving up")
    wait_for_nodes: int = _f(1800, "seconds to wait for the workers' resources (the autoscaler adding nodes) before "
                             "failing", ALL)
    take_over: bool = _f(False, "take the output's lease (_lease.json) from the job it names, which must be dead; "
                         "this job goes on from the committed parts", (SCORE, EVAL))
    lease_timeout: float = _f(60.0, "seconds without a heartbeat after which this job's lease on its output is dead "
                              "(it renews the lease every quarter of that)", (SCORE, EVAL))
    log_every: int = _f(50, "log one line every N optimizer steps")
    mlflow_uri: Optional[str] = _f(None, "also log to this MLflow tracking URI")
    # Tune.
    num_samples: int = _f(8, "trials in the sweep", (TUNE,))
    lr_min: float = _f(1e-5, "lower bound of the log-uniform learning rate", (TUNE,))
    lr_max: float = _f(1e-4, "upper bound of the log-uniform learning rate", (TUNE,))
    batch_sizes: list = _f([16, 32, 64], "global batch sizes to choose from", (TUNE,))
    scheduler: str = _f("asha", "asha or none", (TUNE,))
    search: str = _f("random", "random or optuna", (TUNE,))
    max_concurrent_trials: Optional[int] = _f(None, "cap on concurrent trials (default: what the cluster fits)", (TUNE,))
    # Score.
    input: Optional[str] = _f(None, "file, directory or glob to score", (SCORE,), flag={EVAL: "data"})
    output: Optional[str] = _f(None, "output directory", (SCORE, EVAL))
    id_column: Optional[str] = _f(None, "id column kept as the row key", (SCORE,))
    on_bad_file: str = _f("fail", "fail or skip unreadable files", (SCORE,))
    chunk_rows: int = _f(0, "rows per chunk of a file (parquet: at most one row group): the unit scored, written "
                         "as one part and resumed; 0: the corpus in about 64 chunks of 2,000 to 100,000 rows "
                         "(a rerun keeps the first run's)", (SCORE,))
    long_text: str = _f("head-tail", "texts longer than --max-seq-length: windows (the whole text in overlapping "
                        "windows, their outputs combined), head-tail (the first quarter and the last three quarters "
                        "of one window) or truncate (the head only)", (SCORE, EVAL))
    stride: Optional[int] = _f(None, "--long-text windows: tokens each window shares with the next (default: a "
                               "quarter of --max-seq-length)", (SCORE, EVAL))
    max_windows: int = _f(64, "--long-text windows: windows per text at most; a longer text is scored on its first "
                          "N-1 windows and its last one (status `capped`)", (SCORE, EVAL))
    combine: str = _f("max-confidence", "--long-text windows: how a text's window outputs combine: mean-probs, "
                      "mean-logits or max-confidence (regression: always the mean value)", (SCORE, EVAL))
    # Evaluate.
    models: list = _f([], "model to evaluate; repeat the flag to compare several side by side (default: `model`)",
                      (), flag={EVAL: "model"}, repeat=True)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", self.epochs, "at least 1")
        _check(self.lr > 0, "lr", self.lr, "a positive number")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "at least 1")
        self.num_workers = parse_workers(self.num_workers)
        _check(self.elastic_resize_interval > 0, "elastic_resize_interval", self.elastic_resize_interval,
               "a positive number of seconds")
        _check(self.use_gpu or not self.fake_gpu, "fake_gpu", self.fake_gpu, "false without use_gpu (it fakes a GPU "
               "that use_gpu reserves)")
        _check(self.num_actors is None or self.num_actors >= 1, "num_actors", self.num_actors, "at least 1")
        _check(self.cpus_per_worker >= 1, "cpus_per_worker", self.cpus_per_worker, "at least 1")
        _check(self.grad_accum_steps >= 1, "grad_accum_steps", self.grad_accum_steps, "at least 1")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "in [0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, ">= 0")
        _check(self.head_lr_scale > 0, "head_lr_scale", self.head_lr_scale, "a positive number")
        _check(self.dropout is None or 0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)")
        _check(8 <= self.max_seq_length <= 512, "max_seq_length", self.max_seq_length, "between 8 and 512")
        _check(self.max_train_samples is None or self.max_train_samples >= 0,
               "max_train_samples", self.max_train_samples, "0 (all) or more")
        _check(self.precision in PRECISIONS, "precision", self.precision, "one of " + ", ".join(PRECISIONS))
        if self.precision == "int8" and self.use_gpu:
            raise ValueError("config: --precision int8 quantizes for CPUs and cannot run with --use-gpu; drop "
                             "--use-gpu to score in int8, or keep it with --precision auto, bf16, fp16 or fp32")
        _check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "at least 1")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "at least 1")
        _check(self.max_failures >= 0, "max_failures", self.max_failures, ">= 0")
        _check(self.wait_for_nodes >= 1, "wait_for_nodes", self.wait_for_nodes, "at least 1 (seconds)")
        _check(self.lease_timeout > 0, "lease_timeout", self.lease_timeout, "a positive number of seconds")
        _check(self.log_every >= 1, "log_every", self.log_every, "at least 1")
        _check(bool(self.name) and "/" not in self.name, "name", self.name, "a non-empty name without '/'")
        _check(self.num_samples >= 1, "num_samples", self.num_samples, "at least 1")
        _check(0 < self.lr_min <= self.lr_max, "lr_min/lr_max", (self.lr_min, self.lr_max), "0 < lr_min <= lr_max")
        try:
            self.batch_sizes = [int(b) for b in (self.batch_sizes.split(",") if isinstance(self.batch_sizes, str)
                                                   else self.batch_sizes)]
        except (TypeError, ValueError):
            _check(False, "batch_sizes", self.batch_sizes, "comma-separated whole numbers such as 16,32,64")
        _check(all(b >= 1 for b in self.batch_sizes) and self.batch_sizes, "batch_sizes", self.batch_sizes,
               "a non-empty list of positive sizes")
        _check(self.scheduler in ("asha", "none"), "scheduler", self.scheduler, "asha or none")
        _check(self.search in ("random", "optuna"), "search", self.search, "random or optuna")
        _check(self.on_bad_file in ("fail", "skip"), "on_bad_file", self.on_bad_file, "fail or skip")
        _check(self.long_text in LONG_TEXT_MODES, "long_text", self.long_text, "one of " + ", ".join(LONG_TEXT_MODES))
        _check(self.stride is None or 0 <= self.stride <= self.max_seq_length // 2, "stride", self.stride,
               f"between 0 and half of --max-seq-length ({self.max_seq_length // 2})")
        _check(self.max_windows >= 2, "max_windows", self.max_windows, "at least 2 (the first and the last window)")
        _check(self.combine in COMBINES, "combine", self.combine, "one of " + ", ".join(COMBINES))
        _check(self.chunk_rows >= 0, "chunk_rows", self.chunk_rows, "0 (auto) or more")
        self.models = [str(m) for m in ([self.models] if isinstance(self.models, str) else self.models)]
        # Each model's report lands in a directory named after it: the same model twice would collide.
        _check(len(set(self.models)) == len(self.models) and all(self.models), "models", self.models,
               "distinct, non-empty model names")
        _check(bool(self.label_column), "label_column", self.label_column, "a column name")
        self.labels = [str(n).strip() for n in (self.labels.split(",") if isinstance(self.labels, str)
                                                else self.labels)]
        _check(len(set(self.labels)) == len(self.labels) and all(self.labels), "labels", self.labels,
               "distinct, non-empty comma-separated names such as negative,neutral,positive")
        _check(self.task in (None, *TASK_KINDS), "task", self.task, "one of " + ", ".join(TASK_KINDS))
        _check(0 < self.threshold < 1, "threshold", self.threshold, "in (0, 1)")
        # A resized run keeps its global batch, so every size an elastic group may have must split it.
        uneven = [w for w in self.worker_counts if self.batch_size % (w * self.grad_accum_steps)]
        _check(not uneven, "batch_size", self.batch_size, "divisible by num_workers * grad_accum_steps " + (
            f"for every worker count in {self.num_workers}, but {', '.join(map(str, uneven))} worker(s) do not split "
            f"it; use a multiple of {self.worker_multiple * self.grad_accum_steps} or a narrower range" if self.elastic
            else f"= {self.num_workers * self.grad_accum_steps}"))
        self.storage_path = expand_path(self.storage_path)

    @property
    def elastic(self) -> bool:
        """Whether num_workers is a range MIN-MAX (Ray Train sizes the group to what fits)."""
        return isinstance(self.num_workers, str)

    @property
    def min_workers(self) -> int:
        return worker_range(self.num_workers)[0]

    @property
    def max_workers(self) -> int:
        return worker_range(self.num_workers)[1]

    @property
    def worker_counts(self) -> range:
        """Every world size a run may have."""
        return range(self.min_workers, self.max_workers + 1)

    @property
    def worker_multiple(self) -> int:
        """The least number every world size divides: training rows are trimmed to a multiple of it, so each
        size gives every worker the same rows and every epoch the same optimizer steps."""
        return math.lcm(*self.worker_counts)

    @property
    def compute_on_gpu(self) -> bool:
        """Whether torch computes on CUDA: use_gpu, unless fake_gpu keeps the work on CPU (tests)."""
        return self.use_gpu and not self.fake_gpu

    def per_worker_batch(self, world_size: int) -> int:
        """Each worker's micro-batch when `world_size` workers share the global batch."""
        return self.batch_size // (world_size * self.grad_accum_steps)

    @property
    def window_stride(self) -> int:
        """Tokens shared by neighbouring windows: --stride, else a quarter of the window."""
        return self.max_seq_length // 4 if self.stride is None else self.stride

    @property
    def eval_models(self) -> list:
        """The models an evaluation compares: `models` if given, else `model` alone."""
        return list(self.models) or [self.model]

    def replace(self, **changes: Any) -> "Config":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_job(cfg: Config, job: str) -> Config:
    """The checks that depend on the job as well as the values (a Config does not know its job); returns cfg.

    parse_config runs them for a command line; train and tune run them where they start, for a Config
    built in Python.
    """
    if job == TUNE and cfg.elastic:
        raise ValueError(f"config: tune runs trials of a fixed size; give --workers-per-trial a number, not the range "
                         f"{cfg.num_workers}")
    if job in TRAINING and cfg.precision not in TRAINING_PRECISIONS:
        raise ValueError(f"config: {job} cannot use --precision {cfg.precision}: it is for scoring and evaluation "
                         f"on CPU only; train with one of {', '.join(TRAINING_PRECISIONS)}")
    return cfg


def parse_workers(value: Any) -> Union[int, str]:
    """A worker count as given (4, "4", "2-8", "2-2"): an int when fixed, "MIN-MAX" when a range."""
    low, high = worker_range(value)
    return low if low == high else f"{low}-{high}"


def worker_range(value: Any) -> tuple:
    """(MIN, MAX) of a worker count or range; ValueError in the user's words for anything else."""
    found = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(value)) if not isinstance(value, bool) else None
    low, high = (int(found.group(1)), int(found.group(2) or found.group(1))) if found else (0, 0)
    _check(found is not None and 1 <= low <= high, "num_workers", value,
           "a whole number of at least 1 such as 4, or a range MIN-MAX with 1 <= MIN <= MAX such as 2-8")
    return low, high


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"config: {name} must be {expected}, got {value!r}")


def expand_path(path: str) -> str:
    """Absolute local paths (so `ray job submit` workers agree on them); URIs stay as they are."""
    if "://" in path:
        return path
    return str(Path(os.path.expanduser(path)).absolute())
