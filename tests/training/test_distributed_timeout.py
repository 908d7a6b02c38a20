"""--distributed-timeout-minutes reaches every process group: the world group, the TP and DP groups, and a
group DeepSpeed creates itself with no timeout argument (torch would give that one 30 minutes). Runs in a
fresh process (a world of one over gloo), so no other test's process group is touched."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = """
import os, torch, torch.distributed as dist
from loop_megatron.utils.distributed import free_port
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
from loop_megatron.training.distributed import init_distributed
from loop_megatron.parallel import state
from datetime import timedelta
import deepspeed.comm
init_distributed(timeout_minutes=0.25)
state.initialize_model_parallel(1, timeout=timedelta(minutes=0.25))
groups = {"world": dist.group.WORLD, "tp": state.get_tensor_model_parallel_group(),
          "dp": state.get_data_parallel_group(), "deepspeed": deepspeed.comm.new_group([0])}
for name, group in groups.items():
    print(name, group._get_backend(torch.device("cpu")).options._timeout.total_seconds())
"""


def test_every_group_gets_the_timeout():
    env = dict(os.environ, PYTHONPATH=ROOT, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    timeouts = dict(line.split() for line in proc.stdout.splitlines() if line.split()[:1] and
                    line.split()[0] in ("world", "tp", "dp", "deepspeed"))
    assert timeouts == {"world": "15.0", "tp": "15.0", "dp": "15.0", "deepspeed": "15.0"}, proc.stdout


def test_a_job_spans_nodes_by_deepspeeds_or_torchruns_counts(monkeypatch):
    """Where each rank repeats the loopback-hostname check (local rank 0 of a job on more than one node)."""
    from loop_megatron.training.distributed import spans_nodes

    for var in ("CROSS_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert not spans_nodes()
    monkeypatch.setenv("CROSS_SIZE", "2")  # DeepSpeed's per-node launcher: the node count
    assert spans_nodes()
    monkeypatch.setenv("CROSS_SIZE", "1")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun: 2 nodes of 8
    assert spans_nodes()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert not spans_nodes()
