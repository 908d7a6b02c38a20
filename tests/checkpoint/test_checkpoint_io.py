"""loop_megatron.checkpoint (io, layout): the save-dir/tag layout, round trips, and one-sentence errors for foreign folders."""
import json
import os

import pytest
import torch

from loop_megatron.checkpoint import (CheckpointError, load_checkpoint, load_model, resolve_checkpoint,
                                      save_checkpoint_files)
from loop_megatron.model import full_state_dict
from tests.hf.helpers import build_model, make_checkpoint, tiny_config


def test_save_then_load_round_trips_weights_config_and_meta(tmp_path):
    cfg = tiny_config(loop_gates="scalar")
    save, model = make_checkpoint(tmp_path, cfg, iteration=100)
    assert open(os.path.join(save, "latest")).read().strip() == "iter_0000100"
    assert sorted(os.listdir(os.path.join(save, "iter_0000100"))) == ["meta.json", "model.pt"]
    cfg2, sd, meta = load_checkpoint(save)
    assert cfg2.to_dict() == cfg.to_dict()
    assert meta["iteration"] == 100 and meta["format"] == "loop_megatron" and meta["engine_state"] is False
    expected = full_state_dict(model)
    assert set(sd) == set(expected) and all(torch.equal(sd[k], expected[k]) for k in sd)
    x = torch.randint(0, cfg.model.vocab_size, (2, 12))
    loaded = load_model(save)
    assert not loaded.training
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)


def test_tag_folder_explicit_tag_and_latest(tmp_path):
    cfg = tiny_config()
    save, _ = make_checkpoint(tmp_path, cfg, iteration=100, seed=0)
    make_checkpoint(tmp_path, cfg, iteration=200, seed=1)  # same save dir, newer tag -> latest
    assert resolve_checkpoint(save).endswith("iter_0000200")
    assert resolve_checkpoint(save, "iter_0000100").endswith("iter_0000100")
    assert resolve_checkpoint(os.path.join(save, "iter_0000100")).endswith("iter_0000100")
    assert load_checkpoint(save, "iter_0000100")[2]["iteration"] == 100


def test_load_model_with_more_loops_reuses_last_gate(tmp_path):
    cfg = tiny_config(num_loops=2)
    save, model = make_checkpoint(tmp_path, cfg, random_gates=True)
    x = torch.randint(0, cfg.model.vocab_size, (1, 8))
    four = load_model(save, num_loops=4)
    torch.testing.assert_close(four(x)[0], model(x, depth=4)[0], rtol=0, atol=0)


def one_sentence(msg: str) -> bool:
    return msg.count(". ") == 0 and msg.endswith(".") and "\n" not in msg


def test_missing_tag_lists_available_tags(tmp_path):
    cfg = tiny_config()
    save, _ = make_checkpoint(tmp_path, cfg, iteration=100)
    make_checkpoint(tmp_path, cfg, iteration=200)
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint(save, "iter_0000300")
    msg = str(err.value)
    assert msg == (f"{save}: has no checkpoint tag 'iter_0000300' "
                   f"(available tags: iter_0000100, iter_0000200).")
    assert one_sentence(msg)


def test_folder_that_is_not_ours(tmp_path):
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint(str(other))
    assert str(err.value) == f"{other}: not a loop_megatron checkpoint (no meta.json and no 'latest' file)."
    (other / "meta.json").write_text(json.dumps({"format": "gpt-neox", "config": {}}))
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint(str(other))
    assert str(err.value) == (f"{other}: not a loop_megatron checkpoint (meta.json has format 'gpt-neox', "
                              f"expected 'loop_megatron').")
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        resolve_checkpoint(str(tmp_path / "nowhere"))


def test_deepspeed_only_tag_says_model_pt_is_missing(tmp_path):
    cfg = tiny_config()
    save, _ = make_checkpoint(tmp_path, cfg, iteration=100)
    tag = os.path.join(save, "iter_0000100")
    os.remove(os.path.join(tag, "model.pt"))
    torch.save({}, os.path.join(tag, "mp_rank_00_model_states.pt"))
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint(save)
    assert "the checkpoint has no consolidated model.pt" in str(err.value)
    assert one_sentence(str(err.value).replace("re-save", "resave"))


def test_save_leaves_no_temporary_files(tmp_path):
    cfg = tiny_config()
    model = build_model(cfg)
    folder = save_checkpoint_files(full_state_dict(model), cfg, str(tmp_path / "out"), iteration=7)
    assert folder.endswith("iter_0000007")
    leftovers = [f for root, _, files in os.walk(tmp_path) for f in files if ".tmp" in f]
    assert leftovers == []
