"""TP=2 against TP=1: the same weights give the same logits, loss and (gathered) gradients."""
import torch
import torch.nn.functional as F

from loop_megatron.config import ModelConfig
from loop_megatron.model import LoopDepth, LoopGPT, full_state_dict
from loop_megatron.model.documents import DocumentLayout
from loop_megatron.parallel import (VocabParallelEmbedding, destroy_model_parallel, get_tensor_model_parallel_group,
                                    get_tensor_model_parallel_rank, initialize_model_parallel, merge_shards,
                                    vocab_parallel_cross_entropy)
from tests.dist_utils import run_distributed


def _model_cfg(**overrides) -> ModelConfig:
    cfg = ModelConfig(vocab_size=101, make_vocab_size_divisible_by=8, max_position_embeddings=32, hidden_size=32,
                      num_attention_heads=4, num_layers=2, num_loops=3, inner_loops=2, prelude_layers=1,
                      coda_layers=1, loop_gates="vector", activation_checkpointing="per-iteration")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _gathered_grads(model):
    """Full (TP=1 layout) gradients, merging sharded parameters' gradients over the TP group."""
    import torch.distributed as dist

    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.detach()
        if getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(g) for _ in range(dist.get_world_size(get_tensor_model_parallel_group()))]
            dist.all_gather(parts, g.contiguous(), group=get_tensor_model_parallel_group())
            g = merge_shards(parts, p.partition_dim, p.partition_stride)
        grads[name] = g.clone()
    return grads


def _run_model(tp: int, cfg: ModelConfig, ids: torch.Tensor, eod=None):
    destroy_model_parallel()
    initialize_model_parallel(tp)
    torch.manual_seed(7)
    model = LoopGPT(cfg).train()
    with torch.no_grad():
        model.loop.gates.uniform_(0.5, 1.5)  # same on all ranks: gates are replicated, seeded alike
    # eod: packed documents kept apart (model/documents.py), the mask broadcast over each rank's heads
    kwargs = {} if eod is None else {"attention_mask": DocumentLayout(eod, True, True).mask(ids[:, :-1])}
    logits, loss = model(ids[:, :-1], ids[:, 1:], return_logits=True, **kwargs)
    loss.backward()
    return {"logits": logits.detach(), "loss": loss.detach(), "grads": _gathered_grads(model),
            "weights": full_state_dict(model)}


def _tp_worker(rank, world_size, cfg, ids, eod=None):
    return {"tp1": _run_model(1, cfg, ids, eod), "tp2": _run_model(2, cfg, ids, eod)}


def _assert_same(a, b, atol=1e-5):
    assert abs(a["loss"].item() - b["loss"].item()) < atol
    assert (a["logits"] - b["logits"]).abs().max().item() < atol
    assert a["weights"].keys() == b["weights"].keys()
    for name in a["weights"]:
        assert torch.equal(a["weights"][name], b["weights"][name]), f"initial weight {name} differs"
    for name in a["grads"]:
        assert torch.allclose(a["grads"][name], b["grads"][name], atol=atol, rtol=1e-4), f"grad {name} differs"


def test_tp2_matches_tp1_for_looped_gated_model():
    torch.manual_seed(0)
    ids = torch.randint(0, 101, (2, 13))
    results = run_distributed(_tp_worker, 2, _model_cfg(), ids)
    for r in results:
        _assert_same(r["tp1"], r["tp2"])
    # both TP ranks agree with each other too
    assert torch.equal(results[0]["tp2"]["logits"], results[1]["tp2"]["logits"])


def test_tp2_matches_tp1_with_dropout_and_per_block_checkpointing():
    torch.manual_seed(1)
    ids = torch.randint(0, 101, (2, 9))
    # Residual dropout acts on replicated activations: it must draw the same masks as at TP=1.
    cfg = _model_cfg(hidden_dropout=0.1, activation_checkpointing="per-block", loop_gates="scalar")
    for r in run_distributed(_tp_worker, 2, cfg, ids):
        _assert_same(r["tp1"], r["tp2"])


def test_tp2_matches_tp1_with_packed_documents_kept_apart():
    torch.manual_seed(3)
    ids = torch.randint(1, 101, (2, 13))
    ids[0, 4], ids[1, 8] = 0, 0  # one end-of-document token in each window
    for r in run_distributed(_tp_worker, 2, _model_cfg(), ids, 0):
        _assert_same(r["tp1"], r["tp2"])


