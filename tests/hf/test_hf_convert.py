"""Hugging Face conversion: equal logits after export, exact round trips, folder contents, CLI messages."""
import ast
import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from loop_megatron.checkpoint import load_checkpoint, load_model
from loop_megatron.config import preset
from loop_megatron.hf import convert_checkpoint_to_hf, convert_hf_to_checkpoint
from loop_megatron.hf.convert import ConversionError
from loop_megatron.model import LoopGPT, load_full_state_dict

from .helpers import PYTHON, ROOT, VOCAB, load_hf, make_checkpoint, run_tool, tiny_config, tool_main

ATOL = 1e-4


def assert_same_logits(ours, hf, vocab, num_loops=None, seed=0, **hf_kwargs):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (3, 20), generator=g)
    with torch.no_grad():
        a = ours(x, depth=num_loops)[0]
        b = hf(x, **hf_kwargs).logits
    assert a.shape == b.shape == (3, 20, vocab)
    assert (a - b).abs().max().item() < ATOL


def hf_files(folder):
    return sorted(os.listdir(folder))


def test_gpt2_124m_shape_exports_plain_gpt2(tmp_path):
    """The 12-layer baseline preset at small width -> GPT2LMHeadModel, no remote code, same logits."""
    cfg = preset("gpt2-124m")
    cfg.model.hidden_size, cfg.model.num_attention_heads, cfg.model.max_position_embeddings = 64, 4, 64
    cfg.data.seq_length = 64
    assert cfg.model.vocab_size == VOCAB and cfg.model.padded_vocab_size == 50304
    save, model = make_checkpoint(tmp_path, cfg.validate())
    out = str(tmp_path / "hf")
    assert convert_checkpoint_to_hf(save, out) == "gpt2"
    files = hf_files(out)
    assert not [f for f in files if f.endswith(".py")]
    for f in ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert f in files
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "gpt2" and "auto_map" not in config
    assert config["n_layer"] == 12 and config["vocab_size"] == VOCAB and config["n_embd"] == 64
    hf = load_hf(out)  # plain transformers, no trust_remote_code
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    # Conv1D layout: c_attn.weight is [d, 3d], the transpose of our fused qkv [3d, d].
    sd = load_file(os.path.join(out, "model.safetensors"))
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)
    torch.testing.assert_close(sd["transformer.h.0.attn.c_attn.weight"], model.loop.blocks[0].attn.qkv.weight.t())
    assert sd["transformer.wte.weight"].shape == (VOCAB, 64)
    assert_same_logits(model, hf, VOCAB)


def test_tokenizer_files_load_offline(tmp_path):
    save, _ = make_checkpoint(tmp_path, tiny_config(loop_gates="none"))
    out = str(tmp_path / "hf")
    convert_checkpoint_to_hf(save, out)
    from transformers import AutoTokenizer

    from loop_megatron.data.tokenizer import GPT2Tokenizer

    tok = AutoTokenizer.from_pretrained(out)
    text = "Fellow citizens, the state of the Union is strong."
    assert tok(text).input_ids == GPT2Tokenizer().encode(text)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 50256 and len(tok) == VOCAB


@pytest.mark.parametrize("gates", ["none", "vector-ones"])
def test_ungated_loop_exports_unrolled_gpt2(tmp_path, gates):
    """2 shared layers x 3 loops x 2 inner (+ prelude and coda) -> a 14-layer GPT-2 in application order."""
    cfg = tiny_config(num_layers=2, num_loops=3, inner_loops=2, prelude_layers=1, coda_layers=1,
                      loop_gates="none" if gates == "none" else "vector")
    save, model = make_checkpoint(tmp_path, cfg)  # vector gates stay at their init, exactly one
    out = str(tmp_path / "hf")
    assert convert_checkpoint_to_hf(save, out) == "gpt2"
    hf = load_hf(out)
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.config.n_layer == 1 + 3 * 2 * 2 + 1
    assert_same_logits(model, hf, VOCAB)


