"""What the resume wrapper judges around a launch (bdt.cluster.launch_checks): which errors the
trainer met before its first step are worth a restart, as the trainer records them
(bdt.training.run_dir.record_launch_error), and the rendezvous endpoint a command will use."""

import errno
import json
import os
import socket
import sys

import pytest

from bdt.cluster import resume
from bdt.cluster.launch_checks import master_endpoint, retry_may_fix
from bdt.config import ConfigError
from bdt.training.run_dir import LAUNCH_ERROR, record_launch_error
from bdt.training.run_lock import RunDirInUse


def _throw(exc):
    raise exc


def _raised(make):
    try:
        make()
    except Exception as exc:  # noqa: BLE001 (the error under test, with its chain)
        return exc
    raise AssertionError("nothing raised")


def _wrapped_timeout():
    try:
        raise TimeoutError("read timed out")
    except TimeoutError:
        raise OSError("cannot write to s3://b/run: read timed out") from None


def _s3_slow_down():
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    raise translate_boto_error(ClientError({"Error": {"Code": "SlowDown", "Message": "slow"}},
                                           "GetObject"))


def _s3_no_such_key():
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    raise translate_boto_error(ClientError({"Error": {"Code": "NoSuchKey", "Message": "gone"}},
                                           "GetObject"))


UNFIXABLE = {
    "config key": lambda: _throw(ConfigError("cli: key 'stages.0.stepz': unknown")),
    "bad input": lambda: _throw(ValueError("shards of another image tokenizer")),
    "missing backbone": lambda: _throw(OSError("backbone path '/x' does not exist")),
    "missing file": lambda: open("/nonexistent/bdt/model.safetensors"),
    "missing object": _s3_no_such_key,
}
FIXABLE = {
    "timeout": lambda: _throw(TimeoutError("connect timed out")),
    "refused": lambda: socket.create_connection(("127.0.0.1", 1)),
    "s3 slow down": _s3_slow_down,
    "wrapped timeout": _wrapped_timeout,
    "run dir of a job still stopping": lambda: _throw(RunDirInUse("held by pid 7")),
    "permission": lambda: _throw(PermissionError(errno.EACCES, "denied")),
    "disk i/o": lambda: _throw(OSError(errno.EIO, "I/O error")),
}


def _recorded(tmp_path, exc) -> dict:
    record_launch_error(str(tmp_path), exc)
    return json.loads((tmp_path / LAUNCH_ERROR).read_text())


@pytest.mark.parametrize("name", UNFIXABLE)
def test_errors_of_the_configuration_or_inputs_are_not_retried(tmp_path, name):
    record = _recorded(tmp_path, _raised(UNFIXABLE[name]))
    assert record["message"] and record["errors"][0]["types"]
    assert not retry_may_fix(record)


@pytest.mark.parametrize("name", FIXABLE)
def test_network_storage_and_lock_errors_are_retried(tmp_path, name):
    assert retry_may_fix(_recorded(tmp_path, _raised(FIXABLE[name])))


def test_a_record_it_cannot_judge_is_retried():
    assert retry_may_fix({}) and retry_may_fix({"errors": []}) and retry_may_fix({"errors": [{}]})


