"""Where looping pays: a seeded CPU-scale study of pointer chasing (or p-hop induction), tasks that need
depth but few parameters, with the arms of Saunshi et al. (arXiv 2502.17416): a k-layer model (k x 1), the same k layers
looped L times (k x L), the unshared model of the same depth (kL x 1), and the recurrent-depth recipe
(sampled depth, injection, truncated backprop) on the same k layers; reported as exact-match test
accuracy per difficulty (trained hop counts and harder ones) at every inference loop count.

    python -m studies.reasoning.study                 # the full study (`make reasoning`)
    python -m studies.reasoning.study --quick         # the smoke run (`QUICK=1 make reasoning`)
    python -m studies.reasoning.study --report-only   # tables and plots from the records on disk

Like studies/looping_pays (its sibling), it is a client of loop_megatron: every step is a public command
line run in its own subprocess through loop_megatron.experiments.driver.StudyDriver (resumable: a step
whose output exists is skipped), and its report (report.py beside this file) is built on the analysis API
of loop_megatron.experiments. Steps:
  1. data: tools/make_tasks.py chain|phop (seeded; train and valid at the trained hop counts, test at those and
     harder ones, all prompts distinct across splits) and answer-masked datasets of train and valid
     (tools/preprocess_data.py --prompt-key prompt --answer-key answer --append-eod), so the loss counts
     the answer letter and its end-of-document token only (a data folder found on disk is reused only when
     its tasks.json matches the settings); the chance floor per test level (a uniform
     guess among the answers each record allows) goes into settings.json;
  2. learning rate, per arm: seed `seeds[0]` trained at every LR of `lr_grid`; each run's exact-match
     accuracy on valid.jsonl at its trained depth decides (ties: the lower final valid loss). Only the
     validation split is looked at for any choice; the test split is read by the evaluation alone;
  3. training: every arm x seed at its arm's LR (the sweep's run is reused for the first seed); a seed fixes
     initialisation and data order, so arms with the same seed see the same batches;
  4. evaluation (tools/evaluate.py --task accuracy --prepend-eod): test.jsonl at every loop count of the
     arm's sweep (the trained depth only for unshared arms) and, for the recurrent arm, with the KL exit;
  5. report: tables and figures in `out_dir`, optionally spliced into the README between the markers.
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


Arm = StudyArm
"""One configuration of the grid (loop_megatron.experiments.driver.StudyArm; `family` is 'k x 1', 'k x L',
'kL x 1' or 'recurrent', the role the claims give it; `sweep_loops` the test set's inference loop counts,
the exit's cap their largest)."""


def make_arms(loops: int = 4) -> Tuple[Arm, ...]:
    """The four arms for k = 1 and L = `loops` (the study's default is L = 4)."""
    L = loops
    sweep = tuple(sorted({1, 2, 3, 4, max(1, L // 2), L, L + L // 2, 2 * L}))
    return (
        Arm("1L", "tiny-1l", "k x 1", "1 layer (k x 1)"),
        Arm(f"1Lx{L}", "tiny-1l-4loop", "k x L", f"1 shared layer x {L} loops (k x L)",
            overrides=(f"model.num_loops={L}",), sweep_loops=sweep),
        Arm(f"{L}L", "tiny-4l", "kL x 1", f"{L} layers (kL x 1: the unshared model of the same depth)",
            overrides=(f"model.num_layers={L}",)),
        # The recurrent-depth recipe on the same single layer: depth r ~ 1 + Poisson-lognormal (mean L, cap
        # 2L) per step, additive injection of the embeddings into every iteration's input (u = s + e: Huginn's
        # adapter at its initialisation, no extra parameters), a random initial state, and backprop through
        # the last L iterations (all of them at the mean depth). Not 'diagonal' (the LM study's): here it
        # stayed at the letter prior (valid loss 1.20 after 200, 400 and 1,500 steps), 'add' reached 0.948
        # after 400 and 'linear' (2d^2 more parameters) 1.125 (probes on the validation split, 2026-12-02,
        # results/reasoning/calibration/rec-probes/).
        Arm("rec", "tiny-recurrent", "recurrent",
            f"recurrent depth: 1 core layer x ~{L} sampled loops (cap {2 * L}, backprop {L}), additive injection",
            overrides=("model.prelude_layers=0", "model.num_layers=1", "model.coda_layers=0",
                       "model.loop_injection=add", f"model.num_loops={L}", f"training.mean_loops={L}",
                       f"training.max_loops={2 * L}", f"training.backprop_loops={L}"),
            sweep_loops=tuple(sorted(set(sweep) | {3 * L})), exit_thresholds=(0.1, 0.01)),
    )


# k = 1, L = 4: one layer cannot form an induction head (it needs two attention layers composed), four
# can follow hops; the looped and recurrent arms have the 1-layer model's parameters (+ gates/injection).
ARMS: Tuple[Arm, ...] = make_arms(4)


@dataclasses.dataclass
class ReasoningSettings:
    """Everything that decides the study's numbers (written to OUT/settings.json)."""

    task: str = "chain"
    """'chain' (pointer chasing from position 0 to a chain's end: one lookup per hop, each with one answer)
    or 'phop' (p-hop induction; on this budget no arm left chance, see README 'The setup checked')."""
    train_hops: Tuple[int, ...] = (1, 2, 3)
    """Hop counts of the training and validation records. chain's 1 hop is one read of the fixed position 0,
    the lookup every hop repeats: with it in training the 4-layer model reached valid loss 0.068 by step 750
    (calibration, seed 1, lr 2e-3); without it 4L solved 1 seed of 3 in 1,500 steps
    (results/reasoning/calibration/chain-h2-3-n12-s1500/)."""
    claim_hops: Tuple[int, ...] = (2, 3)
    """Hop counts the claims are measured on (empty: every trained one). Not 1: one layer solves it (100% in
    the calibration), so it tests no composition of hops."""
    test_hops: Tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    """Hop counts of the test records: the trained ones and harder ones."""
    nodes: int = 12
    """chain: pointers per prompt (the prompt is those letters + '='), the same at every level. Calibration
    (results/reasoning/calibration/, 1,500 steps, one seed): at 12 the 4-layer model reached 100% / 99.5% at
    2 / 3 hops and one layer 59.5% / 33% (it reads a few fixed positions at once: a partial table, not a
    lookup); at 20 one layer fell to 23.5% / 15.5% but the 4-layer model was still at valid loss 0.73 after
    750 steps, too slow for this budget."""
    length: int = 16
    """phop: letters per sequence (the prompt is 'p:' + the sequence + '=')."""
    alphabet: int = 4
    """phop: letters the sequences draw from (Saunshi et al. use 4)."""
    train_records: int = 20_000
    """Training records per trained hop count."""
    valid_records: int = 200
    """Validation records per trained hop count (the LR choice reads these)."""
    test_records: int = 200
    """Test records per test hop count."""
    task_seed: int = 1
    """Base seed of tools/make_tasks.py (fixed: every run sees the same data)."""
    seeds: Tuple[int, ...] = (1, 2, 3)
    """Seeds per arm; each fixes initialisation and data order."""
    lr_grid: Tuple[float, ...] = (1e-3, 2e-3, 4e-3)
    """Peak learning rates tried per arm on seeds[0]; the best valid accuracy wins. Two points (1e-3, 2e-3) put
    every arm's choice at an edge in the run trained on 2-3 hops (1L and rec at 2e-3, 4L and 1Lx4 at 1e-3); with
    1-hop records 2e-3 trained 4L best in the calibration, so the grid is centred there."""
    train_iters: int = 1500
    """Optimizer steps per run."""
    micro_batch: int = 32
    """Sequences per step (one micro-batch, no accumulation)."""
    seq_length: int = 60
    """Tokens per training window. For chain, a multiple of the record length (nodes + 3: the pointers, '=',
    the answer and the end-of-document token; 4 x 15 = 60): every record then starts a window or follows a
    whole one, so none is cut and each answer's positions are those of its record alone (a cut record's
    pointers name the wrong positions, an unlearnable target)."""
    keep_documents_apart: bool = True
    """Train with Megatron's --reset-position-ids --reset-attention-mask, so each packed record has the
    positions and context it has alone (calibration.py, answer = the last prompt letter, 4 layers: answer
    loss 0.149 with them against 0.689 without over steps 51-100, 0.028 against 0.359 over steps 151-200)."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of the peak LR."""
    warmup_fraction: float = 0.05
    """Linear warm-up, as a fraction of the training iterations."""
    evals: int = 4
    """Validation points (masked loss) during training."""
    eval_iters: int = 4
    """Micro-batches per validation point."""
    data_dir: str = "data/reasoning"
    runs_dir: str = "runs/reasoning"
    ckpt_dir: str = "checkpoints/reasoning"
    out_dir: str = "results/reasoning"
    overrides: Tuple[str, ...] = ()
    """Trainer config overrides (SECTION.FIELD=VALUE) for every arm, before the arm's own (e.g. the width)."""
    quick: bool = False
    """The smoke configuration (one seed, one LR, fewer steps and records)."""

    @classmethod
    def quick_settings(cls) -> "ReasoningSettings":
        return cls(train_records=4000, valid_records=100, test_records=100, seeds=(1,), lr_grid=(2e-3,),
                   train_iters=300, evals=2, data_dir="data/reasoning-quick", runs_dir="runs/reasoning-quick",
                   ckpt_dir="checkpoints/reasoning-quick", out_dir="results/reasoning-quick", quick=True)

    def as_dict(self) -> Dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """StudyError naming the field when the settings cannot give the study's numbers."""
        if self.task not in ("chain", "phop"):
            raise StudyError(f"task {self.task!r}: choose chain or phop.")
        if not set(self.claim_hops) <= set(self.train_hops):
            raise StudyError(f"claim_hops {','.join(map(str, self.claim_hops))} are not all trained hop counts "
                             f"(train_hops {','.join(map(str, self.train_hops))}): set claim_hops to a subset, or "
                             "claim_hops= for every trained one.")
        if self.task == "chain" and self.seq_length % (self.nodes + 3):
            raise StudyError(f"seq_length {self.seq_length} is not a multiple of the chain record length "
                             f"{self.nodes + 3} (nodes + 3): windows would cut records and shift their positions.")


def choose(rows: Sequence[Dict]) -> Dict:
    """The row with the highest valid accuracy; ties go to the lower valid loss (a row without one last)."""
    return max(rows, key=lambda r: (r["valid_accuracy"], -(r.get("valid_loss") if r.get("valid_loss") is not None
                                                           else float("inf"))))


class ReasoningStudy(StudyDriver):
    """Runs the steps of the module docstring; every output lands atomically, so a restart skips it."""

    def __init__(self, settings: ReasoningSettings, arms: Sequence[Arm] = ARMS, python: Optional[str] = None,
                 log=print):
        super().__init__(settings.runs_dir, settings.ckpt_dir, python=python, log=log)
        self.s = settings
        self.arms = list(arms)

    # -------------------------------------------------------------------------------------------- data
    def task_file(self, split: str) -> str:
        return os.path.join(self.s.data_dir, f"{split}.jsonl")

    def prefix(self, split: str) -> str:
        return os.path.join(self.s.data_dir, f"{split}_prompt_answer_document")

    def wanted_tasks(self) -> Dict:
        """What DATA_DIR/tasks.json (tools/make_tasks.py's record of its arguments) must say for these settings."""
        s = self.s
        knob = {"nodes": s.nodes} if s.task == "chain" else {"length": s.length}
        return {"task": s.task, "seed": s.task_seed,
                "train_levels": [dict(hops=h, **knob) for h in s.train_hops],
                "test_levels": [dict(hops=h, **knob) for h in s.test_hops],
                "per_level": {"train": s.train_records, "valid": s.valid_records, "test": s.test_records},
                **({"alphabet": s.alphabet} if s.task == "phop" else {})}

    def check_data(self) -> None:
        """StudyError naming the first field where an existing DATA_DIR/tasks.json differs from the settings (a
        study resumed with other settings would otherwise train and test on the old data, silently)."""
        from loop_megatron.experiments.records import read_json

        path = os.path.join(self.s.data_dir, "tasks.json")
        have = read_json(path)
        for key, want in self.wanted_tasks().items():
            if have.get(key) != want:
                raise StudyError(f"{path} was written for {key} {have.get(key)!r}, but the settings ask for {want!r}: "
                                 f"remove {self.s.data_dir} (and the runs trained on it) or pass another --data-dir.")

    def prepare_data(self) -> None:
        """The task JSONL, its tokenizer and the answer-masked train and valid datasets."""
        s, d = self.s, self.s.data_dir
        if os.path.isfile(os.path.join(d, "tasks.json")):
            self.check_data()
        else:
            knobs = (["--nodes", str(s.nodes)] if s.task == "chain" else
                     ["--length", str(s.length), "--alphabet", str(s.alphabet)])
            self.log(f"[data] {s.task} (hops {s.train_hops}, test {s.test_hops}, {' '.join(knobs)}) -> {d}")
            self.run([*self.tool("make_tasks.py"), s.task, "--out", d, "--hops", *map(str, s.train_hops),
                      "--test-hops", *map(str, s.test_hops), *knobs, "--train", str(s.train_records),
                      "--valid", str(s.valid_records), "--test", str(s.test_records), "--seed", str(s.task_seed)],
                     os.path.join(self.s.runs_dir, "_data", "make_tasks.log"))
        for split in ("train", "valid"):
            if not os.path.isfile(self.prefix(split) + ".loss_mask.idx"):
                self.run([*self.tool("preprocess_data.py"), "--input", self.task_file(split),
                          "--prompt-key", "prompt", "--answer-key", "answer", "--append-eod",
                          "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", d,
                          "--output-prefix", os.path.join(d, split), "--no-progress"],
                         os.path.join(self.s.runs_dir, "_data", f"preprocess_{split}.log"))

    # ---------------------------------------------------------------------------------------- training
    def trainer_command(self, arm: Arm, seed: int, lr: float, name: str) -> List[str]:
        s = self.s
        iters = s.train_iters
        return [self.python, "-m", "loop_megatron.train", "--preset", arm.preset,
                "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", s.data_dir,
                "--override", "model.vocab_size=40",
                *[x for o in (*s.overrides, *arm.overrides) for x in ("--override", o)],
                *(["--reset-position-ids", "--reset-attention-mask"] if s.keep_documents_apart else []),
                "--data-path", self.prefix("train"), "--split", "1,0,0",
                "--valid-data-path", self.prefix("valid"),
                "--seq-length", str(s.seq_length), "--micro-batch-size", str(s.micro_batch),
                "--global-batch-size", str(s.micro_batch), "--train-iters", str(iters),
                "--lr", f"{lr:g}", "--min-lr", f"{lr * s.min_lr_ratio:g}",
                "--lr-warmup-iters", str(max(1, int(iters * s.warmup_fraction))),
                "--seed", str(seed), "--zero-stage", "0",
                "--eval-interval", str(max(1, iters // max(1, s.evals))), "--eval-iters", str(s.eval_iters),
                "--log-interval", str(max(1, iters // 5)),
                "--save", self.ckpt_dir(name), "--load", self.ckpt_dir(name), "--save-interval", str(iters),
                "--keep-last", "1", "--run-dir", self.run_dir(name)]

    def train_arm(self, arm: Arm, seed: int, lr: float, name: str, label: str) -> None:
        self.train(name, self.trainer_command(arm, seed, lr, name), self.s.train_iters, lr, label,
                   f"{arm.description}, seed {seed}, lr {lr:g}, {self.s.train_iters} steps")

    # -------------------------------------------------------------------------------------- evaluation
    def eval_path(self, name: str, kind: str) -> str:
        return os.path.join(self.s.out_dir, "eval", f"{name}.{kind}.json")

    def accuracy(self, name: str, kind: str, split: str, extra: Sequence[str] = ()) -> str:
        """tools/evaluate.py --task accuracy of run `name` on SPLIT.jsonl -> OUT/eval/NAME.KIND.json."""
        out = self.eval_path(name, kind)
        cmd = [*self.tool("evaluate.py"), "--load", self.ckpt_dir(name), "--task", "accuracy",
               "--tasks-file", self.task_file(split), "--prepend-eod", "--group-by", "hops",
               *extra, "--json", out]
        return self.once(out, cmd, os.path.join(self.run_dir(name), f"evaluate.{kind}.log"))

    def evaluate_run(self, arm: Arm, name: str) -> None:
        t0 = time.time()
        self.accuracy(name, "valid", "valid")
        extra: List[str] = ["--loops", *map(str, arm.sweep_loops)] if arm.sweep_loops else []
        if arm.exit_thresholds:
            extra += ["--exit-criterion", "kl", "--exit-threshold", *map(str, arm.exit_thresholds)]
        self.accuracy(name, "test", "test", extra)
        self.log(f"        {name}: evaluated in {time.time() - t0:.0f} s")

    # ------------------------------------------------------------------------------------------- steps
    def choose_lrs(self, arms: Sequence[Arm]) -> Dict[str, float]:
        """Per arm of `arms`: train seeds[0] at each LR and keep the best valid accuracy; OUT/lr_sweep.json
        keeps the choices of arms swept earlier (a study run with --only adds to it)."""
        from .report import final_valid_loss, overall_accuracy

        seed = self.s.seeds[0]

        def run_point(arm: Arm, lr: float) -> Dict:
            name = lr_run_name(arm.name, seed, lr)
            self.train_arm(arm, seed, lr, name, f"[lr {arm.name} {self.s.lr_grid.index(lr) + 1}/{len(self.s.lr_grid)}]")
            valid = self.accuracy(name, "valid", "valid")
            return {"lr": lr, "run": name, "valid_accuracy": overall_accuracy(valid),
                    "valid_loss": final_valid_loss(os.path.join(self.run_dir(name), "summary.json"))}

        return self.sweep_learning_rates(
            arms, self.s.lr_grid, os.path.join(self.s.out_dir, "lr_sweep.json"), run_point, choose,
            lambda r: f"{r['valid_accuracy']:.3f}",
            {"seed": seed, "criterion": "exact-match accuracy on valid.jsonl at the trained depth (all trained hop "
                                        "counts together); ties: the lower final valid loss"})

    def guess_chance(self) -> Dict[str, float]:
        """{hop count: mean accuracy of a uniform guess among the allowed answers} over test.jsonl (the
        floor the report prints under each level; loop_megatron.data.tasks.guess_chance)."""
        from loop_megatron.data.tasks import guess_chance
        from loop_megatron.inference.accuracy import read_tasks

        per: Dict[str, List[float]] = {}
        for rec in read_tasks(self.task_file("test")):
            per.setdefault(str(rec["hops"]), []).append(guess_chance(rec))
        return {h: sum(v) / len(v) for h, v in per.items()}

    def run_study(self, only: Sequence[str] = (), report_only: bool = False, readme: Optional[str] = None) -> Dict:
        from .report import write_reasoning_report

        if not report_only:  # settings that cannot work, or data from other settings: before anything is written
            self.s.check()
            if os.path.isfile(os.path.join(self.s.data_dir, "tasks.json")):
                self.check_data()
        os.makedirs(self.s.out_dir, exist_ok=True)
        if not report_only:
            self.prepare_data()
            arms = [a for a in self.arms if not only or a.name in only]
            lrs = self.choose_lrs(arms)
            write_json(os.path.join(self.s.out_dir, "settings.json"),
                       dict(self.s.as_dict(), lr=lrs, arms=[dataclasses.asdict(a) for a in self.arms],
                            chance=self.guess_chance(),
                            example_command=self.trainer_command(arms[0], self.s.seeds[0],
                                                                 lrs[arms[0].name], "NAME")[1:]))
            self.train_plan(arms, self.s.seeds, lrs, self.s.train_iters)
        written = write_reasoning_report(self.s.out_dir, self.s.runs_dir, readme=readme)
        self.log(f"[report] {', '.join(sorted(written.values()))}  [study {self.elapsed()}]")
        return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.reasoning.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arguments(
        p, [a.name for a in ARMS], "smoke run: 1 seed, 1 LR, 300 steps, 4,000 records per level, into "
        "runs/reasoning-quick and results/reasoning-quick",
        {"seeds": "1 2 3; quick: 1", "out": "results/reasoning; quick: results/reasoning-quick",
         "runs_dir": "runs/reasoning; quick: runs/reasoning-quick",
         "ckpt_dir": "checkpoints/reasoning; quick: checkpoints/reasoning-quick",
         "data_dir": "data/reasoning; quick: data/reasoning-quick"},
        "reasoning")
    p.add_argument("--train-iters", type=int, help="steps per run (default 1500; quick: 300)")
    p.add_argument("--loops", type=int, default=4, metavar="L",
                   help="L of the arms: 1L, 1LxL, LL and rec (mean L loops); default 4")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="study settings (ReasoningSettings fields, e.g. task=phop length=256 train_hops=32 "
                        "claim_hops= test_hops=32,48,64 train_iters=20000; tuples comma-separated, "
                        "an empty value an empty tuple)")
    p.add_argument("--override", nargs="+", default=[], metavar="SECTION.FIELD=VALUE",
                   help="trainer config overrides for every arm (e.g. model.hidden_size=256)")
    return p


def apply_settings(settings: ReasoningSettings, assignments: Sequence[str]) -> None:
    """Set FIELD=VALUE assignments on settings, each converted to the field's type (tuples: comma-separated);
    StudyError naming the assignment when the field is unknown or the value does not convert."""
    fields = {f.name: f for f in dataclasses.fields(ReasoningSettings)}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise StudyError(f"--set {item}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}.")
        current = getattr(settings, key)
        try:
            if isinstance(current, tuple):
                kind = type(current[0]) if current else str
                new = tuple(kind(v) for v in value.split(",") if v)
            elif isinstance(current, bool):
                new = value.lower() in ("1", "true", "yes", "on")
            else:
                new = type(current)(value)
        except ValueError:
            raise StudyError(f"--set {item}: {value!r} is not a {type(current).__name__}.") from None
        setattr(settings, key, new)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    settings = ReasoningSettings.quick_settings() if args.quick else ReasoningSettings()
    arms = make_arms(args.loops)
    try:
        apply_settings(settings, args.set)
    except StudyError as exc:
        print(f"study: error: {exc}", file=sys.stderr)
        return 2
    settings.overrides = tuple(settings.overrides) + tuple(args.override)
    apply_study_arguments(args, settings)
    if args.train_iters:
        settings.train_iters = args.train_iters
    study = ReasoningStudy(settings, arms, log=lambda line: print(line, flush=True))
    return run_study_main(lambda: study.run_study(args.only, args.report_only, args.readme), args.only,
                          [a.name for a in arms])

if __name__ == "__main__":
    sys.exit(main())
