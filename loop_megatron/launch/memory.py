"""Model-state memory per GPU under ZeRO 0/1/2/3 (DeepSpeed's own estimators for ZeRO-2/3)."""
from __future__ import annotations

from typing import Dict


def largest_layer_params(model_cfg) -> int:
    """Parameters of the largest single module (what ZeRO-3 gathers at once): the tied token embedding
    for every GPT-2-width preset."""
    d, f = model_cfg.hidden_size, model_cfg.ffn_size
    return max(model_cfg.padded_vocab_size * d,          # token embedding / tied LM head
               model_cfg.max_position_embeddings * d,    # position embedding
               3 * d * d + 3 * d,                        # fused QKV projection
               d * d + d,                                # attention output projection
               d * f + f, f * d + d)                     # MLP up / down


def zero_model_state_bytes(total_params: int, largest_layer: int, nodes: int = 1,
                           gpus_per_node: int = 1) -> Dict[str, int]:
    """Model-state bytes per GPU (params, gradients, Adam state; no activations, no offload).

    ZeRO 2 and 3 come from DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`,
    `estimate_zero3_model_states_mem_needs`; 16-bit weights, 18 bytes/param of gradient + fp32 master +
    Adam state partitioned). ZeRO 1 and 0 use the same byte accounting with the stated formulas:

        ZeRO-0 (data parallel):  2P (bf16 params) + 2P (bf16 grads) + 16P (fp32 grads, master params, Adam m, v)
        ZeRO-1 (optimizer state partitioned): 2P + 2P + 16P / N
        ZeRO-2 (DeepSpeed):      2P + 18P / N
        ZeRO-3 (DeepSpeed):      4 x largest layer + 18P / N
    where P = parameters and N = nodes x GPUs per node (tensor-parallel size 1).
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = nodes * gpus_per_node
    _, zero2 = estimate_zero2_model_states_mem_needs(total_params, num_gpus_per_node=gpus_per_node,
                                                     num_nodes=nodes, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(total_params, largest_layer, num_gpus_per_node=gpus_per_node,
                                                        num_nodes=nodes, cpu_offload=False, cpu_offload_params=False)
    return {"zero0": 20 * total_params, "zero1": 4 * total_params + int(16 * total_params / n),
            "zero2": int(zero2), "zero3": int(zero3)}
