"""The engine checkpoint writer: `latest` moves only after a complete save; unfinished saves are pruned."""
import os

import pytest

from tests.training.helpers import tiny_config, write_corpus


class _FailingEngine:
    """Stands in for a DeepSpeed engine whose save dies half-way (disk full, killed rank, ...)."""

    def __init__(self, module):
        self.module = module

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(b"partial")
        raise OSError("No space left on device")


def test_latest_only_after_a_complete_save(tmp_path):
    from loop_megatron.model import LoopGPT
    from loop_megatron import checkpoint

    prefix = write_corpus(str(tmp_path / "data"))
    ck = str(tmp_path / "ck")
    cfg = tiny_config(prefix, str(tmp_path / "run"), **{"training.save": ck})
    os.makedirs(os.path.join(ck, "iter_0000004"))
    with open(os.path.join(ck, "latest"), "w") as f:
        f.write("iter_0000004\n")
    with pytest.raises(OSError):
        checkpoint.save_engine_checkpoint(_FailingEngine(LoopGPT(cfg.model)), cfg, 5, 20)
    assert open(os.path.join(ck, "latest")).read().strip() == "iter_0000004"
    assert not os.path.exists(os.path.join(ck, "iter_0000005"))
    # An unfinished save is never mistaken for a checkpoint, and the next save cleans it up.
    assert checkpoint.list_checkpoints(ck) == [(4, "iter_0000004")]
    checkpoint.prune(ck, keep_last=3, keep="iter_0000006")
    assert sorted(os.listdir(ck)) == ["iter_0000004", "latest"]
