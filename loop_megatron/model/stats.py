"""Parameter and FLOP counts from the config alone (no model needs to be built).

FLOPs follow the PaLM/Megatron convention: per token, a forward pass costs 2 FLOPs per matmul weight
applied plus 4 * seq * d per applied block for attention scores and values; training (forward +
backward) is 3x that. Looped weights are *applied* effective_depth times, so FLOPs are counted over the
effective depth while parameters are counted once. Recomputation from activation checkpointing is not
counted (this is model FLOPs, the numerator of MFU).
"""
from __future__ import annotations

from typing import Dict, Optional

from ..config import ModelConfig


def block_parameters(cfg: ModelConfig) -> int:
    d, f = cfg.hidden_size, cfg.ffn_size
    layernorms = 2 * 2 * d
    attention = 3 * d * d + 3 * d + d * d + d
    mlp = d * f + f + f * d + d
    return layernorms + attention + mlp


def gate_parameters(cfg: ModelConfig) -> int:
    return {"vector": cfg.num_loops * cfg.hidden_size, "scalar": cfg.num_loops, "none": 0}[cfg.loop_gates]


def parameter_count(cfg: ModelConfig, exclude_embeddings: bool = False) -> int:
    """Unique parameters (shared loop blocks counted once), including vocab padding rows."""
    d = cfg.hidden_size
    unique_blocks = cfg.num_layers + cfg.prelude_layers + cfg.coda_layers
    body = unique_blocks * block_parameters(cfg) + 2 * d + gate_parameters(cfg)
    if exclude_embeddings:
        return body
    return body + cfg.padded_vocab_size * d + cfg.max_position_embeddings * d


def flops_per_token(cfg: ModelConfig, seq_length: Optional[int] = None, training: bool = True) -> float:
    """Model FLOPs per token over the effective depth (forward+backward when `training`)."""
    d, f, L = cfg.hidden_size, cfg.ffn_size, cfg.effective_depth
    T = seq_length or cfg.max_position_embeddings
    matmul_weights = L * (4 * d * d + 2 * d * f) + d * cfg.padded_vocab_size
    forward = 2 * matmul_weights + 4 * L * T * d
    return float(3 * forward if training else forward)


def model_summary(cfg: ModelConfig, seq_length: Optional[int] = None) -> Dict[str, float]:
    """The figures `tools/model_info.py` prints."""
    T = seq_length or cfg.max_position_embeddings
    return {
        "params": parameter_count(cfg),
        "non_embedding_params": parameter_count(cfg, exclude_embeddings=True),
        "unique_layers": cfg.num_layers + cfg.prelude_layers + cfg.coda_layers,
        "num_loops": cfg.num_loops,
        "inner_loops": cfg.inner_loops,
        "effective_depth": cfg.effective_depth,
        "seq_length": T,
        "flops_per_token": flops_per_token(cfg, T),
        "forward_flops_per_token": flops_per_token(cfg, T, training=False),
    }
