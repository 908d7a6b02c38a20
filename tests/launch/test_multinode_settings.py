"""What a multi-node launch passes on and checks before it starts (no process but a stand-in launcher):
the job's .deepspeed_env (computed CPU settings and socket interfaces, the user's file merged in and
winning, no blank line, written atomically for the run and removed after), DeepSpeed launcher options
through --launcher-args (placed, and refused where train.sh owns the option), and the loopback preflight.
The same settings reaching real ranks on two nodes is tests/multinode/test_two_nodes.py."""
import os
import sys

import pytest

from loop_megatron.launch import cli
from loop_megatron.launch.commands import (check_launcher_args, deepspeed_env_values, loopback_warnings, plan_launch,
                                           read_deepspeed_env, run_plan)
from loop_megatron.launch.errors import LaunchError
from loop_megatron.utils.distributed import hostname_loopback_warning, loopback_address

HOSTS = {"10.0.0.1": ["10.0.0.1"], "node-a": ["10.0.0.1"], "node-b": ["10.0.0.2"], "node-a-lo": ["127.0.1.1"],
         "localhost": ["127.0.0.1", "::1"], "vm": ["127.0.1.1"]}


def resolve(name):
    if name not in HOSTS:
        raise OSError("unknown host")
    return HOSTS[name]


def two_node_plan(tmp_path, environ, **kwargs):
    hf = tmp_path / "hosts"
    hf.write_text("node-a slots=2\nnode-b slots=2\n")
    # --launcher openmpi: the ssh-mode plan without needing pdsh on this machine
    return plan_launch([], hostfile=str(hf), gpus=0, environ=environ, deepspeed=["deepspeed"], launcher="openmpi",
                       **kwargs)


def test_ssh_plan_lists_computed_and_user_settings_for_every_node(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    plan = two_node_plan(tmp_path, {"GLOO_SOCKET_IFNAME": "eth0", "MKL_NUM_THREADS": "3"})
    assert plan.mode == "ssh"
    threads = plan.env["OMP_NUM_THREADS"]
    assert plan.deepspeed_env == {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": "3",
                                  "GLOO_SOCKET_IFNAME": "eth0"}
    assert os.path.isabs(plan.env["DS_ENV_FILE"]) and plan.env["DS_ENV_FILE"].endswith(".deepspeed_env")
    assert "passed to every node's ranks): DS_ACCELERATOR=cpu" in plan.describe()


def test_local_and_no_ssh_plans_need_no_env_file(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("node-a slots=1\nnode-b slots=1\n")
    plan = plan_launch([], hostfile=str(hf), no_ssh=True, node_rank=0, master_addr="10.0.0.1", gpus=0, environ={},
                       deepspeed=["deepspeed"])
    assert plan.deepspeed_env == {} and "DS_ENV_FILE" not in plan.env  # the ranks inherit this environment


def test_users_deepspeed_env_is_merged_in_and_wins(tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    (home / ".deepspeed_env").write_text("# mine\nOMP_NUM_THREADS=7\n\nFOO=a b\n")
    (cwd / ".deepspeed_env").write_text("FOO=c=d\n")
    monkeypatch.setenv("HOME", str(home))
    values = deepspeed_env_values({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2"}, {}, cwd=str(cwd))
    assert dict(values) == {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "7", "FOO": "c=d"}
    (tmp_path / "own").write_text("NCCL_SOCKET_IFNAME=ib0\n")
    values = deepspeed_env_values({"DS_ACCELERATOR": "cpu"}, {"DS_ENV_FILE": str(tmp_path / "own")}, cwd=str(cwd))
    assert dict(values) == {"DS_ACCELERATOR": "cpu", "NCCL_SOCKET_IFNAME": "ib0"}  # $DS_ENV_FILE replaces both
    (tmp_path / "bad").write_text("JUSTANAME\n")
    with pytest.raises(LaunchError, match=r"bad, line 1: expected KEY=VALUE"):
        read_deepspeed_env(str(tmp_path / "bad"))


STAND_IN = "import os; print('FILE', repr(open(os.environ['DS_ENV_FILE']).read()))"


def test_run_writes_the_env_file_whole_for_the_job_and_removes_it(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    plan = two_node_plan(tmp_path, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NCCL_SOCKET_IFNAME": "eth1"})
    plan.command = [sys.executable, "-c", STAND_IN]  # stands in for the deepspeed launcher
    assert run_plan(plan) == 0
    out = capfd.readouterr().out
    text = eval(out.split("FILE ", 1)[1].strip())
    assert text == "DS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1\nMKL_NUM_THREADS=1\nNCCL_SOCKET_IFNAME=eth1\n"
    # DeepSpeed's runner splits every line at '=' and breaks on a blank one: there is none
    assert all("=" in line for line in text.splitlines()) and "\n\n" not in text
    assert not os.path.exists(plan.env["DS_ENV_FILE"])


def test_launcher_args_are_placed_before_module_and_checked(tmp_path, capsys):
    words = check_launcher_args(["--ssh_port 2222", "--bind_cores_to_rank --bind_core_list '0-3'"])
    assert words == ["--ssh_port", "2222", "--bind_cores_to_rank", "--bind_core_list", "0-3"]
    status = cli.main(["train", "--dry-run", "--preset", "tiny-1l", "--launcher-args", "--ssh_port 2222",
                       "--launcher-args", "--bind_cores_to_rank", "--", "--train-iters", "3"])
    out = capsys.readouterr().out
    assert status == 0
    assert "--ssh_port 2222 --bind_cores_to_rank --module loop_megatron.train --preset tiny-1l --train-iters 3" in out
    for bad, words in [("--master_addr 10.0.0.1", "use launch/train.sh's --master-addr instead"),
                       ("--num_gpus=4", "use launch/train.sh's --num-gpus instead"),
                       ("ssh_port 22", "must start with a DeepSpeed launcher option"),
                       ("--ssh_port '22", "is not valid shell words")]:
        with pytest.raises(LaunchError, match=words):
            check_launcher_args([bad])
    status = cli.main(["train", "--dry-run", "--preset", "tiny-1l", "--launcher-args", "--module x"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "--module is set by launch/train.sh itself" in err


def test_loopback_preflight_names_the_name_and_the_fix():
    assert loopback_address("localhost", resolve) == "127.0.0.1"
    assert loopback_address("node-b", resolve) is None and loopback_address("nowhere", resolve) is None
    hosts = {"node-a-lo": 1, "node-b": 1}
    found = loopback_warnings(hosts, "hosts", "localhost", {}, resolve=resolve, hostname="vm")
    assert len(found) == 3
    assert found[0].startswith("--master-addr localhost resolves to 127.0.0.1 (loopback)")
    assert found[1].startswith("host node-a-lo of hostfile hosts resolves to 127.0.1.1") and "/etc/hosts" in found[1]
    assert found[2].startswith("this node's hostname vm resolves to 127.0.1.1") and "GLOO_SOCKET_IFNAME" in found[2]
    # fixed: network addresses everywhere, or gloo told its interface (or NCCL on GPUs)
    assert loopback_warnings({"node-a": 1, "node-b": 1}, "hosts", "10.0.0.1", {}, resolve=resolve,
                             hostname="node-a") == []
    assert hostname_loopback_warning("vm", {"GLOO_SOCKET_IFNAME": "eth0"}, resolve) is None
    assert loopback_warnings(hosts, "hosts", None, {}, gpus=8, resolve=resolve, hostname="vm") == [found[1]]
