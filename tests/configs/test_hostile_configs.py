"""Config sources that cannot be a config, refused by bdt.config.load in one line naming the
file (or the key and the file that set it) before anything is read at length or resolved."""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest

from bdt import config as C
from bdt.config_file import MAX_CONFIG_BYTES


@dataclass
class Stage:
    shards: str = ""


@dataclass
class Job:
    name: str = "run"
    steps: int = 10
    stages: list[Stage] = field(default_factory=list)


def _refused(paths, overrides=()) -> str:
    with pytest.raises(C.ConfigError) as err:
        C.load(Job, [str(p) for p in paths], list(overrides))
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def _write_when_read(fifo: str, text: bytes, within_s: float = 3.0) -> threading.Thread:
    """Write `text` into `fifo` once a reader opens it (as a shell's `<(...)` would); gives up
    after `within_s`, so that a loader that never opens it leaves no thread waiting."""
    def write() -> None:
        end = time.monotonic() + within_s
        while time.monotonic() < end:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no reader
            except OSError:
                time.sleep(0.02)
                continue
            os.write(fd, text)
            os.close(fd)
            return

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def test_a_pipe_or_device_as_config_is_refused_before_it_is_opened(tmp_path):
    """A FIFO's open waited forever for a writer (and every rank reads the config: a pipe is
    read once); a device was read to its end: /dev/zero filled memory, /dev/null gave {}."""
    fifo = tmp_path / "job.yaml"
    os.mkfifo(fifo)
    writer = _write_when_read(str(fifo), b"steps: 3\n")
    msg = _refused([fifo])
    writer.join()
    assert msg == f"{fifo}: not a regular file (a pipe, socket or device); every rank reads " \
                  f"the config, so give a file"
    assert _refused(["/dev/null"]).startswith("/dev/null: not a regular file")


def test_a_config_file_past_the_size_limit_is_refused_unparsed(tmp_path):
    """50 MB of YAML took 4 minutes and 5 GB to parse, then failed with omegaconf's advice on
    YAML aliases; a file past the limit is refused by its size, even one of comments. Its last
    line is no YAML: a parse before the size check would name that instead (a timer could not
    tell, 1 MiB of comments parses in ~0.1 s)."""
    big = tmp_path / "big.yaml"
    big.write_bytes(b"steps: 3\n" + b"#" * MAX_CONFIG_BYTES + b"\n[not yaml")
    assert _refused([big]) == f"{big}: larger than 1 MiB, which no config is (a few KB of " \
                              f"YAML): is it the right file?"
    fits = tmp_path / "fits.yaml"
    fits.write_bytes(b"steps: 3\n" + b"#" * (MAX_CONFIG_BYTES - 10) + b"\n")
    assert C.load(Job, [str(fits)]).steps == 3


@pytest.mark.parametrize("path, says", [
    ("", "config file: the path is empty"),  # read the working directory: "Is a directory"
    (" ", "config file: the path is empty"),
    # s3fs's bare ValueError, which named no file and was no ConfigError
    ("s3:///job.yaml", "s3:///job.yaml: cannot read config file: the URL names a bucket, not an "
                       "object in it"),
    ("s3://bucket/", "s3://bucket/: cannot read config file: the URL names a bucket"),
])
def test_a_config_path_that_names_no_file_says_so(path, says):
    assert _refused([path]).startswith(says)


def test_a_config_from_stdin_is_refused_saying_what_to_do(tmp_path, monkeypatch):
    """`--config -` said "config file not found: -"; a file named '-' is still read as ./-."""
    assert _refused(["-"]).startswith("config file '-': a config is not read from stdin (every "
                                      "rank of a launch reads the config, a pipe only once): "
                                      "write it to a file")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-").write_text("steps: 4\n")
    assert C.load(Job, ["./-"]).steps == 4


def test_a_config_on_a_store_that_does_not_answer_fails_in_time_naming_it(monkeypatch):
    """botocore retried a closed port for 10 s, and an endpoint that never answers for
    minutes, in silence; the read is bounded and names the endpoint."""
    import fsspec.config
    import s3fs

    from bdt import config_file

    with socket.socket() as s:  # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    for key, value in (("AWS_ACCESS_KEY_ID", "k"), ("AWS_SECRET_ACCESS_KEY", "s"),
                       ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ENDPOINT_URL_S3", endpoint)):
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    monkeypatch.setattr(config_file, "STORE_READ_TIMEOUT_S", 1)
    s3fs.S3FileSystem.clear_instance_cache()
    t0 = time.monotonic()
    try:
        msg = _refused(["s3://bucket/job.yaml"])
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert msg == f"s3://bucket/job.yaml: the store at {endpoint} did not answer within 1 s " \
                  f"(cannot read config file): is its endpoint right and up?"
    assert time.monotonic() - t0 < 5


@pytest.mark.slow
def test_a_config_on_a_store_is_read_and_capped(s3_bucket):
    """The bounded read is one ranged GET: what a file holds, and no more than the cap."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe(f"{s3_bucket}/job.yaml", b"steps: 5\nname: no\n")
    cfg = C.load(Job, [f"{s3_bucket}/job.yaml"])
    assert (cfg.steps, cfg.name) == (5, "no")
    fs.pipe(f"{s3_bucket}/big.yaml", b"steps: 3\n" + b"#" * MAX_CONFIG_BYTES)
    assert _refused([f"{s3_bucket}/big.yaml"]).startswith(f"{s3_bucket}/big.yaml: larger than 1 MiB")



def test_a_stores_error_reading_a_config_names_the_file(monkeypatch):
    """botocore's errors (a dead endpoint) are no OSError: one escaped as a traceback."""
    from botocore.exceptions import EndpointConnectionError

    from bdt import storage

    class DeadStore:
        def open(self, path, mode):
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")

    monkeypatch.setattr(storage, "filesystem", lambda url: (DeadStore(), url.split("://")[1]))
    assert _refused(["s3://bucket/job.yaml"]) == "s3://bucket/job.yaml: cannot read config " \
        "file: Could not connect to the endpoint URL: \"http://127.0.0.1:9\""


def test_an_interpolation_that_fails_names_the_file_or_command_line_that_set_it(tmp_path):
    """It said only 'interpolation: key ...': with several YAMLs, which one to fix was a hunt."""
    os.environ.pop("BDT_TEST_UNSET_VAR", None)
    base = tmp_path / "base.yaml"
    base.write_text("name: ${oc.env:BDT_TEST_UNSET_VAR}\n")
    steps = tmp_path / "steps.yaml"
    steps.write_text("steps: 3\n")
    assert _refused([base, steps]) == f"{base}: key 'name': KeyError raised while resolving " \
        f"interpolation: \"Environment variable 'BDT_TEST_UNSET_VAR' not found\""
    over = tmp_path / "over.yaml"
    over.write_text("stages:\n  - shards: /x\n  - shards: ${nope}\n")
    # a list item of a later file (its list replaced the defaults' whole list)
    assert _refused([over]) == f"{over}: key 'stages[1].shards': Interpolation key 'nope' not found"
    # the last source that set the key: the command line, as a key or a whole section
    assert _refused([base], ["name=${name}"]) == \
        "command line: key 'name': Recursive interpolation detected"
    assert _refused([over], ["stages=[{shards: '${steps}x'}, {shards: '${nix}'}]"]) == \
        "command line: key 'stages[1].shards': Interpolation key 'nix' not found"
    assert C.load(Job, [str(base)], ["name=fixed"]).name == "fixed"
