#!/usr/bin/env python
"""Held-out loss, perplexity and bits per byte of a loop_megatron checkpoint, versus test-time compute:
the number of loops (--loops, fixed depth) and adaptive per-token exit (--exit-criterion, one row per
--exit-threshold, mean loop iterations per token reported); --plot draws loss against mean iterations.
Evaluates what the run held out: by default its own data path (or named validation sets), split, seed,
sequence length, micro batch size and index cache, read from the checkpoint's recorded config; a flag
that overrides one is printed with the run's value. Named sets (--valid-data-path NAME=PREFIX ...) are
each reported separately; bits per byte use the checkpoint's tokenizer (override: --tokenizer-type/-model).
--task accuracy instead scores exact-match greedy answers on a prompt/answer JSONL file (--tasks-file, e.g.
from tools/make_tasks.py) at each --loops count and exit threshold, per group of records with equal
metadata (--group-by; default every field but prompt and answer), with mean loop iterations per token.

Examples:
  python tools/evaluate.py --load checkpoints/loop-81m
  python tools/evaluate.py --load checkpoints/loop-81m --data-path data/sotu_text_document
  python tools/evaluate.py --load checkpoints/loop-81m --data-path data/sotu_text_document \\
      --eval-split test --loops 1 2 4 6 8 --json results/loops.json
  python tools/evaluate.py --load checkpoints/tiny-recurrent --data-path data/sotu_text_document \\
      --loops 1 2 4 8 --exit-criterion kl --exit-threshold 1e-3 1e-2 0.1 --max-loops 8 --plot curve.png
  python tools/evaluate.py --load checkpoints/tok8k --valid-data-path kjv=data/corpus8k/kjv_text_document \\
      sotu=data/corpus8k/sotu_text_document --eval-iters 20
  python tools/evaluate.py --load checkpoints/phop --task accuracy --tasks-file data/tasks/phop/test.jsonl \\
      --loops 1 2 4 8 --exit-criterion kl --exit-threshold 0.01 --prepend-eod --json results/phop_accuracy.json
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("Examples:")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Examples:" + __doc__.split("Examples:", 1)[1])
    p.add_argument("--load", required=True, metavar="CKPT_DIR", help="checkpoint: the --save folder or a tag folder.")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: 'latest').")
    p.add_argument("--task", choices=("loss", "accuracy"), default="loss",
                   help="loss: held-out loss, perplexity and bpb (default); accuracy: exact match of greedy "
                        "answers on --tasks-file.")
    p.add_argument("--tasks-file", default=None, metavar="JSONL",
                   help="--task accuracy: records with string fields prompt and answer, plus metadata to group by.")
    p.add_argument("--group-by", nargs="*", default=None, metavar="FIELD",
                   help="--task accuracy: metadata fields to report accuracy per value of (default: every field "
                        "but prompt and answer; none: only all records).")
    p.add_argument("--prepend-eod", action="store_true",
                   help="--task accuracy: start each prompt with the end-of-document token, as in data packed with "
                        "preprocessing's --append-eod, where every document follows one.")
    p.add_argument("--data-path", nargs="+", default=None,
                   help="indexed-dataset prefix(es) without .bin/.idx, optionally weighted: 0.7 a 0.3 b "
                        "(default: the run's data path, or its named validation sets).")
    p.add_argument("--valid-data-path", nargs="+", default=None, metavar="NAME=PREFIX",
                   help="named validation sets, each used whole and reported separately (instead of --data-path).")
    p.add_argument("--test-data-path", nargs="+", default=None, metavar="NAME=PREFIX",
                   help="named test sets (with --eval-split test).")
    p.add_argument("--tokenizer-type", default=None, choices=("GPT2BPETokenizer", "HuggingFaceTokenizer"),
                   help="tokenizer for bits per byte (default: the checkpoint's).")
    p.add_argument("--tokenizer-model", default=None, help="HuggingFaceTokenizer: a tokenizer.json or its folder.")
    p.add_argument("--split", default=None,
                   help="train,valid,test proportions by document (default: the run's data.split).")
    p.add_argument("--eval-split", choices=("valid", "test"), default="valid", help="split to evaluate (default valid).")
    p.add_argument("--seq-length", type=int, default=None, help="tokens per sample (default: the checkpoint's).")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="samples per forward pass (default: the run's; --task accuracy: prompts per batch, 32).")
    p.add_argument("--eval-iters", type=int, default=None,
                   help="micro-batches to evaluate (default: the whole split; the trainer's valid line is its "
                        "eval_iters global batches: eval_iters x global batch / micro batch micro-batches of the run's micro "
                        "batch size).")
    p.add_argument("--loops", type=int, nargs="+", default=None,
                   help="loop counts to evaluate at (default: the trained count); several print a table.")
    p.add_argument("--exit-criterion", choices=("none", "kl", "entropy", "gate", "delta"), default="none",
                   help="adaptive per-token exit: kl (successive next-token distributions), entropy, or gate "
                        "(the learned exit gate); one row per --exit-threshold (default none).")
    p.add_argument("--exit-threshold", type=float, nargs="+", default=[],
                   help="exit thresholds to sweep: nats for kl/entropy, a cumulative exit probability for gate.")
    p.add_argument("--max-loops", type=int, default=None,
                   help="loop cap of the exit rows (default: the largest --loops, or the trained count).")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="write loss versus mean iterations per token (default with --json and an exit criterion: "
                        "beside the JSON, .png).")
    p.add_argument("--seed", type=int, default=None, help="sample-order seed (default: the run's training.seed).")
    p.add_argument("--data-cache-path", default=None,
                   help="folder for cached sample indices (default: the run's data.data_cache_path).")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON.")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from loop_megatron.errors import LoopMegatronError
    from loop_megatron.experiments.plots import plot_compute_curve
    from loop_megatron.inference.evaluation import (describe_data, evaluate_checkpoint, exit_table, markdown_table,
                                                    write_json)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.task == "accuracy":
        return accuracy_main(args, device)
    if args.tasks_file or args.group_by is not None or args.prepend_eod:
        print("evaluate.py: error: --tasks-file, --group-by and --prepend-eod apply to --task accuracy.",
              file=sys.stderr)
        return 1
    named = args.test_data_path if args.eval_split == "test" else args.valid_data_path
    try:
        if args.data_path and named:
            raise ValueError(f"pass either --data-path or --{args.eval_split}-data-path, not both.")
        tokenizer = None
        if args.tokenizer_type or args.tokenizer_model:
            from loop_megatron.checkpoint import resolve_checkpoint, tokenizer_for

            tokenizer = tokenizer_for(checkpoint=resolve_checkpoint(args.load, args.tag),
                                      tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model)
        results, meta = evaluate_checkpoint(args.load, args.data_path, split=args.split,
                                            eval_split=args.eval_split, seq_length=args.seq_length,
                                            micro_batch_size=args.micro_batch_size, eval_iters=args.eval_iters,
                                            loops=args.loops, tag=args.tag, seed=args.seed,
                                            cache_dir=args.data_cache_path, device=device, named=named,
                                            exit_criterion=args.exit_criterion,
                                            exit_thresholds=args.exit_threshold, max_loops=args.max_loops,
                                            tokenizer=tokenizer)
    except (LoopMegatronError, ValueError) as exc:
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return 1
    trained = meta["config"]["model"]["num_loops"]
    print(f"data: {describe_data(meta['eval_data'], args.eval_split)}"
          + ("" if meta["eval_notes"] else " (the run's own settings)"))
    for note in meta["eval_notes"]:
        print(f"data: {note}")
    adaptive = args.exit_criterion != "none"
    if len(results) == 1:
        r = results[0]
        bpb = "" if r.bpb is None else f" | bpb {r.bpb:.4f}"
        print(f"{r.name} loss {r.loss:.4f} | perplexity {r.perplexity:.2f}{bpb} | loops {r.loops} | "
              f"{r.tokens} tokens in {r.batches} batches")
    elif adaptive:
        where = describe_data(meta["eval_data"], args.eval_split)
        print(f"{where} ({results[0].tokens} tokens per row; "
              f"fixed-depth rows, then {args.exit_criterion} exit per threshold)\n")
        print(exit_table(results))
    else:
        where = describe_data(meta["eval_data"], args.eval_split)
        print(f"{where} (* = trained loop count)\n")
        print(markdown_table(results, trained_loops=trained))
    if args.json:
        write_json(results, args.json, checkpoint=meta["path"], iteration=meta.get("iteration"),
                   data_path=meta["eval_data"]["data_path"], named_sets=meta["eval_data"]["named"],
                   split=meta["eval_data"]["split"], seed=meta["eval_data"]["seed"], eval_split=args.eval_split,
                   trained_loops=trained)
    plot = args.plot or (args.json.rsplit(".", 1)[0] + ".png" if args.json and adaptive else None)
    if plot:
        plot_compute_curve(results, plot, title=f"{os.path.basename(os.path.normpath(args.load))}: "
                                                 f"{args.eval_split} loss vs test-time compute")
        print(f"wrote {plot}")
    return 0


# Flags of --task loss that --task accuracy does not read (it evaluates --tasks-file whole).
LOSS_ONLY = ("data_path", "valid_data_path", "test_data_path", "split", "seq_length", "eval_iters", "plot", "seed",
             "data_cache_path")


def accuracy_main(args, device: str) -> int:
    from loop_megatron.errors import LoopMegatronError
    from loop_megatron.inference.accuracy import accuracy_table, evaluate_accuracy_checkpoint
    from loop_megatron.inference.evaluation import write_json

    try:
        given = [f"--{k.replace('_', '-')}" for k in LOSS_ONLY if getattr(args, k) is not None]
        if given or args.eval_split != "valid":
            raise ValueError(f"{', '.join(given or ['--eval-split'])}: not used by --task accuracy "
                             "(it evaluates --tasks-file whole).")
        if not args.tasks_file:
            raise ValueError("--task accuracy needs --tasks-file (JSONL records with prompt and answer).")
        results, info = evaluate_accuracy_checkpoint(
            args.load, args.tasks_file, tag=args.tag, loops=args.loops, exit_criterion=args.exit_criterion,
            exit_thresholds=args.exit_threshold, max_loops=args.max_loops, batch_size=args.micro_batch_size or 32,
            group_by=args.group_by, device=device, tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model, prepend_eod=args.prepend_eod)
    except (LoopMegatronError, ValueError) as exc:
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return 1
    for note in info["notes"]:
        print(f"note: {note}")
    print(f"{info['tasks_file']}: {info['records']} records, exact match of greedy answers in percent "
          f"(* = trained loop count; exit columns: mean loop iterations per token)\n")
    print(accuracy_table(results, trained_loops=info["trained_loops"]))
    if args.json:
        write_json(results, args.json, **info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
