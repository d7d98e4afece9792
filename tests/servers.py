"""Real object-store servers on localhost, for the tests that read and write s3:// (moto)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from raysst.local_head import free_port


@contextmanager
def moto_s3(monkeypatch, bucket: str) -> Iterator:
    """A moto S3 server on a free port with `bucket` created; the AWS_* variables point this process and the
    jobs it starts at it. Yields a pyarrow S3FileSystem on that server."""
    from moto.server import ThreadedMotoServer
    from pyarrow.fs import S3FileSystem

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        fs = S3FileSystem(endpoint_override=f"http://127.0.0.1:{port}", scheme="http", region="us-east-1",
                          access_key="test", secret_key="test", allow_bucket_creation=True)
        fs.create_dir(bucket)
        yield fs
    finally:
        server.stop()