@pytest.mark.parametrize("variant", ["inner", "prelude-coda-scalar"])
def test_gated_loop_exports_custom_architecture(tmp_path, variant):
    if variant == "inner":
        cfg = tiny_config(num_layers=2, num_loops=3, inner_loops=2, loop_gates="vector")
    else:
        cfg = tiny_config(num_layers=1, num_loops=3, inner_loops=2, prelude_layers=1, coda_layers=2,
                          loop_gates="scalar")
    save, model = make_checkpoint(tmp_path, cfg, random_gates=True)
    out = str(tmp_path / "hf")
    assert convert_checkpoint_to_hf(save, out) == "loop_gpt"
    files = hf_files(out)
    assert "configuration_loop_gpt.py" in files and "modeling_loop_gpt.py" in files
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "loop_gpt"
    assert config["auto_map"] == {"AutoConfig": "configuration_loop_gpt.LoopGPTConfig",
                                  "AutoModelForCausalLM": "modeling_loop_gpt.LoopGPTForCausalLM"}
    # Shared blocks stored once, plus the gates.
    sd = load_file(os.path.join(out, "model.safetensors"))
    blocks = {k.split(".")[3] for k in sd if k.startswith("transformer.loop.blocks.")}
    assert blocks == {str(k) for k in range(cfg.model.num_layers)}
    torch.testing.assert_close(sd["transformer.loop.gates"], model.loop.gates.detach(), rtol=0, atol=0)
    hf = load_hf(out, trust_remote_code=True)
    assert type(hf).__name__ == "LoopGPTForCausalLM"
    assert_same_logits(model, hf, VOCAB)
    # More loops than trained (the last gate is reused) agree as well.
    with torch.no_grad():
        x = torch.randint(0, VOCAB, (2, 10))
        assert (model(x, depth=5)[0] - hf(x, num_loops=5).logits).abs().max() < ATOL


def test_remote_code_is_the_package_model_and_imports_only_torch_numpy_transformers():
    """The export carries no second implementation: apart from the adapter and the HF config class, every file
    is a package module whose only changed lines are its relative imports, and the adapter defines no layers."""
    import sys

    from loop_megatron.hf import remote_code

    sources = remote_code.remote_code_sources()
    assert {"modeling_loop_gpt.py", "configuration_loop_gpt.py", "model_gpt.py", "model_loop.py", "model_exit.py",
            "model_attention.py", "model_block.py", "config.py", "parallel.py"} <= set(sources)
    flat_to_module = {}
    for name, text in sources.items():
        module = next(m for m in _reachable_modules(remote_code) if remote_code.flat_name(m) + ".py" == name)
        flat_to_module[name] = module
        original = open(remote_code.module_path(module), encoding="utf-8").read().splitlines()
        exported = text.splitlines()
        assert len(original) == len(exported), name
        changed = [(a, b) for a, b in zip(original, exported) if a != b]
        assert all(a.lstrip().startswith("from .") and b.lstrip().startswith("from .") for a, b in changed), name
        roots = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 1 and node.module + ".py" in sources, (name, node.module)
        outside = {r for r in roots if r not in sys.stdlib_module_names}
        assert outside <= {"torch", "transformers", "numpy", "yaml", "flash_attn"}, (name, outside)
    adapter = ast.parse(sources["modeling_loop_gpt.py"])
    classes = {node.name for node in ast.walk(adapter) if isinstance(node, ast.ClassDef)}
    assert classes == {"LoopGPTPreTrainedModel", "LoopGPTForCausalLM", "_ApplicationCache"}
    assert "scaled_dot_product_attention" not in sources["modeling_loop_gpt.py"]


def _reachable_modules(remote_code):
    seen, pending = set(), list(remote_code.ENTRY_MODULES)
    while pending:
        m = pending.pop()
        if m not in seen:
            seen.add(m)
            pending += [t for _, t in remote_code._relative_imports(m)]
    return seen


def test_custom_folder_loads_in_a_fresh_process_offline(tmp_path):
    """trust_remote_code from the local folder alone (the package is not importable there)."""
    cfg = tiny_config(num_loops=2, loop_gates="vector")
    save, model = make_checkpoint(tmp_path, cfg, random_gates=True)
    out = str(tmp_path / "hf")
    convert_checkpoint_to_hf(save, out)
    x = torch.randint(0, VOCAB, (1, 7))
    expected = model(x)[0]
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({out!r}, trust_remote_code=True).eval()\n"
        "assert 'loop_megatron' not in sys.modules\n"
        f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})).logits, {str(tmp_path / 'y.pt')!r})\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="",
               HF_MODULES_CACHE=str(tmp_path / "modules"))
    subprocess.run([PYTHON, "-c", script], cwd=str(tmp_path), env=env, check=True, timeout=120)
    assert (torch.load(tmp_path / "y.pt") - expected).abs().max() < ATOL


def test_bf16_export(tmp_path):
    cfg = tiny_config(num_loops=2, loop_gates="vector")
    save, model = make_checkpoint(tmp_path, cfg, random_gates=True)
    out = str(tmp_path / "hf")
    convert_checkpoint_to_hf(save, out, dtype="bf16")
    sd = load_file(os.path.join(out, "model.safetensors"))
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    hf = load_hf(out, trust_remote_code=True).float()
    x = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        a, b = model(x)[0], hf(x).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()


