"""Where rank 0 sends its metrics: TensorBoard always, MLflow when `--mlflow-uri` is given."""

from __future__ import annotations

from pathlib import Path
from raysst.config import DEFAULT_STORAGE, Config, expand_path


def tensorboard_dir(cfg: Config) -> str:
    """`<storage>/<name>/tensorboard`; for s3:// storage, the same under ~/raysst-runs on the rank-0 node."""
    base = cfg.storage_path if "://" not in cfg.storage_path else expand_path(DEFAULT_STORAGE)
    return str(Path(base) / cfg.name / "tensorboard")


def require_mlflow(cfg: Config) -> None:
    """Fail on the driver, before any worker starts, when MLflow is asked for but not installed."""
    if cfg.mlflow_uri:
        try:
            import mlflow  # noqa: F401
        except ImportError as e:
            raise SystemExit("--mlflow-uri needs MLflow: pip install 'raysst[mlflow]'") from e


class Tracker:
    """Logs scalars by global step; a resumed run appends to the same TensorBoard directory and MLflow run name."""

    def __init__(self, cfg: Config, enabled: bool = True):
        self.tb, self.mlflow = None, None
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(tensorboard_dir(cfg))
        if cfg.mlflow_uri:
            import mlflow

            mlflow.set_tracking_uri(cfg.mlflow_uri)
            mlflow.set_experiment("raysst")
            mlflow.start_run(run_name=cfg.name)
            mlflow.log_params({k: v for k, v in cfg.to_dict().items() if v is not None and not isinstance(v, list)})
            self.mlflow = mlflow

    def log(self, metrics: dict, step: int, prefix: str = "") -> None:
        scalars = {prefix + k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.mlflow:
            self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.mlflow:
            self.mlflow.end_run()
