"""The command line behind `launch/train.sh` and `launch/run_paper_experiments.sh`::

    python -m loop_megatron.launch.cli train [--hostfile F] [--preset NAME] [--num-gpus N] ... [-- trainer args]
    python -m loop_megatron.launch.cli paper --dry-run [--nodes N --gpus-per-node G --hostfile F]

Bad options, hostfiles or settings exit with status 2 and one sentence on stderr.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from typing import List, Optional, Sequence, Tuple

from .commands import REPO_ROOT, build_deepspeed_command, deepspeed_executable, plan_launch, run_plan
from .environment import gpu_count
from ..errors import LoopMegatronError
from .errors import LaunchError
from .hostfile import read_hostfile
from .paper import PAPER_PRESETS, PaperSettings, format_paper_table, paper_rows, paper_trainer_args, run_batch_sizes


def _split_passthrough(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _launch_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description="Launch python -m loop_megatron.train under the deepspeed "
                                "launcher. Options not listed here (and everything after --) go to the trainer.")
    p.add_argument("--hostfile", help="MPI-style hostfile (HOST slots=N per line). Default: this machine only.")
    p.add_argument("--preset", help="trainer preset (gpt2-124m, loop-81m, ..., tiny-2l-2loop)")
    p.add_argument("--num-gpus", "--nproc-per-node", dest="num_gpus", type=int,
                   help="processes per node (GPUs; on a CPU machine, CPU processes; default: all GPUs, or 2 on CPU)")
    p.add_argument("--num-nodes", type=int, help="use the first N hosts of the hostfile")
    p.add_argument("--master-addr", help="address of node 0 (default 127.0.0.1 locally; required with --no-ssh)")
    p.add_argument("--master-port", type=int, help="rendezvous port (default: a free port locally, 29500 otherwise)")
    p.add_argument("--no-ssh", action="store_true",
                   help="start only this node's ranks (run once per node with its --node-rank); no ssh/pdsh needed")
    p.add_argument("--node-rank", type=int, help="with --no-ssh: this node's index in the hostfile, from 0")
    p.add_argument("--launcher", help="multi-node backend for DeepSpeed: pdsh (default), openmpi, mvapich, slurm, ...")
    p.add_argument("--include", help="DeepSpeed resource filter, e.g. 'worker-0@worker-1:0,2'")
    p.add_argument("--launcher-args", action="append", default=[], metavar="'OPTIONS'",
                   help="further options of DeepSpeed's launcher, as shell words (repeatable), e.g. "
                        "--launcher-args '--ssh_port 2222 --bind_cores_to_rank'; options this script sets itself "
                        "(--hostfile, --master_addr, ...) are refused with the option to use instead")
    p.add_argument("--dry-run", action="store_true", help="print the command and environment, start nothing")
    return p


def _join_launcher_args(argv: Sequence[str]) -> List[str]:
    """`--launcher-args '--ssh_port 2222'` as `--launcher-args=--ssh_port 2222` (argparse would take a value
    starting with '--' for an option of its own)."""
    out: List[str] = []
    words = list(argv)
    i = 0
    while i < len(words):
        if words[i] == "--launcher-args" and i + 1 < len(words):
            out.append(f"--launcher-args={words[i + 1]}")
            i += 2
        else:
            out.append(words[i])
            i += 1
    return out


def main_train(argv: Sequence[str], prog: str = "launch/train.sh") -> int:
    ours, passthrough = _split_passthrough(argv)
    ours = _join_launcher_args(ours)
    parser = _launch_parser(prog)
    args, unknown = parser.parse_known_args(ours)
    trainer_args = (["--preset", args.preset] if args.preset else []) + unknown + passthrough
    plan = None
    try:
        # The command line first (no torch: a fraction of a second), then the layout needs the world size
        # (GPU detection imports torch).
        cfg = check_trainer_args(trainer_args, None, parser, unknown)
        plan = plan_launch(unknown + passthrough, hostfile=args.hostfile, preset=args.preset, num_gpus=args.num_gpus,
                           num_nodes=args.num_nodes, master_addr=args.master_addr, master_port=args.master_port,
                           no_ssh=args.no_ssh, node_rank=args.node_rank, launcher=args.launcher, include=args.include,
                           launcher_args=args.launcher_args)
        if not args.include:  # --include picks GPUs the plan does not count
            cfg.validate(plan.world_size)
    except LoopMegatronError as exc:
        if plan is not None and plan.generated_hostfile:
            shutil.rmtree(os.path.dirname(plan.hostfile), ignore_errors=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if not args.dry_run:
        status = prepare_bundled_data(cfg)
        if status:
            return status
    return run_plan(plan, dry_run=args.dry_run)


def check_trainer_args(trainer_args: Sequence[str], world_size: Optional[int],
                       launch_parser: Optional[argparse.ArgumentParser] = None, before_dashes: Sequence[str] = ()):
    """The trainer's command line parsed exactly as every rank will parse it (training.arguments), the
    --deepspeed-config file's settings adopted and the config validated for `world_size` ranks (None:
    not known here, e.g. with --include), so a typo'd flag or an impossible setting stops the launch in
    a fraction of a second with one sentence instead of in every rank after start-up. Imports no torch.
    Data files, the checkpoint to resume and the hardware are still checked by each rank (preflight).
    An unknown flag given before `--` that is close to one of this launcher's options names that one."""
    import difflib

    from ..config import ConfigError
    from ..training.arguments import config_from_args
    from ..training.ds_config import adopt_ds_file_settings

    try:
        cfg, opts = config_from_args(list(trainer_args))
    except ConfigError as exc:
        flag = next((u.split("=", 1)[0] for u in before_dashes if u.startswith("--")), None)
        ours = [o for a in launch_parser._actions for o in a.option_strings if o.startswith("--")] \
            if launch_parser is not None else []
        close = difflib.get_close_matches(flag, ours, n=1, cutoff=0.75) if flag else []
        if close and str(exc).startswith(f"unknown flag {flag}"):
            raise LaunchError(f"unknown flag {flag}; did you mean {close[0]} (an option of launch/train.sh)?") from None
        raise
    adopt_ds_file_settings(cfg, opts.explicit)
    cfg.validate(world_size)
    return cfg


