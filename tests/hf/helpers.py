"""Shared helpers for the conversion, generation and evaluation tests: tiny checkpoints, HF loading."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

import torch

from loop_megatron.checkpoint import save_checkpoint_files
from loop_megatron.config import Config, preset
from loop_megatron.model import LoopGPT, full_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable
VOCAB = 50257


def tiny_config(name: Optional[str] = None, **model) -> Config:
    """A preset (default tiny-2l-2loop) at a tiny width: hidden 32, 4 heads, 64 positions, GPT-2 vocab."""
    cfg = preset(name or "tiny-2l-2loop")
    cfg.model.hidden_size, cfg.model.num_attention_heads, cfg.model.max_position_embeddings = 32, 4, 64
    cfg.data.seq_length = 32
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg.validate()


def build_model(cfg: Config, seed: int = 0, random_gates: bool = False) -> LoopGPT:
    torch.manual_seed(seed)
    model = LoopGPT(cfg.model).eval()
    with torch.no_grad():
        # Larger block weights than the init give peaked, context-dependent logits (no near-ties in greedy
        # comparisons, and greedy continuations that do not just repeat one token).
        for name, p in model.named_parameters():
            if p.ndim == 2 and not name.endswith("gates"):
                p.normal_(0.0, 0.02 if name in ("wte.weight", "wpe.weight") else 0.3)
        if random_gates and model.loop.gates is not None:
            model.loop.gates.uniform_(0.3, 1.5)
    return model


def make_checkpoint(tmp_path, cfg: Config, seed: int = 0, random_gates: bool = False, iteration: int = 100,
                    name: str = "ckpt"):
    """(save dir, model) of a randomly initialised LoopGPT written with save_checkpoint_files."""
    model = build_model(cfg, seed, random_gates)
    save = os.path.join(str(tmp_path), name)
    save_checkpoint_files(full_state_dict(model), cfg, save, iteration=iteration)
    return save, model


def load_hf(folder: str, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code).eval()


def run_tool(*args, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python tools/...` from the repo root, as a user would."""
    env = dict(os.environ, PYTHONPATH="", OMP_NUM_THREADS="2", TRANSFORMERS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([PYTHON, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def tool_main(name: str):
    """`main(argv)` of tools/<name>.py, loaded in-process (no interpreter start-up per call)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main
