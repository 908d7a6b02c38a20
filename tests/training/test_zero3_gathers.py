"""ZeRO-3 with a looped model: the all-gathers per training step do not grow with the loop count."""
from tests.dist_utils import run_distributed


def _gathers_per_step(rank, world, loops_list, reuse_distance):
    import torch

    from loop_megatron.config import Config
    from loop_megatron.model import LoopGPT
    from loop_megatron.parallel import destroy_model_parallel, initialize_model_parallel
    from loop_megatron.parallel.comm_count import AllGatherCounter
    from loop_megatron.training.distributed import skip_shm_comm_build
    from loop_megatron.training.ds_config import DEFAULT_ZERO_TUNING
    from loop_megatron.training.engine import build_engine
    from loop_megatron.training.step import train_step

    skip_shm_comm_build()
    out = {}
    for loops in loops_list:
        initialize_model_parallel(1)
        cfg = Config()
        m = cfg.model
        m.vocab_size, m.make_vocab_size_divisible_by, m.hidden_size, m.num_attention_heads = 64, 1, 32, 4
        m.num_layers, m.num_loops, m.max_position_embeddings = 1, loops, 8
        cfg.data.seq_length = 8
        cfg.training.micro_batch_size, cfg.training.zero_stage, cfg.training.precision = 2, 3, "fp32"
        # Every parameter partitioned, no prefetch bucket (which would fetch this tiny model whole and hide
        # the per-use behaviour): what keeps the shared block gathered is the reuse distance alone.
        zero = dict(DEFAULT_ZERO_TUNING[3], stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
        if reuse_distance is not None:
            zero["stage3_max_reuse_distance"] = reuse_distance
        torch.manual_seed(0)
        engine, _, _ = build_engine(cfg, LoopGPT(m), world, "fp32", {"zero_optimization": zero}, log=lambda s: None)
        batches = iter([torch.randint(0, 64, (2, 9)) for _ in range(3)])
        counts = []
        for _ in range(3):  # step 1 records DeepSpeed's module trace; steps 2-3 replay it
            with AllGatherCounter() as counter:
                train_step(engine, batches, 1, torch.device("cpu"))
            counts.append(counter.calls)
        out[loops] = counts
        engine.destroy()
        destroy_model_parallel()
    return out


def test_zero3_gathers_do_not_grow_with_loops():
    default, no_reuse = run_distributed(_gathers_per_step, 2, [1, 3], None)[0], \
        run_distributed(_gathers_per_step, 2, [1, 3], 0)[0]
    # The trainer's defaults: after the trace step, the same number of gathers at 1 and 3 loops.
    assert default[1][1] == default[1][2] == default[3][1] == default[3][2] > 0, default
    # Control (the counter sees per-use gathers): without reuse every iteration gathers the block again.
    assert no_reuse[3][2] > no_reuse[1][2] > 0, no_reuse
    assert default[3][2] < no_reuse[3][2]
