"""The ZeRO tuning used without a --deepspeed-config file is the one the shipped ds_configs/ carry."""
import json
import os

from loop_megatron.training.ds_config import DEFAULT_ZERO_TUNING, build_ds_config
from tests.training.helpers import REPO, tiny_config


def test_default_zero_tuning_matches_shipped_files(tmp_path):
    for stage, tuning in DEFAULT_ZERO_TUNING.items():
        with open(os.path.join(REPO, "ds_configs", f"zero{stage}.json"), encoding="utf-8") as f:
            shipped = json.load(f)["zero_optimization"]
        assert {k: v for k, v in shipped.items() if k != "stage"} == tuning, stage
        cfg = tiny_config("unused", str(tmp_path), **{"training.zero_stage": stage})
        ds = build_ds_config(cfg, dp_size=2, precision="fp32", cuda=False)
        assert ds["zero_optimization"] == dict(tuning, stage=stage)


def test_gpu_defaults_overlap_comm_and_fused_adamw(tmp_path):
    for stage in (0, 1, 2, 3):
        cfg = tiny_config("unused", str(tmp_path), **{"training.zero_stage": stage})
        gpu = build_ds_config(cfg, dp_size=2, precision="bf16", cuda=True)
        cpu = build_ds_config(cfg, dp_size=2, precision="fp32", cuda=False)
        if stage in (2, 3):
            assert gpu["zero_optimization"]["overlap_comm"] is True
            assert cpu["zero_optimization"]["overlap_comm"] is False
        else:
            assert "overlap_comm" not in gpu["zero_optimization"]
        assert gpu["optimizer"]["params"]["fused"] is True and gpu["optimizer"]["params"]["torch_adam"] is True
        assert "fused" not in cpu["optimizer"]["params"] and cpu["optimizer"]["params"]["torch_adam"] is True
    # A DeepSpeed file's own ZeRO section is taken as written, on GPU too.
    cfg = tiny_config("unused", str(tmp_path), **{"training.zero_stage": 2})
    base = {"zero_optimization": {"stage": 2, "overlap_comm": False}}
    assert build_ds_config(cfg, 2, "bf16", base, cuda=True)["zero_optimization"]["overlap_comm"] is False
    # CPU offload keeps DeepSpeedCPUAdam (no torch fused kernel).
    cfg = tiny_config("unused", str(tmp_path), **{"training.zero_stage": 2, "training.cpu_offload": True})
    params = build_ds_config(cfg, 2, "bf16", cuda=True)["optimizer"]["params"]
    assert params["torch_adam"] is False and "fused" not in params


def test_trainer_clips_only_at_zero0_fp32(tmp_path):
    for stage, precision, clipping in ((0, "fp32", 0.0), (0, "bf16", 0.5), (1, "fp32", 0.5), (3, "fp32", 0.5)):
        cfg = tiny_config("unused", str(tmp_path), **{"training.zero_stage": stage, "training.clip_grad": 0.5})
        assert build_ds_config(cfg, 1, precision, cuda=False)["gradient_clipping"] == clipping, (stage, precision)


def test_compile_flag_and_attention_backend_line(tmp_path):
    from loop_megatron.training.arguments import config_from_args
    from loop_megatron.training.engine import attention_backend_line

    cfg = config_from_args(["--preset", "tiny-2l", "--compile"])[0]
    assert cfg.training.compile is True
    cfg = tiny_config("unused", str(tmp_path))
    assert "SDPA" in attention_backend_line(cfg, "fp32", cuda=False)
    cfg.model.attention_backend = "sdpa"
    assert "model.attention_backend=sdpa" in attention_backend_line(cfg, "bf16", cuda=True)
