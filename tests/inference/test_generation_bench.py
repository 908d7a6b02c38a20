"""bench/generation_bench.py --load: a checkpoint benched on its held-out sets, with the quality columns equal to
the package's own evaluation at each setting."""
import importlib.util
import os
import re

import numpy as np
import torch

from loop_megatron.data.indexed_dataset import IndexedDatasetBuilder
from loop_megatron.inference.evaluation import build_eval_sets, evaluate
from tests.hf.helpers import ROOT, VOCAB, make_checkpoint, tiny_config


def bench_main():
    spec = importlib.util.spec_from_file_location("_generation_bench", os.path.join(ROOT, "bench", "generation_bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_bench_loaded_checkpoint(tmp_path, capsys):
    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "data" / "held_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(12):
        builder.add_document(rng.integers(0, VOCAB, size=int(rng.integers(20, 60))).tolist() + [50256])
    builder.finalize(prefix + ".idx")
    cfg = tiny_config(num_loops=2)
    cfg.data.seq_length = 16
    save, model = make_checkpoint(tmp_path, cfg, random_gates=True)
    cache = str(tmp_path / "cache")
    assert bench_main()(["--load", save, "--valid-data-path", f"held={prefix}", "--data-cache-path", cache,
                         "--quick", "--no-peer", "--cap", "3", "--prompt-len", "6", "--new-tokens", "4",
                         "--thresholds", "delta=0.5", "kl=none", "entropy=none", "gate=none",
                         "--cache-dir", str(tmp_path / "bench")]) == 0
    out = capsys.readouterr().out
    speed = [line for line in out.splitlines() if line.startswith("| ckpt | ") and line.count("|") == 12]
    # batch 1 and 8: fixed 1..3, then delta < 0.5 with prefill exit and full
    assert [row.split(" | ")[2] for row in speed] == ["fixed 1", "fixed 2", "fixed 3", "delta < 0.5, prefill exit",
                                                      "delta < 0.5, prefill full"] * 2
    assert all(row.split(" | ")[1] == b for row, b in zip(speed, ["1"] * 5 + ["8"] * 5))
    quality = {row.split(" | ")[1]: row.split(" | ") for row in out.splitlines()
               if row.startswith("| ckpt | ") and row.count("|") == 6}
    assert set(quality) == {"fixed 1", "fixed 2", "fixed 3", "fixed 6", "delta < 0.5"}
    assert quality["fixed 3"][4] == "+0.00% |"
    # The bpb column is the package's evaluation of the same windows (the first 8 of the held-out set).
    ds = build_eval_sets([], "", 16, seed=cfg.training.seed, cache_dir=cache, named=[f"held={prefix}"])["held"]
    windows = [{"tokens": torch.as_tensor(ds[i]["tokens"])} for i in range(8)]
    from loop_megatron.data.tokenizer import GPT2Tokenizer

    lengths = GPT2Tokenizer().token_byte_lengths()
    for key, kw in [("fixed 2", dict(num_loops=2)), ("delta < 0.5", dict(num_loops=3, exit_criterion="delta",
                                                                           exit_threshold=0.5))]:
        res = evaluate(model, windows, micro_batch_size=8, byte_lengths=lengths, **kw)
        assert quality[key][3] == f"{res.bpb:.4f}"
        assert quality[key][2] == f"{res.mean_iterations:.2f}"
    # The speed rows' quality column repeats it, relative to the cap's bpb (within the 2-decimal rounding of the
    # percentage; the 4-decimal bpb printed here moves it by far less).
    cap_bpb = float(quality["fixed 3"][3])
    for row in speed:
        key = row.split(" | ")[2].split(",")[0]
        shown = float(re.search(r"\| ([+-]\d+\.\d\d)% \|", row).group(1))
        assert abs(shown - 100 * (float(quality[key][3]) / cap_bpb - 1)) <= 0.0051
