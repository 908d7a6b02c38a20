"""tools/evaluate.py on a trained checkpoint defaults to the run's own data settings (data path, split,
seed, sequence length, micro batch size, index cache), so its loss is the trainer's final valid loss.

The trainer's valid line is the token-weighted mean loss over the first eval_iters x global batch
samples of the valid split (one process, no accumulation here: eval_iters micro-batches); evaluate.py with
--eval-iters equal to the trainer's eval_iters x global batch / micro batch reads the same samples with the same weights, in fp32 on the CPU like the run,
so the two numbers are the same computation and come out bit-equal (float64 sums of the same float32
token losses, batched alike, in one process). The run's split (80,20,0) differs from evaluate.py's former default
(949,50,1), under which its held-out set overlapped the run's training documents.
"""
import json
import os

import pytest

from tests.training.helpers import tiny_config, write_corpus


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import torch.distributed as dist

    from loop_megatron.training import RunOptions, pretrain

    root = str(tmp_path_factory.mktemp("eval_run_data"))
    prefix = write_corpus(os.path.join(root, "data"))
    cfg = tiny_config(prefix, os.path.join(root, "run"), **{
        "training.train_iters": 3, "training.eval_iters": 3, "training.save": os.path.join(root, "ck"),
        "data.split": "80,20,0", "training.seed": 11, "model.num_layers": 1})
    try:
        summary = pretrain(cfg, RunOptions())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return cfg, summary


def test_defaults_reproduce_the_trainers_final_valid_loss(trained, capsys):
    from tests.hf.helpers import tool_main

    cfg, summary = trained
    with open(os.path.join(cfg.training.run_dir, "summary.json")) as f:
        final = json.load(f)["final_valid_loss"]
    assert final == summary["final_valid_loss"]
    main = tool_main("evaluate")
    out_json = os.path.join(cfg.training.run_dir, "eval.json")
    assert main(["--load", cfg.training.save, "--eval-iters", "3", "--device", "cpu", "--json", out_json]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"data: valid split of {cfg.data.data_path[0]} (split 80,20,0), seed 11, seq_length 16, "
                              "micro batch 2 (the run's own settings)\n")
    loss = json.load(open(out_json))["results"][0]["loss"]
    assert loss == final  # the same float32 forward and float64 sums over the same samples: bit-equal


def test_overrides_are_printed_with_the_runs_values(trained, capsys):
    from tests.hf.helpers import tool_main

    cfg, _ = trained
    main = tool_main("evaluate")
    assert main(["--load", cfg.training.save, "--eval-iters", "1", "--split", "70,30,0", "--seed", "3",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "data: split 70,30,0 (from --split; the run used 80,20,0)" in printed
    assert "data: seed 3 (from --seed; the run used 11)" in printed
