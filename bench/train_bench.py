#!/usr/bin/env python
"""Training throughput and memory per rank of the trainer's DeepSpeed engine, 2 processes on gloo (CPU)
or NCCL (GPU): ZeRO stages 0-3, then loop counts with and without per-iteration checkpointing.

    python bench/train_bench.py [--procs 2] [--steps 3] [--loops 1 2 4 8 12] [--loops-zero 2]

Each configuration builds the engine the way `python -m loop_megatron.train` does (LoopGPT,
build_ds_config, parameter groups, the model-parallel unit; fp32 on CPU), runs two warm-up steps (which
allocate gradients and Adam state), times --steps steps and measures one more step's peak memory.

Columns (MiB, per rank, the largest over ranks):
  states   heap in use after warm-up minus before the model was built: weights, gradients, optimizer
           state and DeepSpeed's buffers (what ZeRO partitions)
  peak     highest heap use during a step, same zero point: states + activations + transients
  step Δ   peak minus the level at the start of the step: activations and transient buffers
On CPU memory is sampled after every ATen op (loop_megatron/utils/profiling.py); on CUDA it is
torch.cuda.max_memory_allocated. tokens/s counts all ranks (micro batch x ranks x sequence / step time).
"""
import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from loop_megatron.utils.distributed import free_port  # noqa: E402

MIB = 2 ** 20


def bytes_in_use(device: torch.device) -> int:
    from loop_megatron.utils.profiling import cpu_bytes_in_use

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return cpu_bytes_in_use() or 0


def run_job(job: dict, device: torch.device) -> dict:
    """One configuration on this rank: build the engine, warm up, time, measure, tear down."""
    import deepspeed

    from loop_megatron.config import Config
    from loop_megatron.model import LoopGPT, parameter_count
    from loop_megatron.parallel import ModelParallelUnit, get_data_parallel_rank, get_data_parallel_world_size
    from loop_megatron.utils.profiling import PeakMemory
    from loop_megatron.training.ds_config import build_ds_config
    from loop_megatron.training.zero3 import loop_reuse_distance
    from loop_megatron.training.optim import parameter_groups

    cfg = Config()
    m = cfg.model
    m.vocab_size, m.make_vocab_size_divisible_by = job["vocab"], 1
    m.hidden_size, m.num_attention_heads, m.max_position_embeddings = job["hidden"], job["heads"], job["seq"]
    m.num_layers, m.num_loops, m.loop_gates = job["layers"], job["loops"], "vector"
    m.activation_checkpointing = job["checkpointing"]
    cfg.data.seq_length = job["seq"]
    t = cfg.training
    t.micro_batch_size, t.zero_stage, t.lr, t.precision = job["micro"], job["zero"], 1e-4, job["precision"]
    dp = get_data_parallel_world_size()

    gc.collect()
    base = bytes_in_use(device)
    torch.manual_seed(1234)
    model = LoopGPT(m)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, t.weight_decay),
                                           config=build_ds_config(cfg, dp, job["precision"], job.get("ds_base"),
                                                                  reuse_distance=loop_reuse_distance(model)),
                                           mpu=ModelParallelUnit())
    del model
    gen = torch.Generator().manual_seed(100 + get_data_parallel_rank())
    ids = torch.randint(0, m.vocab_size, (t.micro_batch_size, job["seq"] + 1), generator=gen).to(device)

    def step():
        _, loss = engine(ids[:, :-1], labels=ids[:, 1:])
        engine.backward(loss)
        engine.step()
        return loss

    for _ in range(2):
        step()
    gc.collect()
    states = bytes_in_use(device) - base
    times = []
    for _ in range(job["steps"]):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    gc.collect()
    at_step = bytes_in_use(device) - base
    with PeakMemory(device) as meter:
        step()
    delta = meter.peak_bytes or 0
    result = {"params": parameter_count(m), "step_time": statistics.median(times), "states": states,
              "peak": at_step + delta, "delta": delta}
    engine.destroy()
    del engine
    gc.collect()
    return result


