"""HF export of recurrent-depth models: injection and initial state carried by the remote-code model."""
import json
import os

import pytest
import torch

from loop_megatron.checkpoint.io import load_checkpoint
from loop_megatron.hf import convert_checkpoint_to_hf, convert_hf_to_checkpoint
from loop_megatron.hf.convert import ConversionError, export_to_hf
from loop_megatron.model import LoopDepth, full_state_dict

from .helpers import VOCAB, load_hf, make_checkpoint, tiny_config

ATOL = 1e-4
EOD = 50256


def recurrent_config(kind: str, init: str, gates: str = "none"):
    return tiny_config(num_layers=2, num_loops=3, prelude_layers=1, coda_layers=1, loop_gates=gates,
                       loop_injection=kind, loop_state_init=init, loop_state_std=0.3,
                       loop_gate_count=4 if gates != "none" else 0)


def perturb_injection(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.loop.injection.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("kind,init,gates", [("linear", "random", "none"), ("diagonal", "zeros", "vector"),
                                             ("add", "input", "scalar")])
def test_recurrent_model_exports_remote_code_with_equal_logits(tmp_path, kind, init, gates):
    cfg = recurrent_config(kind, init, gates)
    save, model = make_checkpoint(tmp_path, cfg, random_gates=True)
    out = str(tmp_path / "hf")
    assert convert_checkpoint_to_hf(save, out) == "loop_gpt"  # never a plain GPT-2
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["loop_injection"], config["loop_state_init"]) == (kind, init)
    hf = load_hf(out, trust_remote_code=True)
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for loops in (None, 1, 6):  # the config's count, fewer, and more than trained (last gate reused)
            ours = model(x, depth=loops)[0]
            theirs = hf(x, num_loops=loops).logits
            assert (ours - theirs).abs().max().item() < ATOL, loops


def test_random_state_with_a_generator_matches_and_default_is_zeros(tmp_path):
    cfg = recurrent_config("linear", "random")
    save, model = make_checkpoint(tmp_path, cfg)
    perturb_injection(model)
    out = str(tmp_path / "hf")
    export_to_hf(full_state_dict(model), cfg, out)
    hf = load_hf(out, trust_remote_code=True)
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x, depth=LoopDepth(state_generator=torch.Generator().manual_seed(4)))[0]
        theirs = hf(x, state_generator=torch.Generator().manual_seed(4)).logits
        assert (ours - theirs).abs().max().item() < ATOL
        assert (ours - model(x)[0]).abs().max() > 1e-3  # the generator's state did matter
        assert (model(x)[0] - hf(x).logits).abs().max().item() < ATOL  # both default to s_0 = 0


def test_plain_gpt2_format_is_refused_for_injection(tmp_path):
    cfg = recurrent_config("add", "input")
    save, model = make_checkpoint(tmp_path, cfg)
    with pytest.raises(ConversionError, match="model.loop_injection"):
        convert_checkpoint_to_hf(save, str(tmp_path / "hf"), fmt="gpt2")


def test_round_trip_keeps_injection_exactly(tmp_path):
    cfg = recurrent_config("diagonal", "random", "vector")
    save, model = make_checkpoint(tmp_path, cfg, random_gates=True)
    out, back = str(tmp_path / "hf"), str(tmp_path / "back")
    convert_checkpoint_to_hf(save, out)
    convert_hf_to_checkpoint(out, back)
    _, sd0, _ = load_checkpoint(save)
    cfg1, sd1, _ = load_checkpoint(back)
    assert cfg1.model == cfg.model
    assert set(sd0) == set(sd1) and "loop.injection.rate" in sd1
    for k in sd0:
        a, b = (sd0[k][:VOCAB], sd1[k][:VOCAB]) if k == "wte.weight" else (sd0[k], sd1[k])
        assert torch.equal(a, b), k


def test_hf_generate_with_injection_uses_its_cache_consistently(tmp_path):
    cfg = recurrent_config("linear", "random", "vector")
    save, model = make_checkpoint(tmp_path, cfg, random_gates=True)
    out = str(tmp_path / "hf")
    convert_checkpoint_to_hf(save, out)
    hf = load_hf(out, trust_remote_code=True)
    x = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    res = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False, pad_token_id=EOD,
                      eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    steps = torch.stack(res.logits, dim=1)
    with torch.no_grad():
        full = model(res.sequences[:, :-1])[0][:, 5:]
    assert (steps - full).abs().max() < ATOL
    # greedy tokens are our argmax of the full forward at every step
    assert torch.equal(res.sequences[0, 6:], full[0].argmax(-1))


def test_fresh_hf_model_initialises_injection_like_ours():
    from loop_megatron.hf.convert import loop_gpt_config
    from loop_megatron.hf.modeling_loop_gpt import LoopGPTForCausalLM
    from loop_megatron.model import LoopGPT

    for kind in ("linear", "diagonal"):
        cfg = recurrent_config(kind, "zeros")
        hf = LoopGPTForCausalLM(loop_gpt_config(cfg.model))
        ours = LoopGPT(cfg.model)
        for name, p in ours.loop.injection.named_parameters():
            theirs = dict(hf.transformer.loop.injection.named_parameters())[name]
            assert torch.allclose(theirs, p, atol=1e-7), (kind, name)


def test_fresh_hf_model_is_built_by_the_package_model_with_its_gate_init():
    """The adapter builds the package's LoopGPT, so a fresh HF model has our init (gate_init included) bit for bit."""
    from loop_megatron.hf.convert import loop_gpt_config
    from loop_megatron.hf.modeling_loop_gpt import LoopGPTForCausalLM
    from loop_megatron.model import LoopGPT

    cfg = tiny_config(num_loops=3, loop_gates="vector", gate_init=0.25, make_vocab_size_divisible_by=1)
    torch.manual_seed(11)
    hf = LoopGPTForCausalLM(loop_gpt_config(cfg.model))
    torch.manual_seed(11)
    ours = LoopGPT(cfg.model)
    assert torch.all(hf.transformer.loop.gates == 0.25)
    theirs = hf.transformer.state_dict()
    for name, p in ours.state_dict().items():
        assert torch.equal(theirs[name], p), name