# ----------------------------------------------------------------------------------------------------
# HF -> ours
# ----------------------------------------------------------------------------------------------------
def make_local_gpt2(folder, n_layer=3, seed=0):
    """Stands in for OpenAI's gpt2 (no hub access): a random GPT2LMHeadModel saved locally."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=64, n_head=4, n_positions=64, vocab_size=VOCAB)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a mix-up would show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(0.0, 0.1).add_(1.0 if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") else 0.0)
    model.save_pretrained(folder)
    return model


def test_hf_gpt2_to_ours_and_back_is_exact(tmp_path):
    hf_dir = str(tmp_path / "gpt2")
    gpt2 = make_local_gpt2(hf_dir)
    ckpt = str(tmp_path / "ckpt")
    folder, how = convert_hf_to_checkpoint(hf_dir, ckpt)
    cfg, sd, meta = load_checkpoint(ckpt)
    m = cfg.model
    assert (m.num_layers, m.num_loops, m.loop_gates, m.vocab_size, m.padded_vocab_size) == (3, 1, "none", VOCAB, 50304)
    assert torch.count_nonzero(sd["wte.weight"][VOCAB:]) == 0  # padding rows are zero
    ours = load_model(ckpt)
    assert_same_logits(ours, gpt2, VOCAB)
    back = str(tmp_path / "gpt2-again")
    assert convert_checkpoint_to_hf(ckpt, back) == "gpt2"
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    again = load_file(os.path.join(back, "model.safetensors"))
    assert set(original) == set(again)
    for k in original:
        assert torch.equal(original[k], again[k]), k


@pytest.mark.parametrize("kind", ["plain", "custom"])
def test_ours_to_hf_to_ours_is_exact(tmp_path, kind):
    """Our exported folders come back in their looped form (an unrolled GPT-2 is rolled back up)."""
    cfg = tiny_config(num_layers=2, num_loops=2, inner_loops=2, prelude_layers=1,
                      loop_gates="vector")
    save, model = make_checkpoint(tmp_path, cfg, random_gates=(kind == "custom"))
    out = str(tmp_path / "hf")
    assert convert_checkpoint_to_hf(save, out) == ("gpt2" if kind == "plain" else "loop_gpt")
    back = str(tmp_path / "back")
    convert_hf_to_checkpoint(out, back)
    _, sd0, _ = load_checkpoint(save)
    cfg1, sd1, _ = load_checkpoint(back)
    assert cfg1.model == cfg.model
    assert set(sd0) == set(sd1)
    for k in sd0:
        a, b = (sd0[k][:VOCAB], sd1[k][:VOCAB]) if k == "wte.weight" else (sd0[k], sd1[k])
        assert torch.equal(a, b), k


def test_imported_checkpoint_loads_into_loopgpt_strictly(tmp_path):
    hf_dir = str(tmp_path / "gpt2")
    make_local_gpt2(hf_dir, n_layer=2)
    ckpt = str(tmp_path / "ckpt")
    convert_hf_to_checkpoint(hf_dir, ckpt)
    cfg, sd, meta = load_checkpoint(ckpt)
    load_full_state_dict(LoopGPT(cfg.model), sd)  # strict
    assert meta["engine_state"] is False and meta["tensor_model_parallel_size"] == 1


def test_unsupported_hf_folders_get_one_sentence(tmp_path):
    with pytest.raises(ConversionError, match="not a Hugging Face model folder"):
        convert_hf_to_checkpoint(str(tmp_path), str(tmp_path / "out"))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({}, llama / "pytorch_model.bin")
    with pytest.raises(ConversionError) as err:
        convert_hf_to_checkpoint(str(llama), str(tmp_path / "out"))
    assert str(err.value) == (f"{llama}: model_type 'llama' is not supported; expected a GPT-2 (gpt2) or a "
                              f"folder exported by loop_megatron (loop_gpt).")


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def test_cli_round_trip_and_messages(tmp_path, capsys):
    cfg = tiny_config(num_loops=2, loop_gates="vector")
    save, model = make_checkpoint(tmp_path, cfg, random_gates=True, iteration=100)
    main = tool_main("convert_checkpoint")
    out = str(tmp_path / "hf")
    assert main(["--input", save, "--tag", "iter_0000100", "--output", out]) == 0
    stdout = capsys.readouterr().out
    assert "loop_gpt" in stdout and "trust_remote_code=True" in stdout
    back = str(tmp_path / "back")
    assert main(["--from-hf", out, "--output", back]) == 0
    assert "iter_0000000" in capsys.readouterr().out
    x = torch.arange(10)[None]
    torch.testing.assert_close(load_model(back)(x)[0], model(x)[0])

    assert main(["--input", out, "--output", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err.strip() == (f"convert_checkpoint.py: error: {out}: not a loop_megatron "
                                               f"checkpoint (no meta.json and no 'latest' file).")
    assert not os.path.exists(tmp_path / "x")
    assert main(["--input", save, "--output", out]) == 1
    assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["--input", save, "--output", out, "--overwrite", "--format", "gpt2"]) == 1
    assert "not all one" in capsys.readouterr().err
    # A real `python tools/convert_checkpoint.py` process from the repo root: the wrong-tag sentence.
    bad = run_tool("tools/convert_checkpoint.py", "--input", save, "--tag", "iter_0000999", "--output",
                   str(tmp_path / "x"), check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip() == (f"convert_checkpoint.py: error: {save}: has no checkpoint tag 'iter_0000999' "
                                  f"(available tags: iter_0000100).")


def test_cli_help_names_the_neox_style_flags():
    proc = run_tool("tools/convert_checkpoint.py", "--help")
    for flag in ("--input", "--output", "--tag", "--dtype", "--from-hf", "--format"):
        assert flag in proc.stdout


def write_random_corpus(tmp_path) -> str:
    import numpy as np

    from loop_megatron.data.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "data" / "rand_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(64):
        builder.add_document(rng.integers(0, VOCAB, size=int(rng.integers(40, 120))).tolist())
    builder.finalize(prefix + ".idx")
    return prefix


# ----------------------------------------------------------------------------------------------------
# A checkpoint written by the trainer with TP=2 under ZeRO-3
# ----------------------------------------------------------------------------------------------------
def test_trainer_tp2_zero3_checkpoint_converts(tmp_path):
    prefix = write_random_corpus(tmp_path)
    save = str(tmp_path / "save")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "loop_megatron.train", "--preset", "tiny-2l-2loop", "--tensor-model-parallel-size", "2",
           "--zero-stage", "3", "--data-path", prefix, "--split", "90,10,0", "--seq-length", "32",
           "--micro-batch-size", "2", "--train-iters", "2", "--lr-warmup-iters", "1", "--eval-iters", "0",
           "--precision", "fp32", "--save", save, "--run-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg, sd, meta = load_checkpoint(save)
    assert meta["tensor_model_parallel_size"] == 2 and meta["zero_stage"] == 3
    model = load_model(save)
    out = str(tmp_path / "hf")
    convert_checkpoint_to_hf(save, out)
    hf = load_hf(out, trust_remote_code=True)
    assert_same_logits(model, hf, cfg.model.vocab_size)


def test_trainer_initialises_from_an_imported_hf_gpt2_under_tp2(tmp_path):
    """HF GPT-2 -> our checkpoint -> trainer --init-from with TP=2 / ZeRO-2: the weights the trainer
    starts from (saved at iteration 0 after sharding over TP and partitioning by ZeRO) are the HF ones."""
    hf_dir = str(tmp_path / "gpt2")
    make_local_gpt2(hf_dir, n_layer=2)
    imported = str(tmp_path / "imported")
    convert_hf_to_checkpoint(hf_dir, imported)
    _, sd_imported, _ = load_checkpoint(imported)
    prefix = write_random_corpus(tmp_path)
    save = str(tmp_path / "save")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "loop_megatron.train", "--init-from", imported, "--num-layers", "2", "--loops", "1",
           "--loop-gates", "none", "--hidden-size", "64", "--num-attention-heads", "4",
           "--override", f"model.vocab_size={VOCAB}", "--override", "model.max_position_embeddings=64",
           "--tensor-model-parallel-size", "2", "--zero-stage", "2", "--data-path", prefix, "--split", "90,10,0",
           "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "0", "--eval-iters", "1",
           "--precision", "fp32", "--save", save, "--run-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "initialised weights from" in proc.stdout + proc.stderr
    _, sd_started, _ = load_checkpoint(save)
    assert set(sd_started) == set(sd_imported)
    for k in sd_imported:
        assert torch.equal(sd_started[k], sd_imported[k]), k
    # A shape mismatch is refused before anything starts, naming the field.
    bad = cmd[:]
    bad[bad.index("--hidden-size") + 1] = "32"
    proc = subprocess.run(bad, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert "model.hidden_size 64 there vs 32 here" in proc.stdout + proc.stderr
