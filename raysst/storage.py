"""Files in local directories and behind URIs (s3://, gs://) alike, through pyarrow's filesystems; and the
names of the files a training checkpoint holds beside the model. The lowest layer: it imports no raysst module."""

from __future__ import annotations

import posixpath
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Optimizer, schedule and scaler state, the epoch and the history, without pickle (raysst.train_state): the
# tensors, the rest as JSON, and the torch.save file that checkpoints held before them.
STATE_FILES = ("train_state.safetensors", "train_state.json", "train_state.pt")
HISTORY_FILE = "history.json"  # one row of metrics per epoch, readable without torch
# The epoch's own validation pass: each validation row's outputs (rows, num_labels; raysst.task), file order.
PREDICTIONS_FILE = "validation_outputs.npy"


_FILESYSTEMS: dict = {}  # per process and bucket: S3's region lookup costs a request


def filesystem(path: str):
    """(pyarrow filesystem, path in it) for a local path or a URI such as s3://bucket/key or gs://...

    Credentials come the standard way (AWS_* variables, ~/.aws, instance roles; GOOGLE_APPLICATION_CREDENTIALS,
    the node's service account). AWS_ENDPOINT_URL points S3 at a compatible server (MinIO, moto), and
    STORAGE_EMULATOR_HOST points gs:// at a GCS emulator (fake-gcs-server), as Google's own clients read it.
    """
    import pyarrow.fs

    if "://" not in path:
        return pyarrow.fs.LocalFileSystem(), str(Path(path).expanduser().absolute())
    scheme, rest = path.split("://", 1)
    rest, _, query = rest.partition("?")  # options such as ?endpoint_override=... name the filesystem too
    key = f"{scheme}://{rest.split('/', 1)[0]}?{query}"
    if key not in _FILESYSTEMS:
        _FILESYSTEMS[key] = _gcs_emulator(scheme) or pyarrow.fs.FileSystem.from_uri(path)[0]
    return _FILESYSTEMS[key], rest.rstrip("/")


def _gcs_emulator(scheme: str):
    """A GcsFileSystem on the emulator that STORAGE_EMULATOR_HOST names (http://host:port), for gs:// only."""
    import os

    import pyarrow.fs

    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if scheme != "gs" or not host:
        return None
    protocol, _, address = host.rpartition("://")
    return pyarrow.fs.GcsFileSystem(anonymous=True, scheme=protocol or "http", endpoint_override=address)


def read_text(path: str) -> str:
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def write_text(path: str, text: str) -> None:
    fs, p = filesystem(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def commit_text(path: str, text: str, tmp_prefix: str = "_tmp-") -> None:
    """Write `path` whole or not at all, replacing what is there: locally a temporary name beside it, then
    os.replace; in an object store one PUT (an object appears only complete)."""
    import os
    import uuid

    if "://" in path:
        write_text(path, text)
        return
    directory, name = posixpath.split(str(Path(path).expanduser().absolute()))
    tmp = f"{directory}/{tmp_prefix}{uuid.uuid4().hex}-{name}"
    write_text(tmp, text)
    os.replace(tmp, path)


@contextmanager
def local_dir(dest: str) -> Iterator[Path]:
    """`dest` itself when local; for a URI, a temporary directory copied into `dest` at the end."""
    if "://" not in dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        yield Path(dest)
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)
        copy_to(Path(tmp), dest)  # to a URI this copies into the directory, keeping what is there


def copy_to(local_dir: Path, dest: str) -> str:
    """Replace `dest` (a local path or a pyarrow-supported URI such as s3://) with `local_dir`."""
    if "://" not in dest:
        tmp = Path(dest).with_name(Path(dest).name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(local_dir, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)  # the directory appears whole or not at all
        return dest
    import pyarrow.fs

    fs, path = filesystem(dest)  # the same cached, credentialed filesystem as every other write here
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(local_dir), path, destination_filesystem=fs)
    return dest
