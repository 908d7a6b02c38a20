"""The exported remote-code model honours num_loops / exit_criterion / exit_threshold with logits equal to
ours (exits on), carries the exit gate, and keeps the latest-entry KV rule in HF generate()."""
import json
import os

import pytest
import torch

from loop_megatron.hf import convert_checkpoint_to_hf
from loop_megatron.hf.convert import ConversionError, export_to_hf
from loop_megatron.model import full_state_dict
from loop_megatron.model.exit import ExitRule, ExitStats

from .helpers import VOCAB, load_hf, make_checkpoint, tiny_config

ATOL = 1e-4
EOD = 50256


def gated_recurrent(**model):
    return tiny_config(**dict(dict(num_layers=1, num_loops=5, prelude_layers=1, coda_layers=1, loop_gates="none",
                                   loop_injection="linear", loop_state_init="zeros", exit_gate=True), **model))


def _export(tmp_path, cfg):
    save, model = make_checkpoint(tmp_path, cfg)
    with torch.no_grad():
        model.exit_gate.proj.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(4))
        model.wte.weight.mul_(25)  # peaked next-token distributions, so that entropies differ by position
    out = str(tmp_path / "hf")
    export_to_hf(full_state_dict(model), cfg, out)
    return model, load_hf(out, trust_remote_code=True), out


def _threshold_with_mixed_exits(model, x, criterion, candidates):
    for t in candidates:
        stats = ExitStats()
        with torch.no_grad():
            model(x, exit_rule=ExitRule(criterion, t), exit_stats=stats)
        if len(set(stats.iterations.flatten().tolist())) >= 2:
            return t
    pytest.fail(f"no threshold among {candidates} gives mixed exits for {criterion}")


CANDIDATES = {"entropy": [7.0, 6.5, 6.0, 5.0], "kl": [3.0, 2.0, 4.0, 5.0],
              "gate": [0.5, 0.7, 0.9]}


@pytest.mark.parametrize("criterion", ["entropy", "kl", "gate"])
def test_hf_logits_equal_ours_with_exits_on(tmp_path, criterion):
    model, hf, out = _export(tmp_path, gated_recurrent())
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["exit_gate"] is True and config["exit_criterion"] == "none"
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    t = _threshold_with_mixed_exits(model, x, criterion, CANDIDATES[criterion])
    with torch.no_grad():
        for loops in (None, 3, 7):
            ours = model(x, depth=loops, exit_rule=ExitRule(criterion, t))[0]
            theirs = hf(x, num_loops=loops, exit_criterion=criterion, exit_threshold=t).logits
            assert (ours - theirs).abs().max().item() < ATOL, loops
        # exits change the output, and the fixed-depth path is untouched
        assert (model(x)[0] - hf(x).logits).abs().max().item() < ATOL
        assert (hf(x).logits - hf(x, exit_criterion=criterion, exit_threshold=t).logits).abs().max() > 1e-3
    # the config's defaults are used when no kwargs are given
    hf.config.exit_criterion, hf.config.exit_threshold = criterion, t
    with torch.no_grad():
        assert (hf(x).logits - model(x, exit_rule=ExitRule(criterion, t))[0]).abs().max() < ATOL


@pytest.mark.parametrize("criterion", ["kl", "gate"])
def test_hf_generate_with_exits_equals_our_cached_and_full_forward(tmp_path, criterion):
    from loop_megatron.inference.generation import generate

    model, hf, _ = _export(tmp_path, gated_recurrent())
    x = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    t = _threshold_with_mixed_exits(model, x, criterion, CANDIDATES[criterion])
    res = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False, pad_token_id=EOD,
                      eos_token_id=None, output_logits=True, return_dict_in_generate=True,
                      exit_criterion=criterion, exit_threshold=t)
    ours = generate(model, x, max_new_tokens=8, temperature=0, exit_criterion=criterion, exit_threshold=t)
    assert torch.equal(res.sequences, ours)
    steps = torch.stack(res.logits, dim=1)
    with torch.no_grad():
        full = model(res.sequences[:, :-1], exit_rule=ExitRule(criterion, t))[0][:, 5:]
    assert (steps - full).abs().max() < ATOL


def test_plain_gpt2_export_is_unaffected_and_exit_models_are_not_plain(tmp_path):
    plain = tiny_config(num_loops=2, loop_gates="none")
    save, _ = make_checkpoint(tmp_path, plain, name="plain")
    assert convert_checkpoint_to_hf(save, str(tmp_path / "plain_hf")) == "gpt2"
    config = json.load(open(tmp_path / "plain_hf" / "config.json"))
    assert config["model_type"] == "gpt2" and "exit_criterion" not in config
    gated = tiny_config(num_loops=2, loop_gates="none", exit_gate=True)
    save, _ = make_checkpoint(tmp_path, gated, name="gated")
    assert convert_checkpoint_to_hf(save, str(tmp_path / "gated_hf")) == "loop_gpt"
    with pytest.raises(ConversionError, match="model.exit_gate True"):
        convert_checkpoint_to_hf(save, str(tmp_path / "gated_gpt2"), fmt="gpt2")


@pytest.mark.parametrize("criterion", ["none", "entropy", "kl", "gate"])
def test_hf_left_padded_batch_equals_ours_and_each_row_alone(tmp_path, criterion):
    """Padding (issue #15): the remote-code model's logits on a left-padded batch (attention_mask, positions
    from it) equal ours at every real token, exits on; and HF generate() on the padded batch equals ours."""
    from loop_megatron.inference.generation import generate, pad_prompts

    model, hf, _ = _export(tmp_path, gated_recurrent())
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (10, 6, 3)]
    ids, mask = pad_prompts(rows, pad_token_id=EOD, padding_side="left")
    t = 0.0 if criterion == "none" else _threshold_with_mixed_exits(model, ids[:1], criterion, CANDIDATES[criterion])
    kw = {} if criterion == "none" else dict(exit_criterion=criterion, exit_threshold=t)
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, exit_rule=ExitRule(criterion, t))[0]
        theirs = hf(ids, attention_mask=mask, **kw).logits
        assert (ours - theirs)[real].abs().max().item() < ATOL
        for b, row in enumerate(rows):
            alone = hf(torch.tensor([row]), **kw).logits[0]
            assert (theirs[b, real[b]] - alone).abs().max().item() < ATOL, b
    res = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=EOD,
                      eos_token_id=None, **kw)
    assert torch.equal(res, generate(model, ids, attention_mask=mask, max_new_tokens=6, temperature=0, **kw))
