"""The recurrent-depth recipe through the trainer: a model with linear injection, a random initial state,
Poisson-lognormal depths (per step, and per sequence), truncated backprop and a loop schedule together
trains the same under TP=2 and TP=1, ZeRO-3 and ZeRO-0, per-iteration checkpointing and none, and resumed
and uninterrupted; the logged train/loops are the sampler's draws (an explicit re-computation below).

Random initial states come from each process's default RNG, so runs are compared at the same
data-parallel layout (a DP=2 run and a DP=1 one draw different noise for the same samples)."""
import math
import os

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.training.helpers import tiny_config, write_corpus

STEPS, STOP_AT, SEED = 4, 2, 7
RECIPE = {
    "model.prelude_layers": 1, "model.num_layers": 1, "model.coda_layers": 1, "model.num_loops": 3,
    "model.loop_gates": "none", "model.loop_injection": "linear", "model.loop_state_init": "random",
    "training.loop_sampling": "poisson-lognormal", "training.mean_loops": 3, "training.max_loops": 5,
    "training.backprop_loops": 2, "training.loop_schedule": "0:2,0.5:3", "training.global_batch_size": 4,
    "training.train_iters": STEPS, "training.seed": SEED,
}
PER_SEQ = {"training.loop_sampling_per_sequence": True}
TP2 = {"parallel.tensor_model_parallel_size": 2}
WORLD2_RUNS = {
    "zero0": {"training.zero_stage": 0},
    "zero0_ckpt": {"training.zero_stage": 0, "model.activation_checkpointing": "per-iteration"},
    "zero3": {"training.zero_stage": 3},
    "tp2": {**TP2, "training.zero_stage": 0},
    "tp2_zero3_ckpt": {**TP2, "training.zero_stage": 3, "model.activation_checkpointing": "per-iteration"},
    "perseq_zero0": {**PER_SEQ, "training.zero_stage": 0},
    "perseq_zero3_ckpt": {**PER_SEQ, "training.zero_stage": 3, "model.activation_checkpointing": "per-iteration"},
}
WORLD1_RUNS = {"dp1": {"training.zero_stage": 0}}  # DP=1, accumulation 2: the TP=2 runs' layout
RESUME = "tp2_zero3_ckpt"  # the layout the interrupted + resumed pair uses


def _run(cfg, stop_at=None):
    """pretrain(), optionally asking the loop to stop (as SIGTERM would) during step `stop_at`."""
    from loop_megatron import checkpoint
    from loop_megatron.training import RunOptions
    from loop_megatron.training.trainer import Trainer, preflight

    class StopAfter(Trainer):
        def train_step(self, micro_batches, iteration):
            if stop_at is not None and iteration + 1 == stop_at:
                self.stop.requested = True
            return super().train_step(micro_batches, iteration)

    opts = RunOptions()
    trainer = StopAfter(cfg, opts, preflight(cfg, opts))
    try:
        trainer.setup()
        out = trainer.train()
        out["state_dict"] = checkpoint.consolidated_state_dict(trainer.engine, cfg.training.zero_stage)
        return out
    finally:
        trainer.close()


def _worker(rank, world_size, root, prefix, runs, resume):
    results = {}

    def keep(out):
        return {"records": out["records"], "state_dict": out["state_dict"] if rank == 0 else None,
                "iterations": out["iterations"], "start_iteration": out["start_iteration"]}

    for name, overrides in runs.items():
        results[name] = keep(_run(tiny_config(prefix, os.path.join(root, name), **RECIPE, **overrides)))
    if resume:
        ck = os.path.join(root, "resume", "ck")
        base = {**RECIPE, **WORLD2_RUNS[RESUME], "training.save": ck}
        results["part"] = keep(_run(tiny_config(prefix, os.path.join(root, "part"), **base), stop_at=STOP_AT))
        results["resumed"] = keep(_run(tiny_config(prefix, os.path.join(root, "resumed"), **base,
                                                   **{"training.load": ck})))
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("recipe"))
    prefix = write_corpus(os.path.join(root, "data"))
    results = dict(run_distributed(_worker, 2, root, prefix, WORLD2_RUNS, True)[0])
    results.update(run_distributed(_worker, 1, root, prefix, WORLD1_RUNS, False)[0])
    return results


def _losses(run):
    return {rec["iteration"]: rec["loss"] for rec in run["records"] if "loss" in rec}


# How far two layouts of this recipe may drift (fp32 sums in another order, amplified by AdamW's m / sqrt(v) on
# near-zero gradients). Measured by bench/layout_spread.py over seeds 1-6 (largest difference of any step / weight):
#   TP=2 vs TP=1 (with or without ZeRO-3 + checkpointing)   loss 9.5e-7   weights 3.6e-5
#   ZeRO-3 vs ZeRO-0, per-sequence ZeRO-3 + ckpt vs ZeRO-0   loss 2.4e-7   weights 2.4e-6
#   per-iteration checkpointing vs none                     bit-equal on every seed
# The weight bounds are about 10x the largest measured difference; the loss bound 10x the TP one.
WEIGHT_ATOL = 2.5e-5
TP_WEIGHT_ATOL = 4e-4


def _assert_same_run(a, b, name, state=True, weight_atol=WEIGHT_ATOL):
    la, lb = _losses(a), _losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1)), name
    for it in la:
        assert abs(la[it] - lb[it]) < 1e-5, f"{name}: step {it} loss {la[it]} vs {lb[it]}"
    if state:
        for key, value in b["state_dict"].items():
            torch.testing.assert_close(a["state_dict"][key], value, rtol=0, atol=weight_atol,
                                       msg=lambda m: f"{name}: {key}: {m}")


