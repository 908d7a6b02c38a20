"""loop_megatron: a DeepSpeed/Megatron-style trainer for Loop-Residual (looped, weight-shared) GPT models.

Package map (each depends only on those above it):
    config     typed dataclasses, presets, validation
    parallel   TP/DP process groups, Megatron column/row layers, vocab-parallel embedding and loss
    model      attention, block, the loop stack, the GPT wrapper, parameter/FLOP counts
    data       offline GPT-2 tokenizer, Megatron .bin/.idx datasets, GPT sample windows
    training   DeepSpeed engine, schedule, checkpoints, logging
"""

__version__ = "0.1.0"
