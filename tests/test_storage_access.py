"""S3 destinations the credentials may not write, and credentials the store does not know: the
error names the URL and comes before any work, and a denied read is not taken for a missing file.

A moto server of its own on 127.0.0.1 checks credentials (INITIAL_NO_AUTH_ACTION_COUNT: the
first requests, which make the users, go unchecked): user "rw" may do anything on S3, user "ro"
only read and list."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from bdt import output_dirs, storage, url_listing
from bdt.training.checkpoint import CheckpointManager
from bdt.training.distributed import DistInfo, free_port

pytestmark = pytest.mark.slow

BUCKET = "bdt-access"
UNCHECKED_SETUP_REQUESTS = 8  # 2 users x (user, policy, attachment, key)


@pytest.fixture(scope="module")
def keyed_s3():
    """{"endpoint": URL, "rw": (key id, secret), "ro": (key id, secret)}; BUCKET holds x/a.tar."""
    import boto3

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(UNCHECKED_SETUP_REQUESTS)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        _wait_for(port)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        keys = {"endpoint": endpoint}
        for user, actions in (("rw", ["s3:*"]), ("ro", ["s3:Get*", "s3:List*"])):
            iam.create_user(UserName=user)
            policy = iam.create_policy(PolicyName=user, PolicyDocument=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
            iam.attach_user_policy(UserName=user, PolicyArn=policy["Policy"]["Arn"])
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        with _as(endpoint, keys["rw"]):
            fs, _ = storage.filesystem(f"s3://{BUCKET}")
            fs.mkdir(BUCKET)
            storage.write_bytes_atomic(f"s3://{BUCKET}/x/a.tar", b"data")
        yield keys
    finally:
        server.terminate()
        server.wait(10)


def _wait_for(port: int) -> None:
    for _ in range(200):
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        time.sleep(0.05)
    raise RuntimeError(f"moto server on port {port} did not start")


@contextlib.contextmanager
def _as(endpoint: str, key: tuple[str, str]):
    """s3fs talks to `endpoint` with `key` inside the block (s3fs caches its clients, with the
    credentials they were made with, per set of options: cleared on the way in and out)."""
    import fsspec.config
    import s3fs

    saved_env = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")}
    saved_conf = fsspec.config.conf.get("s3")
    os.environ.update(AWS_ACCESS_KEY_ID=key[0], AWS_SECRET_ACCESS_KEY=key[1],
                      AWS_ENDPOINT_URL_S3=endpoint, AWS_DEFAULT_REGION="us-east-1")
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        fsspec.config.conf.pop("s3", None)
        if saved_conf is not None:
            fsspec.config.conf["s3"] = saved_conf
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _objects(keys) -> list[str]:
    with _as(keys["endpoint"], keys["rw"]):
        fs, _ = storage.filesystem(f"s3://{BUCKET}")
        fs.invalidate_cache()
        return sorted(fs.find(BUCKET))


def test_an_output_the_credentials_cannot_write_is_refused_before_the_work(keyed_s3):
    """`bdt sample/eval --out s3://...` with read-only credentials sampled everything, then
    failed the upload with a bare "Access Denied"."""
    out = f"s3://{BUCKET}/samples"
    worked = []
    with _as(keyed_s3["endpoint"], keyed_s3["ro"]):
        with pytest.raises(OSError, match=f"cannot write to {out}: .*Access Denied"):
            with output_dirs.staged_dir(out):
                worked.append(True)
    assert not worked
    with _as(keyed_s3["endpoint"], ("AKIAUNKNOWN0000000", "wrong")):
        with pytest.raises(PermissionError, match=f"{out}: .*Access Key Id"):
            output_dirs.refuse_nonempty_dir(out)
    with _as(keyed_s3["endpoint"], keyed_s3["rw"]):
        output_dirs.refuse_nonempty_dir(out)
        with pytest.raises(FileExistsError, match=f"^s3://{BUCKET}/x exists and is not empty$"):
            output_dirs.refuse_nonempty_dir(f"s3://{BUCKET}/x")
    assert _objects(keyed_s3) == [f"{BUCKET}/x/a.tar"]  # the probes are gone


def test_a_denied_read_is_not_a_missing_file(keyed_s3):
    """With credentials the store does not know, an input was reported "not found"; the
    error now names the URL and what the store said."""
    url = f"s3://{BUCKET}/x/a.tar"
    with _as(keyed_s3["endpoint"], ("AKIAUNKNOWN0000000", "wrong")):
        with pytest.raises(PermissionError, match=url):
            url_listing.file_sizes([url])
        with pytest.raises(PermissionError, match=f"s3://{BUCKET}/x: .*Access Key Id"):
            url_listing.missing_files([url, f"s3://{BUCKET}/x/b.tar"])
        for call in (storage.exists, storage.read_bytes, storage.sha256):
            with pytest.raises(PermissionError, match=f"^{url}: "):
                call(url)
        with pytest.raises(PermissionError, match=f"^s3://{BUCKET}/x/\\*.tar: "):
            url_listing.expand_urls(f"s3://{BUCKET}/x/*.tar", "x")
    with _as(keyed_s3["endpoint"], keyed_s3["ro"]):
        assert url_listing.file_sizes([url, f"s3://{BUCKET}/x/b.tar"]) == {
            url: 4, f"s3://{BUCKET}/x/b.tar": None}


def test_a_checkpoint_root_that_takes_no_write_is_refused_at_the_start(keyed_s3, tmp_path):
    """A run on a read-only checkpoint root it already owned trained up to its first save and
    failed there; a missing bucket failed with "The specified bucket does not exist", naming
    neither bucket nor root."""
    solo = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    root = f"s3://{BUCKET}/ck"
    with _as(keyed_s3["endpoint"], keyed_s3["rw"]):
        CheckpointManager(root, solo).bind(str(tmp_path / "run"))
        missing = f"s3://{BUCKET}-missing/ck"
        with pytest.raises(OSError, match=f"cannot write to {missing}: .*bucket does not exist"):
            CheckpointManager(missing, solo).bind(str(tmp_path / "run"))
    with _as(keyed_s3["endpoint"], keyed_s3["ro"]):
        with pytest.raises(OSError, match=f"cannot write to {root}: .*Access Denied"):
            CheckpointManager(root, solo).bind(str(tmp_path / "run"))


_SILENT_ENDPOINT_CHECK = """
import sys
from bdt import url_listing
try:
    url_listing.file_sizes([sys.argv[1]])
