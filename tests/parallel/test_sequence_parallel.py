"""Sequence parallelism (parallel.sequence_parallel) at the model level, on 2 gloo processes: TP=2 with the
residual stream sharded along the sequence gives TP=2's and TP=1's loss, logits and gradients; the replicated
parameters applied to sequence shards (LayerNorms, row-parallel biases, gates, injection) end with the whole
gradient, equal on both TP ranks; dropout on shards draws a different mask per TP rank; the collectives are
each other's adjoints. The trainer-level runs (ZeRO-0/3, checkpointing, the recipe) are in
tests/training/test_sequence_parallel_training.py."""
import pytest
import torch
import torch.distributed as dist

from loop_megatron.config import ModelConfig
from loop_megatron.model import KVCache, LoopDepth, LoopGPT, full_state_dict
from loop_megatron.model.documents import DocumentLayout
from loop_megatron.parallel import (destroy_model_parallel, dropout, gather_from_sequence_parallel_region,
                                    get_tensor_model_parallel_group, initialize_model_parallel, merge_shards,
                                    randn_like, reduce_scatter_to_sequence_parallel_region,
                                    scatter_to_sequence_parallel_region)
from tests.dist_utils import run_distributed

VOCAB = 101


def _model_cfg(**overrides) -> ModelConfig:
    cfg = ModelConfig(vocab_size=VOCAB, make_vocab_size_divisible_by=8, max_position_embeddings=32, hidden_size=32,
                      num_attention_heads=4, num_layers=2, num_loops=3, prelude_layers=1, coda_layers=1,
                      loop_gates="vector", activation_checkpointing="per-iteration")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _grads(model):
    """(full TP=1-layout gradients, this rank's own gradients of the replicated parameters)."""
    full, replicated = {}, {}
    group = get_tensor_model_parallel_group()
    for name, p in model.named_parameters():
        g = p.grad.detach()
        if getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(g) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, g.contiguous(), group=group)
            g = merge_shards(parts, p.partition_dim, p.partition_stride)
        else:
            replicated[name] = g.clone()
        full[name] = g.clone()
    return full, replicated


def _run(tp: int, sp: bool, cfg: ModelConfig, ids: torch.Tensor, depth=None, documents=False):
    destroy_model_parallel()
    initialize_model_parallel(tp)
    torch.manual_seed(7)
    model = LoopGPT(cfg).train()
    with torch.no_grad():  # the same on both ranks: replicated parameters, seeded alike
        for p in [model.loop.gates] if model.loop.gates is not None else []:
            p.uniform_(0.5, 1.5)
        for p in model.loop.injection.parameters() if model.loop.injection is not None else []:
            p.add_(0.1 * torch.randn_like(p))
        for block in list(model.prelude) + list(model.loop.blocks):
            block.ln_1.weight.uniform_(0.5, 1.5)
            block.attn.proj.bias.uniform_(-0.1, 0.1)
    on_shards = model.enable_sequence_parallel() if sp else []
    torch.manual_seed(11)  # the random initial state's draw
    # documents: the packed documents kept apart (model/documents.py): the full [T, T] mask on every rank
    kwargs = {"attention_mask": DocumentLayout(0, True, True).mask(ids[:, :-1])} if documents else {}
    logits, loss = model(ids[:, :-1], ids[:, 1:], return_logits=True, depth=depth, **kwargs)
    loss.backward()
    full, replicated = _grads(model)
    return {"loss": loss.detach(), "logits": logits.detach(), "grads": full, "replicated": replicated,
            "on_shards": on_shards, "weights": full_state_dict(model)}


def _worker(rank, world_size, cases, ids):
    out = {case: {"tp1": _run(1, False, cfg, ids, depth, *docs), "tp2": _run(2, False, cfg, ids, depth, *docs),
                  "tp2_sp": _run(2, True, cfg, ids, depth, *docs)} for case, (cfg, depth, *docs) in cases.items()}
    destroy_model_parallel()
    out["collectives"] = _collectives(rank)
    return out


