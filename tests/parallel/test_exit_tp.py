"""Adaptive exit and the exit gate under tensor parallelism: TP=2 takes the same exit decisions, gives the same
logits, and the gate's expected loss and gradients equal TP=1's."""
import torch

from loop_megatron.config import ModelConfig
from loop_megatron.model import LoopGPT
from loop_megatron.model.exit import ExitRule, ExitStats, configure_exit_training
from loop_megatron.parallel import destroy_model_parallel, initialize_model_parallel
from tests.dist_utils import run_distributed
from tests.parallel.test_tensor_parallel import _gathered_grads

CASES = [("entropy", 3.25), ("kl", 0.07), ("gate", 0.7)]


def _cfg() -> ModelConfig:
    return ModelConfig(vocab_size=101, make_vocab_size_divisible_by=8, max_position_embeddings=32, hidden_size=32,
                       num_attention_heads=4, num_layers=1, num_loops=5, prelude_layers=1, coda_layers=1,
                       loop_injection="linear", loop_state_init="zeros", exit_gate=True, init_method_std=0.3)


def _build(tp: int) -> LoopGPT:
    destroy_model_parallel()
    initialize_model_parallel(tp)
    torch.manual_seed(5)
    model = LoopGPT(_cfg())
    with torch.no_grad():
        model.exit_gate.proj.weight.normal_(0, 1.0)  # the default RNG: the same on every rank
    return model


def _run(tp: int, ids: torch.Tensor):
    model = _build(tp).eval()
    out = {}
    with torch.no_grad():
        for criterion, threshold in CASES:
            stats = ExitStats()
            logits, _ = model(ids, exit_rule=ExitRule(criterion, threshold), exit_stats=stats)
            out[criterion] = (logits, stats.iterations)
    model.train()
    configure_exit_training(model, 0.1, gate_only=False)
    _, loss = model(ids[:, :-1], ids[:, 1:], depth=4)
    loss.backward()
    out["gate_loss"] = loss.detach()
    out["grads"] = _gathered_grads(model)
    return out


def _worker(rank, world_size, ids):
    return {"tp1": _run(1, ids), "tp2": _run(2, ids)}


def test_tp2_equals_tp1_for_exit_decisions_logits_and_gate_loss():
    torch.manual_seed(1)
    ids = torch.randint(0, 101, (2, 12))
    results = run_distributed(_worker, 2, ids)
    for r in results:
        for criterion, _ in CASES:
            (l1, i1), (l2, i2) = r["tp1"][criterion], r["tp2"][criterion]
            assert torch.equal(i1, i2), criterion
            assert len(set(i1.flatten().tolist())) >= 2, (criterion, i1)  # the decisions are not trivial
            assert (l1 - l2).abs().max().item() < 1e-5, criterion
        assert abs(r["tp1"]["gate_loss"].item() - r["tp2"]["gate_loss"].item()) < 1e-5
        for name, g in r["tp1"]["grads"].items():
            assert torch.allclose(g, r["tp2"]["grads"][name], atol=1e-5, rtol=1e-4), name
        assert r["tp1"]["grads"]["exit_gate.proj.weight"].abs().sum() > 0
    assert torch.equal(results[0]["tp2"]["kl"][1], results[1]["tp2"]["kl"][1])  # the two TP ranks agree
