"""DeepSpeed launcher commands: build the `deepspeed ... --module loop_megatron.train` argv, work out a
launch plan (localhost, ssh/pdsh multi-node, or ssh-less `--no_ssh --node_rank R`), and run it.

`plan_launch` checks everything and starts nothing (`--dry-run` prints the plan); `run_plan` runs it.
"""
from __future__ import annotations

import collections
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..utils.distributed import free_port
from .environment import cpu_cores, cpu_environment, gpu_count
from .errors import LaunchError
from .hostfile import format_hostfile, is_local_host, read_hostfile, write_hostfile

TRAINER_MODULE = "loop_megatron.train"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
DEFAULT_MASTER_PORT = 29500


def deepspeed_executable() -> List[str]:
    """The `deepspeed` launcher of this Python environment (its console script, else `python -m`)."""
    candidate = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    if os.access(candidate, os.X_OK):
        return [candidate]
    found = shutil.which("deepspeed")
    if found:
        return [found]
    return [sys.executable, "-m", "deepspeed.launcher.runner"]


def build_deepspeed_command(hostfile: str, trainer_args: Sequence[str] = (), *, module: str = TRAINER_MODULE,
                            master_addr: Optional[str] = None, master_port: Optional[int] = None,
                            no_ssh: bool = False, node_rank: Optional[int] = None, no_ssh_check: bool = False,
                            num_nodes: Optional[int] = None, num_gpus: Optional[int] = None,
                            include: Optional[str] = None, launcher: Optional[str] = None,
                            deepspeed: Sequence[str] = ("deepspeed",)) -> List[str]:
    """The deepspeed launcher argv: `deepspeed --hostfile F [options] --module MODULE TRAINER_ARGS`.

    `--module` makes every rank run `python -u -m MODULE --local_rank=R TRAINER_ARGS`.
    """
    cmd = list(deepspeed) + ["--hostfile", hostfile]
    if include:
        cmd += ["--include", include]
    if num_nodes is not None:
        cmd += ["--num_nodes", str(num_nodes)]
    if num_gpus is not None:
        cmd += ["--num_gpus", str(num_gpus)]
    if master_addr:
        cmd += ["--master_addr", master_addr]
    if master_port is not None:
        cmd += ["--master_port", str(master_port)]
    if no_ssh:
        if node_rank is None:
            raise LaunchError("--no-ssh needs --node-rank R (this machine's position in the hostfile, from 0).")
        cmd += ["--no_ssh", "--node_rank", str(node_rank)]
    elif no_ssh_check:
        cmd.append("--no_ssh_check")
    if launcher:
        cmd += ["--launcher", launcher]
    cmd += ["--module", module]
    return cmd + list(trainer_args)


