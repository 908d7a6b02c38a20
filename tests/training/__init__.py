"""Tests of loop_megatron.training (DeepSpeed trainer)."""
