"""Depth sampling and loop schedules: reproducible per (seed, iteration), right distributions, caps, layouts."""
import math

import pytest
import torch

from loop_megatron.config import ConfigError, preset
from loop_megatron.model.depth import LoopDepth
from loop_megatron.training.loop_depth import LoopDepthSampler, LoopSchedule, loop_flop_counts


def sampler(kind="poisson-lognormal", mean=4.0, max_loops=8, seed=1234, schedule="", per_sequence=False,
            num_loops=4, backprop=0, train_iters=100):
    cfg = preset("tiny-recurrent")
    t = cfg.training
    cfg.model.num_loops = num_loops
    t.loop_sampling, t.mean_loops, t.max_loops, t.seed = kind, mean, max_loops, seed
    t.loop_schedule, t.loop_sampling_per_sequence, t.backprop_loops, t.train_iters = schedule, per_sequence, backprop, train_iters
    cfg.validate()
    return LoopDepthSampler(cfg)


def test_same_seed_and_iteration_give_the_same_depth_in_a_fresh_sampler():
    a, b = sampler(), sampler()
    draws = [a.step_loops(i) for i in range(200)]
    assert draws == [b.step_loops(i) for i in range(200)]  # another "rank", or a resumed run
    assert [a.step_loops(i) for i in range(150, 200)] == draws[150:]  # order of asking does not matter
    assert len(set(draws)) > 3  # it does vary with the iteration
    assert draws != [sampler(seed=99).step_loops(i) for i in range(200)]  # and with the seed
    assert a.step_loops(7, micro_batch=0) == a.step_loops(7)
    assert [a.step_loops(7, micro_batch=m) for m in range(20)] != [a.step_loops(7)] * 20


def test_poisson_lognormal_mean_and_cap():
    s = sampler(mean=4.0, max_loops=1000)
    draws = torch.tensor([s.step_loops(i) for i in range(4000)], dtype=torch.float)
    assert abs(draws.mean().item() - 4.0) < 0.15  # E[r] = mean_loops (uncapped)
    assert draws.min().item() >= 1
    # Huginn's heavy tail: depths far above the mean occur
    assert draws.max().item() >= 12
    capped = sampler(mean=4.0, max_loops=5)
    c = torch.tensor([capped.step_loops(i) for i in range(2000)])
    assert c.max().item() == 5 and c.min().item() >= 1
    assert (c == 5).float().mean().item() > 0.2  # the cap is hit, not merely respected


def test_uniform_covers_one_to_max():
    s = sampler(kind="uniform", max_loops=6)
    draws = torch.tensor([s.step_loops(i) for i in range(3000)])
    assert set(draws.tolist()) == set(range(1, 7))
    assert abs(draws.float().mean().item() - 3.5) < 0.15


def test_fixed_is_num_loops_and_follows_a_schedule():
    assert {sampler(kind="fixed", max_loops=0).step_loops(i) for i in range(50)} == {4}
    s = sampler(kind="fixed", max_loops=0, schedule="0:1,0.35:4", train_iters=100)
    assert [s.step_loops(i) for i in (0, 34, 35, 99, 100)] == [1, 1, 4, 4, 4]


def test_schedule_values():
    step = LoopSchedule("0:1,0.35:4,0.8:6", train_iters=200, default=9)
    assert [step.level(i) for i in (0, 69, 70, 159, 160, 200, 500)] == [1, 1, 4, 4, 6, 6, 6]
    ramp = LoopSchedule("linear:0:1,0.5:4", train_iters=100, default=9)
    assert [ramp.level(i) for i in (0, 25, 50, 80)] == [1.0, 2.5, 4.0, 4.0]
    assert math.isclose(ramp.level(10), 1.6)
    assert LoopSchedule("", train_iters=100, default=3.0).level(50) == 3.0


def test_schedule_sets_the_poisson_mean():
    s = sampler(mean=8.0, max_loops=64, schedule="0:2,0.5:8", train_iters=10000)
    early = torch.tensor([s.step_loops(i) for i in range(0, 3000)], dtype=torch.float).mean().item()
    late = torch.tensor([s.step_loops(i) for i in range(6000, 9000)], dtype=torch.float).mean().item()
    assert abs(early - 2.0) < 0.15 and abs(late - 8.0) < 0.4


@pytest.mark.parametrize("bad", ["1:4", "0:1,0.3", "0:1,x:4", "0:1,0.5:3,0.4:4", "0:0.5", "0:1,1.5:2", "cosine:0:1"])
def test_bad_schedules_name_the_field(bad):
    with pytest.raises(ConfigError, match="training.loop_schedule"):
        LoopSchedule(bad, 100, 1)


def test_per_sequence_depths_follow_the_sample_not_the_data_parallel_layout():
    s = sampler(per_sequence=True, max_loops=8)
    one_rank = s.micro_step_depths(iteration=3, micro_batch=0, first_sample=48, micro_batch_size=8, dp_rank=0,
                                   dp_size=1)
    halves = [s.micro_step_depths(3, 0, 48, 4, dp_rank=r, dp_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat([h.loop_depths for h in halves]), one_rank.loop_depths)
    # every DP rank runs the micro-step's deepest row (ZeRO-3's collectives line up)
    assert halves[0].num_loops == halves[1].num_loops == one_rank.num_loops == int(one_rank.loop_depths.max())
    assert torch.equal(s.sample_loops(3, torch.arange(48, 56)), one_rank.loop_depths)
    many = s.sample_loops(3, torch.arange(0, 400))
    assert len(set(many.tolist())) > 3 and many.max() <= 8
    # what the model's forward receives as `depth`: one object, no truncation asked for here
    assert isinstance(one_rank, LoopDepth) and one_rank.backprop_loops == 0 and one_rank.no_grad_loops is None


def test_step_depth_carries_backprop_loops_and_eval_loops():
    s = sampler(backprop=2)
    d = s.micro_step_depths(0, 0, 0, 4)
    assert d.backprop_loops == 2 and d.loop_depths is None
    assert s.eval_loops() == 4  # the mean
    assert sampler(kind="uniform", max_loops=7).eval_loops() == 4
    assert sampler(kind="fixed", max_loops=0, schedule="0:1,0.5:3").eval_loops() == 3  # the final level
    cfg = preset("tiny-recurrent")
    cfg.training.eval_loops = 6
    assert LoopDepthSampler(cfg.validate()).eval_loops() == 6


def test_flop_counts():
    assert loop_flop_counts(8, 0) == (8, 8)
    assert loop_flop_counts(8, 3) == (8, 3)
    assert loop_flop_counts(2, 3) == (2, 2)