@dataclass
class LaunchPlan:
    """Everything `launch/train.sh` will do: the command, the environment it adds, the hosts."""

    command: List[str]
    env: Dict[str, str] = field(default_factory=dict)
    hosts: Dict[str, int] = field(default_factory=dict)
    hostfile: str = ""
    generated_hostfile: bool = False
    mode: str = "local"
    """'local' (every rank on this machine), 'ssh' (DeepSpeed reaches the other hosts by pdsh/ssh or MPI)
    or 'no-ssh' (this invocation starts only this machine's ranks; run one per node)."""

    @property
    def world_size(self) -> int:
        return sum(self.hosts.values())

    def describe(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        hosts = ", ".join(f"{h}:{s}" for h, s in self.hosts.items())
        lines = [f"# launch mode: {self.mode}; hosts (slots): {hosts}; world size {self.world_size}"]
        if self.generated_hostfile:
            lines.append(f"# generated hostfile {self.hostfile}: " + format_hostfile(self.hosts).strip().replace("\n", "; "))
        lines.append((env + " " if env else "") + shlex.join(self.command))
        return "\n".join(lines)


def plan_launch(trainer_args: Sequence[str], *, hostfile: Optional[str] = None, preset: Optional[str] = None,
                num_gpus: Optional[int] = None, num_nodes: Optional[int] = None, master_addr: Optional[str] = None,
                master_port: Optional[int] = None, no_ssh: bool = False, node_rank: Optional[int] = None,
                launcher: Optional[str] = None, include: Optional[str] = None,
                generated_hostfile_dir: Optional[str] = None, gpus: Optional[int] = None,
                deepspeed: Optional[Sequence[str]] = None, environ: Optional[Dict[str, str]] = None) -> LaunchPlan:
    """Work out the launch for the given options (checked; nothing is started).

    Without a hostfile: this machine only, `localhost slots=N` written to a temporary hostfile, where N is
    --num-gpus, else every local GPU, else (no GPU) 2 processes when there are 2+ cores. `gpus` overrides
    GPU detection (tests).
    """
    environ = os.environ if environ is None else environ
    gpus = gpu_count() if gpus is None else gpus
    deepspeed = list(deepspeed) if deepspeed is not None else deepspeed_executable()
    if num_gpus is not None and num_gpus < 1:
        raise LaunchError(f"--num-gpus must be >= 1, got {num_gpus}.")
    if num_nodes is not None and num_nodes < 1:
        raise LaunchError(f"--num-nodes must be >= 1, got {num_nodes}.")
    trainer = list(trainer_args)
    if preset:
        trainer = ["--preset", preset] + trainer

    if hostfile is None:
        if num_nodes not in (None, 1):
            raise LaunchError(f"--num-nodes {num_nodes} needs --hostfile naming the nodes (see launch/hostfile.example).")
        if no_ssh:
            raise LaunchError("--no-ssh is for multi-node launches and needs --hostfile naming the nodes.")
        if gpus:
            slots = num_gpus or gpus
            if slots > gpus:
                raise LaunchError(f"--num-gpus {slots} asks for more GPUs than this machine has ({gpus}).")
        else:
            slots = num_gpus or (2 if cpu_cores() >= 2 else 1)
        hosts = collections.OrderedDict(localhost=slots)
        folder = generated_hostfile_dir or tempfile.mkdtemp(prefix="loop_megatron_launch_")
        os.makedirs(folder, exist_ok=True)
        path = write_hostfile(os.path.join(folder, "hostfile"), hosts)
        command = build_deepspeed_command(path, trainer, master_addr=master_addr or "127.0.0.1",
                                          master_port=master_port or free_port(), no_ssh_check=True,
                                          deepspeed=deepspeed)
        plan = LaunchPlan(command, hosts=dict(hosts), hostfile=path, generated_hostfile=True, mode="local")
    else:
        hosts = read_hostfile(hostfile)
        if num_nodes is not None and num_nodes > len(hosts):
            raise LaunchError(f"--num-nodes {num_nodes} is more than the {len(hosts)} host(s) in hostfile {hostfile}.")
        active = collections.OrderedDict(list(hosts.items())[:num_nodes or len(hosts)])
        if num_gpus is not None:
            active = collections.OrderedDict((h, min(s, num_gpus)) for h, s in active.items())
        single_local = len(active) == 1 and is_local_host(next(iter(active)))
        if no_ssh:
            if node_rank is None:
                raise LaunchError("--no-ssh needs --node-rank R (this machine's position in the hostfile, from 0).")
            if not 0 <= node_rank < len(active):
                raise LaunchError(f"--node-rank {node_rank} is outside 0..{len(active) - 1} for the {len(active)} "
                                  f"host(s) of hostfile {hostfile}.")
            if not master_addr:
                raise LaunchError("--no-ssh needs --master-addr (the address of node 0, reachable from every node).")
            mode = "no-ssh"
        elif single_local:
            master_addr = master_addr or "127.0.0.1"
            mode = "local"
        else:
            mode = "ssh"
            chosen = (launcher or "pdsh").lower()
            if chosen == "pdsh" and shutil.which("pdsh") is None:
                raise LaunchError(f"hostfile {hostfile} names {len(active)} host(s) to reach by ssh, but pdsh is not "
                                  f"installed; install pdsh, pick --launcher openmpi/slurm, or start each node "
                                  f"with --no-ssh --node-rank R --master-addr ADDR.")
        if node_rank is not None and not no_ssh:
            raise LaunchError("--node-rank only makes sense with --no-ssh.")
        master_port = master_port or (free_port() if mode == "local" else DEFAULT_MASTER_PORT)
        command = build_deepspeed_command(hostfile, trainer, master_addr=master_addr, master_port=master_port,
                                          no_ssh=no_ssh, node_rank=node_rank, no_ssh_check=(mode == "local"),
                                          num_nodes=num_nodes, num_gpus=num_gpus, include=include,
                                          launcher=launcher, deepspeed=deepspeed)
        plan = LaunchPlan(command, hosts=dict(active), hostfile=hostfile, mode=mode)

    env: Dict[str, str] = {}
    if not gpus:
        env.update(cpu_environment(max(plan.hosts.values()), environ))
    # The ranks must import loop_megatron even when it is not pip-installed (a plain checkout).
    pythonpath = environ.get("PYTHONPATH", "")
    if REPO_ROOT not in pythonpath.split(os.pathsep):
        env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + pythonpath if pythonpath else "")
    plan.env = env
    return plan


