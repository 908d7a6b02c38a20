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
    gates = cfg.loop_gate_count or cfg.num_loops
    return {"vector": gates * cfg.hidden_size, "scalar": gates, "none": 0}[cfg.loop_gates]


def injection_parameters(cfg: ModelConfig) -> int:
    """linear: W (d x 2d); diagonal: delta (1), rate (d), input gain (d)."""
    d = cfg.hidden_size
    return {"linear": 2 * d * d, "diagonal": 2 * d + 1}.get(cfg.loop_injection, 0)


def parameter_count(cfg: ModelConfig, exclude_embeddings: bool = False) -> int:
    """Unique parameters (shared loop blocks counted once), including vocab padding rows."""
    d = cfg.hidden_size
    unique_blocks = cfg.num_layers + cfg.prelude_layers + cfg.coda_layers
    body = unique_blocks * block_parameters(cfg) + 2 * d + gate_parameters(cfg) + injection_parameters(cfg)
    if exclude_embeddings:
        return body
    return body + cfg.padded_vocab_size * d + cfg.max_position_embeddings * d


def _forward_flops(cfg: ModelConfig, T: int, blocks: int, iterations: int, head: bool = True) -> float:
    """Forward FLOPs per token of `blocks` block applications, `iterations` loop injections, the LM head."""
    d, f = cfg.hidden_size, cfg.ffn_size
    matmul_weights = blocks * (4 * d * d + 2 * d * f) + (d * cfg.padded_vocab_size if head else 0)
    if cfg.loop_injection == "linear":
        matmul_weights += iterations * 2 * d * d  # W [s ; e] per iteration
    return 2 * matmul_weights + 4 * blocks * T * d


def flops_per_token(cfg: ModelConfig, seq_length: Optional[int] = None, training: bool = True,
                    loops: Optional[int] = None, backprop_loops: Optional[int] = None) -> float:
    """Model FLOPs per token over the effective depth (forward+backward when `training`).

    `loops` (r, default num_loops) is the iterations the forward ran; `backprop_loops` (k, default all) the
    iterations the backward ran through (truncated backprop): the backward costs 2x the forward of what
    it differentiates, i.e. the head, the coda, the last k iterations, and the prelude when gradient
    reaches it (through injection, or when k covers all r iterations)."""
    T = seq_length or cfg.max_position_embeddings
    r = cfg.num_loops if loops is None else loops
    k = r if not backprop_loops else min(backprop_loops, r)
    per_iteration = cfg.num_layers * cfg.inner_loops
    forward = _forward_flops(cfg, T, cfg.prelude_layers + r * per_iteration + cfg.coda_layers, r)
    if not training:
        return float(forward)
    prelude = cfg.prelude_layers if (k == r or cfg.loop_injection != "none") else 0
    backward = 2 * _forward_flops(cfg, T, prelude + k * per_iteration + cfg.coda_layers, k)
    return float(forward + backward)


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