# TP=2 vs TP=1 differ by fp32 summation order (the row-parallel sums): the bounds of test_tensor_parallel.py.
ATOL, RTOL = 1e-5, 1e-4


def _assert_same(a, b, what):
    assert abs(a["loss"].item() - b["loss"].item()) < ATOL, what
    assert (a["logits"] - b["logits"]).abs().max().item() < ATOL, what
    for name in a["weights"]:
        assert torch.equal(a["weights"][name], b["weights"][name]), f"{what}: initial weight {name} differs"
    assert a["grads"].keys() == b["grads"].keys()
    for name in a["grads"]:
        torch.testing.assert_close(a["grads"][name], b["grads"][name], atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"{what}: grad {name}: {m}")


CASES = {
    # the looped gated model, per-iteration checkpointing
    "gated": (_model_cfg(), None),
    # the recurrent-depth recipe: linear injection, random s_0 (drawn whole, sharded), truncated backprop,
    # per-row depths (masks over the batch dimension, untouched by the sequence split), per-block checkpoints
    "recipe": (_model_cfg(loop_gates="none", loop_injection="linear", loop_state_init="random",
                          activation_checkpointing="per-block"),
               LoopDepth(backprop_loops=2, loop_depths=torch.tensor([4, 2]))),
    "diagonal": (_model_cfg(loop_injection="diagonal", loop_state_init="zeros", activation_checkpointing="none"),
                 None),
    # packed documents kept apart (reset positions and attention at token 0, which the inputs below hold)
    "documents": (_model_cfg(), None, True),
}


@pytest.fixture(scope="module")
def results():
    """Every case (and the collectives) in one pair of processes: spawning costs more than the models."""
    torch.manual_seed(0)
    ids = torch.randint(1, VOCAB, (2, 17))  # 16 positions: 8 per TP rank
    ids[0, 5], ids[1, 9] = 0, 0  # an end-of-document token in each row, for the "documents" case
    return run_distributed(_worker, 2, CASES, ids)


@pytest.mark.parametrize("case", sorted(CASES))
def test_sequence_parallel_matches_tp2_and_tp1(results, case):
    cfg = CASES[case][0]
    results = [r[case] for r in results]
    for r in results:
        _assert_same(r["tp2_sp"], r["tp1"], f"{case}: TP=2+SP vs TP=1")
        _assert_same(r["tp2_sp"], r["tp2"], f"{case}: TP=2+SP vs TP=2")
    # The replicated parameters on shards: the whole gradient, bit-equal on both TP ranks.
    on_shards = results[0]["tp2_sp"]["on_shards"]
    assert "ln_f.weight" in on_shards and "loop.blocks.0.attn.proj.bias" in on_shards
    assert "wpe.weight" not in on_shards and "wte.weight" not in on_shards
    assert ("loop.gates" in on_shards) == (cfg.loop_gates != "none")
    assert any(n.startswith("loop.injection.") for n in on_shards) == (cfg.loop_injection in ("linear", "diagonal"))
    for name, g in results[0]["tp2_sp"]["replicated"].items():
        assert torch.equal(g, results[1]["tp2_sp"]["replicated"][name]), f"{case}: {name} grad differs across TP ranks"


