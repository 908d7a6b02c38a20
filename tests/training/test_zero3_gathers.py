"""ZeRO-3 with a looped model: the all-gathers per training step do not grow with the loop count, and
only the shared loop's parameters stay gathered across their uses (training/zero3.py)."""
import pytest

from tests.dist_utils import run_distributed

# A model where residency shows: the loop's block is a third of the blocks, the vocabulary is small.
RECURRENT = {"prelude_layers": 1, "coda_layers": 1, "loop_injection": "add"}


def _gathers_per_step(rank, world, jobs):
    """{job name: {loops: {"steps": [(gathers, peak gathered elements) per step], "model", "loop"}}} for
    jobs {name: (loop counts, reuse distance or None for the trainer's, model overrides)}."""
    return {name: _job(world, *job) for name, job in jobs.items()}


def _job(world, loops_list, reuse_distance, layers):
    import torch

    from loop_megatron.config import Config
    from loop_megatron.model import LoopGPT
    from loop_megatron.parallel import destroy_model_parallel, initialize_model_parallel
    from loop_megatron.parallel.comm_count import AllGatherCounter
    from loop_megatron.training.distributed import skip_shm_comm_build
    from loop_megatron.training.ds_config import DEFAULT_ZERO_TUNING
    from loop_megatron.training.engine import build_engine
    from loop_megatron.training.step import train_step
    from loop_megatron.training.zero3 import GatheredParameterPeak

    skip_shm_comm_build()
    out = {}
    for loops in loops_list:
        initialize_model_parallel(1)
        cfg = Config()
        m = cfg.model
        m.vocab_size, m.make_vocab_size_divisible_by, m.hidden_size, m.num_attention_heads = 64, 1, 32, 4
        m.num_layers, m.num_loops, m.max_position_embeddings = 1, loops, 8
        for key, value in layers.items():
            setattr(m, key, value)
        cfg.data.seq_length = 8
        cfg.training.micro_batch_size, cfg.training.zero_stage, cfg.training.precision = 2, 3, "fp32"
        # Every parameter partitioned, no prefetch bucket (which would fetch this tiny model whole and hide
        # the per-use behaviour): what keeps a parameter gathered is the reuse distance alone.
        zero = dict(DEFAULT_ZERO_TUNING[3], stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
        if reuse_distance is not None:
            zero["stage3_max_reuse_distance"] = reuse_distance
        torch.manual_seed(0)
        model = LoopGPT(m)
        sizes = {"model": sum(p.numel() for p in model.parameters()),
                 "loop": sum(p.numel() for p in model.loop.parameters())}
        engine, _, _ = build_engine(cfg, model, world, "fp32", {"zero_optimization": zero}, log=lambda s: None)
        batches = iter([torch.randint(0, 64, (2, 9)) for _ in range(3)])
        steps = []
        for _ in range(3):  # step 1 records DeepSpeed's module trace; steps 2-3 replay it
            with AllGatherCounter() as counter, GatheredParameterPeak(engine.module) as peak:
                train_step(engine, batches, 1, torch.device("cpu"))
            steps.append((counter.calls, peak.peak))
        out[loops] = {"steps": steps, **sizes}
        engine.destroy()
        destroy_model_parallel()
    return out


JOBS = {
    "default": ([1, 3], None, {}),            # the trainer's settings
    "no_reuse": ([1, 3], 0, {}),              # control: DeepSpeed releases after every use
    "recurrent": ([2, 4], None, RECURRENT),   # the trainer's settings, prelude + loop + coda
    "everything": ([4], 1_000_000_000, RECURRENT),  # the old default: every parameter kept gathered
}


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_gathers_per_step, 2, JOBS)[0]


def _gathers(run):
    return {loops: [calls for calls, _ in r["steps"]] for loops, r in run.items()}


def test_zero3_gathers_do_not_grow_with_loops(runs):
    default, no_reuse = _gathers(runs["default"]), _gathers(runs["no_reuse"])
    # The trainer's defaults: after the trace step, the same number of gathers at 1 and 3 loops.
    assert default[1][1] == default[1][2] == default[3][1] == default[3][2] > 0, default
    # Control (the counter sees per-use gathers): without reuse every iteration gathers the block again.
    assert no_reuse[3][2] > no_reuse[1][2] > 0, no_reuse
    assert default[3][2] < no_reuse[3][2]


def test_zero3_keeps_only_the_loop_gathered(runs):
    """Prelude + shared core x 4 + coda: with the trainer's reuse distance (the loop's size) the step's
    peak of gathered parameters is the loop plus at most one other block's worth, not the whole model
    (what DeepSpeed's 1e9 default held), and the gathers per step still do not grow with the loops."""
    trainer, everything = runs["recurrent"], runs["everything"]
    whole, loop = trainer[4]["model"], trainer[4]["loop"]
    old_peak = max(p for _, p in everything[4]["steps"][1:])
    new_peak = max(p for _, p in trainer[4]["steps"][1:])
    assert old_peak == whole, (old_peak, whole)  # 1e9: every parameter gathered at once
    block = (whole - loop) // 2  # prelude and coda blocks with the embeddings spread over them: an upper bound
    assert loop <= new_peak <= loop + block < whole, (new_peak, loop, block, whole)
    gathers = _gathers(trainer)
    assert gathers[2][1] == gathers[2][2] == gathers[4][1] == gathers[4][2] > 0, gathers
