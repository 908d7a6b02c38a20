"""ZeRO-0 with bf16 weights writes and reads the universal state (one process, CPU).

DeepSpeed runs bf16 ZeRO-0 through FP16_UnfusedOptimizer: the module holds bf16 weights, the wrapper one
fp32 copy per parameter that the torch AdamW steps (and keys its moments by). The universal state reads
and writes those copies. Checked by round trips that must be lossless: a bf16 ZeRO-0 checkpoint resumed
on fp32 ZeRO-0 and saved without a step, and an fp32 ZeRO-0 checkpoint resumed on bf16 ZeRO-0 and saved
without a step, give back the saved masters, moments and counters bit for bit.
"""
import os
import shutil

import pytest
import torch

from tests.training.helpers import pretrain_in_process, tiny_config, write_corpus

BASE = {"training.global_batch_size": 2, "training.lr_warmup_iters": 1, "training.lr_decay_iters": 6,
        "training.eval_iters": 0, "model.num_layers": 1, "training.zero_stage": 0}
BF16, FP32 = {"training.precision": "bf16"}, {"training.precision": "fp32"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("zero0_16bit"))
    prefix = write_corpus(os.path.join(root, "data"))
    out = {}
    for source, target in (("bf16", FP32), ("fp32", BF16)):
        ck = os.path.join(root, source, "ck")
        pretrain_in_process(tiny_config(prefix, os.path.join(root, source, "run"), **BASE,
                              **(BF16 if source == "bf16" else FP32),
                              **{"training.train_iters": 2, "training.save": ck}))
        back = os.path.join(root, source, "back")
        pretrain_in_process(tiny_config(prefix, os.path.join(root, source, "rerun"), **BASE, **target,
                              **{"training.train_iters": 2, "training.load": ck, "training.save": back}))
        out[source] = (os.path.join(ck, "iter_0000002"), os.path.join(back, "iter_0000002"))
    return out


def _same(saved, again):
    from loop_megatron.checkpoint import read_full_state

    (s1, p1), (s2, p2) = read_full_state(saved), read_full_state(again)
    for key in ("iteration", "optimizer_step", "lr_scheduler", "consumed_samples", "global_batch_size"):
        assert s1[key] == s2[key], key
    assert sorted(p1) == sorted(p2)
    for name in p1:
        for k, v in p1[name].items():
            assert torch.equal(p2[name][k], v), f"{name} {k}"
    return p1


def test_bf16_zero0_writes_universal_state_of_its_fp32_masters(runs):
    saved, again = runs["bf16"]
    assert os.path.isfile(os.path.join(saved, "universal", "state.json"))
    params = _same(saved, again)
    # Real fp32 masters, not the bf16 weights upcast; moments are live.
    assert any(not torch.equal(p["fp32"], p["fp32"].bfloat16().float()) for p in params.values())
    assert all(p["exp_avg_sq"].abs().sum() > 0 for p in params.values())


def test_fp32_checkpoint_resumes_on_bf16_zero0(runs):
    _same(*runs["fp32"])


def test_refusal_names_the_true_reason(runs, tmp_path):
    from loop_megatron.checkpoint import check_compatible, read_meta
    from loop_megatron.config import Config, ConfigError

    folder = str(tmp_path / "iter_0000002")
    shutil.copytree(runs["bf16"][0], folder)
    shutil.rmtree(os.path.join(folder, "universal"))
    meta = read_meta(folder)
    cfg = Config.from_dict(meta["config"])
    cfg.training.precision = "fp32"
    with pytest.raises(ConfigError, match=r"holds no universal/ state \(meta.json records that it was written, so "
                                          r"the universal/ folder was removed since\)"):
        check_compatible(meta, cfg, folder, 1, "fp32")
    del meta["universal"]
    with pytest.raises(ConfigError, match=r"holds no universal/ state \(the checkpoint predates universal state\)"):
        check_compatible(meta, cfg, folder, 1, "fp32")
