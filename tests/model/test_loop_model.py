"""The loop stack against its definition: unrolled equivalence, checkpointing, KV cache, counts."""
import copy

import pytest
import torch

from loop_megatron.config import Config, ModelConfig, preset
from loop_megatron.model import KVCache, LoopGPT, model_summary, parameter_count


def tiny(**overrides) -> ModelConfig:
    cfg = ModelConfig(vocab_size=97, make_vocab_size_divisible_by=8, max_position_embeddings=32, hidden_size=32,
                      num_attention_heads=4, num_layers=2, num_loops=3)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build(cfg: ModelConfig, seed: int = 0) -> LoopGPT:
    torch.manual_seed(seed)
    return LoopGPT(cfg)


PAPER_PARAMS = {"gpt2-124m": 124e6, "loop-81m": 81e6, "loop-67m": 67e6, "lite-45m": 45e6, "loop-45m": 45e6}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_paper_parameter_counts_within_4_percent(name):
    count = parameter_count(preset(name).model)
    assert abs(count - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.04, (name, count)


def test_analytic_parameter_count_matches_built_model():
    for cfg in (tiny(), tiny(loop_gates="scalar", prelude_layers=1, coda_layers=2, inner_loops=2), tiny(loop_gates="none")):
        assert build(cfg).num_parameters() == parameter_count(cfg)


def test_flops_count_effective_depth():
    looped = preset("loop-81m").model  # 6 layers x 6 loops = depth 36
    summary = model_summary(looped)
    assert summary["effective_depth"] == 36
    d, T, V = 768, 1024, looped.padded_vocab_size
    expected = 3 * (2 * (36 * 12 * d * d + d * V) + 4 * 36 * T * d)
    assert summary["flops_per_token"] == expected
    assert model_summary(preset("loop-67m").model)["effective_depth"] == 48


def unrolled_copy(looped: LoopGPT) -> LoopGPT:
    """An ordinary (loops=1, gates none) GPT whose layers are copies of the looped model's blocks,
    in application order: for each iteration, each block repeated inner_loops times."""
    cfg = looped.cfg
    flat_cfg = copy.deepcopy(cfg)
    flat_cfg.num_layers = cfg.num_layers * cfg.num_loops * cfg.inner_loops
    flat_cfg.num_loops, flat_cfg.inner_loops, flat_cfg.loop_gates = 1, 1, "none"
    flat = LoopGPT(flat_cfg)
    order = [b for _ in range(cfg.num_loops) for b in looped.loop.blocks for _ in range(cfg.inner_loops)]
    with torch.no_grad():
        for target, source in zip(flat.loop.blocks, order):
            target.load_state_dict(source.state_dict())
        for name in ("wte", "wpe", "ln_f", "prelude", "coda"):
            getattr(flat, name).load_state_dict(getattr(looped, name).state_dict())
    return flat


@pytest.mark.parametrize("gates,inner,prelude,coda", [("none", 1, 0, 0), ("vector", 1, 0, 0), ("scalar", 2, 0, 0),
                                                      ("none", 2, 1, 1)])
def test_loop_equals_unrolled_gpt_when_gates_are_one(gates, inner, prelude, coda):
    looped = build(tiny(loop_gates=gates, inner_loops=inner, prelude_layers=prelude, coda_layers=coda)).eval()
    flat = unrolled_copy(looped).eval()
    ids = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        a, _ = looped(ids)
        b, _ = flat(ids)
    assert a.shape == (3, 20, 97)
    assert (a - b).abs().max().item() < 1e-5


def test_gates_change_the_output():
    model = build(tiny()).eval()
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        before, _ = model(ids)
        model.loop.gates.fill_(0.5)
        after, _ = model(ids)
        # gates of zero make every iteration the identity: only embeddings -> ln_f -> head remain
        model.loop.gates.zero_()
        no_loop, _ = model(ids)
        h = model.ln_f(model.wte(ids) + model.wpe(torch.arange(10)))
    assert (before - after).abs().max() > 1e-3
    assert torch.allclose(no_loop, model.wte.logits_parallel(h)[..., :97], atol=1e-5)


def loss_and_grads(cfg: ModelConfig, ids, seed=0):
    model = build(cfg, seed).train()
    torch.manual_seed(123)  # same dropout stream for every variant
    _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["per-iteration", "per-block"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_gives_same_loss_and_grads(mode, dropout):
    base = tiny(inner_loops=2, prelude_layers=1, hidden_dropout=dropout, attention_dropout=dropout)
    ids = torch.randint(0, 97, (2, 17))
    ref_loss, ref_grads = loss_and_grads(base, ids)
    ckpt_loss, ckpt_grads = loss_and_grads(_with(base, activation_checkpointing=mode), ids)
    assert torch.equal(ref_loss, ckpt_loss) or abs(ref_loss.item() - ckpt_loss.item()) < 1e-6
    assert ref_grads.keys() == ckpt_grads.keys()
    for name in ref_grads:
        assert torch.allclose(ref_grads[name], ckpt_grads[name], atol=1e-6, rtol=1e-5), name


def _with(cfg, **changes):
    cfg = copy.deepcopy(cfg)
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


def test_kv_cache_decoding_matches_full_forward():
    model = build(tiny(loop_gates="vector", inner_loops=2, prelude_layers=1, coda_layers=1)).eval()
    with torch.no_grad():
        model.loop.gates.uniform_(0.5, 1.5)  # make iterations distinguishable
        ids = torch.randint(0, 97, (2, 12))
        full, _ = model(ids)
        cache = KVCache()
        prefix, _ = model(ids[:, :5], kv_cache=cache)
        steps = [prefix]
        for t in range(5, 9):
            out, _ = model(ids[:, t:t + 1], kv_cache=cache)
            steps.append(out)
        chunk, _ = model(ids[:, 9:], kv_cache=cache)  # several new tokens at once against a cache
        steps.append(chunk)
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full).abs().max().item() < 1e-5
    # one slot per block application: prelude + loops*layers*inner + coda
    assert len(cache.slots) == model.cfg.effective_depth


def test_more_loops_at_inference_reuse_last_gate():
    model = build(tiny(num_loops=2)).eval()
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        logits4, _ = model(ids, depth=4)
        logits2, _ = model(ids)
    assert logits4.shape == logits2.shape
    assert (logits4 - logits2).abs().max() > 1e-4


def test_padded_vocab_is_masked_out_of_loss():
    cfg = tiny()  # vocab 97 padded to 104
    model = build(cfg).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        logits, loss = model(ids[:, :-1], ids[:, 1:], return_logits=True)
    assert logits.shape[-1] == 97
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert abs(loss.item() - expected.item()) < 1e-5
