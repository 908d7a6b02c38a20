"""Adaptive per-token exit: fixed depth when off, the latest-entry KV rule against a token-by-token reference,
cached = recomputed generation, and the learned exit gate's objective and gate-only training."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from loop_megatron.config import ModelConfig
from loop_megatron.inference.generation import generate
from loop_megatron.model import KVCache, LoopGPT
from loop_megatron.model.exit import ExitRule, ExitStats, configure_exit_training, exit_distribution, expected_exit_loss
from loop_megatron.training.optim import parameter_groups

# Thresholds that give a mix of exit depths on the model below (checked by test_thresholds_give_mixed_depths).
MIXED = [("entropy", 3.0), ("kl", 0.03), ("gate", 0.7), ("delta", 0.5)]


def tiny(**overrides) -> ModelConfig:
    cfg = ModelConfig(vocab_size=97, make_vocab_size_divisible_by=8, max_position_embeddings=48, hidden_size=32,
                      num_attention_heads=4, num_layers=1, num_loops=6, prelude_layers=1, coda_layers=1,
                      loop_injection="linear", loop_state_init="zeros", exit_gate=True, init_method_std=0.3)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build(cfg: ModelConfig = None, seed: int = 0) -> LoopGPT:
    torch.manual_seed(seed)
    model = LoopGPT(cfg or tiny()).eval()
    if model.exit_gate is not None:
        with torch.no_grad():  # a gate that is not constant, so that its decisions vary by position
            model.exit_gate.proj.weight.normal_(0, 1.0)
    return model


def exit_rule(criterion, threshold):
    """The forward's exit setting (criterion None: the model config's default)."""
    return None if criterion is None else ExitRule(criterion, threshold)


def run(model, ids, criterion, threshold, **kw):
    stats = ExitStats()
    with torch.no_grad():
        logits, _ = model(ids, exit_rule=exit_rule(criterion, threshold), exit_stats=stats, **kw)
    return logits, stats.iterations


# ----------------------------------------------------------------------------------------------------
# The slow reference: one token at a time, per-position K/V lists, the exit rule written out.
# ----------------------------------------------------------------------------------------------------
class _StoreKV:
    """Attention reads/writes explicit per-application lists of per-token K/V ([1, heads, 1, hd] each)."""

    def __init__(self, store):
        self.store, self.keys = store, iter(())

    def use(self, keys):
        self.keys = iter(keys)

    def update(self, k, v):
        entries = self.store.setdefault(next(self.keys), [])
        entries.append((k, v))
        return torch.cat([a for a, _ in entries], dim=2), torch.cat([b for _, b in entries], dim=2)


@torch.no_grad()
def reference(model, ids, criterion, threshold, R):
    """Logits [T, V] and iteration counts [T] of one sequence, token by token."""
    cfg, loop = model.cfg, model.loop
    core = [("core", j) for j in range(cfg.num_layers * cfg.inner_loops)]
    coda = [("coda", i) for i in range(cfg.coda_layers)]
    decodes = criterion in ("kl", "entropy")
    per_iteration = core + (coda if decodes else [])
    store = {}
    kv = _StoreKV(store)
    out_logits, counts = [], []
    for t, tok in enumerate(ids.tolist()):
        x = (model.wte.weight[tok] + model.wpe.weight[t]).view(1, 1, -1)
        kv.use([("prelude", i) for i in range(cfg.prelude_layers)])
        for block in model.prelude:
            x = block(x, kv)
        e, s = x, loop.initial_state(x)
        prev, survive, chosen = None, 1.0, None
        for n in range(R):
            kv.use([(n,) + key for key in per_iteration])
            s_prev, s = s, loop.iteration(s, n, kv, e)
            if decodes:
                h = s
                for block in model.coda:
                    h = block(h, kv)
                logits = model.logits_parallel(model.ln_f(h))[0, 0, :cfg.vocab_size]
                log_p = F.log_softmax(logits.float(), -1)
                if criterion == "entropy":
                    stop = -(log_p.exp() * log_p).sum() < threshold
                else:
                    stop = prev is not None and (log_p.exp() * (log_p - prev)).sum() < threshold
                prev, chosen = log_p, logits
            elif criterion == "gate":
                survive *= 1 - float(model.exit_gate(s))
                stop = 1 - survive >= threshold
            else:  # delta: the relative change of the state
                stop = float((s - s_prev).norm()) < threshold * float(s.norm())
            if stop or n == R - 1:
                for later in range(n + 1, R):  # the exited token's later slots: its latest entries
                    for key in per_iteration:
                        store.setdefault((later,) + key, []).append(store[(n,) + key][-1])
                break
        counts.append(n + 1)
        if not decodes:
            kv.use([("final",) + key for key in coda])
            h = s
            for block in model.coda:
                h = block(h, kv)
            chosen = model.logits_parallel(model.ln_f(h))[0, 0, :cfg.vocab_size]
        out_logits.append(chosen)
    return torch.stack(out_logits), torch.tensor(counts)


# ----------------------------------------------------------------------------------------------------
def test_exit_off_or_never_met_is_the_fixed_depth_model_bitwise():
    model = build()
    with torch.no_grad():
        model.exit_gate.proj.weight.zero_()  # lambda = 1/2: the cumulative exit probability stays below 1
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        fixed, _ = model(ids)
        fixed3, _ = model(ids, depth=3)
    for criterion, threshold in [("none", 0.0), ("entropy", 0.0), ("kl", 0.0), ("gate", 1.0), ("delta", 0.0)]:
        logits, its = run(model, ids, criterion, threshold)
        assert torch.equal(logits, fixed), criterion
        logits, its = run(model, ids, criterion, threshold, depth=3)
        assert torch.equal(logits, fixed3), criterion
        if criterion != "none":
            assert torch.equal(its, torch.full((2, 10), 3))


def test_thresholds_give_mixed_depths():
    model = build()
    ids = torch.randint(0, 97, (3, 8))
    for criterion, threshold in MIXED:
        _, its = run(model, ids, criterion, threshold)
        assert len(set(its.flatten().tolist())) >= 2, (criterion, its)
        assert its.min() >= 1 and its.max() <= 6


@pytest.mark.parametrize("criterion,threshold", MIXED)
def test_full_forward_equals_token_by_token_reference(criterion, threshold):
    model = build()
    ids = torch.randint(0, 97, (3, 9))
    logits, its = run(model, ids, criterion, threshold)
    for b in range(3):
        ref_logits, ref_its = reference(model, ids[b], criterion, threshold, 6)
        assert torch.equal(its[b], ref_its), (criterion, its[b], ref_its)
        assert (logits[b] - ref_logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("criterion,threshold", MIXED)
def test_cached_generation_equals_recomputed_generation_with_exits(criterion, threshold):
    model = build()
    prompt = torch.randint(0, 97, (3, 5))
    kw = dict(max_new_tokens=10, temperature=0, exit_criterion=criterion, exit_threshold=threshold,
              return_iterations=True)
    cached, cached_its = generate(model, prompt, **kw)
    full, full_its = generate(model, prompt, use_cache=False, **kw)
    assert torch.equal(cached, full)
    assert torch.equal(cached_its, full_its)
    assert cached_its.shape == (3, 14) and len(set(cached_its.flatten().tolist())) >= 2
    # and every step's logits agree (prefill in one chunk, then one token at a time)
    cache = KVCache()
    with torch.no_grad():
        step_logits, _ = model(cached[:, :5], kv_cache=cache, exit_rule=ExitRule(criterion, threshold))
        for t in range(5, cached.shape[1]):
            last, _ = model(cached[:, t:t + 1], kv_cache=cache, exit_rule=ExitRule(criterion, threshold))
            step_logits = torch.cat([step_logits, last], dim=1)
        whole, _ = model(cached, exit_rule=ExitRule(criterion, threshold))
    assert (step_logits - whole).abs().max().item() < 1e-5


def test_cache_with_exits_fills_every_slot_to_the_same_length():
    model = build(tiny(num_layers=2, inner_loops=2))
    cache = KVCache()
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 4)), kv_cache=cache, exit_rule=ExitRule("gate", 0.3))
        model(torch.randint(0, 97, (2, 1)), kv_cache=cache, exit_rule=ExitRule("gate", 0.3))
    cfg = model.cfg
    assert len(cache.slots) == cfg.prelude_layers + 6 * 2 * 2 + cfg.coda_layers
    assert {k.shape[2] for k, _ in cache.slots} == {5}


def test_exits_are_refused_in_training_and_gate_needs_a_gate():
    model = build().train()
    with pytest.raises(ValueError, match="inference only"):
        model(torch.zeros(1, 3, dtype=torch.long), exit_rule=ExitRule("kl", 0.1))
    plain = build(tiny(exit_gate=False))
    with pytest.raises(ValueError, match="exit gate"):
        run(plain, torch.zeros(1, 3, dtype=torch.long), "gate", 0.5)


def test_config_default_criterion_applies_at_inference_only():
    model = build(tiny(exit_criterion="gate", exit_threshold=0.7))
    ids = torch.randint(0, 97, (2, 6))
    default, its = run(model, ids, None, None)
    explicit, _ = run(model, ids, "gate", 0.7)
    assert torch.equal(default, explicit) and its is not None
    fixed, none_its = run(model, ids, "none", None)
    assert none_its is None and not torch.equal(fixed, default)


# ----------------------------------------------------------------------------------------------------
# The learned gate's objective
# ----------------------------------------------------------------------------------------------------
def test_exit_distribution_and_expected_loss_match_hand_computation():
    torch.manual_seed(0)
    R, B, T = 4, 2, 3
    lam = torch.rand(R, B, T)
    L = torch.rand(R, B, T) * 5
    keep = torch.tensor([[True, True, False], [True, True, True]])
    depths = torch.tensor([4, 2])
    beta = 0.3
    p = exit_distribution(lam, depths)
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T):
            probs, alive = [], 1.0
            for n in range(R):
                if n >= depths[b]:
                    probs.append(0.0)
                elif n == depths[b] - 1:
                    probs.append(alive)
                else:
                    probs.append(alive * float(lam[n, b, t]))
                    alive *= 1 - float(lam[n, b, t])
            assert torch.allclose(p[:, b, t], torch.tensor(probs), atol=1e-6)
            assert abs(sum(probs) - 1) < 1e-6
            if keep[b, t]:
                entropy = -sum(q * math.log(q) for q in probs if q > 0)
                total += sum(q * float(L[n, b, t]) for n, q in enumerate(probs)) - beta * entropy
                count += 1
    got = expected_exit_loss(L, lam, keep, beta, depths)
    assert abs(float(got) - total / count) < 1e-5


def test_model_gate_loss_equals_expected_loss_over_fixed_depth_losses():
    model = build(tiny(init_method_std=0.02))
    configure_exit_training(model, 0.05, gate_only=False)
    ids = torch.randint(0, 97, (2, 8))
    x, y = ids[:, :-1], ids[:, 1:]
    R = 4
    with torch.no_grad():
        per_depth = []
        for n in range(1, R + 1):  # L_n = the fixed-depth model's per-token loss at depth n
            logits, _ = model(x, depth=n)
            per_depth.append(F.cross_entropy(logits.reshape(-1, 97), y.reshape(-1), reduction="none").view(2, 7))
        states = []
        model.hidden_states(x, R, states=states)
        lam = torch.stack([model.exit_gate(s) for s in states])
    want = expected_exit_loss(torch.stack(per_depth), lam, torch.ones_like(y, dtype=torch.bool), 0.05)
    model.train()
    _, loss = model(x, y, depth=R)
    assert abs(loss.item() - want.item()) < 1e-5
    loss.backward()
    assert model.exit_gate.proj.weight.grad.abs().sum() > 0


def test_gate_only_training_changes_only_the_gate():
    model = build(tiny(init_method_std=0.02)).train()
    configure_exit_training(model, 0.01, gate_only=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = parameter_groups(model, 0.1)
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for p in model.exit_gate.parameters()}
    opt = torch.optim.AdamW(groups, lr=1e-2)
    for _ in range(3):
        ids = torch.randint(0, 97, (2, 9))
        _, loss = model(ids[:, :-1], ids[:, 1:], depth=3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for name in before:
        if name.startswith("exit_gate."):
            continue
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["exit_gate.proj.weight"], after["exit_gate.proj.weight"])


def test_exit_gate_consumes_no_rng_and_fixed_depth_eval_ignores_it():
    with_gate, without = build(tiny()), build(tiny(exit_gate=False))
    sd = with_gate.state_dict()
    for name, t in without.state_dict().items():
        assert torch.equal(sd[name], t), name
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        assert torch.equal(with_gate(ids)[0], without(ids)[0])


def test_exit_gate_objective_with_per_row_depths_has_finite_gradients():
    """Rows shallower than the batch have p(exit) = 0 after their depth; the entropy bonus must not make NaN."""
    from loop_megatron.model import LoopDepth

    model = build(tiny(num_loops=4)).train()
    configure_exit_training(model, 0.01, gate_only=False)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    _, loss = model(ids[:, :-1], ids[:, 1:], depth=LoopDepth(4, loop_depths=torch.tensor([4, 2])))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # the shallow row alone gives the same loss contribution as in the batch (the held iterations weigh 0)
    p = exit_distribution(torch.full((4, 2, 8), 0.5), torch.tensor([4, 2]))
    assert torch.equal(p[2:, 1], torch.zeros(2, 8)) and torch.allclose(p.sum(0), torch.ones(2, 8))


# ----------------------------------------------------------------------------------------------------
# Exits that save time: compaction, readouts only where a decision is needed, prefill policy, KV sharing
# ----------------------------------------------------------------------------------------------------
class _Recorder:
    """Rows the shared core computes per call (its first block's batch) and positions the LM head reads out."""

    def __init__(self, model):
        self.core, self.head = [], []
        model.loop.blocks[0].register_forward_pre_hook(lambda m, args: self.core.append(args[0].shape[0]))
        plain = model.logits_parallel
        model.logits_parallel = lambda h: (self.head.append(h.shape[:-1].numel()), plain(h))[1]

    def clear(self):
        self.core.clear()
        self.head.clear()


@pytest.mark.parametrize("criterion,threshold", MIXED)
def test_decode_computes_running_rows_only_and_reads_out_deciding_positions_only(criterion, threshold):
    model = build()
    rec = _Recorder(model)
    prompt = torch.randint(0, 97, (8, 5), generator=torch.Generator().manual_seed(3))
    rule = ExitRule(criterion, threshold)
    cache, stats = KVCache(), ExitStats()
    with torch.no_grad():
        model(prompt, kv_cache=cache, exit_rule=rule, exit_stats=stats)
        its = stats.iterations
        # prefill: the head reads out the positions still iterating, never every position at every iteration
        if rule.decodes:
            assert rec.head == [int((its > n).sum()) for n in range(int(its.max()))]
        rec.clear()
        shrank = False
        for t in range(6):  # decode: the core runs on the rows still iterating (gathered), nothing else
            model(torch.randint(0, 97, (8, 1), generator=torch.Generator().manual_seed(t)), kv_cache=cache,
                  exit_rule=rule, exit_stats=stats)
            its = stats.iterations[:, 0]
            running = [int((its > n).sum()) for n in range(int(its.max()))]
            assert rec.core == running, (rec.core, its)
            readouts = running if rule.decodes else [8]  # else: the coda + head once, after the loop
            assert rec.head == readouts, (rec.head, its)
            shrank |= min(running) < 8
            rec.clear()
    assert shrank  # some step ran part of the batch


@pytest.mark.parametrize("criterion,threshold", MIXED)
def test_cached_equals_recomputed_at_batch_8_with_compaction_and_full_depth_prefill(criterion, threshold):
    model = build()
    prompt = torch.randint(0, 97, (8, 4), generator=torch.Generator().manual_seed(5))
    for prefill in ("exit", "full"):
        kw = dict(max_new_tokens=6, temperature=0, exit_criterion=criterion, exit_threshold=threshold,
                  return_iterations=True, prefill=prefill)
        cached, cached_its = generate(model, prompt, **kw)
        full, full_its = generate(model, prompt, use_cache=False, **kw)
        assert torch.equal(cached, full) and torch.equal(cached_its, full_its), prefill
        if prefill == "full":  # the prompt runs to the cap; generated tokens exit on their own
            assert torch.equal(cached_its[:, :4], torch.full((8, 4), 6))
            assert len(set(cached_its[:, 4:].flatten().tolist())) >= 2


def _step_logits(model, seq, rule, prompt_len):
    cache = KVCache()
    with torch.no_grad():
        steps = [model(seq[:, :prompt_len], kv_cache=cache, exit_rule=rule)[0]]
        for t in range(prompt_len, seq.shape[1]):
            steps.append(model(seq[:, t:t + 1], kv_cache=cache, exit_rule=rule)[0])
    return torch.cat(steps, dim=1), cache


@pytest.mark.parametrize("criterion,threshold", [("none", None), ("kl", 0.03), ("delta", 0.5)])
def test_kv_share_first_is_exact_and_holds_one_iteration_of_entries(criterion, threshold):
    """'first' (recursion-wise sharing): every iteration attends to the first iteration's keys/values; the
    full-sequence forward and the cache implement it alike, and the cache holds one iteration's slots."""
    model = build(tiny(num_layers=2))
    seq = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(6))
    first, shared = ExitRule(criterion, threshold, kv_share="first"), ExitRule(criterion, threshold)
    steps, cache = _step_logits(model, seq, first, 4)
    _, cache_all = _step_logits(model, seq, shared, 4)
    with torch.no_grad():
        whole = model(seq, exit_rule=first)[0]
        assert (whole - model(seq, exit_rule=shared)[0]).abs().max() > 1e-3  # another model than 'all'
    assert (steps - whole).abs().max().item() < 1e-5
    per_iteration = 2 + (1 if first.decodes else 0)  # core blocks (+ the readout's coda) per iteration
    slot = cache.slots[0][0].numel() * 4 * 2
    assert cache.nbytes() == slot * (1 + per_iteration + (0 if first.decodes else 1))
    assert cache_all.nbytes() == slot * (1 + 6 * per_iteration + (0 if first.decodes else 1))
    prompt = seq[:, :4]
    kw = dict(max_new_tokens=6, temperature=0, exit_criterion=criterion, exit_threshold=threshold, kv_share="first",
              return_iterations=True)
    a, b = generate(model, prompt, **kw), generate(model, prompt, use_cache=False, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_kv_share_last_k_keeps_k_iterations_and_equals_all_when_k_covers_the_cap():
    """'last' (Huginn's budget k: iteration n uses slot n mod k) is defined by the cache, so it claims no
    cached = recomputed equality; with k >= the cap it is 'all', bit for bit, and its memory is k iterations."""
    model = build(tiny(num_layers=2))
    seq = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(7))
    rule = ExitRule("kl", 0.03)
    ref, cache_all = _step_logits(model, seq, rule, 3)
    wide, _ = _step_logits(model, seq, dataclasses.replace(rule, kv_share="last", kv_budget=6), 3)
    assert torch.equal(wide, ref)
    two, cache_two = _step_logits(model, seq, dataclasses.replace(rule, kv_share="last", kv_budget=2), 3)
    slot = cache_two.slots[0][0].numel() * 4 * 2
    assert cache_two.nbytes() == slot * (1 + 2 * 3) and cache_all.nbytes() == slot * (1 + 6 * 3)
    assert (two - ref).abs().max() > 1e-4  # past tokens' entries now come from other iterations
    # positions of one forward see each other's entries of the same iteration: the chunk itself is 'all'
    assert (two[:, :3] - ref[:, :3]).abs().max().item() == 0