def _reference_step_loops(iteration: int, micro_batch: int) -> int:
    """Huginn's draw written out: level L from the schedule '0:2,0.5:3' over STEPS, tau ~ N(log(L - 1) -
    sigma^2 / 2, sigma), r = 1 + Poisson(exp(tau)) capped at max_loops 5, from the (seed, iteration,
    micro-batch) generator."""
    from loop_megatron.training.loop_depth import _seed

    level = 2.0 if iteration / STEPS < 0.5 else 3.0
    gen = torch.Generator().manual_seed(_seed(SEED, 0x100F, iteration, micro_batch))
    tau = torch.randn(1, generator=gen, dtype=torch.float64) * 0.5 + (math.log(level - 1) - 0.125)
    return min(5, 1 + int(torch.poisson(torch.exp(tau), generator=gen)[0]))


def _reference_per_sequence_loops(iteration: int, micro_batch: int, micro: int = 2, dp: int = 2) -> int:
    """Per-sequence: every sample has its own (seed, sample index) draw; a micro-step runs its deepest."""
    from loop_megatron.training.loop_depth import _seed

    level = 2.0 if iteration / STEPS < 0.5 else 3.0
    first = iteration * 4 + micro_batch * micro * dp
    depths = []
    for i in range(first, first + micro * dp):
        gen = torch.Generator().manual_seed(_seed(SEED, 0x5EC, i))
        tau = torch.randn(1, generator=gen, dtype=torch.float64) * 0.5 + (math.log(level - 1) - 0.125)
        depths.append(min(5, 1 + int(torch.poisson(torch.exp(tau), generator=gen)[0])))
    return max(depths)


def test_logged_loops_are_the_samplers_draws(runs):
    loops = {rec["iteration"]: rec["loops"] for rec in runs["zero0"]["records"] if "loops" in rec}
    assert loops == {it + 1: float(_reference_step_loops(it, 0)) for it in range(STEPS)}
    tp2 = {rec["iteration"]: rec["loops"] for rec in runs["tp2"]["records"] if "loops" in rec}  # accumulation 2
    assert tp2 == {it + 1: (_reference_step_loops(it, 0) + _reference_step_loops(it, 1)) / 2 for it in range(STEPS)}
    per_seq = {rec["iteration"]: rec["loops"] for rec in runs["perseq_zero0"]["records"] if "loops" in rec}
    assert per_seq == {it + 1: float(_reference_per_sequence_loops(it, 0)) for it in range(STEPS)}
    # The draws vary (else this test could not tell a sampled depth from a fixed one).
    assert len(set(loops.values()) | set(tp2.values())) > 1


def test_zero3_matches_zero0(runs):
    _assert_same_run(runs["zero3"], runs["zero0"], "ZeRO-3 vs ZeRO-0")


def test_per_iteration_checkpointing_matches_none(runs):
    _assert_same_run(runs["zero0_ckpt"], runs["zero0"], "per-iteration checkpointing vs none")


def test_tp2_matches_tp1(runs):
    _assert_same_run(runs["tp2"], runs["dp1"], "TP=2 vs TP=1 (DP=1, accumulation 2)", weight_atol=TP_WEIGHT_ATOL)
    _assert_same_run(runs["tp2_zero3_ckpt"], runs["dp1"], "TP=2 + ZeRO-3 + per-iteration checkpointing vs TP=1",
                     weight_atol=TP_WEIGHT_ATOL)


def test_per_sequence_depths_zero3_with_checkpointing_matches_zero0(runs):
    _assert_same_run(runs["perseq_zero3_ckpt"], runs["perseq_zero0"], "per-sequence: ZeRO-3 + checkpointing vs ZeRO-0")


def test_resumed_matches_uninterrupted(runs):
    part, resumed, full = runs["part"], runs["resumed"], runs[RESUME]
    assert part["iterations"] == STOP_AT and resumed["start_iteration"] == STOP_AT
    assert sorted(_losses(resumed)) == list(range(STOP_AT + 1, STEPS + 1))
    full_losses = _losses(full)
    for it, loss in _losses(resumed).items():
        assert abs(loss - full_losses[it]) < 1e-5, f"iteration {it}: {loss} vs {full_losses[it]}"
    full_loops = {r["iteration"]: r["loops"] for r in full["records"] if "loops" in r}
    assert all(r["loops"] == full_loops[r["iteration"]] for r in resumed["records"] if "loops" in r)
    for key, value in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6)


def test_a_common_no_grad_prefix_leaves_per_row_gradients_unchanged():
    """no_grad_loops (what the trainer passes so ZeRO-3 ranks share one graph layout) builds more graph
    but every row is still cut where its own last k iterations begin: same loss, same gradients."""
    from loop_megatron.config import ModelConfig
    from loop_megatron.model import LoopDepth, LoopGPT

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, vocab_size=64, max_position_embeddings=16,
                      num_layers=1, num_loops=3, loop_gates="none", loop_injection="linear", prelude_layers=1)
    model = LoopGPT(cfg)
    x = torch.randint(0, 64, (3, 8))
    depths = torch.tensor([5, 3, 4])

    def grads(**kw):
        model.zero_grad()
        _, loss = model(x, labels=x, depth=LoopDepth(5, 2, depths, **kw))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (la, ga), (lb, gb) = grads(), grads(no_grad_loops=0)
    torch.testing.assert_close(la, lb)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], msg=lambda m: f"{name}: {m}")
