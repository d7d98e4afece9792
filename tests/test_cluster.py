"""cluster.yaml and cluster-gcp.yaml through Ray's own cluster-config validation, the checks that matter for
raysst on top of it, and bench/gpu_check.py's CPU smoke run (the GPU check itself needs a GPU)."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = {"aws": ROOT / "cluster.yaml", "gcp": ROOT / "cluster-gcp.yaml"}
INSTANCE_KEY = {"aws": "InstanceType", "gcp": "machineType"}
A100_NODE = {"aws": "p4d.24xlarge", "gcp": "a2-highgpu-8g"}
CLUSTER_CONFIG = ROOT / "configs" / "bert-base-a100.yaml"


def load(cloud: str) -> dict:
    return yaml.safe_load(CLUSTERS[cloud].read_text())


def ray_validated(config: dict) -> dict:
    """What `ray up` does with a config before it contacts the cloud (ray.autoscaler._private.commands.
    _bootstrap_config): merge the provider's defaults, then validate against ray-schema.json and the
    cross-field rules. The provider's own bootstrap that follows needs cloud credentials."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def node_types(config: dict) -> tuple[dict, dict]:
    """The head node type and the one worker type."""
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    (worker,) = [t for name, t in types.items() if name != config["head_node_type"]]
    return head, worker


@pytest.mark.parametrize("cloud", CLUSTERS)
def test_ray_validator_accepts_the_cluster_config(cloud):
    prepared = ray_validated(load(cloud))
    assert prepared["provider"]["type"] == cloud
    # The merge kept our commands: the worker gets the common setup, the head also its autoscaler client.
    assert prepared["worker_setup_commands"] == load(cloud)["setup_commands"]
    assert prepared["head_setup_commands"][:-1] == load(cloud)["setup_commands"]


def _typo_in_node_type(c):
    c["available_node_types"][c["head_node_type"]]["min_worker"] = 0


def _gpu_count_as_text(c):
    node_types(c)[1]["resources"]["GPU"] = "8"


def _unknown_head_type(c):
    c["head_node_type"] = "ray.head.missing"


def _min_over_max(c):
    node_types(c)[1]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize("break_it", [_typo_in_node_type, _gpu_count_as_text, _unknown_head_type, _min_over_max])
