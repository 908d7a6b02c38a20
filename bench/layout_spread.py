"""How far layouts of one training run drift apart: the numbers behind the equality tests' tolerances.

Runs the layouts of tests/training/test_equivalence.py (ZeRO 0-3, TP=2, checkpointing, DP=2 vs accumulation)
and tests/training/test_recipe_training.py (the recurrent-depth recipe), and those of
tests/training/test_sequence_parallel_training.py (--sequence-parallel; suite sequence_parallel), for several seeds and prints, per
compared pair, the largest difference of any step's loss and of any final weight. The tests' bounds are
about 10x the largest value this prints (their comments quote it); rerun it after changing their settings.
Two more suites measure the resume tests: `resume` (tests/training/test_checkpointing.py: a run resumed on
its own layout against the uninterrupted one) and `universal` (tests/checkpoint/test_universal.py: one step
after a resume on another layout, the relative difference of the moments and weights, and the absolute one
of the noise-level elements).

    python bench/layout_spread.py --seeds 1 2 3 4 5 6          # every suite (about 20 minutes on 2 cores)
    python bench/layout_spread.py --suite resume universal --seeds 1 2 3
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.dist_utils import run_distributed  # noqa: E402
from tests.checkpoint import test_universal as universal  # noqa: E402
from tests.training import test_checkpointing as checkpointing  # noqa: E402
from tests.training import test_equivalence as equivalence  # noqa: E402
from tests.training import test_recipe_training as recipe  # noqa: E402
from tests.training import test_sequence_parallel_training as sequence_parallel  # noqa: E402
from tests.training.helpers import tiny_config, write_corpus  # noqa: E402

# suite -> (world-2 runs, world-1 runs, base settings, [(run, reference)])
SUITES = {
    "equivalence": (
        {k: v for k, v in equivalence.WORLD2_RUNS.items() if not k.startswith("bf16")}, equivalence.WORLD1_RUNS,
        {"training.global_batch_size": 4, "training.train_iters": equivalence.STEPS},
        [(n, "zero0") for n in ("zero1", "zero2", "zero3", "tp2", "tp2_zero3_per_block", "zero0_no_ckpt",
                                "dp1_accum2")]),
    "recipe": (
        recipe.WORLD2_RUNS, recipe.WORLD1_RUNS, recipe.RECIPE,
        [("zero3", "zero0"), ("zero0_ckpt", "zero0"), ("tp2", "dp1"), ("tp2_zero3_ckpt", "dp1"),
         ("perseq_zero3_ckpt", "perseq_zero0")]),
    "sequence_parallel": (
        sequence_parallel.WORLD2_RUNS, sequence_parallel.WORLD1_RUNS, sequence_parallel.BASE,
        [(a, b) for a, b, _ in sequence_parallel.PAIRS]),
}


def _worker(rank, world_size, root, prefix, base, runs, seed):
    from loop_megatron.training import RunOptions, pretrain

    out = {}
    for name, overrides in runs.items():
        cfg = tiny_config(prefix, os.path.join(root, name), **{**base, **overrides, "training.seed": seed})
        result = pretrain(cfg, RunOptions(), return_state_dict=True)
        out[name] = {"losses": [r["loss"] for r in result["records"] if "loss" in r],
                     "state_dict": result["state_dict"] if rank == 0 else None}
    return out


def spread(suite: str, seed: int):
    """[(pair, max loss difference, max weight difference)] of one seed."""
    runs2, runs1, base, pairs = SUITES[suite]
    root = tempfile.mkdtemp(prefix=f"spread-{suite}-{seed}-")
    prefix = write_corpus(os.path.join(root, "data"))
    res = dict(run_distributed(_worker, 2, root, prefix, base, runs2, seed)[0])
    res.update(run_distributed(_worker, 1, root, prefix, base, runs1, seed)[0])
    rows = []
    for a, b in pairs:
        dl = max(abs(x - y) for x, y in zip(res[a]["losses"], res[b]["losses"]))
        sa, sb = res[a]["state_dict"], res[b]["state_dict"]
        dw = max((sa[k] - sb[k]).abs().max().item() for k in sb)
        rows.append((f"{a} vs {b}", dl, dw))
    return rows


def resume_spread(seed: int):
    """test_checkpointing's pairs: [(layout resumed vs uninterrupted, max loss difference, max weight difference)]."""
    root = tempfile.mkdtemp(prefix=f"spread-resume-{seed}-")
    prefix = write_corpus(os.path.join(root, "data"))
    out = run_distributed(checkpointing._worker, 2, root, prefix, seed)[0]
    rows = []
    for layout, r in out.items():
        full = {rec["iteration"]: rec["loss"] for rec in r["full"]["records"]}
        dl = max(abs(rec["loss"] - full[rec["iteration"]]) for rec in r["resumed"]["records"])
        sa, sb = r["resumed"]["state_dict"], r["full"]["state_dict"]
        dw = max((sa[k] - sb[k]).abs().max().item() for k in sb)
        rows.append((f"{layout} resumed vs uninterrupted", dl, dw))
    return rows


