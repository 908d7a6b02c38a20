"""LoopDepth (one call's depth settings) and the truncation plan, as pure functions."""
import pytest
import torch

from loop_megatron.model.depth import LoopDepth, TruncationPlan, truncation_plan


def test_of_accepts_none_an_int_or_a_depth():
    assert LoopDepth.of(None) == LoopDepth()
    assert LoopDepth.of(3).num_loops == 3
    d = LoopDepth(4, backprop_loops=2)
    assert LoopDepth.of(d) is d
    with pytest.raises(TypeError, match="depth must be"):
        LoopDepth.of(2.5)
    with pytest.raises(TypeError, match="depth must be"):
        LoopDepth.of(True)


def test_resolve_defaults_and_per_row_depths():
    assert LoopDepth().resolve(6, 2, torch.device("cpu")) == (6, None, None)
    assert LoopDepth(3).resolve(6, 2, torch.device("cpu")) == (3, None, None)
    r, rows, shallowest = LoopDepth(loop_depths=torch.tensor([2, 5, 3])).resolve(6, 3, torch.device("cpu"))
    assert (r, rows.tolist(), shallowest) == (5, [2, 5, 3], 2)
    with pytest.raises(ValueError, match="2 entries for a batch of 3"):
        LoopDepth(loop_depths=torch.tensor([1, 2])).resolve(6, 3, torch.device("cpu"))
    with pytest.raises(ValueError, match=">= 1"):
        LoopDepth(loop_depths=torch.tensor([0, 2])).resolve(6, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="below the deepest row"):
        LoopDepth(2, loop_depths=torch.tensor([3, 1])).resolve(6, 2, torch.device("cpu"))


@pytest.mark.parametrize("r,k,grad", [(5, 0, True), (5, 5, True), (5, 7, True), (5, 2, False)])
def test_no_truncation_builds_every_iteration(r, k, grad):
    plan = truncation_plan(r, k, grad)
    assert plan == TruncationPlan() and all(plan.tracked(n) for n in range(r)) and not plan.cuts_rows(3)


def test_fixed_depth_truncation_keeps_the_last_k():
    plan = truncation_plan(5, 2, True)
    assert [plan.tracked(n) for n in range(5)] == [False, False, False, True, True]
    assert plan.row_starts is None and not any(plan.cuts_rows(n) for n in range(5))


def test_per_row_truncation_cuts_each_row_at_its_own_last_k():
    rows = torch.tensor([2, 5, 3])
    plan = truncation_plan(5, 2, True, rows, shallowest=2)
    assert plan.first_graph == 0  # the shallowest row needs gradient from iteration 0
    assert plan.row_starts.tolist() == [0, 3, 1]
    assert [plan.cuts_rows(n) for n in range(5)] == [False, True, True, True, True]
    deep = truncation_plan(6, 2, True, torch.tensor([5, 6]), shallowest=5)
    assert deep.first_graph == 3
    # a micro-step-wide no-grad prefix may only shorten the local one (ZeRO-3 needs one prefix on all ranks)
    assert truncation_plan(6, 2, True, torch.tensor([5, 6]), shallowest=5, no_grad_loops=1).first_graph == 1
    assert truncation_plan(6, 2, True, torch.tensor([5, 6]), shallowest=5, no_grad_loops=9).first_graph == 3
