"""Hostfile parsing, launch planning and command building, ZeRO memory estimates (no processes started)."""
import os

import pytest

from loop_megatron.launch import cli
from loop_megatron.launch.commands import REPO_ROOT, build_deepspeed_command, plan_launch
from loop_megatron.launch.environment import cpu_environment
from loop_megatron.launch.errors import LaunchError
from loop_megatron.launch.hostfile import parse_hostfile_text, read_hostfile, write_hostfile
from loop_megatron.launch.memory import zero_model_state_bytes
from loop_megatron.launch.paper import PAPER_PRESETS, paper_batch_sizes


# ---------------------------------------------------------------------------------------------------
# Hostfiles
# ---------------------------------------------------------------------------------------------------
def test_hostfile_comments_blank_lines_and_slots():
    text = """# cluster
worker-0 slots=8   # node 0
\t
worker-1    slots=4 max_slots=8
# worker-2 slots=8
"""
    hosts = parse_hostfile_text(text, "hostfile h")
    assert list(hosts.items()) == [("worker-0", 8), ("worker-1", 4)]


@pytest.mark.parametrize("bad, line, words", [
    ("localhost\n", 1, "expected 'HOSTNAME slots=N'"),
    ("a slots=2\n\nb slots=two\n", 3, "whole number"),
    ("a slots=0\n", 1, "whole number"),
    ("# header\na slots=1\na slots=2\n", 3, "listed twice"),
    ("a slots=1 junk\n", 1, "expected 'HOSTNAME slots=N'"),
])
def test_bad_hostfile_line_is_one_sentence_naming_the_line(bad, line, words):
    with pytest.raises(LaunchError) as info:
        parse_hostfile_text(bad, "hostfile my_hosts")
    message = str(info.value)
    assert message.startswith(f"hostfile my_hosts, line {line}:")
    assert words in message
    assert message.count("\n") == 0 and message.endswith(".")


def test_hostfile_without_hosts_is_refused():
    with pytest.raises(LaunchError, match="names no host"):
        parse_hostfile_text("# only a comment\n\n", "hostfile h")


def test_missing_hostfile_is_one_sentence(tmp_path):
    path = str(tmp_path / "nope")
    with pytest.raises(LaunchError) as info:
        read_hostfile(path)
    assert str(info.value).startswith(f"hostfile {path} does not exist;")
    assert "\n" not in str(info.value)


def test_hostfile_round_trip(tmp_path):
    path = write_hostfile(str(tmp_path / "hf"), {"localhost": 2, "node-b": 1})
    assert read_hostfile(path) == {"localhost": 2, "node-b": 1}
    assert os.listdir(tmp_path) == ["hf"]  # no temporary left behind


# ---------------------------------------------------------------------------------------------------
# Commands and plans
# ---------------------------------------------------------------------------------------------------
def test_build_deepspeed_command_local():
    cmd = build_deepspeed_command("hf", ["--preset", "tiny-1l", "--train-iters", "3"], master_addr="127.0.0.1",
                                     master_port=1234, no_ssh_check=True)
    assert cmd == ["deepspeed", "--hostfile", "hf", "--master_addr", "127.0.0.1", "--master_port", "1234",
                   "--no_ssh_check", "--module", "loop_megatron.train", "--preset", "tiny-1l", "--train-iters", "3"]


def test_build_deepspeed_command_no_ssh_needs_node_rank():
    cmd = build_deepspeed_command("hf", [], master_addr="10.0.0.1", master_port=29500, no_ssh=True, node_rank=1,
                                     num_nodes=2, num_gpus=8)
    assert cmd[:3] == ["deepspeed", "--hostfile", "hf"]
    assert "--no_ssh" in cmd and cmd[cmd.index("--node_rank") + 1] == "1"
    assert cmd[cmd.index("--num_nodes") + 1] == "2" and cmd[cmd.index("--num_gpus") + 1] == "8"
    assert cmd[-2:] == ["--module", "loop_megatron.train"]
    with pytest.raises(LaunchError, match="--node-rank"):
        build_deepspeed_command("hf", [], no_ssh=True)