@pytest.mark.parametrize("cmd, env, expected", [
    (["torchrun", "--master-addr", "n1", "--master-port", "29511", "bdt/train.py"], {},
     ("n1", 29511)),
    (["deepspeed", "--master_addr=n2", "--master_port=29512", "bdt/train.py"],
     {"MASTER_ADDR": "x", "MASTER_PORT": "1"}, ("n2", 29512)),
    (["bash", "cluster/deepspeed/launch.sh", "bdt/train.py"],
     {"MASTER_ADDR": "n3", "MASTER_PORT": "20007", "HOSTFILE": "HOSTS"}, ("n3", 20007)),
    # what launch.sh fills in itself (the wrapper once checked nothing in this, the documented flow)
    (["cluster/deepspeed/launch.sh", "bdt/train.py"], {"HOSTFILE": "HOSTS"}, ("n4", 29500)),
    (["bash", "cluster/deepspeed/launch.sh", "bdt/train.py"],
     {"HOSTFILE": "HOSTS", "MASTER_PORT": "20008"}, ("n4", 20008)),
    (["torchrun", "--standalone", "bdt/train.py"], {"MASTER_ADDR": "n3", "MASTER_PORT": "1"},
     None),
    (["python", "bdt/train.py"], {"MASTER_ADDR": "n3"}, None),
    # another node than the first: its launch listens on no master port (two "nodes" on one
    # machine, localhost and 127.0.0.1, had the second wait for the first's rank 0, then stop)
    (["torchrun", "--node-rank", "1", "--master-addr", "n1", "--master-port", "29511"], {},
     None),
    (["bash", "cluster/deepspeed/launch.sh", "bdt/train.py"], {"HOSTFILE": "HOSTS",
                                                               "NODE_RANK": "1"}, None),
    (["bash", "cluster/deepspeed/launch.sh", "bdt/train.py"], {"HOSTFILE": "HOSTS",
                                                               "NODE_RANK": "0"}, ("n4", 29500)),
    (["torchrun", "--master-addr", "n1", "--master-port", "29511"], {"NODE_RANK": "1"},
     ("n1", 29511)),  # torchrun does not read NODE_RANK
])
def test_master_endpoint_of_a_command(tmp_path, cmd, env, expected):
    (tmp_path / "hosts").write_text("# nodes\nn4 slots=2\nn5 slots=2\n")
    env = {k: str(tmp_path / "hosts") if v == "HOSTS" else v for k, v in env.items()}
    assert master_endpoint(cmd, env) == expected


def test_launch_sh_with_a_missing_hostfile_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """MASTER_ADDR and MASTER_PORT set, HOSTFILE naming no file: the wrapper once launched, and
    `deepspeed` ran a missing hostfile as a one-node job."""
    monkeypatch.setenv("MASTER_ADDR", "n3")
    monkeypatch.setenv("MASTER_PORT", "20007")
    monkeypatch.setenv("HOSTFILE", str(tmp_path / "hostfile"))
    assert resume.main(["--run-dir", str(tmp_path), "--", "bash", "cluster/deepspeed/launch.sh",
                        "x.py"]) == resume.USAGE
    assert f"hostfile not found: {tmp_path / 'hostfile'}" in capsys.readouterr().err
    assert not (tmp_path / "resume.jsonl").exists()  # nothing launched


def test_launch_sh_without_a_hostfile_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """launch.sh stops at once without HOSTFILE; the wrapper restarted that as a crash (30 s,
    60 s, 120 s) until it gave up."""
    monkeypatch.delenv("HOSTFILE", raising=False)
    assert resume.main(["--run-dir", str(tmp_path), "--", "bash", "cluster/deepspeed/launch.sh",
                        "x.py"]) == resume.USAGE
    assert "HOSTFILE is not set: cluster/deepspeed/launch.sh needs" in capsys.readouterr().err
    assert not (tmp_path / "resume.jsonl").exists()  # nothing launched


@pytest.mark.parametrize("rank", ["2", "-1", "one"])
def test_launch_sh_node_rank_outside_the_hostfile_is_a_usage_error(tmp_path, monkeypatch, capsys,
                                                                    rank):
    """DeepSpeed's launcher fails such a NODE_RANK with a bare AssertionError (or an argparse
    error), which the wrapper restarted as a crash (30 s, 60 s, 120 s) until it gave up."""
    (tmp_path / "hostfile").write_text("n1 slots=2\nn2 slots=2\n")
    monkeypatch.setenv("HOSTFILE", str(tmp_path / "hostfile"))
    monkeypatch.setenv("NODE_RANK", rank)
    assert resume.main(["--run-dir", str(tmp_path), "--max-restarts", "0", "--", "bash",
                        "cluster/deepspeed/launch.sh", "x.py"]) == resume.USAGE
    assert f"NODE_RANK='{rank}' names no node of {tmp_path / 'hostfile'} (0 .. 1: n1, n2)" in \
        capsys.readouterr().err
    monkeypatch.setenv("BDT_LAUNCHER", "pdsh")  # one launch on the first host: no node rank
    assert master_endpoint(["bash", "cluster/deepspeed/launch.sh"], os.environ) == ("n1", 29500)