def _vocab_worker(rank, world_size, weight, ids, logits_full, targets):
    destroy_model_parallel()
    initialize_model_parallel(2)
    emb = VocabParallelEmbedding(weight.shape[0], weight.shape[1], init_fn=lambda w: w.copy_(weight))
    out = emb(ids)
    out.sum().backward()
    per_rank = logits_full.shape[-1] // 2
    local = logits_full[..., rank * per_rank:(rank + 1) * per_rank].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, targets)
    loss.mean().backward()
    return {"emb": out.detach(), "emb_grad": emb.weight.grad.clone(), "loss": loss.detach(),
            "logit_grad": local.grad.clone(), "rank": get_tensor_model_parallel_rank()}


def test_vocab_parallel_embedding_and_cross_entropy_match_dense():
    torch.manual_seed(2)
    weight = torch.randn(16, 6)
    ids = torch.randint(0, 16, (3, 5))
    logits = torch.randn(3, 5, 16) * 3
    targets = torch.randint(0, 16, (3, 5))

    ref_w = weight.clone().requires_grad_(True)
    ref_out = F.embedding(ids, ref_w)
    ref_out.sum().backward()
    ref_logits = logits.clone().requires_grad_(True)
    ref_loss = F.cross_entropy(ref_logits.reshape(-1, 16), targets.reshape(-1), reduction="none").view(3, 5)
    ref_loss.mean().backward()

    results = run_distributed(_vocab_worker, 2, weight, ids, logits, targets)
    for r in results:
        assert torch.allclose(r["emb"], ref_out.detach(), atol=1e-6)
        assert torch.allclose(r["loss"], ref_loss.detach(), atol=1e-5)
    grad_w = torch.cat([r["emb_grad"] for r in sorted(results, key=lambda r: r["rank"])])
    grad_logits = torch.cat([r["logit_grad"] for r in sorted(results, key=lambda r: r["rank"])], dim=-1)
    assert torch.allclose(grad_w, ref_w.grad, atol=1e-6)
    assert torch.allclose(grad_logits, ref_logits.grad, atol=1e-6)


def _rng_worker(rank, world_size):
    from loop_megatron.parallel import tp_rng_fork

    destroy_model_parallel()
    initialize_model_parallel(2)
    torch.manual_seed(3)
    with tp_rng_fork():
        inside = torch.rand(4)
    after = torch.rand(4)
    return inside, after


def test_tp_rng_fork_differs_per_rank_and_keeps_the_shared_stream_aligned():
    (in0, after0), (in1, after1) = run_distributed(_rng_worker, 2)
    assert not torch.equal(in0, in1)  # sharded activations get different dropout masks per TP rank
    assert torch.equal(after0, after1)  # replicated activations still see identical masks


def _run_recipe_model(tp: int, cfg: ModelConfig, ids: torch.Tensor, forward_kwargs: dict):
    """A recurrent-depth model (injection parameters moved off their init, same on every rank), trained one
    forward/backward with the given depth arguments."""
    destroy_model_parallel()
    initialize_model_parallel(tp)
    torch.manual_seed(7)
    model = LoopGPT(cfg).train()
    with torch.no_grad():
        for p in model.loop.injection.parameters():
            p.add_(0.1 * torch.randn_like(p))  # the default RNG: identical on every TP rank
    logits, loss = model(ids[:, :-1], ids[:, 1:], return_logits=True, depth=LoopDepth(**forward_kwargs))  # random s_0 drawn here
    loss.backward()
    return {"logits": logits.detach(), "loss": loss.detach(), "grads": _gathered_grads(model),
            "weights": full_state_dict(model)}


def _tp_recipe_worker(rank, world_size, cases, ids):
    return [{"tp1": _run_recipe_model(1, cfg, ids, kw), "tp2": _run_recipe_model(2, cfg, ids, kw)}
            for cfg, kw in cases]


def test_tp2_matches_tp1_for_injection_random_state_truncation_and_row_depths():
    torch.manual_seed(3)
    ids = torch.randint(0, 101, (3, 11))
    linear = _model_cfg(loop_injection="linear", loop_state_init="random", loop_state_std=0.3, loop_gates="none",
                        inner_loops=1, hidden_dropout=0.1)
    diagonal = _model_cfg(loop_injection="diagonal", loop_state_init="zeros", loop_gate_count=5, inner_loops=1,
                          activation_checkpointing="per-block")
    cases = [(linear, {"num_loops": 5, "backprop_loops": 2}),
             (diagonal, {"loop_depths": torch.tensor([2, 5, 3]), "backprop_loops": 2})]
    for per_case in run_distributed(_tp_recipe_worker, 2, cases, ids):
        for r in per_case:
            _assert_same(r["tp1"], r["tp2"])
            # the replicated injection parameters get the TP=1 gradient on every rank, unreduced
            assert any(k.startswith("loop.injection.") for k in r["tp2"]["grads"])
