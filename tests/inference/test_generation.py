"""Sampling loop: the KV cache across loop iterations, greedy parity with HF generate(), sampling knobs."""
import pytest
import torch

from loop_megatron.inference.generation import filter_logits, generate, sample_next_token
from loop_megatron.hf import convert_checkpoint_to_hf
from tests.hf.helpers import VOCAB, build_model, load_hf, make_checkpoint, tiny_config, tool_main

EOD = 50256


def prompts(n=2, length=5, seed=0):
    return torch.randint(0, VOCAB - 1, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [
    dict(num_layers=2, num_loops=3, loop_gates="vector"),
    dict(num_layers=1, num_loops=2, inner_loops=2, prelude_layers=1, coda_layers=1, loop_gates="scalar"),
])
def test_kv_cache_matches_full_recompute(shape):
    model = build_model(tiny_config(**shape), random_gates=True)
    x = prompts()
    cached = generate(model, x, max_new_tokens=10, temperature=0)
    full = generate(model, x, max_new_tokens=10, temperature=0, use_cache=False)
    assert cached.shape == (2, 15) and torch.equal(cached, full)
    # with more loops than trained (the last gate is reused)
    assert torch.equal(generate(model, x, max_new_tokens=6, temperature=0, num_loops=5),
                       generate(model, x, max_new_tokens=6, temperature=0, num_loops=5, use_cache=False))


@pytest.mark.parametrize("kind", ["gpt2", "loop_gpt"])
def test_greedy_matches_hf_generate(tmp_path, kind):
    if kind == "gpt2":  # ungated loop with inner loops -> plain unrolled GPT2LMHeadModel
        cfg = tiny_config(num_layers=2, num_loops=2, inner_loops=2, loop_gates="none")
    else:  # gated loop with inner loops, prelude and coda -> custom architecture with a DynamicCache
        cfg = tiny_config(num_layers=2, num_loops=3, inner_loops=2, prelude_layers=1, coda_layers=1)
    save, model = make_checkpoint(tmp_path, cfg, random_gates=(kind == "loop_gpt"))
    out = str(tmp_path / "hf")
    assert convert_checkpoint_to_hf(save, out) == kind
    hf = load_hf(out, trust_remote_code=(kind == "loop_gpt"))
    for seed in range(2):
        x = prompts(1, 6, seed)
        ours = generate(model, x, max_new_tokens=16, temperature=0, eos_token_id=EOD)
        theirs = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                             pad_token_id=EOD, eos_token_id=EOD)
        assert torch.equal(ours, theirs), (ours, theirs)
        assert len(set(ours[0, 6:].tolist())) >= 3  # a context-dependent continuation, not one repeated token
    # HF's per-step logits (computed through its cache) equal our full forward at every position.
    x = prompts(1, 6, 0)
    res = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False, pad_token_id=EOD,
                      eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    steps = torch.stack(res.logits, dim=1)  # [1, 10, V]
    with torch.no_grad():
        full = model(res.sequences[:, :-1])[0][:, 5:]
    assert (steps - full).abs().max() < 1e-4


def test_our_cache_logits_equal_full_forward_at_every_step():
    from loop_megatron.model import KVCache

    model = build_model(tiny_config(num_layers=2, num_loops=2, inner_loops=2, prelude_layers=1, coda_layers=1),
                        random_gates=True)
    seq = generate(model, prompts(2, 5), max_new_tokens=8, temperature=0)
    cache = KVCache()
    with torch.no_grad():
        steps = [model(seq[:, :5], kv_cache=cache)[0][:, -1]]
        for t in range(5, seq.shape[1] - 1):
            steps.append(model(seq[:, t:t + 1], kv_cache=cache)[0][:, -1])
        full = model(seq[:, :-1])[0][:, 4:]
    assert (torch.stack(steps, dim=1) - full).abs().max() < 1e-4


def test_custom_hf_cache_has_one_entry_per_application(tmp_path):
    cfg = tiny_config(num_layers=2, num_loops=3, inner_loops=2, prelude_layers=1, coda_layers=1)
    save, _ = make_checkpoint(tmp_path, cfg, random_gates=True)
    out = str(tmp_path / "hf")
    convert_checkpoint_to_hf(save, out)
    hf = load_hf(out, trust_remote_code=True)
    x = prompts(1, 4)
    with torch.no_grad():
        first = hf(x, use_cache=True)
        assert len(first.past_key_values.layers) == 1 + 3 * 2 * 2 + 1
        step = hf(torch.tensor([[7]]), past_key_values=first.past_key_values, use_cache=True)
        full = hf(torch.cat([x, torch.tensor([[7]])], dim=1), use_cache=False)
    assert (step.logits[:, -1] - full.logits[:, -1]).abs().max() < 1e-4


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = build_model(tiny_config(), random_gates=True)
    x = prompts(1, 4)
    a = generate(model, x, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=3)
    b = generate(model, x, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=3)
    assert torch.equal(a, b)
    greedy = generate(model, x, max_new_tokens=12, temperature=0)
    assert torch.equal(generate(model, x, max_new_tokens=12, temperature=1.5, top_k=1, seed=5), greedy)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # smallest set with mass >= 0.7 is {0.5, 0.3}; the most likely token always survives
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.01)).tolist() == [[False, True, True, True]]
    assert sample_next_token(logits, temperature=0).tolist() == [0]


