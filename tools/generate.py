#!/usr/bin/env python
"""Sample text from a loop_megatron checkpoint (its own tokenizer, KV cache across loop iterations).

Several prompts (--prompt repeated, or --prompt-file) run as one left-padded batch: pads are masked out and
positions count real tokens only, so each prompt's greedy continuation is the one it gets alone. With
sampling the batch shares one seeded generator, so a row's draw differs from a run of that prompt alone.

Examples:
  python tools/generate.py --load checkpoints/loop-81m --prompt "The state of the Union is" --max-new-tokens 50
  python tools/generate.py --load checkpoints/loop-81m --prompt "Fellow citizens" --temperature 0   # greedy
  python tools/generate.py --load checkpoints/loop-81m --prompt "We" --top-p 0.9 --seed 1 --loops 8
  python tools/generate.py --load checkpoints/tiny-recurrent --prompt "We" --temperature 0 \\
      --exit-criterion kl --exit-threshold 0.01 --max-loops 16 --show-iterations
  python tools/generate.py --load checkpoints/loop-81m --prompt "We the people" --prompt "Tonight" --temperature 0
  python tools/generate.py --load checkpoints/loop-81m --prompt-file prompts.txt --temperature 0  # one per line
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="generate.py", description=__doc__.split("Examples:")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Examples:" + __doc__.split("Examples:", 1)[1])
    p.add_argument("--load", required=True, metavar="CKPT_DIR", help="checkpoint: the --save folder or a tag folder.")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: 'latest').")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="text to continue; repeat for several prompts (one batch).")
    src.add_argument("--prompt-file", metavar="FILE",
                     help="text file with one prompt per line (blank lines skipped), generated as one batch.")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate (default 50).")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8).")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens.")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this probability mass.")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling.")
    p.add_argument("--loops", type=int, default=None, help="loop iterations (default: the trained count).")
    p.add_argument("--exit-criterion", choices=("none", "kl", "entropy", "gate", "delta"), default=None,
                   help="adaptive per-token exit (default: the checkpoint's model.exit_criterion, normally none).")
    p.add_argument("--exit-threshold", type=float, default=None,
                   help="exit threshold: nats for kl/entropy, a cumulative exit probability for gate.")
    p.add_argument("--max-loops", type=int, default=None,
                   help="loop cap with an exit criterion (default: --loops, or the trained count).")
    p.add_argument("--show-iterations", action="store_true",
                   help="after each sample, print the loop iterations each token used: a heat-strip "
                        "(prompt | continuation) and the tokens with their counts.")
    p.add_argument("--num-samples", type=int, default=1, help="independent continuations to print (default 1).")
    p.add_argument("--ignore-eod", action="store_true", help="keep generating after <|endoftext|>.")
    p.add_argument("--tokenizer-type", default=None, choices=("GPT2BPETokenizer", "HuggingFaceTokenizer"),
                   help="encode/decode with this tokenizer (default: the checkpoint's; GPT-2 for old checkpoints).")
    p.add_argument("--tokenizer-model", default=None, help="HuggingFaceTokenizer: a tokenizer.json or its folder.")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from loop_megatron.checkpoint import load_model, resolve_checkpoint, tokenizer_for
    from loop_megatron.errors import LoopMegatronError
    from loop_megatron.inference.generation import generate, pad_prompts

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.loops is not None and args.loops < 1:
            raise ValueError(f"--loops must be >= 1, got {args.loops}.")
        if args.max_loops is not None and args.max_loops < 1:
            raise ValueError(f"--max-loops must be >= 1, got {args.max_loops}.")
        model = load_model(args.load, args.tag, num_loops=args.max_loops or args.loops, device=device)
        tok = tokenizer_for(checkpoint=resolve_checkpoint(args.load, args.tag), tokenizer_type=args.tokenizer_type,
                            tokenizer_model=args.tokenizer_model)
        texts = _read_prompts(args)
        prompts = [tok.encode(text) for text in texts]
        for text, prompt in zip(texts, prompts):
            if not prompt:
                raise ValueError(f"--prompt {text!r} encodes to no tokens; give some text.")
            if max(prompt) >= model.cfg.vocab_size:
                raise ValueError(f"--prompt encodes to token id {max(prompt)}, outside the model's vocabulary of "
                                 f"{model.cfg.vocab_size}; use the tokenizer the model was trained with.")
        ids, mask = pad_prompts(prompts, pad_token_id=tok.eod, padding_side="left")
        width = ids.shape[1]
        for i in range(args.num_samples):
            seed = None if args.seed is None else args.seed + i
            out, counts = generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, seed=seed,
                                   eos_token_id=None if args.ignore_eod else tok.eod,
                                   exit_criterion=args.exit_criterion, exit_threshold=args.exit_threshold,
                                   return_iterations=True, attention_mask=mask)
            for j, (text, prompt) in enumerate(zip(texts, prompts)):
                new = out[j, width:].tolist()
                if not args.ignore_eod and tok.eod in new:
                    new = new[:new.index(tok.eod)]
                labels = ([f"prompt {j + 1}"] if len(texts) > 1 else []) + \
                    ([f"sample {i + 1}"] if args.num_samples > 1 else [])
                if labels:
                    print(f"--- {', '.join(labels)} ---")
                print(text + tok.decode(new))
                if args.show_iterations:  # the row's real positions: after its left padding
                    _print_iterations(tok, prompt + new, counts[j, width - len(prompt):].tolist(), len(prompt),
                                      model.loop.num_loops)
    except (LoopMegatronError, ValueError) as exc:
        print(f"generate.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _read_prompts(args):
    """The prompts: the --prompt values, or the non-blank lines of --prompt-file."""
    if args.prompt_file is None:
        return args.prompt
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            texts = [line.rstrip("\r\n") for line in f if line.strip()]
    except OSError as exc:
        raise ValueError(f"cannot read --prompt-file: {exc}") from exc
    if not texts:
        raise ValueError(f"--prompt-file {args.prompt_file} has no prompts (one per line).")
    return texts


def _print_iterations(tok, ids, counts, prompt_len, cap) -> None:
    """Iterations per run token (the last sampled token is never run): a heat-strip, then token:count."""
    from loop_megatron.inference.generation import iteration_strip

    counts = counts[:len(ids)]
    mean = sum(counts) / max(1, len(counts))
    print(f"iterations per token (cap {cap}, mean {mean:.2f}): "
          f"{iteration_strip(counts[:prompt_len], cap)} | {iteration_strip(counts[prompt_len:], cap)}")
    print(" ".join(f"{tok.decode([t])!r}:{c}" for t, c in zip(ids, counts)))


if __name__ == "__main__":
    sys.exit(main())
