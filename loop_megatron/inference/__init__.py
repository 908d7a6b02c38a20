"""Using a trained model: autoregressive generation with a per-application KV cache (`generation`) and
held-out loss / perplexity at any number of loops (`evaluation`). Single process, TP=1, weights read
through `loop_megatron.checkpoint`. Adaptive exit criteria and compute curves belong here too.
"""