def worker(rank: int, world: int, port: int, out_dir: str, jobs: list, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    path = os.path.join(out_dir, f"rank{rank}.json")
    try:
        from loop_megatron.parallel import destroy_model_parallel, initialize_model_parallel
        from loop_megatron.training.distributed import device, init_distributed

        init_distributed(rank)
        initialize_model_parallel(1)
        results = []
        run_job(dict(jobs[0], steps=1), device())  # one-time allocations (gloo, DeepSpeed) are not charged to row 1
        for job in jobs:
            results.append(run_job(job, device()))
            if rank == 0:
                print(f"  done: {job['label']}", flush=True)
        destroy_model_parallel()
        with open(path, "w") as f:
            json.dump({"ok": True, "results": results}, f)
    except BaseException:
        with open(path, "w") as f:
            json.dump({"ok": False, "error": traceback.format_exc()}, f)
        raise


def run_jobs(jobs: list, procs: int, threads: int) -> list:
    """Run every job on `procs` fresh ranks; return, per job, the list of per-rank results."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        port = free_port()
        ps = [ctx.Process(target=worker, args=(r, procs, port, out_dir, jobs, threads)) for r in range(procs)]
        for p in ps:
            p.start()
        for p in ps:
            p.join()
        per_rank = []
        for r in range(procs):
            path = os.path.join(out_dir, f"rank{r}.json")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} exited with code {ps[r].exitcode} and no result")
            with open(path) as f:
                record = json.load(f)
            if not record["ok"]:
                raise RuntimeError(f"rank {r} failed:\n{record['error']}")
            per_rank.append(record["results"])
    return [[per_rank[r][j] for r in range(procs)] for j in range(len(jobs))]


def row(label: str, ranks: list, tokens_per_step: int) -> str:
    step = max(r["step_time"] for r in ranks)
    return (f"| {label} | {tokens_per_step / step:,.0f} | {step * 1e3:.0f} | "
            f"{max(r['states'] for r in ranks) / MIB:.1f} | {max(r['peak'] for r in ranks) / MIB:.1f} | "
            f"{max(r['delta'] for r in ranks) / MIB:.1f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, default=2, help="ranks (processes); default 2")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (default cores / procs)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--zero-vocab", type=int, default=16384,
                   help="vocab of the ZeRO table's model (a large embedding makes model states dominate)")
    p.add_argument("--zero-layers", type=int, default=2)
    p.add_argument("--zero-loops", type=int, default=2)
    p.add_argument("--loops", type=int, nargs="+", default=[1, 2, 4, 8, 12])
    p.add_argument("--loops-vocab", type=int, default=4096, help="vocab of the loops table's model")
    p.add_argument("--loops-zero", type=int, default=0,
                   help="ZeRO stage of the loops table (default 0, so the step's peak is activations only)")
    p.add_argument("--bucket-elements", type=int, default=0,
                   help="set DeepSpeed's reduce/allgather bucket sizes (and ZeRO-3 prefetch/persistence limits) to "
                        "this many elements; default: the trainer's own defaults (training/ds_config.py "
                        "DEFAULT_ZERO_TUNING, 5e7-element buckets)")
    p.add_argument("--skip-zero", action="store_true")
    p.add_argument("--skip-loops", action="store_true")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.procs)
    tokens = args.micro_batch * args.procs * args.seq
    ds_base = None
    if args.bucket_elements:
        b = args.bucket_elements
        ds_base = {"zero_optimization": {"reduce_bucket_size": b, "allgather_bucket_size": b,
                                         "stage3_prefetch_bucket_size": b, "stage3_param_persistence_threshold": b}}
    common = dict(hidden=args.hidden_size, heads=args.heads, seq=args.seq, micro=args.micro_batch,
                  steps=args.steps, precision=precision, ds_base=ds_base)
    print(f"# train_bench: {args.procs} ranks ({'NCCL/CUDA' if cuda else f'gloo/CPU, {threads} thread(s) each'}), "
          f"{precision}, d={args.hidden_size}, micro batch {args.micro_batch} x seq {args.seq} per rank "
          f"({tokens} tokens/step); MiB per rank, the largest rank shown"
          + (f"; DeepSpeed buckets {args.bucket_elements:,} elements" if args.bucket_elements else
             "; the trainer's default ZeRO buckets (5e7 elements)"), flush=True)
    header = "| {} | tokens/s | step ms | states MiB | peak MiB | step Δ MiB |\n|---|---:|---:|---:|---:|---:|"
    tables = []
    started = time.perf_counter()
    if not args.skip_zero:
        jobs = [dict(common, label=f"ZeRO-{z}", zero=z, vocab=args.zero_vocab, layers=args.zero_layers,
                     loops=args.zero_loops, checkpointing="none") for z in range(4)]
        results = run_jobs(jobs, args.procs, threads)
        params = results[0][0]["params"]
        fp32_copy = params * 4 / MIB
        lines = [f"\n## ZeRO stages: {args.zero_layers} layers x {args.zero_loops} loops, vocab {args.zero_vocab}, "
                 f"{params / 1e6:.2f}M params (one fp32 copy = {fp32_copy:.1f} MiB)\n", header.format("ZeRO stage")]
        lines += [row(f"{j['zero']}", r, tokens) for j, r in zip(jobs, results)]
        tables.append("\n".join(lines))
        print(tables[-1], flush=True)
    if not args.skip_loops:
        jobs = [dict(common, label=f"{mode} x{n}", zero=args.loops_zero, vocab=args.loops_vocab, layers=1, loops=n,
                     checkpointing=mode) for mode in ("none", "per-iteration") for n in args.loops]
        results = run_jobs(jobs, args.procs, threads)
        hidden_state = args.micro_batch * args.seq * args.hidden_size * (2 if precision == "bf16" else 4) / MIB
        lines = [f"\n## Loops: 1 shared layer x N loops, vocab {args.loops_vocab}, ZeRO-{args.loops_zero} "
                 f"(one hidden state = {hidden_state:.2f} MiB)\n", header.format("checkpointing, loops")]
        lines += [row(f"{j['checkpointing']}, {j['loops']}", r, tokens) for j, r in zip(jobs, results)]
        tables.append("\n".join(lines))
        print(tables[-1], flush=True)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