def test_plan_without_hostfile_on_cpu_writes_localhost_hostfile(tmp_path):
    plan = plan_launch(["--train-iters", "5"], preset="tiny-2l", num_gpus=2, gpus=0, environ={},
                          generated_hostfile_dir=str(tmp_path), deepspeed=["deepspeed"])
    assert plan.mode == "local" and plan.hosts == {"localhost": 2} and plan.world_size == 2
    assert open(plan.hostfile).read() == "localhost slots=2\n"
    cmd = plan.command
    assert "--no_ssh_check" in cmd and cmd[cmd.index("--master_addr") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--module"):] == ["--module", "loop_megatron.train", "--preset", "tiny-2l",
                                           "--train-iters", "5"]
    assert plan.env["DS_ACCELERATOR"] == "cpu"
    assert int(plan.env["OMP_NUM_THREADS"]) >= 1
    assert REPO_ROOT in plan.env["PYTHONPATH"]
    assert os.path.isfile(os.path.join(REPO_ROOT, "loop_megatron", "train.py"))  # the checkout, not the package


def test_plan_on_gpu_machine_sets_no_cpu_env(tmp_path):
    plan = plan_launch([], gpus=4, environ={}, generated_hostfile_dir=str(tmp_path), deepspeed=["deepspeed"])
    assert plan.hosts == {"localhost": 4}
    assert "DS_ACCELERATOR" not in plan.env and "OMP_NUM_THREADS" not in plan.env
    with pytest.raises(LaunchError, match="more GPUs than this machine has"):
        plan_launch([], gpus=4, num_gpus=8, environ={}, generated_hostfile_dir=str(tmp_path))


def test_cpu_env_keeps_user_settings():
    env = cpu_environment(2, {"OMP_NUM_THREADS": "7"})
    assert "OMP_NUM_THREADS" not in env and env["DS_ACCELERATOR"] == "cpu"


