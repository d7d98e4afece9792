"""The first lent GPU session's one call: install the carry kit's wheels, run the GPU check, keep its files.

A lent task gets 15 minutes (900 s) of device time in all: a machine's start (a minute or more), every call,
and the idle time between calls count. The call is capped so that the start, the call and one rerun of it
fit: 90 s + 2 x TIMEOUT_S = 870 s. Within the call the check's steps are capped at TRAIN_TIMEOUT (ours,
then HF Trainer's) and SCORE_TIMEOUT, and what is left covers the install (seconds: pip unpacks wheels
and compiles nothing), the kit's checksums, the random bert-base and the corpus.
"""

from __future__ import annotations

import shlex

SITE = "/tmp/site"  # where the wheels are installed on the device machine (a fresh machine each session)
TRAIN_TIMEOUT = 110  # each training step: one epoch of SST-2 on a bert-base shape, Ray's start included
SCORE_TIMEOUT = 90  # the scoring step: ~200k sentences through one GPU actor
TIMEOUT_S = 390  # the call: 2 x 110 + 90 = 310 s of steps, 80 s for the rest
# The device tool's recipe for carried wheels: no index there, the kit holds every wheel's needs.
PIP_INSTALL = "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"


def device_command(kit: str = ".gpu-kit", site: str = SITE, cpu_smoke: bool = False) -> str:
    """The shell command that the device tool runs in the repository root, writing its files under $OUT.

    Set up, it is `python3` (the image's, with torch) on the kit's wheels and this checkout alone:
    PYTHONPATH, no venv. `cpu_smoke` swaps the GPU run for the CPU smoke run (the tests' rehearsal)."""
    k, s = shlex.quote(kit), shlex.quote(site)
    check = f"--kit {k} --out \"$OUT\" " + ("--cpu-smoke" if cpu_smoke else
                                            f"--train-timeout {TRAIN_TIMEOUT} --score-timeout {SCORE_TIMEOUT}")
    return ("set -o pipefail; export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1; "
            "nvidia-smi > \"$OUT/nvidia-smi.txt\" 2>&1; "
            f"python3 bench/gpu_kit.py --verify {k} && "
            f"{PIP_INSTALL} --target {s} {k}/wheels/*.whl && "
            f"PYTHONPATH={s}:\"$PWD\" python3 bench/gpu_check.py {check} 2>&1 | tee \"$OUT/gpu_check.log\"")


def run_arguments(kit: str = ".gpu-kit") -> dict:
    """The device tool's `run` arguments for the GPU check, to paste as they are."""
    return {"command": device_command(kit), "carry": [kit], "timeout_s": TIMEOUT_S}
