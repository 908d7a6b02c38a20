"""A short probe of one arm: the study's own trainer command for that arm (ReasoningStudy.trainer_command, on
the study's data), seed 1, with trainer overrides appended, so a recipe choice is tried on the validation split
before the study spends its budget on it. The `rec` arm's injection was chosen this way (studies/reasoning/
README.md, "The recurrent arm").

    python -m studies.reasoning.probe rec --name rec-add400 --steps 400 --override model.loop_injection=add

Needs the study's data (data/reasoning, written by the study's first step). Trains into runs/reasoning-probe/
NAME (checkpoints in checkpoints/reasoning-probe/NAME), then copies the run's config.yaml and metrics.jsonl to
OUT/NAME.config.yaml and OUT/NAME.metrics.jsonl (default results/reasoning/calibration/rec-probes) and prints
its validation losses.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import List, Optional, Sequence

from loop_megatron.experiments.driver import StudyError
from loop_megatron.experiments.records import read_jsonl
from .study import ARMS, ReasoningSettings, ReasoningStudy


def probe_command(study: ReasoningStudy, arm_name: str, name: str, lr: float, overrides: Sequence[str]) -> List[str]:
    """The study's trainer command for `arm_name` (seed 1) with `overrides` appended (the trainer applies the
    last value of a field, so they win over the arm's own) and an evaluation every 100 steps."""
    arms = {a.name: a for a in ARMS}
    if arm_name not in arms:
        raise StudyError(f"unknown arm {arm_name!r} (known: {', '.join(arms)}).")
    cmd = study.trainer_command(arms[arm_name], 1, lr, name)
    for item in overrides:
        cmd += ["--override", item]
    return cmd + ["--eval-interval", str(min(100, study.s.train_iters))]


def valid_losses(metrics_path: str) -> List[tuple]:
    """[(iteration, valid loss)] from a run's metrics.jsonl."""
    return [(r["iteration"], r["valid_loss"]) for r in read_jsonl(metrics_path) if "valid_loss" in r]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.reasoning.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("arm", help="an arm of the study (1L, 1Lx4, 4L, rec)")
    p.add_argument("--name", required=True, help="the probe's name (its run folder and record files)")
    p.add_argument("--steps", type=int, default=400, help="training steps (cosine schedule over them); default 400")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate; default 2e-3")
    p.add_argument("--override", nargs="+", default=[], metavar="SECTION.FIELD=VALUE",
                   help="trainer overrides appended to the arm's command")
    p.add_argument("--out", default="results/reasoning/calibration/rec-probes", help="where the records go")
    args = p.parse_args(argv)
    settings = ReasoningSettings(train_iters=args.steps, runs_dir="runs/reasoning-probe",
                                 ckpt_dir="checkpoints/reasoning-probe")
    study = ReasoningStudy(settings, log=lambda line: print(line, flush=True))
    try:
        if not os.path.isfile(study.prefix("train") + ".loss_mask.idx"):
            raise StudyError(f"{study.prefix('train')}: the study's data is missing; run the study's data step "
                             "first (python -m studies.reasoning.study --only 1L writes it before training).")
        cmd = probe_command(study, args.arm, args.name, args.lr, args.override)
        study.run(cmd, os.path.join(study.run_dir(args.name), "probe.log"), echo_prefix=args.name)
    except StudyError as exc:
        print(f"probe: error: {exc}", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    for record in ("config.yaml", "metrics.jsonl"):
        shutil.copyfile(os.path.join(study.run_dir(args.name), record), os.path.join(args.out, f"{args.name}.{record}"))
    print(f"{args.name}: valid loss " + ", ".join(f"{v:.4f} at {i}" for i, v in
                                                   valid_losses(os.path.join(args.out, f"{args.name}.metrics.jsonl"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