def test_plan_localhost_hostfile(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("localhost slots=2\n")
    plan = plan_launch(["--seed", "3"], hostfile=str(hf), gpus=0, environ={}, deepspeed=["deepspeed"])
    assert plan.mode == "local" and not plan.generated_hostfile
    assert plan.command[:3] == ["deepspeed", "--hostfile", str(hf)]
    assert "--no_ssh_check" in plan.command


def test_plan_two_nodes_without_ssh(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("node-a slots=1\nnode-b slots=1\n")
    plan = plan_launch([], hostfile=str(hf), no_ssh=True, node_rank=1, master_addr="127.0.0.1",
                          master_port=29511, gpus=0, environ={}, deepspeed=["deepspeed"])
    assert plan.mode == "no-ssh" and plan.world_size == 2
    cmd = plan.command
    assert cmd[cmd.index("--node_rank") + 1] == "1" and "--no_ssh" in cmd and "--no_ssh_check" not in cmd
    for kwargs, words in [(dict(node_rank=None, master_addr="x"), "--node-rank"),
                          (dict(node_rank=2, master_addr="x"), "outside 0..1"),
                          (dict(node_rank=0, master_addr=None), "--master-addr")]:
        with pytest.raises(LaunchError, match=words):
            plan_launch([], hostfile=str(hf), no_ssh=True, gpus=0, environ={}, **kwargs)


def test_plan_errors_before_anything_starts(tmp_path):
    with pytest.raises(LaunchError, match="does not exist"):
        plan_launch([], hostfile=str(tmp_path / "missing"), gpus=0, environ={})
    with pytest.raises(LaunchError, match="needs --hostfile"):
        plan_launch([], num_nodes=2, gpus=0, environ={})
    hf = tmp_path / "hosts"
    hf.write_text("a slots=1\n")
    with pytest.raises(LaunchError, match="more than the 1 host"):
        plan_launch([], hostfile=str(hf), num_nodes=3, gpus=0, environ={})


def test_train_cli_missing_hostfile_exits_nonzero(tmp_path, capsys):
    status = cli.main(["train", "--hostfile", str(tmp_path / "absent"), "--preset", "tiny-1l"])
    err = capsys.readouterr().err
    assert status != 0
    assert err.strip().count("\n") == 0 and "does not exist" in err


def test_train_cli_forwards_unknown_and_passthrough_args_in_order(tmp_path, capsys, monkeypatch):
    hf = tmp_path / "hosts"
    hf.write_text("localhost slots=1\n")
    status = cli.main(["train", "--hostfile", str(hf), "--dry-run", "--preset", "tiny-1l", "--train-iters", "9",
                      "--", "--train-iters", "4", "--num-layers", "2"])
    out = capsys.readouterr().out
    assert status == 0
    command = out.strip().splitlines()[-1]
    assert command.endswith("--module loop_megatron.train --preset tiny-1l --train-iters 9 --train-iters 4 "
                            "--num-layers 2")


# ---------------------------------------------------------------------------------------------------
# Memory estimates and the paper plan
# ---------------------------------------------------------------------------------------------------
def test_zero_estimates_follow_the_stated_formulas():
    P, largest, n = 100_000_000, 40_000_000, 8
    mem = zero_model_state_bytes(P, largest, nodes=2, gpus_per_node=4)
    assert mem["zero0"] == 20 * P
    assert mem["zero1"] == 4 * P + 16 * P // n
    assert mem["zero2"] == 2 * P + int(18 * P / n)          # DeepSpeed's estimator
    assert mem["zero3"] == 4 * largest + int(18 * P / n)    # DeepSpeed's estimator
    assert mem["zero0"] > mem["zero1"] > mem["zero2"] > mem["zero3"]


def test_activation_formulas_and_layout_memory():
    from loop_megatron.config import preset
    from loop_megatron.launch.memory import activation_bytes, block_activation_bytes, per_gpu_memory

    m = preset("recurrent-97m").model  # d=768, 12 heads, ffn 4d, 2 + 4 x 8 + 2 blocks
    assert m.activation_checkpointing == "none"
    whole = activation_bytes(m, 1024, 4, backprop_loops=4)["loop"]
    assert whole == 4 * m.num_layers * 34 * 1024 * 4 * 768                  # every application stored
    m.activation_checkpointing = "per-iteration"
    s, b, sbh = 1024, 4, 1024 * 4 * 768
    assert block_activation_bytes(m, s, b) == 34 * sbh                       # flash: no score term
    assert block_activation_bytes(m, s, b, flash=False) == int(sbh * (34 + 5 * 12 * s / 768))
    assert block_activation_bytes(m, s, b, tp=2) == int(sbh * (10 + 24 / 2))
    assert block_activation_bytes(m, s, b, tp=2, sequence_parallel=True) == 34 * sbh // 2
    acts = activation_bytes(m, s, b, backprop_loops=4)
    assert acts["loop"] == 4 * 2 * sbh + m.num_layers * 34 * sbh            # 4 states + one iteration's blocks
    assert acts["unlooped"] == (m.prelude_layers + m.coda_layers) * 34 * sbh
    sp = activation_bytes(m, s, b, tp=2, sequence_parallel=True, backprop_loops=4)
    assert sp["loop"] == acts["loop"] // 2 and sp["logits"] == acts["logits"] // 2
    from loop_megatron.launch.memory import largest_layer_params, loop_parameters
    from loop_megatron.model.stats import parameter_count

    by_zero = [per_gpu_memory(m, s, b, 16, 2, True, z, 4)["states"] for z in (1, 2, 3)]
    deepspeed = zero_model_state_bytes(parameter_count(m) // 2, largest_layer_params(m) // 2, 1, 8)
    assert by_zero[:2] == [deepspeed["zero1"], deepspeed["zero2"]] and by_zero[0] > by_zero[1]
    # ZeRO-3: DeepSpeed's estimate plus the shared loop kept gathered in 16 bits (training/zero3.py).
    assert by_zero[2] == deepspeed["zero3"] + 2 * loop_parameters(m) // 2
    with pytest.raises(ValueError, match="do not divide"):
        per_gpu_memory(m, s, b, 6, 4, False, 1)


def test_memory_plan_prints_a_table_and_a_pick():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "memory_plan.py"), "--model", "loop-7b",
                          "--gpus", "8", "16"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "| TP 1, ZeRO-1 | (" in out  # 6.6B at micro-batch 8 does not fit 80 GiB on one GPU per replica
    assert "Pick: 8 GPUs: TP 2 + SP, ZeRO-1; 16 GPUs: TP 1, ZeRO-2." in out


def test_paper_batch_sizes_stay_in_nanogpt_range():
    for dp in (1, 2, 4, 8, 16, 32, 64):
        micro, global_batch = paper_batch_sizes(12, dp)
        assert global_batch % (micro * dp) == 0
        assert 480 <= global_batch <= 512 or micro == 1


def test_paper_dry_run_prints_table_and_commands(capsys):
    assert cli.main(["paper", "--dry-run", "--nodes", "2", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    for name in PAPER_PRESETS:
        assert f"| {name} |" in out
        assert f"--preset {name}" in out
    assert out.count("deepspeed --hostfile HOSTFILE --num_nodes 2 --num_gpus 8") == 5
    assert "--precision bf16" in out and "--seq-length 1024" in out


def test_paper_run_without_hostfile_is_refused(capsys):
    assert cli.main(["paper"]) != 0
    assert "needs --hostfile" in capsys.readouterr().err


def test_paper_settings_read_the_presets_and_the_environment():
    from loop_megatron.launch.paper import PaperSettings, paper_trainer_args

    args = paper_trainer_args("loop-45m", PaperSettings.from_env({"DATA": "x/owt", "LR": "3e-4"}), 8)
    assert args[args.index("--data-path") + 1] == "x/owt" and args[args.index("--lr") + 1] == "0.0003"
    args = paper_trainer_args("loop-45m", PaperSettings.from_env({"DATA": "x/a", "OWT_DATA": "x/b"}), 8)
    assert args[args.index("--data-path") + 1] == "x/b"  # the old name is an alias only
    with pytest.raises(LaunchError, match=r"MICRO_BATCH='many' is not a valid int\."):
        PaperSettings.from_env({"MICRO_BATCH": "many"})


def test_train_prepares_the_bundled_corpus_only_when_missing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    assert cli.prepare_bundled_data(["--preset", "tiny-1l"]) == 0
    assert calls and calls[0][-2:] == ["--out-dir", "data"] and calls[0][1].endswith("tools/prepare_sotu.py")
    calls.clear()
    assert cli.prepare_bundled_data(["--preset", "tiny-1l", "--data-path", "elsewhere"]) == 0
    assert cli.prepare_bundled_data(["--preset", "loop-81m"]) == 0
    assert cli.prepare_bundled_data(["--no-such-flag"]) == 0
    os.makedirs("data")
    open("data/sotu_text_document.idx", "w").close()
    assert cli.prepare_bundled_data(["--preset", "tiny-1l"]) == 0
    assert calls == []


@pytest.mark.parametrize("trainer_args, error", [
    (["--hidden", "64"], "error: unknown flag --hidden; did you mean --hidden-size?"),
    (["--global-batch-size", "3"], "error: training.global_batch_size (3) must equal training.micro_batch_size "
                                   "(8) x gradient accumulation x data-parallel size (2)."),
])
def test_train_cli_checks_the_trainer_command_line_before_starting_ranks(trainer_args, error, capsys, monkeypatch,
                                                                          tmp_path):
    """Parsed as each rank parses it and validated for the world size it would launch: one sentence, no
    rank started (each would have printed it, with argparse's usage, after 13-32 s of start-up)."""
    monkeypatch.setattr(cli, "run_plan", lambda *a, **k: pytest.fail("ranks started"))
    hf = tmp_path / "hosts"
    hf.write_text("localhost slots=2\n")
    assert cli.main(["train", "--hostfile", str(hf), "--preset", "tiny-1l", "--", *trainer_args]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == error and captured.out == ""


def test_train_cli_names_its_own_option_for_a_typo(capsys, monkeypatch):
    monkeypatch.setattr(cli, "run_plan", lambda *a, **k: pytest.fail("ranks started"))
    assert cli.main(["train", "--num-gpu", "2", "--preset", "tiny-1l"]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: unknown flag --num-gpu; did you mean --num-gpus (an option of launch/train.sh)?"
