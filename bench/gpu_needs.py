"""What the GPU check's wheels need, against what the lent GPU machine's image already has.

The image's packages are listed in bench/gpu_image.txt (from the device tool's KINDS.md). A wheel's needs
are its METADATA's Requires-Dist lines that apply on Linux under the given CPython, Ray's with the extras
the check uses; each must be met by the image or by another wheel of the kit, in a version it accepts
where the version is known.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Iterable, Optional

IMAGE_PACKAGES = Path(__file__).resolve().parent / "gpu_image.txt"
RAY_EXTRAS = ("data", "train", "tune")  # the parts of Ray the check uses, whose needs must be met


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = IMAGE_PACKAGES) -> dict[str, Optional[str]]:
    """The GPU image's packages: normalized name -> version, where one is known (else None)."""
    lines = (line.strip() for line in path.read_text().splitlines())
    pairs = (line.partition("==") for line in lines if line and not line.startswith("#"))
    return {normalize(name): version or None for name, _, version in pairs}


def requirements(wheel: Path, python: str, extras: Iterable[str] = ()) -> list:
    """What `wheel` requires on Linux under CPython `python`, with `extras` (packaging Requirements)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))).decode()
    env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
           "platform_system": "Linux", "implementation_name": "cpython"}
    reqs = (Requirement(line.split(":", 1)[1].strip()) for line in metadata.splitlines()
            if line.startswith("Requires-Dist:"))
    return [r for r in reqs if not r.marker or any(r.marker.evaluate({**env, "extra": e}) for e in ("", *extras))]


def wheel_name_version(wheel: Path) -> tuple[str, str]:
    name, version = wheel.name.split("-")[:2]
    return normalize(name), version


def unmet(wheels: Iterable[Path], python: str, image: dict[str, Optional[str]]) -> dict[str, list[str]]:
    """For each wheel, what it requires that neither the image nor another wheel of the kit provides, or that
    they provide in a version outside its specifier (where the version is known)."""
    wheels = list(wheels)
    have = {**image, **dict(wheel_name_version(w) for w in wheels)}
    gaps = {}
    for w in wheels:
        extras = RAY_EXTRAS if wheel_name_version(w)[0] == "ray" else ()
        missing = set()
        for r in requirements(w, python, extras):
            there = have.get(normalize(r.name), "absent")
            if there == "absent":
                missing.add(f"{r.name}{r.specifier}")
            elif there and not r.specifier.contains(there, prereleases=True):
                missing.add(f"{r.name}{r.specifier} (there: {there})")
        if missing:
            gaps[w.name] = sorted(missing)
    return gaps
