"""The GPU carry kit (bench/gpu_kit.py) and the device command (bench/gpu_plan.py), rehearsed on this CPU.

Two kits are built from the registry: the cp312 one that travels (its size, its manifest, its repacked Ray,
its needs against the image's package list) and the same kit for this machine's Python, which stands in
for it where something must run. That one is installed with the device command's own pip line into a
clean --target, and used from a stand-in for the image's python3 (tests/image_env.py): a bare venv that
sees the image's packages and not Ray, this project's venv or its editable install.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import uuid
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_kit  # noqa: E402
import gpu_needs  # noqa: E402
import gpu_plan  # noqa: E402
from image_env import make_image_python  # noqa: E402
from raysst.proctree import MARK, kill_job  # noqa: E402

LOCAL = ".".join(platform.python_version_tuple()[:2])  # this machine's Python, for the kit that runs here


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> dict[str, Path]:
    """The travelling cp312 kit and the same kit for this machine's Python, by version."""
    out = tmp_path_factory.mktemp("kits")
    try:
        return {python: (gpu_kit.build(out / python, python), out / python)[1] for python in ("3.12", LOCAL)}
    except gpu_kit.RegistryUnreachable as e:
        pytest.skip(f"the package registry cannot be reached, so no kit can be built to rehearse with: {e}")


@pytest.fixture(scope="module")
def image_python(kits, tmp_path_factory) -> Path:
    """python3 as on the image: its packages only. What the kit carries, or any of it needs, is withheld."""
    image = gpu_needs.image_packages()
    wheels = sorted((kits[LOCAL] / "wheels").glob("*.whl"))
    needs = {gpu_needs.normalize(r.name) for w in wheels for r in gpu_needs.requirements(w, LOCAL, gpu_needs.RAY_EXTRAS)}
    withhold = {gpu_needs.wheel_name_version(w)[0] for w in wheels} | (needs - set(image))
    python, _ = make_image_python(tmp_path_factory.mktemp("image") / "venv", set(image), withhold, gpu_needs.normalize)
    return python