def test_ray_validator_rejects_a_broken_config(break_it):
    """The validator is strict, so its passing the real configs means something."""
    import jsonschema

    config = load("aws")
    break_it(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validated(config)


@pytest.mark.parametrize("cloud", CLUSTERS)
def test_training_lands_on_the_a100_workers_only(cloud):
    from raysst.cli import load_config

    head, worker = node_types(load(cloud))
    assert head["resources"]["GPU"] == 0 and head["resources"]["CPU"] > 0
    assert head.get("max_workers", 0) == 0
    assert worker["node_config"][INSTANCE_KEY[cloud]] == A100_NODE[cloud]
    assert worker["resources"]["GPU"] == 8
    assert 0 <= worker["min_workers"] <= worker["max_workers"] and worker["max_workers"] >= 1
    # configs/bert-base-a100.yaml's workers ({CPU: cpus_per_worker, GPU: 1} each) all fit on one A100 node.
    cfg = load_config(str(CLUSTER_CONFIG))
    assert cfg.use_gpu and cfg.num_workers <= worker["resources"]["GPU"]
    assert cfg.num_workers * cfg.cpus_per_worker <= worker["resources"]["CPU"]


def test_both_clouds_run_the_same_setup_and_start_commands():
    aws, gcp = load("aws"), load("gcp")
    for key in ("setup_commands", "file_mounts", "head_start_ray_commands", "worker_start_ray_commands"):
        assert aws[key] == gcp[key], key


@pytest.mark.parametrize("cloud", CLUSTERS)
def test_every_command_is_valid_shell(cloud):
    """YAML eats an unquoted ' #...' as a comment: what reaches bash must still parse."""
    config = load(cloud)
    for key in ("setup_commands", "head_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in config[key]:
            done = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert done.returncode == 0, f"{key}: {cmd!r}: {done.stderr}"


def test_setup_installs_the_dependencies_of_pyproject(tmp_path):
    """Build exactly what the setup command pip-installs, from exactly the files it mounts: a wheel that
    holds raysst's dependencies (torch, Ray with train/tune/data, ...) and none of its code."""
    import ray

    config = load("aws")
    mounts = {remote: local for remote, local in config["file_mounts"].items() if remote.startswith("~/raysst-deps/")}
    assert set(Path(r).name for r in mounts) == {"pyproject.toml", "README.md"}
    for remote, local in mounts.items():  # local paths are relative to the repository root, where `ray up` runs
        shutil.copy(ROOT / local, tmp_path / Path(remote).name)
    (install,) = [c for c in config["setup_commands"] if "raysst-deps" in c]
    extras = re.search(r'"\$HOME/raysst-deps\[([\w,]+)\]"', install).group(1)
    pin = re.search(r'"ray\[([\w,]+)\]==([\d.]+)"', install)
    assert set(pin.group(1).split(",")) >= {"default", "train", "tune", "data"}
    assert pin.group(2) == ray.__version__, "the cluster's Ray must be the version of the CLI that submits to it"

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), f"{tmp_path}[{extras}]"], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("raysst-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert not [n for n in z.namelist() if n.endswith(".py")], "the code comes with each job, not with setup"
        metadata = z.read(next(n for n in z.namelist() if n.endswith("dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    base = [r for r in requires if "extra ==" not in r]
    assert any(r.startswith("torch") for r in base)
    ray_req = next(r for r in base if r.startswith("ray["))
    assert {"train", "tune", "data"} <= set(ray_req[4:ray_req.index("]")].split(","))
    for extra in extras.split(","):
        assert any(f'extra == "{extra}"' in r for r in requires), f"pyproject has no extra {extra!r}"


def test_outputs_go_to_shared_storage_that_the_workers_can_write():
    from raysst.cli import load_config

    assert load_config(str(CLUSTER_CONFIG)).storage_path.startswith("s3://")
    assert "s3://YOUR-BUCKET/raysst" in CLUSTERS["aws"].read_text()  # the comment that says where it goes
    # Ray gives the head an instance profile / service account; the workers write checkpoints themselves.
    aws_worker = node_types(load("aws"))[1]["node_config"]
    assert aws_worker["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    (account,) = node_types(load("gcp"))[1]["node_config"]["serviceAccounts"]
    assert "https://www.googleapis.com/auth/cloud-platform" in account["scopes"]


@pytest.mark.parametrize("cloud", CLUSTERS)
def test_nodes_share_the_token_of_ray_token_auth(cloud):
    config = load(cloud)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in config[key]), key


# bench/gpu_check.py. Without a GPU only its CPU smoke run can go end to end; it takes the same steps.

def gpu_check(*args: str, timeout: int = 880) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def steps(done: subprocess.CompletedProcess) -> dict:
    return {s["step"]: s for s in json.loads(done.stdout.strip().splitlines()[-1])["gpu_check"]}


def test_gpu_check_without_a_gpu_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = gpu_check(timeout=120)
    assert done.returncode == 2
    assert "no CUDA device is visible" in done.stderr and "--cpu-smoke" in done.stderr


@pytest.mark.timeout(900)
def test_gpu_check_cpu_smoke_runs_every_step():
    done = gpu_check("--cpu-smoke")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = steps(done)
    assert set(result) == {"model", "train", "hf", "score"} and all(s["ok"] for s in result.values())
    train, hf, score = result["train"]["result"], result["hf"]["result"], result["score"]["result"]
    assert train["train_samples"] == hf["train_samples"] == 64 and train["batch_size"] == hf["batch_size"] == 16
    assert train["samples_per_second"] > 0 and hf["samples_per_second"] > 0
    # Our speed as a ratio to HF Trainer(group_by_length) on the same work, in the JSON and the table.
    ratio = json.loads(done.stdout.strip().splitlines()[-1])["speedup_vs_hf_trainer_grouped"]
    assert ratio == pytest.approx(train["samples_per_second"] / hf["samples_per_second"])
    assert f"raysst trains at {ratio:.2f}x the samples/s of HF Trainer(group_by_length)" in done.stdout
    assert re.search(r"^hf +[\d,]+ samples/s \(64 samples, batch 16, HF Trainer\(group_by_length\)\)", done.stdout, re.M)
    assert score["rows"] == 300 and score["status_counts"]["ok"] == 300 and score["rows_per_second"] > 0
    assert re.search(r"^train +[\d,]+ samples/s", done.stdout, re.M)
    assert re.search(r"^score +[\d,]+ rows/s \(300 rows, float32, batch 32\)", done.stdout, re.M)


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_step_is_reported_with_its_last_lines(capsys):
    """What keeps the other step's figure: a failed step becomes a row, never an exception."""
    g = load_gpu_check()
    fail = "import sys; print('DataError: validation.parquet: column label', file=sys.stderr); sys.exit(3)"
    row = g.run_step("train", [sys.executable, "-c", fail], timeout=60)
    assert (row["ok"], row["error"], row["result"]) == (False, "exit status 3", None)
    assert "validation.parquet: column label" in capsys.readouterr().err
    silent = g.run_step("score", [sys.executable, "-c", "print('no figure here')"], timeout=60)
    assert (silent["ok"], silent["error"]) == (False, "printed no JSON result")
    ok = g.run_step("score", [sys.executable, "-c", "print('log line'); print('{\"rows\": 3}')"], timeout=60)
    assert (ok["ok"], ok["result"]) == (True, {"rows": 3})


def test_a_hanging_step_is_killed_with_what_it_started(tmp_path):
    """A step that hangs is killed after its limit, and so is the process it started (as a step starts Ray)."""
    g = load_gpu_check()
    hang = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
            "open(sys.argv[1], 'w').write(str(p.pid)); time.sleep(600)")
    row = g.run_step("score", [sys.executable, "-c", hang, str(tmp_path / "pid")], timeout=5)
    assert (row["ok"], row["error"]) == (False, "timed out after 5 s") and row["wall_seconds"] < 60
    child = int((tmp_path / "pid").read_text())
    deadline = time.time() + 30
    while Path(f"/proc/{child}").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] != "Z":
        assert time.time() < deadline, "the step's child outlived the timeout"
        time.sleep(0.5)


def test_table_gives_each_steps_figure_or_its_failure():
    g = load_gpu_check()
    rows = [{"step": "model", "ok": True, "wall_seconds": 3.0, "error": None, "result": {"shape": "BERT, 12 layers"}},
            {"step": "train", "ok": False, "wall_seconds": 20.5, "error": "exit status 1", "result": None},
            {"step": "score", "ok": True, "wall_seconds": 41.0, "error": None,
             "result": {"rows": 200_000, "rows_per_second": 12345.6, "dtype": "bfloat16", "batch_size": 1024}}]
    lines = g.table(rows).splitlines()
    assert lines[2].split() == ["train", "FAILED:", "exit", "status", "1", "20.5s"]
    assert lines[3].split() == ["score", "12,346", "rows/s", "(200,000", "rows,", "bfloat16,", "batch", "1024)", "41.0s"]
    assert lines[4].split() == ["total", "64.5s"]
