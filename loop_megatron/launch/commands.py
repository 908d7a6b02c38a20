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

from ..utils import fs
from ..utils.distributed import free_port, hostname_loopback_warning, loopback_address
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
                            launcher_args: Sequence[str] = (),
                            deepspeed: Sequence[str] = ("deepspeed",)) -> List[str]:
    """The deepspeed launcher argv: `deepspeed --hostfile F [options] [LAUNCHER_ARGS] --module MODULE
    TRAINER_ARGS`.

    `--module` makes every rank run `python -u -m MODULE --local_rank=R TRAINER_ARGS`. `launcher_args`:
    further options of DeepSpeed's launcher (`--ssh_port 2222`, `--bind_cores_to_rank`, ...), checked by
    `check_launcher_args`.
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
    cmd += list(launcher_args)
    cmd += ["--module", module]
    return cmd + list(trainer_args)


# DeepSpeed launcher options that launch/train.sh sets itself -> the train.sh option to use instead.
MANAGED_LAUNCHER_OPTIONS: Dict[str, str] = {
    "--hostfile": "--hostfile", "-H": "--hostfile", "--include": "--include", "-i": "--include",
    "--num_nodes": "--num-nodes", "--num_gpus": "--num-gpus", "--master_addr": "--master-addr",
    "--master_port": "--master-port", "--no_ssh": "--no-ssh", "--node_rank": "--node-rank",
    "--no_ssh_check": "(set by itself for one-machine hostfiles)", "--launcher": "--launcher",
    "--module": "(always --module loop_megatron.train)", "--no_python": "(not supported)",
}


def check_launcher_args(text: Sequence[str]) -> List[str]:
    """Split `--launcher-args` values (shell words) into DeepSpeed launcher options; refuse an option that
    launch/train.sh sets itself, naming the one to use, and a first word that is not an option."""
    words: List[str] = []
    for item in text:
        try:
            words += shlex.split(item)
        except ValueError as exc:
            raise LaunchError(f"--launcher-args {item!r} is not valid shell words ({exc}).") from None
    if words and not words[0].startswith("-"):
        raise LaunchError(f"--launcher-args must start with a DeepSpeed launcher option (e.g. --ssh_port 2222), "
                          f"got {words[0]!r}.")
    for word in words:
        name = word.split("=", 1)[0]
        if name in MANAGED_LAUNCHER_OPTIONS:
            instead = MANAGED_LAUNCHER_OPTIONS[name]
            hint = f"use launch/train.sh's {instead} instead" if instead.startswith("--") else f"launch/train.sh: {instead.strip('()')}"
            raise LaunchError(f"--launcher-args: {name} is set by launch/train.sh itself; {hint}.")
    return words


FORWARDED_ENV = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
"""Settings every rank on every node must see. DeepSpeed's ssh/MPI launchers pass on only variables with
NCCL/PYTHON/UCX/MV2/MLFLOW-like prefixes plus what its .deepspeed_env file lists, so a multi-node launch
writes these (the launcher's computed value, else this shell's) into a .deepspeed_env of its own."""


def read_deepspeed_env(path: str) -> "collections.OrderedDict[str, str]":
    """KEY=VALUE lines of a .deepspeed_env file (blank lines and # comments skipped, which DeepSpeed's
    own parser would choke on); a line without '=' is one sentence naming the file and line."""
    values: "collections.OrderedDict[str, str]" = collections.OrderedDict()
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                raise LaunchError(f"{path}, line {number}: expected KEY=VALUE, got {line!r}.")
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def deepspeed_env_values(computed: Dict[str, str], environ: Dict[str, str],
                         cwd: Optional[str] = None) -> "collections.OrderedDict[str, str]":
    """What the job's .deepspeed_env lists: FORWARDED_ENV (computed, else this shell's), then the user's own
    file(s), which win: $DS_ENV_FILE if set, else ~/.deepspeed_env and ./.deepspeed_env (DeepSpeed's
    places; it reads only one name, so setting DS_ENV_FILE would hide them otherwise)."""
    values: "collections.OrderedDict[str, str]" = collections.OrderedDict()
    for key in FORWARDED_ENV:
        value = computed.get(key, environ.get(key))
        if value is not None:
            values[key] = value
    user = environ.get("DS_ENV_FILE")
    if user:
        paths = [user if os.path.isabs(user) else os.path.join(cwd or os.getcwd(), user)]
    else:
        paths = [os.path.join(os.path.expanduser("~"), ".deepspeed_env"),
                 os.path.join(cwd or os.getcwd(), ".deepspeed_env")]
    for path in paths:
        if os.path.isfile(path):
            values.update(read_deepspeed_env(path))
    for key, value in values.items():
        if "\n" in value or not key or any(c.isspace() for c in key):
            raise LaunchError(f"environment setting {key!r} cannot be passed to the other nodes through "
                              f".deepspeed_env (a name with spaces or a value with a line break).")
    return values


def write_deepspeed_env(path: str, values: Dict[str, str]) -> str:
    """Write `values` as KEY=VALUE lines, no blank line, atomically (temporary name, then rename)."""
    return fs.write_text(path, "".join(f"{k}={v}\n" for k, v in values.items()))


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
    deepspeed_env: Dict[str, str] = field(default_factory=dict)
    """ssh mode: what the job's own .deepspeed_env (env['DS_ENV_FILE'], written at launch) lists."""
    warnings: List[str] = field(default_factory=list)
    """Preflight findings that may stop a multi-node job (a name resolving to loopback), with the fix."""

    @property
    def world_size(self) -> int:
        return sum(self.hosts.values())

    def describe(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        hosts = ", ".join(f"{h}:{s}" for h, s in self.hosts.items())
        lines = [f"# launch mode: {self.mode}; hosts (slots): {hosts}; world size {self.world_size}"]
        if self.generated_hostfile:
            lines.append(f"# generated hostfile {self.hostfile}: " + format_hostfile(self.hosts).strip().replace("\n", "; "))
        if self.deepspeed_env:
            lines.append(f"# {self.env.get('DS_ENV_FILE')} (written at launch, passed to every node's ranks): "
                         + " ".join(f"{k}={v}" for k, v in self.deepspeed_env.items()))
        lines.append((env + " " if env else "") + shlex.join(self.command))
        return "\n".join(lines)


def plan_launch(trainer_args: Sequence[str], *, hostfile: Optional[str] = None, preset: Optional[str] = None,
                num_gpus: Optional[int] = None, num_nodes: Optional[int] = None, master_addr: Optional[str] = None,
                master_port: Optional[int] = None, no_ssh: bool = False, node_rank: Optional[int] = None,
                launcher: Optional[str] = None, include: Optional[str] = None, launcher_args: Sequence[str] = (),
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
    extra = check_launcher_args(launcher_args)
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
                                          launcher_args=extra, deepspeed=deepspeed)
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
                                          launcher=launcher, launcher_args=extra, deepspeed=deepspeed)
        plan = LaunchPlan(command, hosts=dict(active), hostfile=hostfile, mode=mode)
        if len(active) > 1:
            plan.warnings = loopback_warnings(active, hostfile, master_addr, environ, gpus=gpus)

    env: Dict[str, str] = {}
    if not gpus:
        env.update(cpu_environment(max(plan.hosts.values()), environ))
    # The ranks must import loop_megatron even when it is not pip-installed (a plain checkout).
    pythonpath = environ.get("PYTHONPATH", "")
    if REPO_ROOT not in pythonpath.split(os.pathsep):
        env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + pythonpath if pythonpath else "")
    if plan.mode == "ssh":  # the other nodes' ranks see only what DeepSpeed forwards: its .deepspeed_env
        plan.deepspeed_env = dict(deepspeed_env_values(env, environ))
        env["DS_ENV_FILE"] = os.path.join(tempfile.gettempdir(), f"loop_megatron_{os.getpid()}.deepspeed_env")
    plan.env = env
    return plan


