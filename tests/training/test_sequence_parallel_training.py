"""--sequence-parallel through the trainer (DeepSpeed engine, 2 gloo processes): TP=2 with the residual stream
sharded along the sequence trains the same run as TP=2 without it and as TP=1, under ZeRO-0 and ZeRO-3, with
per-iteration activation checkpointing, and for the recurrent-depth recipe (prelude/coda, linear injection,
random s_0, sampled depths, truncated backprop); the replicated parameters applied to sequence shards
(LayerNorms, row-parallel biases, gates, injection) stay bit-equal on both TP ranks after the steps, which
needs their TP-summed gradients (without the sum each rank would step on the gradient of its own positions).
All runs use dropout 0 (tiny_config), fp32, global batch 4, 4 steps."""
import os

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.training import test_recipe_training as recipe
from tests.training.helpers import tiny_config, write_corpus

STEPS = 4
TP2 = {"parallel.tensor_model_parallel_size": 2}
SP = {**TP2, "parallel.sequence_parallel": True}
CKPT = {"model.activation_checkpointing": "per-iteration"}
BASE = {"training.global_batch_size": 4, "training.train_iters": STEPS, "training.eval_iters": 0}
# name -> settings; "recipe_*" runs add the recurrent-depth recipe of tests/training/test_recipe_training.py.
WORLD2_RUNS = {
    "tp1_zero0": {**CKPT, "training.zero_stage": 0},  # DP=2: bit-equal to DP=1 x accumulation 2 for this model
    "tp2_zero0": {**TP2, **CKPT, "training.zero_stage": 0},
    "sp_zero0": {**SP, **CKPT, "training.zero_stage": 0, "training.eval_iters": 2},  # + the eval-mode (plain TP) path
    "sp_zero3": {**SP, **CKPT, "training.zero_stage": 3},
    "recipe_sp_zero3": {**recipe.RECIPE, **SP, **CKPT, "training.zero_stage": 3},
}
# The recipe's random s_0 comes from each process's RNG, so its TP=1 reference is DP=1 (accumulation 2).
WORLD1_RUNS = {"recipe_tp1": {**recipe.RECIPE, "training.zero_stage": 0}}


def _run(cfg):
    """pretrain()'s run, keeping (besides records and the consolidated weights) this rank's own copy of the
    parameters marked sequence_parallel."""
    import deepspeed

    from loop_megatron import checkpoint
    from loop_megatron.training import RunOptions
    from loop_megatron.training.trainer import Trainer, preflight

    opts = RunOptions()
    trainer = Trainer(cfg, opts, preflight(cfg, opts))
    try:
        trainer.setup()
        out = trainer.train()
        marked = [(n, p) for n, p in trainer.engine.module.named_parameters() if getattr(p, "sequence_parallel", False)]
        with deepspeed.zero.GatheredParameters([p for _, p in marked], enabled=cfg.training.zero_stage == 3):
            out["on_shards"] = {n: p.detach().clone() for n, p in marked}
        out["state_dict"] = checkpoint.consolidated_state_dict(trainer.engine, cfg.training.zero_stage)
        return out
    finally:
        trainer.close()


def _worker(rank, world_size, root, prefix, runs, seed=None):
    results = {}
    for name, overrides in runs.items():
        values = {**BASE, **overrides, **({} if seed is None else {"training.seed": seed})}
        out = _run(tiny_config(prefix, os.path.join(root, name), **values))
        results[name] = {"losses": [r["loss"] for r in out["records"] if "loss" in r], "on_shards": out["on_shards"],
                         "state_dict": out["state_dict"] if rank == 0 else None}
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """[rank 0's results, rank 1's results] of the world-2 runs, the world-1 runs merged into rank 0's."""
    root = str(tmp_path_factory.mktemp("sequence_parallel"))
    prefix = write_corpus(os.path.join(root, "data"))
    out = run_distributed(_worker, 2, root, prefix, WORLD2_RUNS)
    out[0].update(run_distributed(_worker, 1, root, prefix, WORLD1_RUNS)[0])
    return out


# Pairs and bounds. `bench/layout_spread.py --suite sequence_parallel --seeds 1 2 3` measures each pair (the
# largest difference of any step's loss / any final weight over the seeds); the bounds are ~10x those:
#   sp_zero0 vs tp2_zero0          loss 0        weights 1.8e-6  (the sums over the sequence of the replicated
#                                                                 parameters' gradients now run per shard)
#   sp_zero0 / sp_zero3 vs tp1     loss 4.8e-7   weights 1.6e-5  (TP's row-parallel sums in another order)
#   recipe_sp_zero3 vs recipe_tp1  loss 2.4e-7   weights 6.9e-6
# A loss is ~5.5 in fp32 (one ulp 4.8e-7), so the loss bounds are 10 ulp.
PAIRS = [("sp_zero0", "tp2_zero0", dict(loss=5e-6, weights=2e-5)),
         ("sp_zero0", "tp1_zero0", dict(loss=5e-6, weights=2e-4)),
         ("sp_zero3", "tp1_zero0", dict(loss=5e-6, weights=2e-4)),
         ("recipe_sp_zero3", "recipe_tp1", dict(loss=5e-6, weights=1e-4))]


@pytest.mark.parametrize("run,reference,tol", PAIRS, ids=[f"{a}-vs-{b}" for a, b, _ in PAIRS])
def test_sequence_parallel_trains_the_same_run(ranks, run, reference, tol):
    a, b = ranks[0][run], ranks[0][reference]
    assert len(a["losses"]) == len(b["losses"]) == STEPS
    for i, (x, y) in enumerate(zip(a["losses"], b["losses"])):
        assert abs(x - y) < tol["loss"], f"{run} vs {reference}: step {i + 1} loss {x} vs {y}"
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys()
    for key in sb:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=tol["weights"],
                                   msg=lambda m: f"{run} vs {reference}: {key}: {m}")


@pytest.mark.parametrize("run", ["sp_zero0", "sp_zero3", "recipe_sp_zero3"])
def test_replicated_parameters_on_shards_stay_equal_across_tp_ranks(ranks, run):
    r0, r1 = ranks[0][run]["on_shards"], ranks[1][run]["on_shards"]
    assert r0.keys() == r1.keys()
    names = set(r0)
    assert {"ln_f.weight", "ln_f.bias", "loop.blocks.0.ln_1.weight", "loop.blocks.0.mlp.proj.bias"} <= names
    assert ("loop.gates" in names) == (run != "recipe_sp_zero3")  # the recipe has no gates, but injection:
    assert ("loop.injection.weight" in names) == (run == "recipe_sp_zero3")
    for name in names:
        assert torch.equal(r0[name], r1[name]), f"{run}: {name} differs between the TP ranks"
    # and they trained (the runs moved them off their init)
    sd = ranks[0][run]["state_dict"]
    assert not torch.equal(sd["ln_f.weight"], torch.ones_like(sd["ln_f.weight"]))
