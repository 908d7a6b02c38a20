#!/usr/bin/env python
"""Write seeded synthetic reasoning tasks as prompt/answer JSONL, plus their character-level tokenizer.

OUT/train.jsonl and OUT/valid.jsonl draw the trained levels (--hops x --length, or --operands x --digits),
OUT/test.jsonl the test levels (--test-hops ... or --test-operands ..., normally harder than trained, plus the trained ones for
comparison); --train/--valid/--test records per level. Each record: {"prompt", "answer", "task", and the
knobs: hops, length, alphabet | hops, nodes | operands, digits, reversed}. Valid and test prompts are distinct and never
in an earlier split (checked). OUT/tokenizer.json is the task tokenizer (one token per character,
<|endoftext|> = 0): preprocess and train with --tokenizer-type HuggingFaceTokenizer --tokenizer-model OUT.
OUT/tasks.json records the settings and counts. The task definitions are in loop_megatron/data/tasks.py.

Examples:
  python tools/make_tasks.py phop --out data/tasks/phop --hops 1 2 3 4 --test-hops 1 2 3 4 6 8 --length 64
  python tools/make_tasks.py chain --out data/tasks/chain --hops 1 2 3 --test-hops 1 2 3 4 6 8 --nodes 12
  python tools/make_tasks.py addition --out data/tasks/add --operands 2 3 4 --test-operands 2 3 4 6 8 \\
      --digits 2 --reverse-answer --train 20000 --seed 2
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loop_megatron.data.tasks import LETTERS, level_name, make_splits, task_levels, write_task_files
from loop_megatron.errors import LoopMegatronError


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="make_tasks.py", description=__doc__.split("Examples:")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Examples:" + __doc__.split("Examples:", 1)[1])
    sub = p.add_subparsers(dest="task", required=True, metavar="{phop,chain,addition}")
    phop = sub.add_parser("phop", help="p-hop induction: follow p 'previous occurrence, next symbol' hops.")
    phop.add_argument("--hops", type=int, nargs="+", default=[1, 2, 3, 4], help="trained hop counts (default 1 2 3 4).")
    phop.add_argument("--test-hops", type=int, nargs="+", default=None,
                      help="test hop counts (default: --hops, then 1.5x and 2x the largest).")
    phop.add_argument("--length", type=int, nargs="+", default=[64], help="trained sequence lengths (default 64).")
    phop.add_argument("--test-length", type=int, nargs="+", default=None,
                      help="test sequence lengths (default --length).")
    phop.add_argument("--alphabet", type=int, default=4,
                      help=f"letters in the alphabet, 3 to {len(LETTERS)} (default 4).")
    chain = sub.add_parser("chain", help="pointer chasing: follow position pointers from position 0 to a chain's end.")
    chain.add_argument("--hops", type=int, nargs="+", default=[1, 2, 3], help="trained chain lengths (default 1 2 3).")
    chain.add_argument("--test-hops", type=int, nargs="+", default=None,
                       help="test chain lengths (default: --hops, then 1.5x and 2x the largest).")
    chain.add_argument("--nodes", type=int, default=12,
                       help=f"pointers per prompt, the same at every level (default 12; hops + 3 to {len(LETTERS)}).")
    add = sub.add_parser("addition", help="multi-operand addition of d-digit numbers.")
    add.add_argument("--operands", type=int, nargs="+", default=[2, 3, 4],
                     help="trained operand counts (default 2 3 4).")
    add.add_argument("--test-operands", type=int, nargs="+", default=None,
                     help="test operand counts (default: --operands, then 1.5x and 2x the largest).")
    add.add_argument("--digits", type=int, nargs="+", default=[2], help="trained digits per operand (default 2).")
    add.add_argument("--test-digits", type=int, nargs="+", default=None,
                     help="test digits per operand (default --digits).")
    add.add_argument("--reverse-answer", action="store_true",
                     help="write the sum least significant digit first (learnable by small models).")
    for s in (phop, chain, add):
        s.add_argument("--out", required=True, metavar="DIR", help="folder to write into (created).")
        s.add_argument("--train", type=int, default=10000, help="train records per trained level (default 10000).")
        s.add_argument("--valid", type=int, default=200, help="valid records per trained level (default 200).")
        s.add_argument("--test", type=int, default=200, help="test records per test level (default 200).")
        s.add_argument("--seed", type=int, default=1,
                       help="base seed; each split and level derives its own (default 1).")
    return p.parse_args(argv)


def _harder(values):
    """The values, then 1.5x and 2x the largest (the default test levels)."""
    top = max(values)
    return sorted(set(values) | {(3 * top + 1) // 2, 2 * top})


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.task == "phop":
        train = task_levels("phop", hops=args.hops, length=args.length)
        test = task_levels("phop", hops=args.test_hops or _harder(args.hops), length=args.test_length or args.length)
        options = {"alphabet": args.alphabet}
    elif args.task == "chain":
        train = task_levels("chain", hops=args.hops, nodes=[args.nodes])
        test = task_levels("chain", hops=args.test_hops or _harder(args.hops), nodes=[args.nodes])
        options = {}
    else:
        train = task_levels("addition", operands=args.operands, digits=args.digits)
        test = task_levels("addition", operands=args.test_operands or _harder(args.operands),
                           digits=args.test_digits or args.digits)
        options = {"reverse": args.reverse_answer}
    counts = {"train": args.train, "valid": args.valid, "test": args.test}
    try:
        if min(counts.values()) < 0:
            raise ValueError("--train, --valid and --test must be >= 0.")
        splits = make_splits(args.task, train, test, counts, args.seed, **options)
        settings = {"task": args.task, "seed": args.seed, "train_levels": train, "test_levels": test,
                    "per_level": counts, **options}
        paths = write_task_files(args.out, splits, settings)
    except (LoopMegatronError, ValueError) as exc:
        print(f"make_tasks.py: error: {exc}", file=sys.stderr)
        return 1
    trained = {level_name(level) for level in train}
    print("| split | level | records |\n|:---|:---|---:|")
    for split, records in splits.items():
        for level in (test if split == "test" else train):
            name = level_name(level)
            mark = "" if name in trained else " (harder than trained)"
            n = sum(1 for r in records if all(r[k] == v for k, v in level.items()))
            print(f"| {split} | {name}{mark} | {n} |")
    for split in splits:
        print(f"wrote {paths[split]} ({len(splits[split])} records)")
    print(f"wrote {paths['tokenizer']} (character-level, <|endoftext|> = 0) and {paths['manifest']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