except OSError as e:
    print(type(e).__name__, e)
"""


def test_an_endpoint_that_never_answers_fails_naming_the_url_within_the_timeouts():
    """A store that takes connections but never replies: with the timeouts cluster/README.md
    gives (FSSPEC_S3), each try ends, and the error that ends them names the URL (botocore's
    timeout errors cannot be rebuilt from a message)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []
    url = f"s3://{BUCKET}/x/a.tar"
    try:
        env = {**os.environ, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{listener.getsockname()[1]}",
               "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
               "FSSPEC_S3": json.dumps({"config_kwargs": {
                   "connect_timeout": 1, "read_timeout": 0.2,
                   "retries": {"max_attempts": 1, "mode": "standard"}}})}
        proc = subprocess.Popen([sys.executable, "-c", _SILENT_ENDPOINT_CHECK, url], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        listener.settimeout(0.2)
        while proc.poll() is None:  # hold every connection open, answering nothing
            with contextlib.suppress(TimeoutError):
                accepted.append(listener.accept()[0])
        out, err = proc.communicate()
    finally:
        for conn in accepted:
            conn.close()
        listener.close()
    assert accepted, "the check never reached the endpoint"
    assert out.startswith(("OSError", "ReadTimeoutError")) and url in out, (out, err[-2000:])


def test_each_start_up_read_of_a_dead_endpoint_says_what_it_was_doing(s3_stoppable):
    """The trainer's start with the endpoint gone: one line naming the URL and the read (botocore's
    error named no URL for the image tokenizer, and no read for the shards or the owner record)."""
    from bdt.data.shard_source import list_shards
    from bdt.tokenizer.io import tokenizer_identity
    from bdt.training.checkpoint_owner import read_owner
    from bdt.training.model_shapes import check_model_signature

    root = s3_stoppable.bucket
    solo = DistInfo(0, 1, 0, torch.device("cpu"))
    s3_stoppable.stop()
    for call, said in (
            (lambda: list_shards(f"{root}/shards"), f"listing shards in {root}/shards"),
            (lambda: tokenizer_identity(f"{root}/tok"), f"listing image tokenizer {root}/tok"),
            (lambda: read_owner(f"{root}/ck/owner.json"), f"reading {root}/ck/owner.json"),
            (lambda: check_model_signature(f"{root}/ck", {}, solo),
             f"reading {root}/ck/model_shapes.json")):
        with pytest.raises(OSError, match=f"^{said}: EndpointConnectionError"):
            call()
