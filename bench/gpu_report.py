"""What bench/gpu_check.py reports: the versions its figures depend on, one table row per step, and our
training speed as a ratio to HF Trainer(group_by_length)'s."""

from __future__ import annotations

import platform
import subprocess
from typing import Optional


def versions() -> dict:
    """What the figures depend on: the device, the driver, torch and CUDA, Ray, transformers."""
    import ray
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "ray": ray.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
        try:  # nvidia-smi's card name too: torch's can differ (a MIG slice, a renamed board)
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
            info["nvidia_smi_name"], info["driver"] = (part.strip() for part in smi.rsplit(",", 1))
        except (OSError, IndexError, ValueError, subprocess.SubprocessError):
            info["driver"] = "unknown (no nvidia-smi)"
    else:
        info["gpu"] = "none (CPU smoke run)"
    return info


def table(rows: list[dict]) -> str:
    """One line per step: its figure, what it was measured on, its wall time."""
    lines = [f"{'step':<7} {'result':<68} {'wall':>8}"]
    for r in rows:
        res = r["result"] or {}
        if not r["ok"]:
            text = f"FAILED: {r['error']}"
        elif r["step"] == "model":
            text = res["shape"]
        elif r["step"] in ("train", "hf"):
            text = (f"{res['samples_per_second']:,.0f} samples/s ({res['train_samples']:,} samples, "
                    f"batch {res['batch_size']}{', HF Trainer(group_by_length)' if r['step'] == 'hf' else ''})")
        else:
            text = f"{res['rows_per_second']:,.0f} rows/s ({res['rows']:,} rows, {res['dtype']}, batch {res['batch_size']})"
        lines.append(f"{r['step']:<7} {text:<68} {r['wall_seconds']:>7.1f}s")
    lines.append(f"{'total':<7} {'':<68} {sum(r['wall_seconds'] for r in rows):>7.1f}s")
    if (ratio := speedup(rows)) is not None:
        lines.append(f"raysst trains at {ratio:.2f}x the samples/s of HF Trainer(group_by_length) on the same work")
    return "\n".join(lines)


def speedup(rows: list[dict]) -> Optional[float]:
    """Our training samples/s over HF Trainer(group_by_length)'s, when both steps gave a figure."""
    by_step = {r["step"]: r["result"] for r in rows if r["ok"]}
    if "train" in by_step and "hf" in by_step:
        return by_step["train"]["samples_per_second"] / by_step["hf"]["samples_per_second"]
    return None


def describe(v: dict) -> str:
    """The versions as one readable line."""
    smi = f"nvidia-smi: {v['nvidia_smi_name']}, " if "nvidia_smi_name" in v else ""
    gpu = v["gpu"] if "driver" not in v else (f"{v['gpu']} ({smi}{v['gpu_memory_gib']} GiB, compute capability "
                                             f"{v['compute_capability']}, driver {v['driver']})")
    return (f"GPU: {gpu}; torch {v['torch']} (CUDA {v['cuda']}); Ray {v['ray']}; transformers {v['transformers']}; "
            f"Python {v['python']}")
