"""The command line behind `launch/train.sh` and `launch/run_paper_experiments.sh`::

    python -m loop_megatron.launch.cli train [--hostfile F] [--preset NAME] [--num-gpus N] ... [-- trainer args]
    python -m loop_megatron.launch.cli paper --dry-run [--nodes N --gpus-per-node G --hostfile F]

Bad options, hostfiles or settings exit with status 2 and one sentence on stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import io
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
    p.add_argument("--dry-run", action="store_true", help="print the command and environment, start nothing")
    return p


def main_train(argv: Sequence[str], prog: str = "launch/train.sh") -> int:
    ours, passthrough = _split_passthrough(argv)
    args, unknown = _launch_parser(prog).parse_known_args(ours)
    try:
        plan = plan_launch(unknown + passthrough, hostfile=args.hostfile, preset=args.preset, num_gpus=args.num_gpus,
                           num_nodes=args.num_nodes, master_addr=args.master_addr, master_port=args.master_port,
                           no_ssh=args.no_ssh, node_rank=args.node_rank, launcher=args.launcher, include=args.include)
    except LoopMegatronError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.dry_run:
        status = prepare_bundled_data((["--preset", args.preset] if args.preset else []) + unknown + passthrough)
        if status:
            return status
    return run_plan(plan, dry_run=args.dry_run)


def prepare_bundled_data(trainer_args: Sequence[str]) -> int:
    """Prepare the bundled CPU corpus (tools/prepare_sotu.py) when the run reads config.BUNDLED_DATA (the
    tiny presets' data) and its .idx is missing; returns the preparation's exit status (0 when nothing
    was needed). A trainer command line that does not parse is left for the trainer to report."""
    from ..config import BUNDLED_DATA
    from ..training.arguments import config_from_args

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            cfg, _ = config_from_args(list(trainer_args))
    except (Exception, SystemExit):
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
          f"lr {t.lr} -> {t.min_lr} cosine, warmup {t.lr_warmup_iters}, {t.precision}, "
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
