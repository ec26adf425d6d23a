"""SLURM node lists and DeepSpeed hostfiles (bdt.cluster.hosts)."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bdt.cluster import hosts

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("nodelist, expected", [
    ("gpu001", ["gpu001"]),
    ("gpu[001-003]", ["gpu001", "gpu002", "gpu003"]),
    ("gpu[001-002,010],io7", ["gpu001", "gpu002", "gpu010", "io7"]),
    ("rack[1-2]-n[08-09]", ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]),
    ("a[9-11]", ["a9", "a10", "a11"]),
])
def test_nodelist_expansion_without_scontrol(nodelist, expected):
    assert hosts.expand_nodelist(nodelist, use_scontrol=False) == expected


@pytest.mark.parametrize("bad", ["", "  ", "gpu[001-", "gpu[3-1]", "gpu[1-2]]"])
def test_bad_nodelist_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="node list"):
        hosts.expand_nodelist(bad, use_scontrol=False)


@pytest.mark.parametrize("env, slots", [
    ({"SLURM_GPUS_ON_NODE": "8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "a100:4"}, 4),
    ({"SLURM_NTASKS_PER_NODE": "2(x3)"}, 2),
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": "1"}, 4),
    ({"SLURM_GPUS_PER_NODE": "gpu:a100:8"}, 8),
    ({"SLURM_NTASKS_PER_NODE": "4(x2),4"}, 4),
    # a CPU-only allocation sets the GPU count to 0: the tasks say it (once an error)
    ({"SLURM_GPUS_ON_NODE": "0", "SLURM_NTASKS_PER_NODE": "2"}, 2),
])
def test_slots_per_node(env, slots):
    assert hosts.slots_per_node(env) == slots


def test_slots_per_node_errors_name_the_variable():
    with pytest.raises(ValueError, match="SLURM_GPUS_PER_NODE='gpu:'"):
        hosts.slots_per_node({"SLURM_GPUS_PER_NODE": "gpu:"})
    with pytest.raises(ValueError, match="--gpus-per-node"):
        hosts.slots_per_node({})
    # nodes of different sizes were once read as the last count, silently
    with pytest.raises(ValueError, match="SLURM_NTASKS_PER_NODE='8,4\\(x2\\)': the nodes run "
                                         "different numbers of processes"):
        hosts.slots_per_node({"SLURM_NTASKS_PER_NODE": "8,4(x2)"})
    with pytest.raises(ValueError, match="SLURM_NTASKS_PER_NODE='0': a node with no processes"):
        hosts.slots_per_node({"SLURM_GPUS_ON_NODE": "0", "SLURM_NTASKS_PER_NODE": "0"})
    with pytest.raises(ValueError, match="SLURM_GPUS_PER_NODE='4,0'"):
        hosts.slots_per_node({"SLURM_GPUS_PER_NODE": "4,0"})


def test_slurm_allocation_to_hostfile_read_back_by_deepspeed(tmp_path):
    env = {"SLURM_JOB_NODELIST": "node[07-08]", "SLURM_JOB_ID": "123456", "SLURM_GPUS_ON_NODE": "8"}
    path = str(tmp_path / "hostfile")
    values = hosts.slurm_launch_env(env, path, use_scontrol=False)
    assert values == {"MASTER_ADDR": "node07", "MASTER_PORT": str(20000 + 123456 % 20000),
                      "NNODES": "2", "SLOTS": "8", "WORLD": "16"}
    # DeepSpeed's own hostfile parser reads what we wrote, in order
    assert list(hosts.read_hostfile(path).items()) == [("node07", 8), ("node08", 8)]
    with pytest.raises(ValueError, match="SLURM_JOB_ID"):
        hosts.slurm_launch_env({**env, "SLURM_JOB_ID": ""}, path, use_scontrol=False)
    os.remove(path)
    with pytest.raises(ValueError, match="SLURM_JOB_ID='12a' is not a job id"):  # was int()'s
        hosts.slurm_launch_env({**env, "SLURM_JOB_ID": "12a"}, path, use_scontrol=False)
    assert not os.path.exists(path)  # no hostfile for a launch that cannot start


def test_bad_hostfiles_name_the_file(tmp_path):
    dup = tmp_path / "dup"
    dup.write_text("a slots=2\na slots=2\n")
    with pytest.raises(ValueError, match=f"{dup}.*multiple entries for a"):
        hosts.read_hostfile(str(dup))
    bad = tmp_path / "bad"
    bad.write_text("# comment\nnode1 gpus=8\n")
    with pytest.raises(ValueError, match="bad entry: node1 gpus=8"):
        hosts.read_hostfile(str(bad))
    with pytest.raises(ValueError, match="not found"):
        hosts.read_hostfile(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="slots"):
        hosts.hostfile_text(["a"], 0)
    idle = tmp_path / "idle"
    idle.write_text("a slots=0\nb slots=2\n")  # the master would run no rank
    with pytest.raises(ValueError, match=f"{idle}: a slots=0: every host runs at least one rank"):
        hosts.read_hostfile(str(idle))


def test_forwarded_env_keeps_settings_drops_secrets():
    env = {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
           "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "t", "NCCL_IB_HCA": "mlx5",
           "AWS_CONTAINER_AUTHORIZATION_TOKEN": "bearer", "HF_HUB_TOKEN": "t",
           "HOME": "/root", "PATH": "/bin", "NCCL_MULTI": "a\nb"}
    assert hosts.forwarded_env(env) == {"AWS_DEFAULT_REGION": "us-east-1",
                                        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
                                        "NCCL_IB_HCA": "mlx5"}


@pytest.mark.slow
def test_cli_prints_shell_assignments_the_batch_script_evals(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_NODELIST="n[1-2]", SLURM_JOB_ID="7", SLURM_GPUS_ON_NODE="4",
               AWS_DEFAULT_REGION="eu-west-1", AWS_SECRET_ACCESS_KEY="x")
    hostfile, ds_env = tmp_path / "hostfile", tmp_path / ".deepspeed_env"
    script = (f"eval \"$({sys.executable} -m bdt.cluster.hosts slurm --hostfile {hostfile})\"; "
              f"echo $MASTER_ADDR:$MASTER_PORT $NNODES $WORLD; "
              f"{sys.executable} -m bdt.cluster.hosts ds-env --out {ds_env}")
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["n1:20007", "2", "8"]
    assert hostfile.read_text() == "n1 slots=4\nn2 slots=4\n"
    # stdout holds the answer alone: DeepSpeed, which reads the hostfile, logs to stdout (without
    # DS_ACCELERATOR on a node with no GPU), and launch.sh takes stdout as MASTER_ADDR
    master = subprocess.run([sys.executable, "-m", "bdt.cluster.hosts", "master", "--hostfile",
                             str(hostfile)], env={k: v for k, v in env.items()
                                                  if k != "DS_ACCELERATOR"},
                            capture_output=True, text=True, check=True)
    assert master.stdout == "n1\n"
    lines = ds_env.read_text().splitlines()
    assert "AWS_DEFAULT_REGION=eu-west-1" in lines and not any("SECRET" in x for x in lines)
    failed = subprocess.run([sys.executable, "-m", "bdt.cluster.hosts", "slurm", "--hostfile",
                             str(hostfile)], env={**env, "SLURM_JOB_NODELIST": "n[1-"},
                            capture_output=True, text=True)
    assert failed.returncode == 2 and "bad SLURM node list 'n[1-'" in failed.stderr


@pytest.mark.slow
def test_forwarded_env_carries_values_intact_through_deepspeed_and_launch_sh(tmp_path):
    """What ds-env writes reaches the ranks unchanged on both paths: DeepSpeed's pdsh runner
    (`export K=V; ...` run by the remote shell) and launch.sh's own reading of the file."""
    from deepspeed.launcher.multinode_runner import PDSHRunner

    odd = {"NCCL_SOCKET_IFNAME": "^docker,lo", "HF_HOME": "/a b/it's", "FI_X": "pad=",
           "NCCL_EMPTY": ""}
    unsafe = {"NCCL_Q": 'a"b', "NCCL_D": "$HOME", "NCCL_B": "a\\b", "NCCL_S": " x", "HF_a-b": "1",
              "AWS_ACCESS_KEY_ID": "AKIA", "HF_TOKEN": "hf_x"}
    kept = hosts.forwarded_env({**odd, **unsafe})
    assert kept == odd and set(hosts.left_out_env(unsafe)) == {"NCCL_Q", "NCCL_D", "NCCL_B",
                                                                "NCCL_S", "HF_a-b"}
    runner = PDSHRunner(argparse.Namespace(user_args=[], user_script="x.py"), "")
    for key, value in kept.items():
        runner.add_export(key, value)
    dump = "import json, os, sys; print(json.dumps({k: os.environ[k] for k in sys.argv[1:]}))"
    remote = subprocess.run(["bash", "-c", "".join(f"export {k}={v}; " for k, v in
                                                   runner.exports.items())
                             + f"{sys.executable} -c '{dump}' {' '.join(kept)}"],
                            capture_output=True, text=True, check=True)
    assert json.loads(remote.stdout) == kept

    (tmp_path / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in kept.items()))
    (tmp_path / "hostfile").write_text("n1 slots=1\n")
    fake = tmp_path / "bin" / "deepspeed"  # stands in for the launcher: prints what it got
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c '{dump}' {' '.join(kept)}\n")
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "HOSTFILE": str(tmp_path / "hostfile"), "MASTER_ADDR": "n1", "NODE_RANK": "0",
           "DS_ENV_FILE": str(tmp_path / ".deepspeed_env")}
    node = subprocess.run(["bash", str(REPO / "cluster/deepspeed/launch.sh"), "x.py"], env=env,
                          capture_output=True, text=True, check=True)
    assert json.loads(node.stdout) == kept

    # A file written by hand, its last line without a newline: that variable was dropped.
    (tmp_path / ".deepspeed_env").write_text("NCCL_A=1\nNCCL_B=2")
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c '{dump}' NCCL_A NCCL_B\n")
    node = subprocess.run(["bash", str(REPO / "cluster/deepspeed/launch.sh"), "x.py"], env=env,
                          capture_output=True, text=True, check=True)
    assert json.loads(node.stdout) == {"NCCL_A": "1", "NCCL_B": "2"}
    # DS_ENV_FILE set but not on this node (a job dir off the shared filesystem): the node once
    # ran without the site's S3 endpoint and NCCL settings, silently.
    node = subprocess.run(["bash", str(REPO / "cluster/deepspeed/launch.sh"), "x.py"],
                          env={**env, "DS_ENV_FILE": str(tmp_path / "nowhere")},
                          capture_output=True, text=True)
    assert node.returncode == 2 and node.stdout == ""
    assert f"DS_ENV_FILE={tmp_path / 'nowhere'}: not a file" in node.stderr

    # A hostfile path that does not resolve on this node (a relative path, another cwd) while
    # MASTER_ADDR is set: `deepspeed` once ran the job on this node alone, a world of its GPUs.
    missing = {**env, "HOSTFILE": str(tmp_path / "no-hostfile")}
    for launcher in ("node", "pdsh"):
        node = subprocess.run(["bash", str(REPO / "cluster/deepspeed/launch.sh"), "x.py"],
                              env={**missing, "BDT_LAUNCHER": launcher}, capture_output=True,
                              text=True)
        assert node.returncode != 0 and node.stdout == "", node.stdout  # the launcher never ran
        assert f"hostfile not found: {tmp_path / 'no-hostfile'}" in node.stderr


