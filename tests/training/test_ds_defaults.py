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
