"""Loading part of a checkpoint, Megatron-LM's way: --no-load-optim (weights and the run's position, a
fresh optimizer), --no-load-rng (RNGs reseeded from (seed, iteration)) and --finetune (weights only,
iteration 0, data from the start), on the saved layout and on another one (one process: ZeRO-0 fp32 saved,
ZeRO-1 / bf16 resumed)."""
import contextlib
import json
import os

import pytest
import torch

from tests.training.helpers import pretrain_in_process, tiny_config, write_corpus

BASE = {"training.global_batch_size": 2, "training.eval_iters": 0, "model.num_layers": 1,
        "model.hidden_dropout": 0.1, "training.lr_warmup_iters": 1, "training.train_iters": 6}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """An uninterrupted 6-step run that saved at 3 and 6."""
    root = str(tmp_path_factory.mktemp("partial"))
    prefix = write_corpus(os.path.join(root, "data"))
    ck = os.path.join(root, "ck")
    out = pretrain_in_process(tiny_config(prefix, os.path.join(root, "full"), **BASE, **{
        "training.save": ck, "training.save_interval": 3, "training.keep_last": 0}))
    return {"root": root, "prefix": prefix, "tag3": os.path.join(ck, "iter_0000003"), "records": out["records"]}


def _cfg(full, name, **extra):
    return tiny_config(full["prefix"], os.path.join(full["root"], name), **{**BASE, **extra})


@contextlib.contextmanager
def _set_up(cfg):
    """A Trainer after setup() (model, engine, resume), closed afterwards."""
    import torch.distributed as dist

    from loop_megatron.training import RunOptions, Trainer, preflight

    trainer = Trainer(cfg, RunOptions(), preflight(cfg, RunOptions()))
    try:
        trainer.setup()
        yield trainer
    finally:
        trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def test_no_load_optim_keeps_weights_and_position_with_a_fresh_optimizer(full, capsys):
    save = os.path.join(full["root"], "nlo_ck")
    out = pretrain_in_process(_cfg(full, "nlo", **{"training.load": full["tag3"], "training.no_load_optim": True,
                                                   "training.save": save}))
    assert "--no-load-optim: weights from" in capsys.readouterr().out
    ref = {r["iteration"]: r for r in full["records"]}
    got = {r["iteration"]: r for r in out["records"]}
    assert sorted(got) == [4, 5, 6]
    assert [got[i]["lr"] for i in (4, 5, 6)] == [ref[i]["lr"] for i in (4, 5, 6)]  # the schedule continues
    assert got[4]["loss"] == ref[4]["loss"]  # same weights, data and (restored) dropout RNG
    assert got[5]["loss"] != ref[5]["loss"]  # step 4's update came from fresh AdamW moments
    with open(os.path.join(save, "iter_0000006", "universal", "state.json")) as f:
        assert json.load(f)["optimizer_step"] == 3  # 3 updates since the fresh start, not 6


def test_no_load_optim_on_another_layout_restores_the_exact_fp32_masters(full, capsys):
    from loop_megatron.checkpoint import consolidated_state_dict

    cfg = _cfg(full, "nlo_bf16", **{"training.load": full["tag3"], "training.no_load_optim": True,
                                    "training.zero_stage": 1, "training.precision": "bf16"})
    with _set_up(cfg) as trainer:
        assert trainer.checks["resume"].mode == "weights" and not trainer.checks["resume"].same_layout
        assert (trainer.iteration, trainer.engine.lr_scheduler.last_step) == (3, 3)
        masters = consolidated_state_dict(trainer.engine, 1)
    saved = torch.load(os.path.join(full["tag3"], "model.pt"), weights_only=True)
    for name, value in masters.items():
        assert torch.equal(value, saved[name]), name
    assert "RNG reseeded from (seed, iteration) (another layout)" in capsys.readouterr().out


@pytest.mark.parametrize("zero_stage", [0, 1])  # universal/ both: 0 the same layout, 1 another
def test_no_load_rng_reseeds_from_seed_and_iteration(full, zero_stage):
    from loop_megatron.checkpoint.rng import reseed

    states = {}
    for flag in (False, True):
        cfg = _cfg(full, f"nlr{zero_stage}{flag}", **{"training.load": full["tag3"], "training.no_load_rng": flag,
                                                      "training.zero_stage": zero_stage})
        with _set_up(cfg) as trainer:
            states[flag] = torch.get_rng_state()
            assert trainer.checks["resume"].mode == "universal"
            assert trainer.checks["resume"].same_layout == (zero_stage == 0)
    reseed(BASE.get("training.seed", 7), 3)
    assert torch.equal(states[True], torch.get_rng_state())
    saved = torch.load(os.path.join(full["tag3"], "rng", "rank_00000.pt"), weights_only=False)["torch"]
    # Without the flag: the saved state on the saved layout; a new layout is always reseeded.
    assert torch.equal(states[False], saved if zero_stage == 0 else states[True])


def test_no_load_rng_changes_only_the_dropout_masks(full):
    out = pretrain_in_process(_cfg(full, "nlr_run", **{"training.load": full["tag3"], "training.no_load_rng": True}))
    ref = {r["iteration"]: r for r in full["records"]}
    got = {r["iteration"]: r for r in out["records"]}
    assert [got[i]["lr"] for i in (4, 5, 6)] == [ref[i]["lr"] for i in (4, 5, 6)]
    assert got[4]["loss"] != ref[4]["loss"]  # same weights and data, other dropout masks


def test_finetune_takes_the_weights_only_at_iteration_0(full, capsys):
    # Another global batch, schedule and ZeRO stage than the checkpoint's: none of them is refused.
    other = {"training.global_batch_size": 4, "training.lr": 1e-3, "training.min_lr": 1e-4, "training.train_iters": 2,
             "training.zero_stage": 1}
    tuned = pretrain_in_process(_cfg(full, "ft", **other, **{"training.load": full["tag3"], "training.finetune": True}))
    assert "finetuning from the weights of" in capsys.readouterr().out
    assert tuned["start_iteration"] == 0 and [r["iteration"] for r in tuned["records"]] == [1, 2]
    # The same as a fresh run started from those weights: iteration 0, sample 0, fresh optimizer, LR and RNG.
    fresh = pretrain_in_process(_cfg(full, "ft_ref", **other, **{"training.init_from": full["tag3"]}))
    assert [(r["lr"], r["loss"]) for r in tuned["records"]] == [(r["lr"], r["loss"]) for r in fresh["records"]]
    scratch = pretrain_in_process(_cfg(full, "ft_scratch", **other))
    assert tuned["records"][0]["loss"] != scratch["records"][0]["loss"]  # the weights did come from the checkpoint


def test_finetune_needs_a_checkpoint_to_load():
    from loop_megatron.config import ConfigError, preset

    cfg = preset("tiny-1l")
    cfg.training.finetune = True
    with pytest.raises(ConfigError, match=r"training.finetune needs training.load \(the checkpoint whose weights it "
                                          r"starts from\)"):
        cfg.validate(1)