def universal_spread(seed: int):
    """test_universal's cross-layout resumes, one step after the resume: [(pair, loss difference,
    moments' largest relative difference, weights' (above noise) largest relative difference, noise-level
    weights' largest absolute difference)]."""
    root = tempfile.mkdtemp(prefix=f"spread-universal-{seed}-")
    prefix = write_corpus(os.path.join(root, "data"))
    out = run_distributed(universal._worker, 2, root, prefix, seed)[0]
    rows = []
    for source, target, _ in universal.RESUMES:
        key = f"{source}->{target}"
        _, ref = universal._universal(os.path.join(root, source, "ck", "iter_0000003"))
        _, got = universal._universal(os.path.join(root, "resumed", key, "iter_0000003"))
        ref_loss = {r["iteration"]: r["loss"] for r in out["sources"][source]["records"]}[3]
        (rec,) = out["resumed"][key]["records"]
        moments = weights = noise_abs = 0.0
        for name in ref:
            a, b = got[name], ref[name]
            moments = max(moments, universal._rel(a["exp_avg"], b["exp_avg"]),
                          universal._rel(a["exp_avg_sq"], b["exp_avg_sq"]))
            noise = b["exp_avg_sq"].sqrt() < 1e-9
            weights = max(weights, universal._rel(a["fp32"][~noise], b["fp32"][~noise]))
            if noise.any():
                noise_abs = max(noise_abs, float((a["fp32"][noise] - b["fp32"][noise]).abs().max()))
        rows.append((key, abs(rec["loss"] - ref_loss), moments, weights, noise_abs))
    return rows


def _print_worst(title: str, header: str, worst) -> None:
    print(f"\n{title}: largest difference\n")
    print(header)
    for pair, values in worst.items():
        print(f"| {pair} | " + " | ".join(f"{v:.1e}" for v in values) + " |")
    print()


RESUME_SUITES = {
    "resume": (resume_spread, "| pair | loss | weights |\n|---|---:|---:|"),
    "universal": (universal_spread, "| resume | loss | moments (rel) | weights (rel) | noise-level weights (abs) |\n"
                                    "|---|---:|---:|---:|---:|"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--suite", choices=sorted(SUITES) + sorted(RESUME_SUITES), nargs="+",
                        default=sorted(SUITES) + sorted(RESUME_SUITES))
    args = parser.parse_args()
    for suite in args.suite:
        if suite in RESUME_SUITES:
            measure, header = RESUME_SUITES[suite]
            worst = {}
            for seed in args.seeds:
                for pair, *values in measure(seed):
                    print(f"[{suite}] seed {seed}: {pair}: " + ", ".join(f"{v:.2e}" for v in values), flush=True)
                    worst[pair] = [max(a, b) for a, b in zip(worst.get(pair, [0.0] * len(values)), values)]
            _print_worst(f"{suite} (seeds {' '.join(map(str, args.seeds))})", header, worst)
            continue
        worst = {}
        for seed in args.seeds:
            for pair, dl, dw in spread(suite, seed):
                print(f"[{suite}] seed {seed}: {pair}: loss {dl:.2e}, weights {dw:.2e}", flush=True)
                old = worst.get(pair, (0.0, 0.0))
                worst[pair] = (max(old[0], dl), max(old[1], dw))
        print(f"\n{suite} (seeds {' '.join(map(str, args.seeds))}): largest difference\n")
        print("| pair | loss | weights |\n|---|---:|---:|")
        for pair, (dl, dw) in worst.items():
            print(f"| {pair} | {dl:.1e} | {dw:.1e} |")
        print()


if __name__ == "__main__":
    main()