def run_marked(cmd: list[str], timeout: int, **kwargs) -> subprocess.CompletedProcess:
    """Run `cmd` in a session of its own; SIGKILL what is left of it after (the local Ray it started)."""
    mark = uuid.uuid4().hex
    env = {**kwargs.pop("env"), MARK: mark}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, **kwargs)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out = f"timed out after {timeout} s"
    finally:
        kill_job(proc, mark)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def image_env(image_python: Path, **extra: str) -> dict:
    """The environment of a device command: the image's python3 first on PATH, no venv, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_ADDRESS")}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if not Path(p, "activate").exists()]
    return {**env, "PATH": os.pathsep.join([str(image_python.parent), *path]), "RAY_USAGE_STATS_ENABLED": "0", **extra}


def test_the_travelling_kit_fits_and_matches_its_manifest(kits, tmp_path):
    kit = kits["3.12"]
    manifest = gpu_kit.verify(kit)
    size = gpu_kit.kit_bytes(kit)
    tree = sum((ROOT / f).stat().st_size for f in subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split() if (ROOT / f).is_file())
    assert size <= 60 * 2**20 and size + tree <= 64 * 2**20, (size, tree)  # the tool carries 64 MiB a call
    assert set(manifest["groups"]) == {"ray", "deps", "data", "tokenizer"}
    assert manifest["groups"]["ray"] < 45 * 2**20  # 79 MB as published
    assert sorted(f.name for f in (kit / "tokenizer").iterdir()) == sorted(gpu_kit.TOKENIZER_FILES)  # no weights
    for split in ("train", "validation"):
        assert manifest["files"][f"data/sst2/{split}.parquet"]["sha256"] == gpu_kit.sha256(gpu_kit.SST2 / f"{split}.parquet")
    assert all(w.name.endswith(("-none-any.whl", "manylinux2014_x86_64.whl", "manylinux_2_17_x86_64.whl"))
               and ("cp312" in w.name or "py3" in w.name) for w in (kit / "wheels").iterdir()), "not for the image"
    # A changed file is caught, and named.
    copy = shutil.copytree(kit, tmp_path / "kit")
    with (copy / "tokenizer" / "vocab.txt").open("a") as f:
        f.write("extra\n")
    with pytest.raises(gpu_kit.KitError, match="tokenizer/vocab.txt"):
        gpu_kit.verify(copy)


def test_ray_is_repacked_without_the_jar_and_source_maps(kits):
    wheel, = (kits["3.12"] / "wheels").glob("ray-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = z.read("ray-2.60.0.dist-info/RECORD").decode().splitlines()
    assert "ray/jars/ray_dist.jar" not in names and not any(n.endswith(".map") for n in names)
    assert {line.split(",", 1)[0] for line in record if line} == names  # RECORD names each member, and no other
    repacked = json.loads((kits["3.12"] / "MANIFEST.json").read_text())["repacked"]
    assert repacked["dropped"]["ray/jars/ray_dist.jar"] > 30 * 2**20 and repacked["bytes"] < repacked["bytes_before"]


def test_the_kit_and_the_image_meet_every_need(kits):
    image = gpu_needs.image_packages()
    assert {"torch", "transformers", "pyarrow", "pandas"} <= set(image) and "ray" not in image
    for python, kit in kits.items():
        wheels = sorted((kit / "wheels").glob("*.whl"))
        assert gpu_needs.unmet(wheels, python, image) == {}
        ray_wheel = next(w.name for w in wheels if w.name.startswith("ray-"))
        without = [w for w in wheels if not w.name.startswith("jsonschema-")]  # a wheel left out is found
        assert gpu_needs.unmet(without, python, image) == {ray_wheel: ["jsonschema"]}
        old_arrow = {**image, "pyarrow": "16.0.0"}  # and so is a version of the image's that does not do
        assert gpu_needs.unmet(wheels, python, old_arrow)[ray_wheel] == ["pyarrow>=17.0.0 (there: 16.0.0)"]


def test_ray_imports_from_the_installed_kit_in_the_image_python(kits, image_python, tmp_path):
    site = tmp_path / "site"
    for hidden in ("ray", "jsonschema", "pydantic", "tensorboardX", "datasets", "raysst"):  # what the image lacks
        assert subprocess.run([str(image_python), "-c", f"import {hidden}"], cwd=tmp_path, capture_output=True,
                              env=image_env(image_python)).returncode != 0, f"{hidden} is importable without the kit"
    subprocess.run([str(image_python), "-c", "import torch, transformers, pyarrow, pandas, accelerate"],
                   env=image_env(image_python), check=True, timeout=120)  # and has what the image has
    install = f"{gpu_plan.PIP_INSTALL} --target {site} {kits[LOCAL]}/wheels/*.whl"
    subprocess.run(["bash", "-c", install], env=image_env(image_python), check=True, timeout=300)
    probe = ("import os, sys, ray; ray.init(address=\"local\", include_dashboard=False, num_cpus=1);"
             "import ray.data, ray.train.torch, ray.tune;"
             "assert ray.data.range(8).map_batches(lambda b: {'id': b['id'] * 2}).sum('id') == 56;"
             "ray.shutdown();"
             "print([m.__file__ for m in list(sys.modules.values()) if os.path.isabs(getattr(m, '__file__', None) or '')])")
    done = run_marked([str(image_python), "-c", probe], 300, env=image_env(image_python, PYTHONPATH=str(site)), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    loaded = eval(done.stdout.strip().splitlines()[-1])
    assert any(f.startswith(f"{site}/ray/") for f in loaded)
    base = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})
    roots = (str(site), str(image_python.parents[1]), base["stdlib"], base["platstdlib"])  # kit, image, stdlib
    assert [f for f in loaded if not f.startswith(roots) or f.startswith((base["purelib"], base["platlib"]))] == []


@pytest.mark.timeout(900)
def test_the_device_command_runs_the_smoke_check_from_the_kit(kits, image_python, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    command = gpu_plan.device_command(str(kits[LOCAL]), str(tmp_path / "site"), cpu_smoke=True)
    done = run_marked(["bash", "-c", command], 840, env=image_env(image_python, OUT=str(out)), cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:]
    assert {f.name for f in out.iterdir()} == {"nvidia-smi.txt", "gpu_check.log", "gpu_check.txt", "gpu_check.json"}
    result = json.loads((out / "gpu_check.json").read_text())
    assert all(s["ok"] for s in result["gpu_check"]) and [s["step"] for s in result["gpu_check"]] == \
        ["model", "train", "hf", "score"]
    assert result["versions"]["ray"] == "2.60.0" and result["speedup_vs_hf_trainer_grouped"] > 0
    assert "raysst trains at" in (out / "gpu_check.txt").read_text()


def test_the_readme_gives_the_run_arguments_that_gpu_check_prints():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--kit", ".gpu-kit",
                           "--print-command"], capture_output=True, text=True, timeout=120, check=True)
    args = json.loads(done.stdout)
    assert args == gpu_plan.run_arguments() and args["carry"] == [".gpu-kit"]
    assert len(args["command"]) <= 2000 and args["timeout_s"] <= 600  # the device tool's limits
    # One start (a minute or more), the call and one rerun within the 15 minutes; the steps within the call.
    assert 90 + 2 * args["timeout_s"] <= 900 and 2 * gpu_plan.TRAIN_TIMEOUT + gpu_plan.SCORE_TIMEOUT < args["timeout_s"]
    readme = (ROOT / "README.md").read_text()
    assert json.dumps(args, indent=1) in readme  # as gpu_check prints them


def test_gpu_check_refuses_a_kit_that_does_not_match_its_manifest(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--kit", str(tmp_path), "--cpu-smoke"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and f"{tmp_path}/MANIFEST.json is missing" in done.stderr and "make gpu-kit" in done.stderr
