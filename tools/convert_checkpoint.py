#!/usr/bin/env python
"""Convert loop_megatron checkpoints to Hugging Face folders, and Hugging Face GPT-2 folders back.

Examples:
  # ours -> HF (latest tag; plain GPT2LMHeadModel when ungated, else the loop_gpt remote-code model)
  python tools/convert_checkpoint.py --input checkpoints/loop-81m --output hf/loop-81m
  python tools/convert_checkpoint.py --input checkpoints/loop-81m --tag iter_0005000 --output hf/loop-81m --dtype bf16
  # HF -> ours (a local GPT-2 folder becomes a baseline checkpoint; our exported folders come back looped)
  python tools/convert_checkpoint.py --from-hf /models/gpt2 --output checkpoints/gpt2-import
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description="Convert a loop_megatron checkpoint (any TP size / ZeRO stage: reads the consolidated\n"
                    "model.pt) to a Hugging Face model folder, or a local Hugging Face GPT-2 folder to a\n"
                    "loop_megatron checkpoint. Works offline.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Examples:", 1)[1].join(["Examples:", ""]))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="CKPT_DIR",
                     help="loop_megatron checkpoint: the --save folder (uses its 'latest' file) or one tag folder.")
    src.add_argument("--from-hf", metavar="HF_DIR",
                     help="local Hugging Face folder (GPT2LMHeadModel, or a loop_gpt folder exported by this tool) "
                          "to convert into a loop_megatron checkpoint.")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="HF folder to write (with --input) or checkpoint folder to write (with --from-hf).")
    p.add_argument("--tag", default=None, help="checkpoint tag to convert, e.g. iter_0000100 (default: 'latest').")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="HF weight dtype (default fp32).")
    p.add_argument("--format", choices=("auto", "gpt2", "loop_gpt"), default="auto",
                   help="auto: plain unrolled GPT2LMHeadModel when the loop has no gates (or all gates are one), "
                        "else the custom loop_gpt architecture (trust_remote_code=True).")
    p.add_argument("--iteration", type=int, default=0, metavar="N", help="iteration number of the checkpoint written by --from-hf.")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128, metavar="N",
                   help="vocab padding of the checkpoint written by --from-hf (default 128, Megatron's).")
    p.add_argument("--tokenizer-type", default=None, choices=("GPT2BPETokenizer", "HuggingFaceTokenizer"),
                   help="tokenizer written into the HF folder (default: the checkpoint's; GPT-2 for old checkpoints).")
    p.add_argument("--tokenizer-model", default=None, help="HuggingFaceTokenizer: a tokenizer.json or its folder.")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder.")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from loop_megatron.errors import LoopMegatronError
    from loop_megatron.hf.convert import ConversionError, convert_checkpoint_to_hf, convert_hf_to_checkpoint

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        if args.input:
            tokenizer = None
            if args.tokenizer_type or args.tokenizer_model:
                from loop_megatron.checkpoint import resolve_checkpoint, tokenizer_for

                tokenizer = tokenizer_for(checkpoint=resolve_checkpoint(args.input, args.tag),
                                          tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model)
            fmt = convert_checkpoint_to_hf(args.input, args.output, tag=args.tag, dtype=args.dtype, fmt=args.format,
                                           overwrite=args.overwrite, tokenizer=tokenizer)
            if fmt == "gpt2":
                print(f"wrote {args.output}: GPT2LMHeadModel (unrolled), "
                      f"load with AutoModelForCausalLM.from_pretrained({args.output!r})")
            else:
                print(f"wrote {args.output}: loop_gpt custom architecture, load with "
                      f"AutoModelForCausalLM.from_pretrained({args.output!r}, trust_remote_code=True)")
        else:
            out = args.output
            if os.path.exists(out) and os.listdir(out) and not args.overwrite:
                raise ConversionError(f"{out}: already exists and is not empty; pass --overwrite to replace it.")
            folder, how = convert_hf_to_checkpoint(args.from_hf, out, iteration=args.iteration,
                                                   make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
            print(f"wrote {folder}: {how} (weights only, no optimizer state: start training from it with the "
                  f"trainer's --finetune/init-from option rather than resuming)")
    except LoopMegatronError as exc:
        print(f"convert_checkpoint.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
