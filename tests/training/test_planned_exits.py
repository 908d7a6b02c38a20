"""Planned exits (Megatron-LM's --exit-interval, --exit-duration-in-mins) save, log why and exit 0; a run
stopped at an exit interval resumes to the uninterrupted result; the duration decision rides on the step's
all-reduce, so ranks whose clocks disagree still stop together; --exit-signal-handler is the default here,
and switching it off leaves SIGTERM/SIGINT alone."""
import json
import os
import signal

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.training.helpers import tiny_config, write_corpus

BASE = {"training.global_batch_size": 2, "training.eval_iters": 0, "model.num_layers": 1,
        "model.hidden_dropout": 0.1, "training.train_iters": 6, "training.lr_decay_iters": 6}


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("data")))


def _pretrain(cfg):
    import torch.distributed as dist

    from loop_megatron.training import RunOptions, pretrain

    try:
        return pretrain(cfg, RunOptions(), return_state_dict=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_exit_interval_saves_says_why_and_resumes_to_the_uninterrupted_run(prefix, tmp_path, capsys):
    full = _pretrain(tiny_config(prefix, str(tmp_path / "full"), **BASE))
    ck = str(tmp_path / "ck")
    first = _pretrain(tiny_config(prefix, str(tmp_path / "first"), **BASE, **{
        "training.exit_interval": 3, "training.save": ck}))
    out = capsys.readouterr().out
    assert first["iterations"] == 3 and first["stopped"] and first["stop_reason"] == "exit_interval"
    assert "exit interval reached at iteration 3 (--exit-interval 3); saving and exiting" in out
    assert "run stopped at --exit-interval 3: iteration 3/6 (3 steps this run)" in out
    with open(os.path.join(str(tmp_path / "first"), "summary.json")) as f:
        assert json.load(f)["stop_reason"] == "exit_interval"
    assert sorted(os.listdir(ck)) == ["iter_0000003", "latest"]
    # The same command again resumes and runs to the end (6 is the last step: it finishes, not exits).
    second = _pretrain(tiny_config(prefix, str(tmp_path / "second"), **BASE, **{
        "training.exit_interval": 3, "training.save": ck, "training.load": ck}))
    assert second["start_iteration"] == 3 and second["iterations"] == 6 and not second["stopped"]
    assert second["stop_reason"] is None and "run finished: iteration 6/6" in capsys.readouterr().out
    want = {r["iteration"]: (r["lr"], r["loss"]) for r in full["records"]}
    assert [(r["lr"], r["loss"]) for r in second["records"]] == [want[i] for i in (4, 5, 6)]
    for name, value in full["state_dict"].items():
        assert torch.equal(second["state_dict"][name], value), name


def _duration_worker(rank, world_size, root, prefix):
    from loop_megatron.training import RunOptions, pretrain

    # Rank 0's time is up after its first step, rank 1's never: only the reduced decision stops rank 1.
    limit = 1e-9 if rank == 0 else 1e6
    out = pretrain(tiny_config(prefix, os.path.join(root, "run"), **{
        **BASE, "training.global_batch_size": 4, "training.exit_duration_in_mins": limit,
        "training.save": os.path.join(root, "ck")}), RunOptions())
    return {k: out[k] for k in ("iterations", "stopped", "stop_reason")}


def test_exit_duration_stops_every_rank_at_the_same_iteration(prefix, tmp_path):
    from loop_megatron.checkpoint import list_checkpoints, read_latest

    results = run_distributed(_duration_worker, 2, str(tmp_path), prefix)
    assert results == [{"iterations": 1, "stopped": True, "stop_reason": "exit_duration"}] * 2
    ck = str(tmp_path / "ck")
    assert list_checkpoints(ck) == [(1, "iter_0000001")] and read_latest(ck) == "iter_0000001"


def test_cli_exits_0_after_the_duration_with_one_line_saying_why(prefix, tmp_path, capsys):
    import torch.distributed as dist

    from loop_megatron.train import main

    ck, run = str(tmp_path / "ck"), str(tmp_path / "run")
    argv = ["--preset", "tiny-2l-2loop", "--data-path", prefix, "--num-layers", "1", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2", "--train-iters", "5",
            "--eval-iters", "0", "--precision", "fp32", "--split", "90,10,0", "--run-dir", run, "--save", ck,
            "--override", "model.vocab_size=256", "--override", "model.make_vocab_size_divisible_by=1",
            "--override", "model.max_position_embeddings=32", "--exit-duration-in-mins", "1e-9"]
    try:
        assert main(argv) == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    out = capsys.readouterr().out
    assert "exit duration reached at iteration 1: over --exit-duration-in-mins 1e-09 since the start" in out
    assert "run stopped after --exit-duration-in-mins 1e-09: iteration 1/5" in out
    assert os.path.isfile(os.path.join(ck, "iter_0000001", "meta.json"))


@pytest.mark.parametrize("handler", [True, False])
def test_exit_signal_handler_switch(prefix, tmp_path, handler):
    import torch.distributed as dist

    from loop_megatron.training import RunOptions, Trainer, preflight
    from loop_megatron.training.arguments import config_from_args
    from loop_megatron.utils.signals import STOP_REQUEST

    assert config_from_args(["--exit-signal-handler"])[0].training.exit_signal_handler  # Megatron's flag: the default
    cfg = tiny_config(prefix, str(tmp_path / "run"), **BASE, **{"training.exit_signal_handler": handler})
    before = signal.getsignal(signal.SIGTERM)
    STOP_REQUEST.install()  # as `python -m loop_megatron.train` does before it parses the command line
    trainer = Trainer(cfg, RunOptions(), preflight(cfg, RunOptions()))
    try:
        trainer.setup()
        during = signal.getsignal(signal.SIGTERM)
    finally:
        trainer.close()
        STOP_REQUEST.uninstall()
        if dist.is_initialized():
            dist.destroy_process_group()
    assert (during == STOP_REQUEST._handler) is handler
    if not handler:
        assert during == before  # given back: SIGTERM ends the process as it would without the trainer