def _listen_in(low: int, high: int):
    """A listening socket on a free port in [low, high)."""
    import random
    import socket

    for port in random.Random().sample(range(low, high), 200):
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        sock.listen()
        return sock
    raise RuntimeError(f"no free port in [{low}, {high})")


def test_port_holder_sees_a_listener_and_names_it():
    import socket

    with _listen_in(20000, 40000) as sock:
        port = sock.getsockname()[1]
        assert f"pid {os.getpid()} " in hosts.port_holder(port)
    assert hosts.port_holder(port) is None  # closed: free again
    assert hosts.is_this_host("localhost") and hosts.is_this_host("127.0.0.1")
    assert hosts.is_this_host(socket.gethostname())
    assert not hosts.is_this_host("no-such-node.invalid")


def test_the_master_port_skips_one_held_on_the_master(tmp_path):
    """The derived port is taken on the master (this host): the next free candidate instead;
    for a master elsewhere the derivation stands (only the master can see what is taken)."""
    with _listen_in(20000, 40000) as sock:
        held = sock.getsockname()[1]
        env = {"SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": str(held - 20000),
               "SLURM_GPUS_ON_NODE": "2"}
        assert hosts.master_port(env["SLURM_JOB_ID"]) == held
        port = int(hosts.slurm_launch_env(env, str(tmp_path / "h"), use_scontrol=False)
                   ["MASTER_PORT"])
        assert port != held and 20000 <= port < 40000 and hosts.port_holder(port) is None
        elsewhere = hosts.slurm_launch_env({**env, "SLURM_JOB_NODELIST": "no-such-node.invalid"},
                                           str(tmp_path / "h"), use_scontrol=False)
        assert elsewhere["MASTER_PORT"] == str(held)
