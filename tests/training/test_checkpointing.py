"""Checkpoints through the trainer: layout, keep-last, exact resume, refusals (unit tests of the writer
itself: tests/checkpoint/test_engine.py)."""
import json
import os

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.training.helpers import tiny_config, write_corpus

LAYOUTS = {
    # DP=2 ZeRO-2 with dropout: resume must restore optimizer, schedule, data position and RNG.
    "zero2_dp2": {"training.zero_stage": 2, "model.hidden_dropout": 0.1, "model.attention_dropout": 0.1},
    # TP=2 ZeRO-3 with dropout and per-iteration activation checkpointing.
    "zero3_tp2": {"training.zero_stage": 3, "parallel.tensor_model_parallel_size": 2,
                  "model.hidden_dropout": 0.1, "model.attention_dropout": 0.1,
                  "model.activation_checkpointing": "per-iteration"},
}


def _worker(rank, world_size, root, prefix, seed=7):
    from loop_megatron.training import RunOptions, pretrain

    out = {}
    for name, layout in LAYOUTS.items():
        # lr_decay_iters fixed: the 4-step run stands for the first half of the 8-step one (its schedule).
        base = {"training.global_batch_size": 4, "training.lr_warmup_iters": 2, "training.lr_decay_iters": 8,
                "training.seed": seed, **layout}
        ck = os.path.join(root, name, "ck")
        full = pretrain(tiny_config(prefix, os.path.join(root, name, "full"), **base, **{"training.train_iters": 8}),
                        RunOptions(), return_state_dict=True)
        part = pretrain(tiny_config(prefix, os.path.join(root, name, "part"), **base, **{
            "training.train_iters": 4, "training.save": ck, "training.save_interval": 1, "training.keep_last": 2}),
            RunOptions(), return_state_dict=True)
        listing = sorted(os.listdir(ck)) if rank == 0 else None
        resumed = pretrain(tiny_config(prefix, os.path.join(root, name, "resumed"), **base, **{
            "training.train_iters": 8, "training.save": ck, "training.load": ck, "training.keep_last": 2}),
            RunOptions(), return_state_dict=True)
        keep = ("records", "state_dict", "start_iteration", "iterations")
        out[name] = {"full": {k: full[k] for k in keep}, "part": {k: part[k] for k in keep},
                     "resumed": {k: resumed[k] for k in keep}, "listing_after_part": listing, "ck": ck}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    prefix = write_corpus(os.path.join(root, "data"))
    return run_distributed(_worker, 2, root, prefix)[0], prefix


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_matches_uninterrupted_run(runs, layout):
    r = runs[0][layout]
    full, resumed = r["full"], r["resumed"]
    assert resumed["start_iteration"] == 4 and resumed["iterations"] == 8
    full_losses = {rec["iteration"]: rec["loss"] for rec in full["records"]}
    resumed_losses = {rec["iteration"]: rec["loss"] for rec in resumed["records"]}
    assert sorted(resumed_losses) == [5, 6, 7, 8]
    # Bit-exact: on its own layout a resumed run repeats the same operations in the same order on the
    # restored state (bench/layout_spread.py --suite resume: difference 0 for seeds 1-4, both layouts).
    for it, loss in resumed_losses.items():
        assert loss == full_losses[it], f"iteration {it}: {loss} vs {full_losses[it]}"
    for key, value in full["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_keep_last_and_contract(runs, layout):
    r = runs[0][layout]
    ck = r["ck"]
    # After the 4-step run with save_interval 1 and keep_last 2: only the newest two remain.
    # (DeepSpeed also drops its zero_to_fp32.py recovery scripts into the folder.)
    assert [n for n in r["listing_after_part"] if not n.endswith(".py")] == ["iter_0000003", "iter_0000004", "latest"]
    # After the resumed run (saved at the end, iteration 8): keep_last 2 still holds.
    assert [n for n in sorted(os.listdir(ck)) if not n.endswith(".py")] == ["iter_0000004", "iter_0000008", "latest"]
    assert open(os.path.join(ck, "latest")).read().strip() == "iter_0000008"
    meta = json.load(open(os.path.join(ck, "iter_0000008", "meta.json")))
    tp = 2 if layout == "zero3_tp2" else 1
    assert {k: meta[k] for k in ("format", "version", "iteration", "consumed_samples",
                                 "tensor_model_parallel_size", "zero_stage", "world_size")} == {
        "format": "loop_megatron", "version": 1, "iteration": 8, "consumed_samples": 32,
        "tensor_model_parallel_size": tp, "zero_stage": LAYOUTS[layout]["training.zero_stage"], "world_size": 2}
    assert meta["config"]["model"]["hidden_size"] == 32
    # model.pt: the consolidated TP=1 fp32 state dict of the final weights, loadable into a TP=1 model.
    sd = torch.load(os.path.join(ck, "iter_0000008", "model.pt"), weights_only=True)
    for key, value in r["resumed"]["state_dict"].items():
        assert sd[key].dtype == torch.float32
        torch.testing.assert_close(sd[key], value)
    from loop_megatron.config import Config
    from loop_megatron.model import LoopGPT, load_full_state_dict

    model = LoopGPT(Config.from_dict(meta["config"]).model)
    load_full_state_dict(model, sd)
    assert not any(name.endswith(".tmp") for name in os.listdir(ck))


def _ck_config(runs, layout, **overrides):
    prefix = runs[1]
    r = runs[0][layout]
    base = {"training.global_batch_size": 4, "training.lr_warmup_iters": 2, "training.lr_decay_iters": 8,
            "training.load": r["ck"], **LAYOUTS[layout]}  # the saved schedule (another one is refused)
    base.update(overrides)
    return tiny_config(prefix, os.path.join(os.path.dirname(r["ck"]), "refused"), **base)


def test_refuses_different_shape(runs):
    from loop_megatron.config import ConfigError
    from loop_megatron.training import RunOptions, preflight

    cfg = _ck_config(runs, "zero2_dp2", **{"model.hidden_size": 64, "model.num_loops": 3})
    with pytest.raises(ConfigError) as info:
        preflight(cfg, RunOptions())
    msg = str(info.value)
    assert "different model shape" in msg
    assert "model.hidden_size 32 there vs 64 here" in msg and "model.num_loops 2 there vs 3 here" in msg


def test_other_tp_size_resumes_from_universal_state(runs, monkeypatch, tmp_path):
    """Another TP size resumes through universal/ (tests/checkpoint/test_universal.py checks the numbers);
    without universal/ (an older checkpoint) it is refused in one sentence naming the difference."""
    import shutil

    from loop_megatron.config import ConfigError
    from loop_megatron.training import RunOptions, preflight

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = _ck_config(runs, "zero3_tp2", **{"parallel.tensor_model_parallel_size": 1})
    assert preflight(cfg, RunOptions())["resume"].mode == "universal"
    old = str(tmp_path / "old")
    shutil.copytree(runs[0]["zero3_tp2"]["ck"], old)
    shutil.rmtree(os.path.join(old, "iter_0000008", "universal"))
    cfg = _ck_config(runs, "zero3_tp2", **{"parallel.tensor_model_parallel_size": 1, "training.load": old})
    with pytest.raises(ConfigError) as info:
        preflight(cfg, RunOptions())
    assert "tensor_model_parallel_size 2 there vs 1 here" in str(info.value)
    assert "holds no universal/ state" in str(info.value)