def run_plan(plan: LaunchPlan, dry_run: bool = False) -> int:
    """Print the plan, then (unless dry_run) run it and return the launcher's exit status (0 also after a
    clean stop by SIGINT/SIGTERM: see `run_forwarding_signals`)."""
    print(plan.describe(), flush=True)
    if dry_run:
        return 0
    env = dict(os.environ)
    env.update(plan.env)
    try:
        return run_forwarding_signals(plan.command, env, to_ranks=plan.mode != "ssh")
    finally:
        if plan.generated_hostfile:
            shutil.rmtree(os.path.dirname(plan.hostfile), ignore_errors=True)


def rank_processes(root_pid: int, module: str = TRAINER_MODULE) -> list:
    """The trainer ranks (`python ... -m MODULE`) among the descendants of process `root_pid` (psutil
    processes; the deepspeed runner and its per-node launcher name the module only after `--module`)."""
    import psutil

    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return []
    ranks = []
    for child in children:
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if any(a == "-m" and b == module for a, b in zip(cmd, cmd[1:])):
            ranks.append(child)
    return ranks


def run_forwarding_signals(command: Sequence[str], env: Dict[str, str], to_ranks: bool = True,
                           echo_seconds: float = 1.0, prog: str = "launch/train.sh") -> int:
    """Run the deepspeed launcher and return its exit status, handing SIGINT/SIGTERM to the ranks.

    DeepSpeed's per-node launcher answers SIGINT/SIGTERM by sending SIGTERM to every rank, killing them
    30 s later and exiting 1, and a Ctrl-C in the terminal also reaches the ranks themselves: the ranks
    would see two signals (the second one the wrong name) and the run would exit 1. So with `to_ranks`
    (this machine's ranks are descendants: local and --no-ssh launches) the launcher runs in a process
    group of its own, which a terminal's Ctrl-C does not reach, and a SIGINT/SIGTERM that reaches this
    process is forwarded, as itself, to the ranks only: the first asks them to finish the current step,
    save and exit 0 (the launcher then exits 0, and so does this); a second is forwarded too (at least
    `echo_seconds` after the first, which the ranks would take for an echo of it) and makes them exit at
    once; a third kills the launcher's process group. A signal before any rank exists ends the launch.
    Without `to_ranks` (ssh/pdsh, MPI, slurm) DeepSpeed's runner stays in the terminal's process group
    and handles the signal itself (it stops every node's ranks; exit status 1); a SIGTERM sent to this
    process is passed to it.
    """
    import signal
    import time

    kwargs = {"preexec_fn": os.setpgrp} if to_ranks else {}
    proc = subprocess.Popen(list(command), env=env, **kwargs)
    received: List[float] = []

    def say(text: str) -> None:
        try:
            os.write(2, f"{prog}: {text}\n".encode())
        except OSError:
            pass

    def handler(signum, frame):
        name = signal.Signals(signum).name
        received.append(time.monotonic())
        if not to_ranks:
            if signum == signal.SIGTERM:
                proc.send_signal(signum)
            return
        ranks = rank_processes(proc.pid)
        if len(received) >= 3 or not ranks:
            say(f"{name}: stopping the launcher{'' if ranks else ' (no rank has started yet)'}")
            try:
                os.killpg(proc.pid, signal.SIGKILL if ranks else signal.SIGTERM)
            except OSError:
                pass
            return
        if len(received) == 1:
            say(f"{name}: the ranks finish the current step, save (with --save) and exit; "
                f"send it again to stop them at once")
        else:
            time.sleep(max(0.0, echo_seconds + 0.1 - (received[-1] - received[0])))
            say(f"{name} again: the ranks stop at once; 'latest' stays on the last complete checkpoint")
        for rank_process in ranks:
            try:
                rank_process.send_signal(signum)
            except Exception:  # psutil.NoSuchProcess: that rank has just finished
                pass

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = proc.wait()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return 128 - status if status < 0 else status
