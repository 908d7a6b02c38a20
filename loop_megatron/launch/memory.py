"""Memory per GPU on paper: model states under ZeRO 0/1/2/3 (DeepSpeed's own estimators for ZeRO-2/3)
and, for a whole training layout (TP, sequence parallelism, ZeRO, activation checkpointing), the
activations (Korthikanti et al. 2022); tools/memory_plan.py prints the tables."""
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


# ------------------------------------------------------------------------------------------------------
# Per-GPU memory of a training layout, on paper (tools/memory_plan.py)
# ------------------------------------------------------------------------------------------------------
def block_activation_bytes(model_cfg, seq: int, micro: int, tp: int = 1, sequence_parallel: bool = False,
                           flash: bool = True) -> int:
    """Activations one transformer block stores for its backward, in bytes (16-bit activations), after
    Korthikanti et al. 2022 (arXiv 2205.05198, Table 2; dropout masks included):

        no tensor parallelism:      s b h (34 + 5 a s / h)
        tensor parallel t:          s b h (10 + 24 / t + 5 a s / (h t))
        tensor + sequence parallel: s b h (34 / t + 5 a s / (h t))

    With flash attention the 5 a s / h term (attention scores, softmax and its dropout mask) is not
    stored. The formula is for a 4h MLP, whose up-projection output and GeLU output are 16 of the 34; an
    ffn size other than 4h scales those 16 by ffn / 4h."""
    s, b, h, a = seq, micro, model_cfg.hidden_size, model_cfg.num_attention_heads
    mlp_scale = model_cfg.ffn_size / (4 * h)
    linear = 18 + 16 * mlp_scale            # 34 at ffn = 4h
    replicated = 10                          # LayerNorm inputs and dropout masks outside the TP regions
    scores = 0.0 if flash else 5 * a * s / h
    if tp == 1:
        per = linear + scores
    elif sequence_parallel:
        per = linear / tp + scores / tp
    else:
        per = replicated + (linear - replicated) / tp + scores / tp
    return int(s * b * h * per)


def activation_bytes(model_cfg, seq: int, micro: int, tp: int = 1, sequence_parallel: bool = False,
                     backprop_loops: int = 0, flash: bool = True) -> Dict[str, int]:
    """Activation bytes per GPU of one micro-batch's forward kept for the backward, by part:

    - `unlooped`: prelude and coda blocks, stored whole;
    - `loop`: under model.activation_checkpointing 'per-iteration', one 16-bit state per iteration that
      the backward runs through (the last `backprop_loops`, or all), sharded along the sequence with
      sequence parallelism, plus the recomputed activations of one iteration (its K blocks x inner loops)
      during that iteration's backward; 'per-block' stores every block input and recomputes one block;
      'none' stores every application whole;
    - `logits`: the fp32 logits and their gradient (vocabulary-parallel over TP).
    Pipeline parallelism does not exist here; micro-batches do not overlap."""
    s, b, h = seq, micro, model_cfg.hidden_size
    block = block_activation_bytes(model_cfg, seq, micro, tp, sequence_parallel, flash)
    state = 2 * s * b * h // (tp if sequence_parallel else 1)
    r = model_cfg.num_loops
    k = min(backprop_loops, r) if backprop_loops else r
    per_iteration = model_cfg.num_layers * model_cfg.inner_loops
    mode = model_cfg.activation_checkpointing
    if mode == "per-iteration":
        loop = k * state + per_iteration * block
    elif mode == "per-block":
        loop = k * per_iteration * state + block
    else:
        loop = k * per_iteration * block
    return {"unlooped": (model_cfg.prelude_layers + model_cfg.coda_layers) * block, "loop": int(loop),
            "logits": 2 * 4 * s * b * model_cfg.padded_vocab_size // tp}


def loop_parameters(model_cfg) -> int:
    """Parameters of the shared loop (its blocks, gates and injection): what ZeRO-3 keeps gathered."""
    from ..model.stats import block_parameters, gate_parameters, injection_parameters

    return model_cfg.num_layers * block_parameters(model_cfg) + gate_parameters(model_cfg) + \
        injection_parameters(model_cfg)


def per_gpu_memory(model_cfg, seq: int, micro: int, gpus: int, tp: int, sequence_parallel: bool, zero: int,
                   backprop_loops: int = 0, flash: bool = True) -> Dict[str, int]:
    """Bytes per GPU of a bf16 training layout: model states (zero_model_state_bytes on this rank's
    tensor-parallel share, partitioned over the gpus / tp data-parallel ranks; under ZeRO-3 plus the
    shared loop kept gathered in 16 bits, training/zero3.py) and activations (activation_bytes)."""
    from ..model.stats import parameter_count

    if gpus % tp:
        raise ValueError(f"{gpus} GPUs do not divide into tensor-parallel groups of {tp}")
    dp = gpus // tp
    params = parameter_count(model_cfg) // tp
    states = zero_model_state_bytes(params, largest_layer_params(model_cfg) // tp, 1, dp)[f"zero{zero}"]
    if zero == 3:
        states += 2 * loop_parameters(model_cfg) // tp
    acts = activation_bytes(model_cfg, seq, micro, tp, sequence_parallel, backprop_loops, flash)
    activations = sum(acts.values())
    return {"states": int(states), "activations": int(activations), "total": int(states + activations), **acts}
