"""The reasoning study's format check: can the trainer teach a small model the task *format* at all?

The task is the study's own p-hop prompts (same generator, length and alphabet) with the answer replaced by
the last letter of the sequence, which a single attention step to the previous token solves. Each document
setting is trained through the real trainer (`python -m loop_megatron.train`, the study's arm `4L` settings:
tiny-4l, 32 x 64-token windows of packed records) with and without Megatron's `--reset-position-ids
--reset-attention-mask`, and the answer loss is tabulated every `--window` steps (mean over the window, from
each run's metrics.jsonl). A setting under which even this does not leave the plateau in a few hundred steps
cannot calibrate the p-hop study.

    python -m studies.reasoning.calibration --out results/reasoning/calibration        # ~6 CPU-minutes

Writes OUT/calibration.md (the table) and OUT/runs/<setting>/{metrics.jsonl,summary.json,config.yaml};
the data and checkpoints go to --work (default data/reasoning-calibration).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from typing import Dict, List, Optional, Sequence

from loop_megatron.data.tasks import phop_example, write_jsonl
from loop_megatron.experiments.driver import StudyDriver, StudyError
from loop_megatron.utils.fs import write_text

SETTINGS = {
    "packed as one text": [],
    "documents kept apart": ["--reset-position-ids", "--reset-attention-mask"],
}


def last_letter_records(count: int, length: int, alphabet: int, seed: int) -> List[Dict]:
    """p-hop prompts ("1:" + sequence + "=") whose answer is the sequence's last letter."""
    rng = random.Random(f"calibration/{seed}")
    out = []
    for _ in range(count):
        rec = phop_example(rng, 1, length, alphabet)
        out.append({"prompt": rec["prompt"], "answer": rec["prompt"][-2]})
    return out


def window_means(metrics_path: str, window: int) -> Dict[int, float]:
    """{last step of each window: mean training loss over it} from a run's metrics.jsonl."""
    losses = {}
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row and "iteration" in row:
                losses[int(row["iteration"])] = float(row["loss"])
    steps = sorted(losses)
    return {end: sum(losses[s] for s in steps if end - window < s <= end) / window
            for end in range(window, (steps[-1] if steps else 0) + 1, window)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/reasoning/calibration", help="table and run records")
    p.add_argument("--work", default="data/reasoning-calibration", help="data, run folders, checkpoints")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--window", type=int, default=50, help="steps per averaged table row")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    driver = StudyDriver(os.path.join(args.work, "runs"), os.path.join(args.work, "checkpoints"))
    data = os.path.join(args.work, "data")
    try:
        if not os.path.isfile(os.path.join(data, "train_prompt_answer_document.loss_mask.idx")):
            os.makedirs(data, exist_ok=True)
            driver.run([*driver.tool("make_tasks.py"), "phop", "--out", os.path.join(data, "tok"), "--hops", "1",
                        "--length", "16", "--train", "10", "--valid", "1", "--test", "1"],
                       os.path.join(args.work, "runs", "make_tasks.log"))  # only for its tokenizer
            write_jsonl(os.path.join(data, "train.jsonl"), last_letter_records(args.records, 16, 4, args.seed))
            driver.run([*driver.tool("preprocess_data.py"), "--input", os.path.join(data, "train.jsonl"),
                        "--prompt-key", "prompt", "--answer-key", "answer", "--append-eod",
                        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", os.path.join(data, "tok"),
                        "--output-prefix", os.path.join(data, "train"), "--no-progress"],
                       os.path.join(args.work, "runs", "preprocess.log"))
        tables = {}
        for setting, flags in SETTINGS.items():
            name = "apart" if flags else "one-text"
            cmd = [driver.python, "-m", "loop_megatron.train", "--preset", "tiny-4l", *flags,
                   "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", os.path.join(data, "tok"),
                   "--override", "model.vocab_size=40", "--data-path", os.path.join(data, "train_prompt_answer_document"),
                   "--split", "1,0,0", "--seq-length", "64", "--micro-batch-size", "32", "--global-batch-size", "32",
                   "--train-iters", str(args.steps), "--lr", f"{args.lr:g}", "--min-lr", f"{args.lr:g}",
                   "--lr-warmup-iters", "20", "--seed", str(args.seed), "--zero-stage", "0",
                   "--eval-interval", str(args.steps * 10), "--log-interval", str(args.window),
                   "--save", driver.ckpt_dir(name), "--load", driver.ckpt_dir(name), "--save-interval", str(args.steps),
                   "--keep-last", "1", "--run-dir", driver.run_dir(name)]
            driver.train(name, cmd, args.steps, args.lr, f"[{name}]", setting)
            tables[setting] = window_means(os.path.join(driver.run_dir(name), "metrics.jsonl"), args.window)
            dest = os.path.join(args.out, "runs", name)
            os.makedirs(dest, exist_ok=True)
            for f in ("metrics.jsonl", "summary.json", "config.yaml"):
                shutil.copyfile(os.path.join(driver.run_dir(name), f), os.path.join(dest, f))
    except StudyError as err:
        print(f"calibration: error: {err}", file=sys.stderr)
        return 1
    ends = sorted(set().union(*tables.values()))
    lines = [f"Answer = the last letter of a p-hop prompt (length 16, alphabet 4); tiny-4l, 32 x 64-token windows, "
             f"LR {args.lr:g} (20 warm-up steps, constant), seed {args.seed}; mean answer loss (the letter and its "
             f"end-of-document token) per {args.window} steps. ln(4) / 2 = 0.693 is the letter guessed uniformly.",
             "", "| steps | " + " | ".join(SETTINGS) + " |", "|---|" + "---:|" * len(SETTINGS)]
    for end in ends:
        cells = [f"{tables[s][end]:.3f}" if end in tables[s] else "–" for s in SETTINGS]
        lines.append(f"| {end - args.window + 1}-{end} | " + " | ".join(cells) + " |")
    write_text(os.path.join(args.out, "calibration.md"), "\n".join(lines) + "\n", make_parent=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
