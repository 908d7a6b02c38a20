"""Tensor parallelism: process groups, Megatron column/row layers, vocab-parallel embedding and loss."""
from .cross_entropy import vocab_parallel_cross_entropy
from .layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, enable_sequence_parallel,
                     merge_shards, shard_tensor)
from .mappings import (copy_to_tp_region, gather_from_sequence_parallel_region, gather_from_tp_region,
                       reduce_from_tp_region, reduce_scatter_to_sequence_parallel_region,
                       scatter_to_sequence_parallel_region, scatter_to_tp_region)
from .random import dropout, randn_like, set_seed, tp_rng_fork
from .state import (ModelParallelUnit, destroy_model_parallel, get_data_parallel_group, get_data_parallel_rank,
                    get_data_parallel_world_size, get_tensor_model_parallel_group, get_tensor_model_parallel_rank,
                    get_tensor_model_parallel_world_size, initialize_model_parallel, model_parallel_is_initialized)
