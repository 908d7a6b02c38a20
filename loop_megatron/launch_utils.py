"""Launch helpers behind `launch/*.sh`: hostfiles, DeepSpeed launcher commands, ZeRO memory estimates.

The shell scripts under `launch/` are thin: they call this module, which

* reads and checks an MPI-style hostfile (`HOST slots=N` per line, `#` comments) and reports a bad line
  or a missing file with one sentence before anything starts;
* builds the exact `deepspeed ... --module loop_megatron.train <trainer args>` command for a
  localhost, ssh/pdsh multi-node or ssh-less (`--no_ssh --node_rank R`) launch;
* sets the environment a CPU-only machine needs (DeepSpeed's CPU accelerator, gloo, one share of the
  cores per process) and leaves a GPU machine's environment alone;
* estimates model-state memory per GPU under ZeRO 1/2/3 for the paper's presets with DeepSpeed's own
  estimators (`python -m loop_megatron.launch_utils paper --dry-run`).

Command line (what the scripts call)::

    python -m loop_megatron.launch_utils train [--hostfile F] [--preset NAME] [--num-gpus N] ... [-- trainer args]
    python -m loop_megatron.launch_utils paper --dry-run [--nodes N --gpus-per-node G --hostfile F]
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

TRAINER_MODULE = "loop_megatron.train"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_MASTER_PORT = 29500


class LaunchError(ValueError):
    """A launch that cannot work; the message is one sentence naming the file, line or option."""


# ----------------------------------------------------------------------------------------------------
# Hostfiles
# ----------------------------------------------------------------------------------------------------
_HOST_LINE = re.compile(r"^(?P<host>[^\s=#]+)\s+slots\s*=\s*(?P<slots>\S+)(?P<rest>(\s+\S+=\S+)*)\s*$")


def parse_hostfile_text(text: str, source: str = "hostfile") -> "collections.OrderedDict[str, int]":
    """Parse MPI-style hostfile text into {host: slots}, in file order.

    Each non-blank line is `HOSTNAME slots=N`, optionally followed by other `key=value` fields (kept by
    MPI, ignored here) and a `# comment`; lines starting with `#` are comments. A bad line, a duplicate
    host, zero slots or a file naming no host raises LaunchError naming the file and line.
    """
    hosts: "collections.OrderedDict[str, int]" = collections.OrderedDict()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOST_LINE.match(line)
        if not match:
            raise LaunchError(f"{source}, line {number}: expected 'HOSTNAME slots=N', got {raw.strip()!r}.")
        host, slots_text = match.group("host"), match.group("slots")
        if not slots_text.isdigit() or int(slots_text) < 1:
            raise LaunchError(f"{source}, line {number}: slots must be a whole number >= 1, got {slots_text!r}.")
        if host in hosts:
            raise LaunchError(f"{source}, line {number}: host {host!r} is listed twice (DeepSpeed needs one line per host).")
        hosts[host] = int(slots_text)
    if not hosts:
        raise LaunchError(f"{source}: names no host; add a line like 'localhost slots=2'.")
    return hosts


def read_hostfile(path: str) -> "collections.OrderedDict[str, int]":
    """Read and check a hostfile; a missing file is one sentence, never DeepSpeed's silent local fallback."""
    if not os.path.isfile(path):
        raise LaunchError(f"hostfile {path} does not exist; create it (see launch/hostfile.example) "
                          f"or leave out --hostfile to run on this machine only.")
    with open(path, encoding="utf-8") as f:
        return parse_hostfile_text(f.read(), source=f"hostfile {path}")


def format_hostfile(hosts: Dict[str, int]) -> str:
    return "".join(f"{host} slots={slots}\n" for host, slots in hosts.items())