def loopback_warnings(hosts: Dict[str, int], hostfile: str, master_addr: Optional[str], environ: Dict[str, str],
                      gpus: int = 0, resolve=None, hostname: Optional[str] = None) -> List[str]:
    """What would make a multi-node job fail or hang at its rendezvous, each with its fix: the master
    address or a hostfile host that resolves to loopback here, and (gloo, CPU) this node's own hostname
    resolving to loopback with GLOO_SOCKET_IFNAME unset. `resolve`/`hostname`: for tests."""
    found = []
    if master_addr:
        address = loopback_address(master_addr, resolve)
        if address:
            found.append(f"--master-addr {master_addr} resolves to {address} (loopback), which the other nodes "
                         f"cannot reach; pass node 0's network address instead (e.g. --master-addr 10.0.0.1).")
    for host in hosts:
        address = loopback_address(host, resolve)
        if address and host not in ("localhost",):
            found.append(f"host {host} of hostfile {hostfile} resolves to {address} (loopback) on this machine, so "
                         f"ssh and the rendezvous would reach this machine instead of that node; map {host} to its "
                         f"network address in /etc/hosts (or list the node by its address).")
        elif address:
            found.append(f"hostfile {hostfile} names localhost beside other hosts; name this machine by its network "
                         f"hostname or address so that the other nodes can reach it.")
    if not gpus:
        warning = hostname_loopback_warning(hostname, environ, resolve)
        if warning:
            found.append(warning)
    return found


def run_plan(plan: LaunchPlan, dry_run: bool = False) -> int:
    """Print the plan, then (unless dry_run) run it and return the launcher's exit status (0 also after a
    clean stop by SIGINT/SIGTERM: see `run_forwarding_signals`)."""
    print(plan.describe(), flush=True)
    if dry_run:
        return 0
    env = dict(os.environ)
    env.update(plan.env)
    env_file = plan.env.get("DS_ENV_FILE") if plan.deepspeed_env else None
    try:
        if env_file:
            write_deepspeed_env(env_file, plan.deepspeed_env)
        return run_forwarding_signals(plan.command, env, to_ranks=plan.mode != "ssh")
    finally:
        if plan.generated_hostfile:
            shutil.rmtree(os.path.dirname(plan.hostfile), ignore_errors=True)
        if env_file:
            fs.remove_quietly(env_file)


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