def prepare_bundled_data(cfg) -> int:
    """Prepare the bundled CPU corpus (tools/prepare_sotu.py) when the run reads config.BUNDLED_DATA (the
    tiny presets' data) and its .idx is missing; returns the preparation's exit status (0 when nothing
    was needed). `cfg`: the checked Config, or a trainer command line (one that does not parse: 0)."""
    from ..config import BUNDLED_DATA

    if isinstance(cfg, (list, tuple)):
        from ..training.arguments import config_from_args

        try:
            cfg, _ = config_from_args(list(cfg))
        except LoopMegatronError:
            return 0

    if cfg.data.data_path != [BUNDLED_DATA] or os.path.isfile(BUNDLED_DATA + ".idx"):
        return 0
    return subprocess.call([sys.executable, os.path.join(REPO_ROOT, "tools", "prepare_sotu.py"),
                            "--out-dir", os.path.dirname(BUNDLED_DATA)])


def main_paper(argv: Sequence[str], prog: str = "launch/run_paper_experiments.sh") -> int:
    p = argparse.ArgumentParser(prog=prog, description="The paper's five GPT-2-small-width runs on OpenWebText.")
    p.add_argument("--dry-run", action="store_true", help="print sizes, memory estimates and commands; run nothing")
    p.add_argument("--hostfile", help="hostfile of the nodes to train on (required without --dry-run)")
    p.add_argument("--nodes", type=int, help="nodes (default: hosts in --hostfile, else 1)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: slots in --hostfile, else 8)")
    p.add_argument("--presets", nargs="+", default=list(PAPER_PRESETS), help="subset of the paper presets")
    p.add_argument("--master-addr", help="address of node 0 (default: DeepSpeed asks the first host)")
    p.add_argument("--launcher", help="DeepSpeed multi-node backend (default pdsh)")
    args, extra = p.parse_known_args(argv)
    try:
        hosts = read_hostfile(args.hostfile) if args.hostfile else None
        if not args.dry_run and hosts is None:
            raise LaunchError("running the paper experiments needs --hostfile naming the GPU nodes "
                              "(or --dry-run to only print the plan).")
        nodes = args.nodes or (len(hosts) if hosts else 1)
        gpus_per_node = args.gpus_per_node or (min(hosts.values()) if hosts else 8)
        if hosts and nodes > len(hosts):
            raise LaunchError(f"--nodes {nodes} is more than the {len(hosts)} host(s) in hostfile {args.hostfile}.")
        unknown = [n for n in args.presets if n not in PAPER_PRESETS]
        if unknown:
            raise LaunchError(f"--presets: {', '.join(unknown)} is not one of {', '.join(PAPER_PRESETS)}.")
        if hosts and len(hosts) > 1 and not args.dry_run and (args.launcher or "pdsh").lower() == "pdsh" \
                and shutil.which("pdsh") is None:
            raise LaunchError(f"hostfile {args.hostfile} names {len(hosts)} hosts to reach by ssh, but pdsh is not "
                              f"installed; install pdsh or pick --launcher openmpi/slurm.")
        if not gpu_count():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # only the estimators run here; no detection warning
        settings = PaperSettings.from_env()
        world = nodes * gpus_per_node
        recipe = settings.config(args.presets[0])  # the paper presets share data and training settings
        d, t = recipe.data, recipe.training
        rows = paper_rows(nodes, gpus_per_node, args.presets, d.seq_length)
        hostfile = args.hostfile or "HOSTFILE"
        commands = []
        for name in args.presets:
            trainer = paper_trainer_args(name, settings, world) + list(extra)
            cmd = build_deepspeed_command(hostfile, trainer, num_nodes=nodes, num_gpus=gpus_per_node,
                                          master_addr=args.master_addr, launcher=args.launcher,
                                          deepspeed=["deepspeed"] if args.dry_run else deepspeed_executable())
            commands.append((name, cmd))
        micro, global_batch = run_batch_sizes(recipe, settings, world)
    except LoopMegatronError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_paper_table(rows, nodes, gpus_per_node))
    print(f"\nSettings: seq {d.seq_length}, micro-batch {micro} x {world} ranks, global batch {global_batch} "
          f"sequences ({global_batch * d.seq_length / 1e6:.3f}M tokens/step), {t.train_iters} iters, "
          f"lr {t.lr} -> {t.min_lr} {t.lr_decay_style}, warmup {t.lr_warmup_iters}, {t.precision}, "
          f"ZeRO-{t.zero_stage}, data {' '.join(d.data_path)}")
    print("\nCommands:" if args.dry_run else "\nRunning, one after another:")
    for name, cmd in commands:
        print(f"# {name}\n{shlex.join(cmd)}", flush=True)
    if args.dry_run:
        return 0
    for name, cmd in commands:
        print(f"\n=== {name} ===", flush=True)
        status = subprocess.call(cmd)
        if status != 0:
            print(f"error: the {name} run exited with status {status}; later runs were not started.", file=sys.stderr)
            return status
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "paper"):
        print("usage: python -m loop_megatron.launch.cli {train|paper} [options]", file=sys.stderr)
        return 2
    if argv[0] == "train":
        return main_train(argv[1:])
    return main_paper(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