def test_stops_at_eos_and_at_the_position_limit():
    model = build_model(tiny_config(), random_gates=True)
    x = prompts(1, 4)
    greedy = generate(model, x, max_new_tokens=8, temperature=0)
    first = int(greedy[0, 4])
    stopped = generate(model, x, max_new_tokens=8, temperature=0, eos_token_id=first)
    assert stopped.shape == (1, 5)
    limit = model.cfg.max_position_embeddings
    assert generate(model, prompts(1, limit - 3), max_new_tokens=50, temperature=0).shape == (1, limit)


def test_generate_tool_prints_prompt_and_continuation(tmp_path, capsys):
    from loop_megatron.data.tokenizer import GPT2Tokenizer

    save, model = make_checkpoint(tmp_path, tiny_config())
    main = tool_main("generate")
    prompt = "The state of the Union"
    assert main(["--load", save, "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    tok = GPT2Tokenizer()
    ids = tok.encode(prompt)
    new = generate(model, ids, max_new_tokens=8, temperature=0, eos_token_id=tok.eod)[0, len(ids):].tolist()
    if tok.eod in new:
        new = new[:new.index(tok.eod)]
    assert printed == prompt + tok.decode(new)
    assert main(["--load", save, "--prompt", prompt, "--loops", "0"]) == 1
    assert capsys.readouterr().err.strip() == "generate.py: error: --loops must be >= 1, got 0."


def test_generate_tool_with_exits_shows_iterations(tmp_path, capsys):
    from loop_megatron.data.tokenizer import GPT2Tokenizer
    from loop_megatron.inference.generation import iteration_strip

    assert iteration_strip([1, 2, 4, 8], 8) == "▁▂▄█"
    save, model = make_checkpoint(tmp_path, tiny_config(num_loops=3))
    main = tool_main("generate")
    prompt = "The state of the Union"
    assert main(["--load", save, "--prompt", prompt, "--max-new-tokens", "6", "--temperature", "0",
                 "--exit-criterion", "kl", "--exit-threshold", "1e9", "--max-loops", "5", "--show-iterations"]) == 0
    lines = capsys.readouterr().out.rstrip("\n").split("\n")
    tok = GPT2Tokenizer()
    ids = tok.encode(prompt)
    out, counts = generate(model, ids, max_new_tokens=6, temperature=0, eos_token_id=tok.eod, num_loops=5,
                           exit_criterion="kl", exit_threshold=1e9, return_iterations=True)
    assert counts.unique().tolist() == [2]  # kl can first stop after iteration 2, and a huge threshold always does
    assert lines[0] == prompt + tok.decode(out[0, len(ids):].tolist())
    assert lines[1].startswith("iterations per token (cap 5, mean 2.00): ") and " | " in lines[1]
    assert lines[2].split(" ")[0] == f"{tok.decode([ids[0]])!r}:2"


def test_generate_tool_batches_several_prompts_with_padding(tmp_path, capsys):
    """--prompt repeated or --prompt-file: one left-padded batch; each greedy continuation = the prompt alone."""
    from loop_megatron.data.tokenizer import GPT2Tokenizer

    save, model = make_checkpoint(tmp_path, tiny_config(num_loops=3))
    main = tool_main("generate")
    texts = ["The state of the Union is strong", "We", "Fellow citizens of"]
    tok = GPT2Tokenizer()
    expected = []
    for i, text in enumerate(texts):
        ids = tok.encode(text)
        new = generate(model, ids, max_new_tokens=6, temperature=0, eos_token_id=tok.eod)[0, len(ids):].tolist()
        if tok.eod in new:
            new = new[:new.index(tok.eod)]
        expected += [f"--- prompt {i + 1} ---", text + tok.decode(new)]
    args = ["--load", save, "--max-new-tokens", "6", "--temperature", "0"]
    assert main(args + [a for t in texts for a in ("--prompt", t)]) == 0
    assert capsys.readouterr().out.rstrip("\n").split("\n") == expected
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(texts[:2]) + "\n\n" + texts[2] + "\n")
    assert main(args + ["--prompt-file", str(path)]) == 0
    assert capsys.readouterr().out.rstrip("\n").split("\n") == expected
    (tmp_path / "empty.txt").write_text("\n \n")
    assert main(args + ["--prompt-file", str(tmp_path / "empty.txt")]) == 1
    assert "has no prompts" in capsys.readouterr().err