@pytest.mark.parametrize("port", ["29x00", "0", "65536"])
def test_a_bad_master_port_is_a_usage_error(tmp_path, monkeypatch, capsys, port):
    """The whole message: int()'s own ValueError also quotes '29x00' and is a usage error."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", port)
    assert resume.main(["--run-dir", str(tmp_path), "--", "true"]) == resume.USAGE
    assert f"master port '{port}' (--master-port or MASTER_PORT) is not a TCP port" in \
        capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--backoff", "nan"), ("--grace", "nan"),
                                         ("--max-backoff", "-1"), ("--grace", "inf")])
def test_a_wait_that_is_no_number_of_seconds_is_a_usage_error(tmp_path, capsys, flag, value):
    """NaN passed the check of --backoff: the wrapper restarted at once ("in nans"); --grace
    NaN or inf never ran out: ranks that do not exit after a stop signal were never killed."""
    assert resume.main(["--run-dir", str(tmp_path), flag, value, "--", "true"]) == resume.USAGE
    assert "--backoff, --max-backoff and --grace finite numbers >= 0" in capsys.readouterr().err


def test_a_held_master_port_stops_before_launching(tmp_path, monkeypatch, capsys):
    """The master is this host and another process listens on the port: a clear error naming
    it, and nothing launched (not a rendezvous failure retried for minutes)."""
    monkeypatch.setattr(resume, "PORT_WAIT_S", 0.5)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        for cmd, env in ((["torchrun", "--master-addr", "localhost", f"--master-port={port}"], {}),
                         (["bash", "launch.sh"], {"MASTER_ADDR": "127.0.0.1",
                                                  "MASTER_PORT": str(port)})):
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            rc = resume.main(["--run-dir", str(tmp_path), "--backoff", "0", "--", *cmd])
            assert rc == resume.CANNOT_START
            err = capsys.readouterr().err
            assert f"master port {port}" in err and f"pid {os.getpid()} " in err
        # node 1 on the same machine as node 0 (whose rank 0 holds the port): it launches
        cmd = ["torchrun", "--node-rank=1", "--master-addr", "localhost", f"--master-port={port}"]
        rc = resume.main(["--run-dir", str(tmp_path / "node1"), "--", sys.executable, "-c", "",
                          *cmd])
    assert rc == resume.DONE
    events = [json.loads(x) for x in (tmp_path / "resume.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["cannot_start", "cannot_start"]


@pytest.mark.parametrize("record", [
    {"errors": "ValueError"}, {"errors": {"types": ["ValueError"]}}, {"errors": [1, 2]},
    {"errors": [{"types": "ValueError"}]}, {"errors": [{"types": 5}]},
    {"errors": [{"types": [1]}]}, {"errors": [{"types": ["ValueError"], "errno": "5"}]},
    {"errors": [{"types": ["ValueError"], "errno": [5]}]},
    {"errors": [{"types": ["ValueError"], "errno": True}]},
    {"errors": [{"types": ["ValueError"]}, {"types": None}]}, [], "x", None,
], ids=repr)
def test_a_record_of_another_shape_is_judged_as_a_crash(record):
    """Not what record_launch_error writes: restarted as a crash is, never an exception."""
    assert retry_may_fix(record) is True


@pytest.mark.parametrize("content", [
    os.urandom(4096), b"[" * 100_000 + b"]" * 100_000, b" " * (2 << 20) + b"{}",
    json.dumps({"errors": [{"types": ["ValueError"], "errno": [5]}], "message": "m"}).encode(),
], ids=["binary", "deeply nested", "huge", "errno a list"])
def test_the_wrapper_restarts_a_launch_whose_record_is_unusable(tmp_path, content):
    """A launch that leaves such a launch_error.json and fails is restarted, not a wrapper crash
    and not a stop; the file is read no further than a record could be long."""
    script = (f"import pathlib, sys; p = pathlib.Path({str(tmp_path / LAUNCH_ERROR)!r}); "
              f"p.exists() or (p.write_bytes(pathlib.Path({str(tmp_path / 'content')!r})"
              f".read_bytes()), sys.exit(1)); "
              f"pathlib.Path({str(tmp_path / 'summary.json')!r}).write_text('{{}}')")
    (tmp_path / "content").write_bytes(content)
    rc = resume.main(["--run-dir", str(tmp_path), "--backoff", "0", "--", sys.executable, "-c",
                      script])
    assert rc == resume.DONE
    log = [json.loads(x) for x in (tmp_path / "resume.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log] == ["launch", "restart", "launch", "done"]
    assert log[1]["error"].get("message") in (f"unreadable {LAUNCH_ERROR}", "m")
