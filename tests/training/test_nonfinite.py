"""A non-finite loss or gradient norm stops the run (default) without saving it, or is skipped with
training.skip_nonfinite_steps (no update, on the trainer-clipped and on DeepSpeed's layouts); the CLI
exits non-zero with one sentence; checkpoint_info flags non-finite weights."""
import json
import math
import os
import subprocess

import pytest
import torch

from tests.training.helpers import PYTHON, REPO, cli_env, tiny_config, write_corpus

# lr 6e4: step 1 is finite, its update blows the weights up, the loss is NaN from step 2 on.
DIVERGES = {"training.lr": 6e4, "training.min_lr": 6e4, "training.lr_warmup_iters": 0, "training.train_iters": 5}


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("data")))


def test_nonfinite_step_stops_without_saving_it(prefix, tmp_path):
    from loop_megatron import checkpoint
    from loop_megatron.training import RunOptions, pretrain
    from loop_megatron.training.step import NonFiniteStepError

    ck = str(tmp_path / "ck")
    cfg = tiny_config(prefix, str(tmp_path / "run"), **DIVERGES, **{
        "training.save": ck, "training.save_interval": 1, "training.keep_last": 1})
    with pytest.raises(NonFiniteStepError) as err:
        pretrain(cfg, RunOptions())
    msg = str(err.value)
    assert msg.startswith("iteration 2: the loss is nan"), msg
    assert os.path.join(ck, "iter_0000001") in msg and "--skip-nonfinite-steps" in msg
    # The last finite checkpoint stays, `latest` names it, keep_last 1 never pruned it, no other tag exists.
    assert checkpoint.read_latest(ck) == "iter_0000001"
    assert checkpoint.list_checkpoints(ck) == [(1, "iter_0000001")]
    assert not os.path.exists(os.path.join(ck, "lock"))  # released on the way out


def _run(prefix, root, iters, **extra):
    from loop_megatron.training import RunOptions, pretrain

    cfg = tiny_config(prefix, root, **{**DIVERGES, "training.train_iters": iters, **extra})
    return pretrain(cfg, RunOptions(), return_state_dict=True)


@pytest.mark.parametrize("zero_stage", [0, 2])  # ZeRO-0 fp32: the trainer's SkipGuard; ZeRO-2: DeepSpeed's skip
def test_skip_nonfinite_steps_makes_no_update(prefix, tmp_path, zero_stage):
    one = _run(prefix, str(tmp_path / "one"), 1, **{"training.zero_stage": zero_stage})
    skip = _run(prefix, str(tmp_path / "skip"), 5, **{"training.zero_stage": zero_stage,
                                                       "training.skip_nonfinite_steps": True})
    assert [r.get("skipped", False) for r in skip["records"]] == [False, True, True, True, True]
    assert skip["skipped_steps"] == 4 and skip["iterations"] == 5
    assert all(math.isfinite(r["lr"]) and r["lr"] == skip["records"][1]["lr"] for r in skip["records"][1:])
    for key, value in one["state_dict"].items():  # the weights are those after step 1: no update since
        assert torch.isfinite(skip["state_dict"][key]).all(), key
        torch.testing.assert_close(skip["state_dict"][key], value, rtol=0, atol=0)


def test_skipping_stops_after_max_skipped_steps_in_a_row(prefix, tmp_path):
    """A run whose every step is skipped is not training: it stops with one sentence after the cap."""
    from loop_megatron.training.step import NonFiniteStepError

    with pytest.raises(NonFiniteStepError) as err:
        _run(prefix, str(tmp_path / "cap"), 8, **{"training.skip_nonfinite_steps": True,
                                                  "training.max_skipped_steps": 3})
    msg = str(err.value)
    assert msg.startswith("iteration 4: the loss is nan") and "the last 3 steps were all skipped" in msg, msg
    assert "--max-skipped-steps 3" in msg


def test_poisoned_loss_gives_nonfinite_gradients_and_keeps_finite_ones_exact():
    from loop_megatron.training.step import poison_nonfinite

    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    poison_nonfinite((w * 3).sum()).backward()
    assert w.grad.tolist() == [3.0, 3.0]
    w.grad = None
    poison_nonfinite((w * float("inf")).sum()).backward()
    assert not torch.isfinite(w.grad).any()


def test_cli_exits_nonzero_with_one_sentence(prefix, tmp_path):
    cmd = [PYTHON, "-m", "loop_megatron.train", "--preset", "tiny-2l-2loop", "--data-path", prefix,
           "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
           "--micro-batch-size", "2", "--train-iters", "4", "--lr", "6e4", "--min-lr", "6e4",
           "--lr-warmup-iters", "0", "--eval-iters", "0", "--precision", "fp32", "--split", "90,10,0",
           "--run-dir", str(tmp_path / "run"), "--save", str(tmp_path / "ck"),
           "--override", "model.vocab_size=256", "--override", "model.make_vocab_size_divisible_by=1",
           "--override", "model.max_position_embeddings=32",
           "--override", f"data.data_cache_path={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: iteration 2: the loss is nan"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "ck" / "latest")  # nothing of the diverged run was saved


def test_checkpoint_info_flags_nonfinite_weights(tmp_path):
    from loop_megatron.checkpoint import save_checkpoint_files
    from loop_megatron.checkpoint.info import describe, format_text
    from loop_megatron.model import LoopGPT

    cfg = tiny_config("unused", str(tmp_path / "run"))
    sd = LoopGPT(cfg.model).state_dict()
    save_checkpoint_files(sd, cfg, str(tmp_path / "good"))
    assert describe(str(tmp_path / "good"))["weights"] == {"finite": True, "nonfinite": []}
    name = next(k for k, v in sd.items() if v.is_floating_point())
    sd[name] = torch.full_like(sd[name], float("nan"))
    save_checkpoint_files(sd, cfg, str(tmp_path / "bad"))
    record = describe(str(tmp_path / "bad"))
    assert record["weights"]["nonfinite"] == [name] and record["complete"] is False and record["resume"] == {}
    assert "NOT FINITE" in format_text(record) and "NOT A GOOD CHECKPOINT" in format_text(record)
    tool = subprocess.run([PYTHON, os.path.join(REPO, "tools", "checkpoint_info.py"), str(tmp_path / "bad"), "--json"],
                          env=cli_env(), capture_output=True, text=True, timeout=120)
    assert tool.returncode == 1 and json.loads(tool.stdout)["weights"]["finite"] is False
