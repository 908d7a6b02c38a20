"""The Loop-Residual GPT model built from tensor-parallel shards."""
from .depth import LoopDepth
from .exit import ExitGate, ExitRule, ExitStats
from .gpt import IGNORE_INDEX, LoopGPT
from .kv_cache import KVCache
from .loop import LoopStack
from .state_dict import full_state_dict, load_full_state_dict, merge_tp_tensor, shard_tp_tensor
from .stats import flops_per_token, model_summary, parameter_count
