#!/usr/bin/env python
"""Loss curves and a results table from training runs; loss vs. loops from tools/evaluate.py outputs.

    python tools/plot_runs.py runs/small/* --out results/small
    python tools/plot_runs.py runs/small --out results/small --eval-json 'results/small/eval/*.json'
    python tools/plot_runs.py --out results/loops --eval-json a.json b.json      # loss vs. loops only

Writes OUT/loss_curves.png (train and valid loss, one line per run), OUT/results.md (the table: params,
unique layers, loops, effective depth, tokens seen, final losses, tokens/s, step time relative to the
1-layer baseline) and, with --eval-json, OUT/loss_vs_loops.png and OUT/loss_vs_loops.md.
The logic lives in loop_megatron/experiments/.
"""
import sys

import _bootstrap  # noqa: F401  (repo root on sys.path)

from loop_megatron.experiments.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="plot_runs.py"))
