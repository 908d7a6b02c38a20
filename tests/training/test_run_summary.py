"""The end of a run prints one short block: how it ended, time, final train/valid losses, and where the
metrics, TensorBoard events and checkpoints are."""
import os
import re

from tests.training.helpers import tiny_config, write_corpus


def test_end_of_run_block(tmp_path, capsys):
    from loop_megatron.training import RunOptions, pretrain

    prefix = write_corpus(str(tmp_path / "data"))
    run, ck = str(tmp_path / "run"), str(tmp_path / "ck")
    result = pretrain(tiny_config(prefix, run, **{"training.save": ck, "training.train_iters": 3}), RunOptions())
    out = capsys.readouterr().out
    start = out.index("run finished:")
    block = out[start:].splitlines()[:6]
    assert re.match(r"run finished: iteration 3/3 \(3 steps this run\) in \d+:\d\d:\d\d$", block[0]), block
    train = result["final_train_loss"]
    assert block[1] == (f"  final loss   train {train:.4f} (mean of the last 3 steps), valid "
                        f"{result['final_valid_loss']:.4f} (bpb {result['final_valid_bpb']['valid']:.4f})"), block
    assert block[2] == f"  metrics      {os.path.join(run, 'metrics.jsonl')}, {os.path.join(run, 'summary.json')}"
    assert block[3] == f"  tensorboard  {os.path.join(run, 'tensorboard')}"
    assert block[4] == f"  checkpoint   {os.path.join(ck, 'iter_0000003')} (latest; --load {ck} resumes it)"
    assert out.count("run finished:") == 1
    assert result["elapsed_s"] > 0 and result["skipped_steps"] == 0
