#!/usr/bin/env python
"""bf16 MFU, tokens/s and peak memory of the trainer's step on one CUDA GPU (`make bench-gpu`).

    python bench/gpu_bench.py [--presets gpt2-124m loop-81m] [--micro-batch 8] [--steps 10] [--warmup 3]

For each preset at seq 1024: compile off/on x activation checkpointing none/per-iteration, one process,
ZeRO-0, bf16, the trainer's engine (`build_engine`, so fused AdamW and the chosen attention kernel) and
step (`train_step`) on random tokens. MFU = flops_per_token x tokens/s / peak, where flops_per_token
counts the applied blocks (effective depth: loop-81m is 6 blocks x 6 loops = 36 applied) as
training/monitor.py does, and the peak is the bf16 dense figure of the GPU (monitor.PEAK_TFLOPS,
or --peak-tflops). Warm-up steps (which include compilation) are not timed; the compile time is printed.
Peak memory is torch.cuda.max_memory_allocated over the timed steps. Without a CUDA device it says so
and exits.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

GIB = 2 ** 30


def run_case(preset_name, compile_blocks, checkpointing, args, peak_flops):
    from loop_megatron.config import preset
    from loop_megatron.model import LoopGPT, model_summary
    from loop_megatron.parallel import destroy_model_parallel, initialize_model_parallel
    from loop_megatron.training.engine import build_engine
    from loop_megatron.training.step import train_step

    initialize_model_parallel(1)
    cfg = preset(preset_name)
    cfg.data.seq_length = args.seq
    cfg.model.activation_checkpointing = checkpointing
    t = cfg.training
    t.micro_batch_size, t.zero_stage, t.precision, t.compile = args.micro_batch, 0, "bf16", compile_blocks
    t.train_iters, t.lr_warmup_iters = 10 ** 6, 10
    t.global_batch_size = 0  # one micro-batch per optimizer step (the preset's recipe accumulates to 480)
    dev = torch.device("cuda", torch.cuda.current_device())
    log_lines = []
    torch.manual_seed(0)
    engine, clipper, timer = build_engine(cfg, LoopGPT(cfg.model), 1, "bf16", log=log_lines.append)
    vocab = cfg.model.vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.micro_batch, args.seq + 1), generator=gen).pin_memory()
               for _ in range(4)]

    def step(i):
        return train_step(engine, iter((batches[i % len(batches)],)), 1, dev, clipper)

    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / args.steps
    peak_mem = torch.cuda.max_memory_allocated()
    tokens_per_s = args.micro_batch * args.seq / step_s
    flops_per_token = model_summary(cfg.model, args.seq)["flops_per_token"]
    compile_s = timer.total_s if timer is not None else 0.0
    if timer is not None:
        timer.close()
    attention = next((line for line in log_lines if line.startswith("attention:")), "")
    engine.destroy()
    del engine
    destroy_model_parallel()
    torch.cuda.empty_cache()
    return {"preset": preset_name, "compile": compile_blocks, "ckpt": checkpointing, "ms": step_s * 1e3,
            "tokens_per_s": tokens_per_s, "mfu": flops_per_token * tokens_per_s / peak_flops,
            "peak_gib": peak_mem / GIB, "compile_s": compile_s, "warmup_s": warmup_s, "attention": attention}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["gpt2-124m", "loop-81m"])
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", choices=["off", "on", "both"], default="both")
    ap.add_argument("--checkpointing", nargs="+", default=["none", "per-iteration"])
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 dense peak of the GPU (default: table)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device is available on this machine, so there is nothing to measure.")
        return 1

    from loop_megatron.training.distributed import init_distributed
    from loop_megatron.training.monitor import peak_flops_per_device

    init_distributed()
    peak = peak_flops_per_device(args.peak_tflops)
    if peak is None:
        print(f"gpu_bench: the peak bf16 TFLOP/s of {torch.cuda.get_device_name()} is not in the table; "
              "pass --peak-tflops.")
        return 1
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, seq {args.seq}, micro batch "
          f"{args.micro_batch}, ZeRO-0, {args.steps} timed steps after {args.warmup} warm-up; peak "
          f"{peak / 1e12:.0f} TFLOP/s\n")
    print("| preset | compile | checkpointing | ms/step | tokens/s | MFU | peak GiB | compile s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    attention = None
    for name in args.presets:
        for c in compiles:
            for ckpt in args.checkpointing:
                r = run_case(name, c, ckpt, args, peak)
                attention = attention or r["attention"]
                compile_col = f"{r['compile_s']:.1f}" if c else "-"
                print(f"| {name} | {'on' if c else 'off'} | {ckpt} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                      f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.2f} | {compile_col} |", flush=True)
    print(f"\n{attention}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
