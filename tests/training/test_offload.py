"""ZeRO CPU optimizer offload (DeepSpeedCPUAdam) matches the same run without offload.

DeepSpeedCPUAdam is JIT-compiled on first use (~80 s on 2 cores, cached in ~/.cache/torch_extensions),
so this test runs only when that build is already cached or LOOP_MEGATRON_TEST_OFFLOAD=1 asks for it.
"""
import os

import pytest

from tests.dist_utils import run_distributed
from tests.training.helpers import tiny_config, write_corpus


def _cpu_adam_built() -> bool:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        directory = _get_build_directory("cpu_adam", verbose=False)
    except Exception:
        return False
    return os.path.exists(os.path.join(directory, "cpu_adam.so"))


pytestmark = pytest.mark.skipif(
    not (_cpu_adam_built() or os.environ.get("LOOP_MEGATRON_TEST_OFFLOAD") == "1"),
    reason="DeepSpeedCPUAdam not built yet (set LOOP_MEGATRON_TEST_OFFLOAD=1 to build it, ~80 s)")


def _worker(rank, world_size, root, prefix):
    from loop_megatron.training import RunOptions, pretrain

    out = {}
    for name, offload in (("offload", True), ("plain", False)):
        cfg = tiny_config(prefix, os.path.join(root, name), **{
            "training.zero_stage": 2, "training.cpu_offload": offload, "training.train_iters": 3,
            "model.activation_checkpointing": "per-iteration", "training.save": os.path.join(root, name, "ck")})
        res = pretrain(cfg, RunOptions(), return_state_dict=True)
        out[name] = ([r["loss"] for r in res["records"]], res["state_dict"])
    return out


def test_cpu_offload_matches_plain_zero2(tmp_path):
    import torch

    prefix = write_corpus(str(tmp_path / "data"))
    out = run_distributed(_worker, 2, str(tmp_path), prefix)[0]
    (off_losses, off_sd), (losses, sd) = out["offload"], out["plain"]
    for x, y in zip(off_losses, losses):
        assert abs(x - y) < 1e-4
    for key in sd:
        torch.testing.assert_close(off_sd[key], sd[key], rtol=1e-4, atol=1e-5)
    assert os.path.exists(os.path.join(str(tmp_path), "offload", "ck", "iter_0000003", "model.pt"))
