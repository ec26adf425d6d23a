"""Shared fixtures: a real S3 API server (moto) on 127.0.0.1, started once per test session."""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# One intra-op thread per process (set before torch is imported): the tensors here are tiny, and
# torch's default of a thread per core makes them many times slower when the cores are shared.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ray's longest socket path in a session folder (Ray 2.60, a 7-digit pid); AF_UNIX allows 107 bytes
RAY_SOCKET_TAIL = "/ray/session_2026-12-07_02-00-19_123456_4194304/sockets/dash_MetricsHead"


@pytest.fixture(scope="session", autouse=True)
def ray_files_in_pytest_tmp(tmp_path_factory):
    """Every Ray the tests start (ray_local, the drivers and `ray start` they spawn) keeps its
    session folder (~15 MB of logs and sockets) under pytest's temp dir, which pytest prunes to
    its last few runs, not in /tmp/ray for good. Where the socket paths would be too long there
    (Ray refuses to start), Ray keeps its default. Yields the folder it gave Ray, or None."""
    base = tmp_path_factory.getbasetemp()
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1... under `pytest -n N`
    if worker:
        # A folder per worker beside its temp dir (popen-gwN): Rays of two workers never share
        # one, and the shorter name keeps the socket paths under the limit.
        base = base.parent / worker
        base.mkdir(exist_ok=True)
    base = str(base)
    if "RAY_TMPDIR" in os.environ or len((base + RAY_SOCKET_TAIL).encode()) > 107:
        yield None
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", base)
        yield base


@pytest.fixture(scope="session")
def s3_endpoint():
    """Start a moto S3 server on loopback; yields its endpoint URL and stops it afterwards.

    Credentials and region go in the environment (passing a region in client_kwargs breaks
    bucket creation in this moto/botocore pair). AWS_ENDPOINT_URL_S3 (read by botocore at client
    creation) and fsspec's s3 defaults point s3fs at it, so plain `s3://bucket/key` URLs work in
    the code under test, in this process and in child processes.
    """
    import fsspec.config
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL_S3=endpoint)
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
    try:
        yield endpoint
    finally:
        server.stop()
        fsspec.config.conf.pop("s3", None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket on the loopback S3 server; yields its `s3://name` URL."""
    import s3fs

    name = f"bdt-test-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    fs.mkdir(name)
    yield f"s3://{name}"
    fs.rm(name, recursive=True)


class StoppableS3:
    """A moto S3 server of one test, which it stops (the endpoint dies: connections refused)
    and starts again on its port with the same objects (moto keeps them in this process)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bucket = f"s3://bdt-test-{uuid.uuid4().hex[:10]}"

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()


@pytest.fixture
def s3_stoppable(monkeypatch):
    """A StoppableS3 holding an empty bucket, which the environment (this process's and the
    ranks') and fsspec's s3 defaults point at; botocore tries each request once, so that a
    dead endpoint fails at once rather than after its retries."""
    import fsspec.config
    import s3fs

    s3 = StoppableS3()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3.endpoint})
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(s3.bucket[len("s3://"):])
    try:
        yield s3
    finally:
        s3.stop()
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def flaky_s3(s3_endpoint, monkeypatch):
    """A FlakyS3 (tests/flaky_s3.py: faults only where a test plans them or sets `rate`) in front
    of the loopback S3 server, which the environment (this process's and the ranks') and fsspec's
    s3 defaults point at."""
    import fsspec.config
    import s3fs

    from flaky_s3 import FlakyS3

    proxy = FlakyS3(s3_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": proxy.endpoint})
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield proxy
    finally:
        proxy.stop()
        s3fs.S3FileSystem.clear_instance_cache()
