"""Gate-only training through the trainer (Ouro's second stage): start from a checkpoint without an exit
gate, train only the gate under TP=2 x ZeRO-2 and see every other weight come out unchanged."""
import os

import torch

from tests.dist_utils import run_distributed
from tests.training.helpers import tiny_config, write_corpus


def _worker(rank, world_size, root, prefix):
    from loop_megatron.training import RunOptions, pretrain

    ck = os.path.join(root, "base_ck")
    pretrain(tiny_config(prefix, os.path.join(root, "base"), **{"training.train_iters": 2, "training.save": ck}),
             RunOptions())
    gate = pretrain(tiny_config(prefix, os.path.join(root, "gate"), **{
        "training.train_iters": 3, "training.init_from": ck, "model.exit_gate": True,
        "training.train_exit_gate_only": True, "training.exit_entropy_beta": 0.05, "training.zero_stage": 2,
        "parallel.tensor_model_parallel_size": 2, "training.lr": 0.05}), RunOptions(), return_state_dict=True)
    return {"ck": ck, "state_dict": gate["state_dict"], "records": gate.get("records")}


def test_gate_only_training_from_a_gateless_checkpoint_changes_only_the_gate(tmp_path):
    from loop_megatron.checkpoint import load_checkpoint

    prefix = write_corpus(str(tmp_path / "data"))
    result = run_distributed(_worker, 2, str(tmp_path), prefix)[0]
    _, base, _ = load_checkpoint(result["ck"])
    trained = result["state_dict"]
    assert set(trained) - set(base) == {"exit_gate.norm.weight", "exit_gate.norm.bias", "exit_gate.proj.weight",
                                        "exit_gate.proj.bias"}
    for name, t in base.items():
        assert torch.equal(trained[name].float(), t.float()), name
    assert trained["exit_gate.proj.weight"].abs().sum() > 0  # moved off its zero init