def _collectives(rank):
    initialize_model_parallel(2)
    torch.manual_seed(3)  # same full tensors on both ranks
    full = torch.randn(2, 6, 4, dtype=torch.float64)
    partial = torch.randn(2, 2, 6, 4, dtype=torch.float64)[rank]  # rank r's partial sum
    out = {}
    x = full.clone().requires_grad_()
    shard = scatter_to_sequence_parallel_region(x)
    out["shard"] = shard.detach()
    gathered = gather_from_sequence_parallel_region(shard)
    out["gathered"] = gathered.detach()
    p = partial.clone().requires_grad_()
    rs = reduce_scatter_to_sequence_parallel_region(p)
    out["reduce_scattered"] = rs.detach()
    # Adjoints: <A x, y> = <x, A^T y> through autograd, with a rank-dependent cotangent.
    y = torch.randn(2, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    (gathered * y).sum().backward()
    out["x_grad"] = x.grad.clone()
    (rs * y[:, :3]).sum().backward()
    out["p_grad"] = p.grad.clone()
    out["y"] = y
    out["full"], out["partial"] = full, partial
    # dropout on shards: another mask per TP rank; the shared RNG stays aligned
    torch.manual_seed(5)
    out["mask"] = dropout(torch.ones(1, 64), 0.5, True, sequence_sharded=True)
    out["replicated_mask"] = dropout(torch.ones(1, 64), 0.5, True)
    out["after"] = torch.rand(3)
    torch.manual_seed(9)
    out["noise"] = randn_like(torch.empty(2, 3, 4), sequence_sharded=True)
    # refusals: a cached forward in training mode; an exit gate (its loss reads every state at all positions)
    model = LoopGPT(_model_cfg())
    model.enable_sequence_parallel()
    try:
        model(torch.zeros(1, 4, dtype=torch.long), kv_cache=KVCache())
    except ValueError as exc:
        out["kv_refusal"] = str(exc)
    try:
        LoopGPT(_model_cfg(exit_gate=True)).enable_sequence_parallel()
    except ValueError as exc:
        out["gate_refusal"] = str(exc)
    model.eval()  # eval mode runs plain TP: a cache and any length work
    out["eval_logits"] = model(torch.arange(5).view(1, 5), kv_cache=KVCache())[0]
    destroy_model_parallel()
    return out


def test_sequence_collectives_dropout_and_noise(results):
    r0, r1 = (r["collectives"] for r in results)
    full = r0["full"]
    torch.testing.assert_close(torch.cat([r0["shard"], r1["shard"]], dim=1), full, rtol=0, atol=0)
    for r in (r0, r1):
        torch.testing.assert_close(r["gathered"], full, rtol=0, atol=0)
    summed = r0["partial"] + r1["partial"]
    torch.testing.assert_close(torch.cat([r0["reduce_scattered"], r1["reduce_scattered"]], dim=1), summed)
    # gather's backward is a reduce-scatter: rank r gets the sum of both cotangents over its positions, and
    # the scatter's backward gathers that to the whole input
    cot = r0["y"] + r1["y"]
    for r in (r0, r1):
        torch.testing.assert_close(r["x_grad"], cot)
    # reduce-scatter's backward all-gathers the shards' cotangents
    for r in (r0, r1):
        torch.testing.assert_close(r["p_grad"], torch.cat([r0["y"][:, :3], r1["y"][:, :3]], dim=1))
    assert not torch.equal(r0["mask"], r1["mask"])
    assert torch.equal(r0["replicated_mask"], r1["replicated_mask"])
    assert torch.equal(r0["after"], r1["after"])
    torch.manual_seed(9)
    whole = torch.randn(2, 6, 4)
    torch.testing.assert_close(torch.cat([r0["noise"], r1["noise"]], dim=1), whole, rtol=0, atol=0)
    assert "parallel.sequence_parallel" in r0["kv_refusal"] and "model.eval()" in r0["kv_refusal"]
    assert "model.exit_gate" in r0["gate_refusal"]
    assert r0["eval_logits"].shape == (1, 5, VOCAB) and torch.equal(r0["eval_logits"], r1["eval_logits"])


def test_enable_sequence_parallel_is_a_no_op_at_tp1():
    destroy_model_parallel()
    torch.manual_seed(0)
    model = LoopGPT(_model_cfg(exit_gate=True)).train()
    ids = torch.randint(0, VOCAB, (2, 9))
    before = model(ids)[0]
    assert model.enable_sequence_parallel() == []
    assert not any(getattr(m, "sequence_parallel", False) for m in model.modules())
    assert not any(getattr(p, "sequence_parallel", False) for p in model.parameters())
    assert torch.equal(model(ids)[0], before)
