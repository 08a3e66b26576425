"""A real S3 API on this machine for the tests: moto's standalone server on 127.0.0.1.

``s3_endpoint`` (session scope: s3fs caches its filesystem objects per process, and one made for
an earlier server's endpoint would be reused) starts the server on a free loopback port and points the usual
S3 settings of this process (and of subprocesses, which inherit them) at it:
AWS_ENDPOINT_URL (botocore reads it), dummy credentials and a region. ``new_bucket`` creates
an empty bucket with a fresh name. Nothing leaves the loopback interface.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket

import pytest

pytest.importorskip("s3fs", reason="the remote-store tests need s3fs (pip install -e '.[test]')")
moto_server = pytest.importorskip("moto.server", reason="the remote-store tests need moto[server]")

_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
}
_names = itertools.count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*_ENV, "AWS_ENDPOINT_URL", "AWS_PROFILE", "SADPIPE_STORAGE_OPTIONS"]}
    os.environ.update(_ENV, AWS_ENDPOINT_URL=endpoint)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("SADPIPE_STORAGE_OPTIONS", None)
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def s3_client():
    import boto3
    return boto3.client("s3")  # endpoint and credentials from the environment set above


@pytest.fixture
def new_bucket(s3_endpoint) -> str:
    name = f"sadpipe-test-{os.getpid()}-{next(_names)}"
    s3_client().create_bucket(Bucket=name)
    return name
