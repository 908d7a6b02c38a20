"""loop_megatron: a DeepSpeed/Megatron-style trainer for Loop-Residual (looped, weight-shared) GPT models.

Package map (each depends only on those above it; the root holds only the error base, the config and the
entry points; tests/test_architecture.py checks the rule):
    errors       LoopMegatronError, the base of every package's error class
    config       typed dataclasses, presets, validation
    utils        atomic file writes (the one writer), rank/barrier helpers, CPU peak-memory meter
    parallel     TP/DP process groups, Megatron column/row layers, vocab-parallel embedding and loss
    model        attention, block, the loop stack, the GPT wrapper, parameter/FLOP counts
    data         offline GPT-2 tokenizer, Megatron .bin/.idx datasets, GPT sample windows
    checkpoint   the on-disk checkpoint layout, weights read/write, compatibility checks, engine save/resume
    training     the Trainer: DeepSpeed engine, schedule, step loop, evaluation, logging
    inference    generation and held-out evaluation of a checkpoint
    hf           Hugging Face conversion
    launch       hostfiles, deepspeed launcher commands, ZeRO memory estimates (behind launch/*.sh)
    experiments  run records, tables, plots and budgets (behind tools/plot_runs.py)
    train, demo  `python -m loop_megatron.train` and `python -m loop_megatron.demo`
"""

__version__ = "0.1.0"
