"""A stand-in for the lent GPU machine's Python: a bare venv that sees only the image's packages.

The image (bench/gpu_image.txt) has torch, transformers, pyarrow and pandas but no Ray. Here a venv without
site packages gets links to this environment's installed copies of the image's packages, and of what those
copies need in turn (local versions differ from the image's: this machine's huggingface_hub needs httpx2),
except what the carry kit must bring. Ray, this project's venv and everything else stay out of sight, so
the kit's wheels plus PYTHONPATH must supply the rest, as on the device.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement


def _top_levels(dist: importlib.metadata.Distribution) -> set[str]:
    return {f.parts[0] for f in dist.files or () if f.parts and f.parts[0] not in ("..", "__pycache__")}


def image_closure(image: set[str], withhold: set[str], normalize) -> tuple[dict[str, importlib.metadata.Distribution],
                                                                           dict[str, str]]:
    """The installed distributions to show: the image's, and what they require unless it is in `withhold`.

    Returns them by name, and the added ones with the image package that pulled each in."""
    installed = {normalize(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
    shown = {name: installed[name] for name in image if name in installed}
    added: dict[str, str] = {}
    todo = list(shown)
    while todo:
        name = todo.pop()
        for line in shown[name].requires or ():
            req = Requirement(line)
            needed = normalize(req.name)
            if (req.marker and not req.marker.evaluate({"extra": ""})) or needed in shown or needed in withhold:
                continue
            if needed in installed:
                shown[needed], added[needed] = installed[needed], name
                todo.append(needed)
    return shown, added


def make_image_python(directory: Path, image: set[str], withhold: set[str], normalize) -> tuple[Path, dict[str, str]]:
    """A venv in `directory` whose site-packages links the image's packages; returns its python and the
    packages added beyond the image's list (see image_closure)."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(directory)], check=True)
    site = Path(subprocess.run([str(directory / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    shown, added = image_closure(image, withhold, normalize)
    owners: dict[str, int] = {}
    for d in importlib.metadata.distributions():
        for top in _top_levels(d):
            owners[top] = owners.get(top, 0) + 1
    for dist in shown.values():
        for f in dist.files or ():
            if not f.parts or f.parts[0] in ("..", "__pycache__"):
                continue
            # A top-level folder that several distributions share (google/, nvidia/) is linked file by file,
            # so the others' files stay hidden; any other is one link.
            rel = Path(f.parts[0]) if owners.get(f.parts[0], 0) == 1 else Path(*f.parts)
            target, source = site / rel, Path(dist.locate_file(rel))
            if not target.exists() and not target.is_symlink() and source.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(source)
    return directory / "bin" / "python", added
