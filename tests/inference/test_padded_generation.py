"""Padded batches (issue #15): an attention mask through the model, real-token positions, pad positions exited
from the start, and greedy generation of left/right-padded batches equal to each prompt alone, with and without
the KV cache, with adaptive exits on and off (and under TP=2)."""
import pytest
import torch

from loop_megatron.inference.generation import generate, pad_prompts
from loop_megatron.model import KVCache
from loop_megatron.model.exit import ExitRule, ExitStats
from tests.model.test_exit import MIXED, build, tiny

LENGTHS = (7, 4, 2)
NO_EXIT = ("none", 0.0)
CASES = [NO_EXIT] + MIXED


def rows(lengths=LENGTHS, seed=0, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def forward(model, ids, criterion, threshold, **kw):
    stats = ExitStats()
    with torch.no_grad():
        logits, _ = model(torch.as_tensor(ids), exit_rule=ExitRule(criterion, threshold),
                          exit_stats=stats, **kw)
    return logits, stats.iterations


@pytest.mark.parametrize("criterion,threshold", CASES)
def test_all_ones_mask_is_no_mask_bitwise(criterion, threshold):
    model = build()
    ids = torch.randint(0, 97, (2, 9))
    plain, plain_its = forward(model, ids, criterion, threshold)
    masked, masked_its = forward(model, ids, criterion, threshold, attention_mask=torch.ones_like(ids))
    assert torch.equal(plain, masked)
    assert plain_its is None and masked_its is None or torch.equal(plain_its, masked_its)
    kw = dict(max_new_tokens=6, temperature=0, exit_criterion=criterion, exit_threshold=threshold,
              return_iterations=True)
    a, a_its = generate(model, ids, **kw)
    b, b_its = generate(model, ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(a, b) and torch.equal(a_its, b_its)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("criterion,threshold", CASES)
def test_padded_forward_equals_each_row_alone(side, criterion, threshold):
    """Logits and iteration counts at real positions equal the row run alone; pads: finite, 0 iterations."""
    model = build(tiny(inner_loops=2))
    prompts = rows()
    ids, mask = pad_prompts(prompts, pad_token_id=0, padding_side=side)
    logits, its = forward(model, ids, criterion, threshold, attention_mask=mask)
    assert torch.isfinite(logits).all()
    depths = set()
    for b, row in enumerate(prompts):
        alone, alone_its = forward(model, [row], criterion, threshold)
        real = mask[b].bool()
        assert (logits[b, real] - alone[0]).abs().max().item() < 1e-5, b
        if criterion != "none":
            assert torch.equal(its[b, real], alone_its[0]), (b, its[b], alone_its)
            assert (its[b, ~real] == 0).all()
            depths |= set(alone_its[0].tolist())
    assert criterion == "none" or len(depths) >= 2  # the exits really stop tokens at different depths


@pytest.mark.parametrize("criterion,threshold", [NO_EXIT, ("kl", 0.03)])
def test_padded_cache_prefill_and_steps_equal_the_padded_full_forward(criterion, threshold):
    """A left-padded prompt prefilled in two chunks (the offset mask), then one token at a time."""
    model = build(tiny(num_layers=2))
    ids, mask = pad_prompts(rows((9, 5, 3)), padding_side="left")
    whole, whole_its = forward(model, ids, criterion, threshold, attention_mask=mask)
    cache, steps, step_its = KVCache(), [], []
    for lo, hi in ((0, 4), (4, 7), (7, 8), (8, 9)):
        out, its = forward(model, ids[:, lo:hi], criterion, threshold, kv_cache=cache, attention_mask=mask[:, :hi])
        steps.append(out)
        step_its.append(its)
    real = mask.bool()
    assert (torch.cat(steps, dim=1) - whole)[real].abs().max().item() < 1e-5
    if criterion != "none":
        assert torch.equal(torch.cat(step_its, dim=1), whole_its)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("criterion,threshold", CASES)
def test_padded_greedy_generation_cached_equals_recomputed_equals_alone(side, criterion, threshold):
    model = build()
    prompts = rows()
    ids, mask = pad_prompts(prompts, pad_token_id=0, padding_side=side)
    new = 8
    kw = dict(max_new_tokens=new, temperature=0, exit_criterion=criterion, exit_threshold=threshold,
              return_iterations=True)
    cached, cached_its = generate(model, ids, attention_mask=mask, **kw)
    full, full_its = generate(model, ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(cached, full) and torch.equal(cached_its, full_its)
    W = ids.shape[1]
    assert cached.shape == (3, W + new) and cached_its.shape == (3, W + new - 1)
    continuations = set()
    for b, row in enumerate(prompts):
        alone, alone_its = generate(model, row, **kw)
        n = len(row)
        if side == "left":  # the input row, then the continuation; pads report 0 iterations
            assert torch.equal(cached[b, :W], ids[b])
            assert torch.equal(cached[b, W - n:], alone[0])
            assert torch.equal(cached_its[b, W - n:], alone_its[0])
            assert (cached_its[b, :W - n] == 0).all()
        else:  # real tokens, continuation, then the row's pads moved to the end
            assert torch.equal(cached[b, :n + new], alone[0])
            assert (cached[b, n + new:] == 0).all()
            assert torch.equal(cached_its[b, :n + new - 1], alone_its[0])
            assert (cached_its[b, n + new - 1:] == 0).all()
        continuations.add(tuple(alone[0, n:].tolist()))
    assert len(continuations) >= 2  # continuations depend on the prompt (not one repeated token)
    if criterion != "none":
        assert len(set(cached_its[cached_its > 0].tolist())) >= 2


def test_padded_generation_with_eos_and_at_the_position_limit():
    model = build()
    prompts = rows()
    ids, mask = pad_prompts(prompts, padding_side="left")
    greedy = generate(model, ids, attention_mask=mask, max_new_tokens=6, temperature=0)
    eos = int(greedy[1, ids.shape[1]])  # row 1 stops at once; the others run on (eos-padded when they stop)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=6, temperature=0, eos_token_id=eos)
    for b, row in enumerate(prompts):
        alone = generate(model, row, max_new_tokens=6, temperature=0, eos_token_id=eos)[0, len(row):]
        assert torch.equal(out[b, ids.shape[1]:ids.shape[1] + len(alone)], alone)
    # the limit counts real tokens: the longest row may reach it although the padded width is larger
    limit = model.cfg.max_position_embeddings
    long_ids, long_mask = pad_prompts(rows((limit - 3, 2)), padding_side="left")
    long_ids, long_mask = (torch.cat([torch.zeros(2, 4, dtype=torch.long), t], dim=1) for t in (long_ids, long_mask))
    out = generate(model, long_ids, attention_mask=long_mask, max_new_tokens=50, temperature=0)
    assert out.shape == (2, long_ids.shape[1] + 3)


def test_padding_errors():
    model = build()
    ids, mask = pad_prompts(rows(), padding_side="left")
    mixed = mask.clone()
    mixed[2] = mask[2].flip(0)  # one right-padded row among left-padded ones
    with pytest.raises(ValueError, match="left- or right-padded"):
        generate(model, ids, attention_mask=mixed, max_new_tokens=2)
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="no real token"):
        generate(model, ids, attention_mask=empty, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(ids, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="padding_side"):
        pad_prompts([[1]], padding_side="middle")


@pytest.mark.parametrize("kind", ["per-block", "per-iteration"])
def test_padded_training_loss_with_activation_checkpointing(kind):
    """The mask also reaches checkpointed blocks/iterations (training, labels at pads ignored)."""
    ids, mask = pad_prompts(rows((8, 5)), padding_side="right")
    labels = ids.masked_fill(mask == 0, -100)
    losses = []
    for checkpointing in ("none", kind):
        model = build(tiny(activation_checkpointing=checkpointing, exit_gate=False)).train()
        _, loss = model(ids, labels, attention_mask=mask)
        loss.backward()
        losses.append((loss.detach(), model.wte.weight.grad.clone()))
    assert torch.equal(losses[0][0], losses[1][0]) and torch.allclose(losses[0][1], losses[1][1], atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Tensor parallelism: the mask is per row and identical on every rank.
# ----------------------------------------------------------------------------------------------------
def _tp_run(tp: int, ids, mask):
    from tests.parallel.test_exit_tp import CASES as TP_CASES, _build

    model = _build(tp).eval()
    out = {}
    for criterion, threshold in TP_CASES:
        out[criterion] = forward(model, ids, criterion, threshold, attention_mask=mask)
    out["generate"] = generate(model, ids, attention_mask=mask, max_new_tokens=5, temperature=0,
                               exit_criterion="kl", exit_threshold=0.07, return_iterations=True)
    return out


def _tp_worker(rank, world_size, ids, mask):
    return {"tp1": _tp_run(1, ids, mask), "tp2": _tp_run(2, ids, mask)}


def test_tp2_padded_batch_equals_tp1():
    from tests.dist_utils import run_distributed
    from tests.parallel.test_exit_tp import CASES as TP_CASES

    ids, mask = pad_prompts(rows((9, 4, 6), vocab=101), padding_side="left")
    for r in run_distributed(_tp_worker, 2, ids, mask):
        for criterion, _ in TP_CASES:
            (l1, i1), (l2, i2) = r["tp1"][criterion], r["tp2"][criterion]
            assert torch.equal(i1, i2), criterion
            assert (i1[mask == 0] == 0).all() and len(set(i1[mask == 1].tolist())) >= 2, (criterion, i1)
            assert (l1 - l2)[mask == 1].abs().max().item() < 1e-5, criterion
        (g1, gi1), (g2, gi2) = r["tp1"]["generate"], r["tp2"]["generate"]
        assert torch.equal(g1, g2) and torch.equal(gi1, gi2)
