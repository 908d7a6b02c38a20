"""Recurrent-depth recipe in the model: injection, initial state, truncated backprop, per-row depths.

Every path is checked against `reference_hidden`, a hand-rolled loop over model.loop.blocks that applies the
equations of loop_megatron/model/loop.py directly (not the LoopStack code).
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from loop_megatron.config import ModelConfig
from loop_megatron.model import KVCache, LoopDepth, LoopGPT, flops_per_token, parameter_count

V = 97


def tiny(**overrides) -> ModelConfig:
    cfg = ModelConfig(vocab_size=V, make_vocab_size_divisible_by=8, max_position_embeddings=32, hidden_size=32,
                      num_attention_heads=4, num_layers=2, num_loops=3, prelude_layers=1, coda_layers=1)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build(cfg: ModelConfig, seed: int = 0, perturb: bool = True) -> LoopGPT:
    """A model whose gates and injection parameters are moved off their init (so every term matters)."""
    torch.manual_seed(seed)
    model = LoopGPT(cfg)
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            if model.loop.gates is not None:
                model.loop.gates.copy_(torch.empty_like(model.loop.gates).uniform_(0.5, 1.5, generator=g))
            if model.loop.injection is not None:
                for p in model.loop.injection.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


# ----------------------------------------------------------------------------------------------------
# The reference: the equations, written out
# ----------------------------------------------------------------------------------------------------
def reference_hidden(model: LoopGPT, ids, r, s0=None, backprop_loops=0):
    """ln_f(hidden) computed step by step from the module docstring's equations. With `backprop_loops`
    k < r the first r - k iterations run under no_grad and the state is detached before the last k."""
    cfg, loop = model.cfg, model.loop
    x = model.wte(ids) + model.wpe(torch.arange(ids.shape[1]))
    for block in model.prelude:
        x = block(x)
    e = x
    if cfg.loop_state_init == "input":
        s = e
    elif s0 is not None:
        s = s0
    else:
        s = torch.zeros_like(e)
    d = cfg.hidden_size
    k = backprop_loops or r
    for t in range(r):
        if t == r - k and t > 0:
            s = s.detach()
        with torch.set_grad_enabled(torch.is_grad_enabled() and t >= r - k):
            if cfg.loop_injection == "add":
                u = s + e
            elif cfg.loop_injection == "linear":
                W = loop.injection.weight
                u = s @ W[:, :d].t() + e @ W[:, d:].t()
            else:
                u = s
            h = u
            for block in loop.blocks:
                for _ in range(cfg.inner_loops):
                    h = block(h)
            a = None if loop.gates is None else loop.gates[min(t, loop.gates.shape[0] - 1)]
            if cfg.loop_injection == "diagonal":
                inj = loop.injection
                A = torch.exp(-F.softplus(inj.delta) * F.softplus(inj.rate))
                s = A * s + inj.input_gain * e + (h - u if a is None else a * (h - u))
            else:
                s = h if a is None else s + a * (h - s)
    for block in model.coda:
        s = block(s)
    return model.ln_f(s)


def reference_logits(model, ids, r, **kw):
    return model.wte.logits_parallel(reference_hidden(model, ids, r, **kw))[..., :V]


def row_losses(logits, targets):
    """Per-row mean token cross-entropy [B]."""
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1)


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def assert_grads_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=1e-4), name


# ----------------------------------------------------------------------------------------------------
# Injection and initial state against the reference
# ----------------------------------------------------------------------------------------------------
def test_injection_none_is_bit_identical_to_the_reference_and_adds_no_parameters():
    model = build(tiny(loop_gates="vector", inner_loops=2)).eval()
    ids = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        ours, _ = model(ids)
        ref = reference_logits(model, ids, 3)
    assert torch.equal(ours, ref)
    names = {n for n, _ in model.named_parameters()}
    assert not any("injection" in n for n in names)
    assert model.loop.gates.shape == (3, 32)


def test_injection_parameters_consume_no_rng():
    """Every weight a 'none' model has is initialised identically in a 'linear'/'diagonal' model with the same
    seed: switching the recipe on does not reshuffle the rest of the init."""
    base = build(tiny(), perturb=False).state_dict()
    for kind in ("add", "linear", "diagonal"):
        other = build(tiny(loop_injection=kind), perturb=False).state_dict()
        for name, t in base.items():
            assert torch.equal(t, other[name]), (kind, name)


@pytest.mark.parametrize("kind", ["add", "linear", "diagonal"])
@pytest.mark.parametrize("gates,init", [("none", "input"), ("vector", "zeros"), ("scalar", "input")])
def test_injection_matches_reference(kind, gates, init):
    model = build(tiny(loop_injection=kind, loop_gates=gates, loop_state_init=init, inner_loops=2)).eval()
    ids = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        for r in (1, 3, 5):  # 5 > the gate count: the last gate is reused
            ours, _ = model(ids, depth=r)
            ref = reference_logits(model, ids, r)
            assert (ours - ref).abs().max().item() < 1e-5, (kind, r)


def test_injection_changes_the_output():
    ids = torch.randint(0, V, (2, 9))
    outs = {}
    for kind in ("none", "add", "linear", "diagonal"):
        with torch.no_grad():
            outs[kind] = build(tiny(loop_injection=kind), perturb=False).eval()(ids)[0]
    for kind in ("add", "linear", "diagonal"):
        assert (outs[kind] - outs["none"]).abs().max() > 1e-3, kind


def test_linear_injection_starts_as_addition_and_diagonal_at_one_half():
    model = build(tiny(loop_injection="linear"), perturb=False)
    s, e = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.allclose(model.loop.injection(s, e), s + e, atol=1e-6, rtol=0)
    # so an untrained 'linear' model equals an untrained 'add' model exactly in function
    add = build(tiny(loop_injection="add"), perturb=False).eval()
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        assert (model.eval()(ids)[0] - add(ids)[0]).abs().max() < 1e-5
    diag = build(tiny(loop_injection="diagonal"), perturb=False).loop.injection
    with torch.no_grad():
        assert torch.allclose(diag.decay(), torch.full((32,), 0.5))
        assert torch.equal(diag.input_gain, torch.full((32,), 0.5))


def test_random_state_is_random_in_training_and_zero_in_eval_unless_a_generator_is_given():
    cfg = tiny(loop_injection="linear", loop_state_init="random", loop_state_std=0.5)
    model = build(cfg).eval()
    zeros = build(tiny(loop_injection="linear", loop_state_init="zeros")).eval()
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], zeros(ids)[0])  # eval: deterministic s_0 = 0
        # with a generator: N(0, sigma^2) from it, the same draw the reference makes
        ours = model(ids, depth=LoopDepth(state_generator=torch.Generator().manual_seed(5)))[0]
        s0 = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(5)) * 0.5
        ref = reference_logits(model, ids, 3, s0=s0)
        assert (ours - ref).abs().max() < 1e-5
        assert (ours - zeros(ids)[0]).abs().max() > 1e-3
        # training mode: drawn from the default RNG
        model.train()
        torch.manual_seed(9)
        train_out = model(ids)[0]
        torch.manual_seed(9)
        s0 = torch.randn(2, 9, 32) * 0.5
        assert (train_out - reference_logits(model, ids, 3, s0=s0)).abs().max() < 1e-5


def test_gate_count_can_exceed_num_loops():
    model = build(tiny(loop_injection="add", loop_gate_count=5)).eval()
    assert model.loop.gates.shape == (5, 32)
    ids = torch.randint(0, V, (1, 7))
    with torch.no_grad():
        assert (model(ids, depth=5)[0] - reference_logits(model, ids, 5)).abs().max() < 1e-5


def test_parameter_count_matches_built_model():
    for kind in ("add", "linear", "diagonal"):
        cfg = tiny(loop_injection=kind, loop_gates="vector", loop_gate_count=6)
        assert build(cfg).num_parameters() == parameter_count(cfg), kind


def test_injection_parameters_are_not_weight_decayed():
    names = build(tiny(loop_injection="linear")).no_decay_parameter_names()
    assert "loop.injection.weight" in names
    assert "loop.blocks.0.attn.qkv.weight" not in names


# ----------------------------------------------------------------------------------------------------
# Truncated backprop, checkpointing, per-row depths
# ----------------------------------------------------------------------------------------------------
def _loss_grads(model, ids, seed=123, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    _, loss = model(ids[:, :-1], ids[:, 1:], depth=LoopDepth(**kw))
    loss.backward()
    return loss.detach(), grads(model)


@pytest.mark.parametrize("kind", ["none", "linear", "diagonal"])
def test_truncated_backprop_matches_reference(kind):
    model = build(tiny(loop_injection=kind, loop_gates="vector", loop_gate_count=5)).train()
    ids = torch.randint(0, V, (2, 12))
    loss, got = _loss_grads(model, ids, num_loops=5, backprop_loops=2)
    model.zero_grad(set_to_none=True)
    ref_logits = reference_logits(model, ids[:, :-1], 5, backprop_loops=2)
    ref_loss = F.cross_entropy(ref_logits.reshape(-1, V), ids[:, 1:].reshape(-1))
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    assert_grads_close(got, grads(model))
    # and it is a real truncation: full backprop gives different shared-weight gradients
    _, full = _loss_grads(model, ids, num_loops=5)
    assert (full["loop.blocks.0.mlp.fc.weight"] - got["loop.blocks.0.mlp.fc.weight"]).abs().max() > 1e-6
    if kind == "none":  # the prelude only reaches the loss through s_0, which truncation cuts
        assert got["prelude.0.mlp.fc.weight"].abs().max() == 0
    else:  # injection carries e (and its gradient) into the last k iterations
        assert got["prelude.0.mlp.fc.weight"].abs().max() > 0


@pytest.mark.parametrize("mode", ["per-iteration", "per-block"])
def test_checkpointing_equals_none_with_injection_truncation_and_row_depths(mode):
    base = tiny(loop_injection="linear", loop_state_init="random", loop_gates="scalar", loop_gate_count=5,
                hidden_dropout=0.1, attention_dropout=0.1)
    ids = torch.randint(0, V, (3, 10))
    depths = torch.tensor([2, 5, 4])
    ref = build(base).train()
    ckpt_cfg = copy.deepcopy(base)
    ckpt_cfg.activation_checkpointing = mode
    ckpt = build(ckpt_cfg).train()
    for kw in ({"num_loops": 5, "backprop_loops": 2}, {"loop_depths": depths, "backprop_loops": 2}):
        loss_a, grads_a = _loss_grads(ref, ids, **kw)
        loss_b, grads_b = _loss_grads(ckpt, ids, **kw)
        assert abs(loss_a.item() - loss_b.item()) < 1e-6
        assert_grads_close(grads_a, grads_b, atol=1e-6)


@pytest.mark.parametrize("kind", ["none", "diagonal"])
def test_each_row_equals_that_row_run_alone_at_its_depth(kind):
    model = build(tiny(loop_injection=kind, loop_gates="vector", loop_gate_count=6)).train()
    ids = torch.randint(0, V, (3, 10))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    depths = torch.tensor([1, 4, 6])
    k = 2
    model.zero_grad(set_to_none=True)
    logits, _ = model(inputs, depth=LoopDepth(None, k, depths), return_logits=True)
    row_loss = row_losses(logits, targets)
    row_loss.sum().backward()
    batched = grads(model)
    alone_loss, alone_grads = [], None
    for b in range(3):
        model.zero_grad(set_to_none=True)
        lb, _ = model(inputs[b:b + 1], depth=LoopDepth(int(depths[b]), k), return_logits=True)
        loss_b = row_losses(lb, targets[b:b + 1])[0]
        loss_b.backward()
        alone_loss.append(loss_b.detach())
        g = grads(model)
        alone_grads = g if alone_grads is None else {n: alone_grads[n] + g[n] for n in g}
    assert torch.allclose(row_loss.detach(), torch.stack(alone_loss), atol=1e-5)
    assert_grads_close(batched, alone_grads)
    # the rows really run at different depths
    assert len({round(v, 4) for v in row_loss.tolist()}) == 3


def test_row_depths_without_grad_and_with_explicit_num_loops():
    model = build(tiny(loop_injection="add")).eval()
    ids = torch.randint(0, V, (2, 8))
    with torch.no_grad():
        logits, _ = model(ids, depth=LoopDepth(4, loop_depths=torch.tensor([3, 1])))
        assert (logits[0] - model(ids[:1], depth=3)[0][0]).abs().max() < 1e-5
        assert (logits[1] - model(ids[1:], depth=1)[0][0]).abs().max() < 1e-5
        with pytest.raises(ValueError, match="num_loops"):
            model(ids, depth=LoopDepth(2, loop_depths=torch.tensor([3, 1])))


def test_kv_cache_decoding_with_injection_matches_full_forward():
    for kind, init in (("linear", "random"), ("diagonal", "zeros"), ("add", "input")):
        model = build(tiny(loop_injection=kind, loop_state_init=init, loop_gates="vector", inner_loops=2)).eval()
        ids = torch.randint(0, V, (2, 12))
        with torch.no_grad():
            full, _ = model(ids, depth=4)
            cache = KVCache()
            steps = [model(ids[:, :5], depth=4, kv_cache=cache)[0]]
            for t in range(5, 12):
                steps.append(model(ids[:, t:t + 1], depth=4, kv_cache=cache)[0])
        assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5, kind


# ----------------------------------------------------------------------------------------------------
# FLOPs of what ran
# ----------------------------------------------------------------------------------------------------
def test_flops_count_forward_over_r_and_backward_over_k():
    cfg = tiny(loop_injection="linear")
    d, f, T, Vp = 32, 128, 16, cfg.padded_vocab_size
    block = 4 * d * d + 2 * d * f

    def fwd(blocks, iters):
        return 2 * (blocks * block + d * Vp + iters * 2 * d * d) + 4 * blocks * T * d

    r, k = 6, 2
    expected = fwd(1 + 6 * 2 + 1, 6) + 2 * fwd(1 + 2 * 2 + 1, 2)
    assert flops_per_token(cfg, T, loops=r, backprop_loops=k) == expected
    # k >= r is full backprop: 3x the forward, as before
    assert flops_per_token(cfg, T, loops=r) == 3 * fwd(14, 6)
    assert flops_per_token(tiny(), T) == 3 * (2 * (8 * block + d * Vp) + 4 * 8 * T * d)
    # without injection a truncated backward never reaches the prelude
    none = tiny()
    assert flops_per_token(none, T, loops=r, backprop_loops=k) == \
        (2 * (14 * block + d * Vp) + 4 * 14 * T * d) + 2 * (2 * (5 * block + d * Vp) + 4 * 5 * T * d)
    assert math.isclose(flops_per_token(cfg, T, training=False, loops=r), fwd(14, 6))
