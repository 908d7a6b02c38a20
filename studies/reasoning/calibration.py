"""The reasoning study's calibration probes: can the trainer teach a small model the task at this budget?

Three tasks: on p-hop prompts ("p:" + sequence + "="), `last-letter` (the answer is the sequence's last
letter: one attention step to the previous token, a check of the format and the data pipeline) and `phop`
(at chosen hops, length and alphabet); and `chain` (pointer chasing, loop_megatron/data/tasks.py, at chosen
hops and nodes). Each document setting is trained through
the real trainer (`python -m loop_megatron.train`, the study's windows: 32 x 64 tokens of packed records,
constant LR after 20 warm-up steps) with and without Megatron's `--reset-position-ids --reset-attention-mask`,
and the answer loss is tabulated every `--window` steps (the mean over the window, from each run's
metrics.jsonl). A setting under which a model does not leave the plateau within the study's step budget
cannot calibrate the study.

    python -m studies.reasoning.calibration                                   # last-letter, both settings
    python -m studies.reasoning.calibration --task phop --hops 1 --steps 1000 --lr 2e-3 --settings apart
    python -m studies.reasoning.calibration --task chain --hops 1 2 3 --nodes 12 --steps 600 --settings apart

Writes OUT/<name>.md (the table; name from the arguments, or --name) and OUT/runs/<name>/<setting>/
{metrics.jsonl,summary.json,config.yaml}; data and checkpoints go to --work/<name> (gitignored data/).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
from typing import Dict, List, Optional, Sequence

from loop_megatron.data.tasks import chain_ends, chain_example, phop_example, write_jsonl
from loop_megatron.experiments.driver import StudyDriver, StudyError
from loop_megatron.utils.fs import write_text

SETTINGS = {
    "one-text": ("packed as one text", []),
    "apart": ("documents kept apart", ["--reset-position-ids", "--reset-attention-mask"]),
}
"""Setting name -> (table heading, trainer flags)."""


def probe_records(task: str, count: int, hops: Sequence[int], length: int, alphabet: int, seed: int,
                  nodes: int = 12) -> List[Dict]:
    """p-hop records (hop counts drawn uniformly from `hops`), or with task 'last-letter' the same prompts
    answered by the sequence's last letter, or with task 'chain' pointer-chasing records of `nodes` pointers."""
    rng = random.Random(f"calibration/{task}/{seed}")
    out = []
    for _ in range(count):
        if task == "chain":
            rec = chain_example(rng, rng.choice(list(hops)), nodes)
            out.append({"prompt": rec["prompt"], "answer": rec["answer"]})
            continue
        rec = phop_example(rng, rng.choice(list(hops)), length, alphabet)
        out.append({"prompt": rec["prompt"], "answer": rec["prompt"][-2] if task == "last-letter" else rec["answer"]})
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
    p.add_argument("--task", choices=("last-letter", "phop", "chain"), default="last-letter")
    p.add_argument("--hops", type=int, nargs="+", default=[1], help="p-hop counts of the records (default 1)")
    p.add_argument("--length", type=int, default=16, help="letters per sequence (default 16, the study's)")
    p.add_argument("--alphabet", type=int, default=4, help="p-hop: letters drawn from (default 4, the study's)")
    p.add_argument("--nodes", type=int, default=12, help="chain: pointers per prompt (default 12)")
    p.add_argument("--settings", choices=("both", *SETTINGS), default="both")
    p.add_argument("--preset", default="tiny-4l", help="the model (default tiny-4l, the study's kL x 1 arm)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--window", type=int, default=50, help="steps per averaged table row")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--name", default="", help="output name (default: from the task and its knobs)")
    p.add_argument("--out", default="results/reasoning/calibration", help="tables and run records")
    p.add_argument("--work", default="data/reasoning-calibration", help="data, run folders, checkpoints")
    args = p.parse_args(argv)
    knobs = f"h{'-'.join(map(str, args.hops))}-" + (f"n{args.nodes}" if args.task == "chain"
                                                      else f"l{args.length}-a{args.alphabet}")
    name = args.name or (f"{args.task}" + ("" if args.task == "last-letter" and knobs == "h1-l16-a4" else f"-{knobs}")
                         + ("" if args.preset == "tiny-4l" else f"-{args.preset}")
                         + ("" if (args.lr, args.steps) == (1e-3, 200) else f"-lr{args.lr:g}-{args.steps}"))
    work = os.path.join(args.work, name)
    driver = StudyDriver(os.path.join(work, "runs"), os.path.join(work, "checkpoints"))
    data = os.path.join(work, "data")
    settings = list(SETTINGS) if args.settings == "both" else [args.settings]
    try:
        if not os.path.isfile(os.path.join(data, "train_prompt_answer_document.loss_mask.idx")):
            os.makedirs(data, exist_ok=True)
            driver.run([*driver.tool("make_tasks.py"), "phop", "--out", os.path.join(data, "tok"), "--hops", "1",
                        "--length", "16", "--train", "10", "--valid", "1", "--test", "1"],
                       os.path.join(work, "runs", "make_tasks.log"))  # only for its tokenizer
            write_jsonl(os.path.join(data, "train.jsonl"), probe_records(
                args.task, args.records, args.hops, args.length, args.alphabet, args.seed, args.nodes))
            driver.run([*driver.tool("preprocess_data.py"), "--input", os.path.join(data, "train.jsonl"),
                        "--prompt-key", "prompt", "--answer-key", "answer", "--append-eod",
                        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", os.path.join(data, "tok"),
                        "--output-prefix", os.path.join(data, "train"), "--no-progress"],
                       os.path.join(work, "runs", "preprocess.log"))
        tables = {}
        for setting in settings:
            heading, flags = SETTINGS[setting]
            cmd = [driver.python, "-m", "loop_megatron.train", "--preset", args.preset, *flags,
                   "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", os.path.join(data, "tok"),
                   "--override", "model.vocab_size=40", "--data-path", os.path.join(data, "train_prompt_answer_document"),
                   "--split", "1,0,0", "--seq-length", "64", "--micro-batch-size", "32", "--global-batch-size", "32",
                   "--train-iters", str(args.steps), "--lr", f"{args.lr:g}", "--min-lr", f"{args.lr:g}",
                   "--lr-warmup-iters", "20", "--seed", str(args.seed), "--zero-stage", "0",
                   "--eval-interval", str(args.steps * 10), "--log-interval", str(args.window),
                   "--save", driver.ckpt_dir(setting), "--load", driver.ckpt_dir(setting),
                   "--save-interval", str(args.steps), "--keep-last", "1", "--run-dir", driver.run_dir(setting)]
            driver.train(setting, cmd, args.steps, args.lr, f"[{name}]", heading)
            tables[heading] = window_means(os.path.join(driver.run_dir(setting), "metrics.jsonl"), args.window)
            dest = os.path.join(args.out, "runs", name, setting)
            os.makedirs(dest, exist_ok=True)
            for f in ("metrics.jsonl", "summary.json", "config.yaml"):
                shutil.copyfile(os.path.join(driver.run_dir(setting), f), os.path.join(dest, f))
    except StudyError as err:
        print(f"calibration: error: {err}", file=sys.stderr)
        return 1
    ends = sorted(set().union(*tables.values()))
    if args.task == "chain":
        sample = probe_records("chain", 1000, args.hops, args.length, args.alphabet, args.seed, args.nodes)
        chains = sum(chain_ends(r["prompt"]) for r in sample) / len(sample)
        what = f"chain, hops {', '.join(map(str, args.hops))} ({args.nodes} nodes)"
        chance = f"ln({chains:.2f}) / 2 = {math.log(chains) / 2:.3f} is a chain end guessed uniformly (mean chains per prompt)"
    else:
        what = ("answer = the last letter of a p-hop prompt" if args.task == "last-letter" else
                f"p-hop, hops {', '.join(map(str, args.hops))}") + f" (length {args.length}, alphabet {args.alphabet})"
        chance = f"ln({args.alphabet}) / 2 = {math.log(args.alphabet) / 2:.3f} is the letter guessed uniformly"
    lines = [f"{what}; {args.preset}, 32 x 64-token windows, LR "
             f"{args.lr:g} (20 warm-up steps, constant), seed {args.seed}, {args.records:,} records; mean answer loss "
             f"(the letter and its end-of-document token) per {args.window} steps. {chance}. "
             f"Command: `python -m studies.reasoning.calibration "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`.",
             "", "| steps | " + " | ".join(tables) + " |", "|---|" + "---:|" * len(tables)]
    for end in ends:
        cells = [f"{t[end]:.3f}" if end in t else "–" for t in tables.values()]
        lines.append(f"| {end - args.window + 1}-{end} | " + " | ".join(cells) + " |")
    write_text(os.path.join(args.out, f"{name}.md"), "\n".join(lines) + "\n", make_parent=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