def write_hostfile(path: str, hosts: Dict[str, int]) -> str:
    """Write {host: slots} as a hostfile (temporary name, then rename); return the path."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(format_hostfile(hosts))
    os.replace(tmp, path)
    return path


def is_local_host(host: str) -> bool:
    if host in LOCAL_HOSTS:
        return True
    try:
        return host in (socket.gethostname(), socket.getfqdn())
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------
# This machine
# ----------------------------------------------------------------------------------------------------
def gpu_count() -> int:
    """CUDA devices visible here (0 on a CPU-only machine or without a CUDA build of torch)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken driver counts as no GPU
        return 0


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_environment(procs_per_node: int, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment additions for a CPU-only launch (nothing already set is overwritten).

    * DS_ACCELERATOR=cpu: DeepSpeed's CPU accelerator (it would fall back to it anyway, with a warning);
      its communication backend is then gloo, so no oneCCL/CCL_* setting is needed.
    * OMP_NUM_THREADS / MKL_NUM_THREADS: each rank gets its share of the cores; otherwise every rank
      starts one thread per core and they fight over the same cores.
    """
    base = os.environ if base is None else base
    threads = str(max(1, cpu_cores() // max(1, procs_per_node)))
    wanted = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    return {k: v for k, v in wanted.items() if k not in base}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_executable() -> List[str]:
    """The `deepspeed` launcher of this Python environment (its console script, else `python -m`)."""
    candidate = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    if os.access(candidate, os.X_OK):
        return [candidate]
    found = shutil.which("deepspeed")
    if found:
        return [found]
    return [sys.executable, "-m", "deepspeed.launcher.runner"]


# ----------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------
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
    """Print the plan, then (unless dry_run) run it and return the launcher's exit status."""
    print(plan.describe(), flush=True)
    if dry_run:
        return 0
    env = dict(os.environ)
    env.update(plan.env)
    try:
        return subprocess.call(plan.command, env=env)
    except KeyboardInterrupt:
        return 130
    finally:
        if plan.generated_hostfile:
            shutil.rmtree(os.path.dirname(plan.hostfile), ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# ZeRO memory estimates and the paper's runs
# ----------------------------------------------------------------------------------------------------
PAPER_PRESETS = ("gpt2-124m", "loop-81m", "loop-67m", "lite-45m", "loop-45m")


def largest_layer_params(model_cfg) -> int:
    """Parameters of the largest single module (what ZeRO-3 gathers at once): the tied token embedding
    for every GPT-2-width preset."""
    d, f = model_cfg.hidden_size, model_cfg.ffn_size
    return max(model_cfg.padded_vocab_size * d,          # token embedding / tied LM head
               model_cfg.max_position_embeddings * d,    # position embedding
               3 * d * d + 3 * d,                        # fused QKV projection
               d * d + d,                                # attention output projection
               d * f + f, f * d + d)                     # MLP up / down


def zero_model_state_bytes(total_params: int, largest_layer: int, nodes: int = 1,
                           gpus_per_node: int = 1) -> Dict[str, int]:
    """Model-state bytes per GPU (params, gradients, Adam state; no activations, no offload).

    ZeRO 2 and 3 come from DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`,
    `estimate_zero3_model_states_mem_needs`; 16-bit weights, 18 bytes/param of gradient + fp32 master +
    Adam state partitioned). ZeRO 1 and 0 use the same byte accounting with the stated formulas:

        ZeRO-0 (data parallel):  2P (bf16 params) + 2P (bf16 grads) + 16P (fp32 grads, master params, Adam m, v)
        ZeRO-1 (optimizer state partitioned): 2P + 2P + 16P / N
        ZeRO-2 (DeepSpeed):      2P + 18P / N
        ZeRO-3 (DeepSpeed):      4 x largest layer + 18P / N
    where P = parameters and N = nodes x GPUs per node (tensor-parallel size 1).
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = nodes * gpus_per_node
    _, zero2 = estimate_zero2_model_states_mem_needs(total_params, num_gpus_per_node=gpus_per_node,
                                                     num_nodes=nodes, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(total_params, largest_layer, num_gpus_per_node=gpus_per_node,
                                                        num_nodes=nodes, cpu_offload=False, cpu_offload_params=False)
    return {"zero0": 20 * total_params, "zero1": 4 * total_params + int(16 * total_params / n),
            "zero2": int(zero2), "zero3": int(zero3)}


@dataclass
class PaperSettings:
    """Hyper-parameters of the paper-scale runs (nanoGPT's GPT-2-small recipe on OpenWebText).

    Every field can be changed through the environment variable named in `ENV` (see run_paper_experiments.sh).
    """

    data_path: str = "data/openwebtext/openwebtext_text_document"
    seq_length: int = 1024
    micro_batch_size: int = 12
    global_batch_size: int = 0
    """0 = the multiple of micro x data-parallel size in nanoGPT's 480..512 sequences (~0.5M tokens)."""
    train_iters: int = 600000
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_iters: int = 2000
    zero_stage: int = 1
    precision: str = "bf16"
    activation_checkpointing: str = "none"
    save_root: str = "checkpoints/paper"
    run_root: str = "runs/paper"
    save_interval: int = 5000
    eval_interval: int = 1000
    eval_iters: int = 100
    log_interval: int = 10

    ENV = {"data_path": "OWT_DATA", "seq_length": "SEQ_LENGTH", "micro_batch_size": "MICRO_BATCH",
           "global_batch_size": "GLOBAL_BATCH", "train_iters": "TRAIN_ITERS", "lr": "LR", "min_lr": "MIN_LR",
           "warmup_iters": "WARMUP_ITERS", "zero_stage": "ZERO_STAGE", "precision": "PRECISION",
           "activation_checkpointing": "ACT_CKPT", "save_root": "SAVE_ROOT", "run_root": "RUN_ROOT",
           "save_interval": "SAVE_INTERVAL", "eval_interval": "EVAL_INTERVAL", "eval_iters": "EVAL_ITERS",
           "log_interval": "LOG_INTERVAL"}

    @classmethod
    def from_env(cls, environ: Optional[Dict[str, str]] = None) -> "PaperSettings":
        environ = os.environ if environ is None else environ
        settings = cls()
        for name, var in cls.ENV.items():
            if environ.get(var):
                kind = type(getattr(settings, name))
                try:
                    setattr(settings, name, kind(environ[var]))
                except ValueError:
                    raise LaunchError(f"{var}={environ[var]!r} is not a valid {kind.__name__}.") from None
        return settings


def paper_batch_sizes(micro: int, data_parallel: int, target: Tuple[int, int] = (480, 512)) -> Tuple[int, int]:
    """(micro, global) with global a multiple of micro x DP inside nanoGPT's 480..512 sequences, lowering the
    micro-batch if no multiple falls in the range; else the smallest multiple above 480 at micro=1."""
    low, high = target
    for m in range(micro, 0, -1):
        step = m * data_parallel
        multiple = -(-low // step) * step
        if multiple <= high:
            return m, multiple
    return 1, -(-low // data_parallel) * data_parallel


def paper_trainer_args(name: str, settings: PaperSettings, data_parallel: int) -> List[str]:
    micro, global_batch = paper_batch_sizes(settings.micro_batch_size, data_parallel)
    if settings.global_batch_size:
        micro, global_batch = settings.micro_batch_size, settings.global_batch_size
        if global_batch % (micro * data_parallel):
            raise LaunchError(f"GLOBAL_BATCH={global_batch} is not a multiple of MICRO_BATCH ({micro}) x "
                              f"data-parallel size ({data_parallel}).")
    return ["--preset", name, "--data-path", settings.data_path, "--split", "949,50,1",
            "--seq-length", str(settings.seq_length), "--micro-batch-size", str(micro),
            "--global-batch-size", str(global_batch), "--train-iters", str(settings.train_iters),
            "--lr", str(settings.lr), "--min-lr", str(settings.min_lr), "--lr-warmup-iters", str(settings.warmup_iters),
            "--precision", settings.precision, "--zero-stage", str(settings.zero_stage),
            "--activation-checkpointing", settings.activation_checkpointing,
            "--save", f"{settings.save_root}/{name}", "--load", f"{settings.save_root}/{name}",
            "--save-interval", str(settings.save_interval), "--eval-interval", str(settings.eval_interval),
            "--eval-iters", str(settings.eval_iters), "--log-interval", str(settings.log_interval),
            "--run-dir", f"{settings.run_root}/{name}"]


def paper_rows(nodes: int, gpus_per_node: int, presets: Sequence[str] = PAPER_PRESETS,
               seq_length: int = 1024) -> List[Dict[str, float]]:
    from .config import preset as get_preset
    from .model.stats import model_summary

    rows = []
    for name in presets:
        cfg = get_preset(name).model
        summary = model_summary(cfg, seq_length)
        mem = zero_model_state_bytes(int(summary["params"]), largest_layer_params(cfg), nodes, gpus_per_node)
        rows.append({"preset": name, **summary, **mem})
    return rows


def format_paper_table(rows: List[Dict[str, float]], nodes: int, gpus_per_node: int) -> str:
    gib = 2 ** 30
    n = nodes * gpus_per_node
    lines = [f"Model-state memory per GPU (bf16 weights + fp32 Adam, no activations, no offload) on {nodes} node(s) "
             f"x {gpus_per_node} GPU(s) = {n} data-parallel rank(s):",
             "",
             "| preset | params | layers x loops (x inner) | depth | GFLOPs/token (train) | ZeRO-0 GiB | ZeRO-1 GiB | "
             "ZeRO-2 GiB | ZeRO-3 GiB |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        shape = f"{r['unique_layers']} x {r['num_loops']}" + (f" x {r['inner_loops']}" if r["inner_loops"] > 1 else "")
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {shape} | {r['effective_depth']} | "
                     f"{r['flops_per_token'] / 1e9:.3f} | {r['zero0'] / gib:.2f} | {r['zero1'] / gib:.2f} | "
                     f"{r['zero2'] / gib:.2f} | {r['zero3'] / gib:.2f} |")
    lines += ["",
              "ZeRO-2/3 from DeepSpeed's estimate_zero2/3_model_states_mem_needs (cpu_offload=False); ZeRO-1 = 4P + 16P/N "
              "bytes and ZeRO-0 = 20P bytes (same per-parameter accounting: 2 bf16 weights + 2 bf16 grads + 16 fp32 "
              "grads/master/Adam m,v). Activations come on top and grow with loops x layers x micro-batch x sequence."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
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
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_plan(plan, dry_run=args.dry_run)


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
        rows = paper_rows(nodes, gpus_per_node, args.presets, settings.seq_length)
        hostfile = args.hostfile or "HOSTFILE"
        commands = []
        for name in args.presets:
            trainer = paper_trainer_args(name, settings, world) + list(extra)
            cmd = build_deepspeed_command(hostfile, trainer, num_nodes=nodes, num_gpus=gpus_per_node,
                                          master_addr=args.master_addr, launcher=args.launcher,
                                          deepspeed=["deepspeed"] if args.dry_run else deepspeed_executable())
            commands.append((name, cmd))
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_paper_table(rows, nodes, gpus_per_node))
    micro, global_batch = paper_batch_sizes(settings.micro_batch_size, world)
    if settings.global_batch_size:
        micro, global_batch = settings.micro_batch_size, settings.global_batch_size
    print(f"\nSettings: seq {settings.seq_length}, micro-batch {micro} x {world} ranks, global batch {global_batch} "
          f"sequences ({global_batch * settings.seq_length / 1e6:.3f}M tokens/step), {settings.train_iters} iters, "
          f"lr {settings.lr} -> {settings.min_lr} cosine, warmup {settings.warmup_iters}, {settings.precision}, "
          f"ZeRO-{settings.zero_stage}, data {settings.data_path}")
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
        print("usage: python -m loop_megatron.launch_utils {train|paper} [options]", file=sys.stderr)
        return 2
    if argv[0] == "train":
        return main_train(argv[1:])
    return main_paper(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
