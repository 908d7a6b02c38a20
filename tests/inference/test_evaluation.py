"""Held-out evaluation: loss equals a hand computation, loops sweep, table/JSON output, clear errors."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loop_megatron.data.indexed_dataset import IndexedDatasetBuilder
from loop_megatron.inference.evaluation import build_eval_dataset, evaluate, evaluate_checkpoint, markdown_table
from tests.hf.helpers import VOCAB, make_checkpoint, tiny_config, tool_main


@pytest.fixture
def corpus(tmp_path):
    """40 documents of random tokens as a Megatron .bin/.idx pair."""
    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "data" / "rand_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(40):
        builder.add_document(rng.integers(0, VOCAB, size=int(rng.integers(20, 80))).tolist() + [50256])
    builder.finalize(prefix + ".idx")
    return prefix


def test_loss_matches_hand_computation(tmp_path, corpus):
    cfg = tiny_config(num_loops=2)
    save, model = make_checkpoint(tmp_path, cfg, random_gates=True)
    ds = build_eval_dataset([corpus], "800,150,50", 16, "valid", cache_dir=str(tmp_path / "cache"))
    result = evaluate(model, ds, micro_batch_size=3, eval_iters=2)
    assert result.batches == 2 and result.tokens == 6 * 16
    tokens = torch.stack([torch.as_tensor(ds[i]["tokens"]) for i in range(6)])
    with torch.no_grad():
        logits = model(tokens[:, :-1])[0]
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).item()
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


def test_loops_sweep_table_and_json(tmp_path, corpus, capsys):
    cfg = tiny_config(num_loops=2)
    save, model = make_checkpoint(tmp_path, cfg, random_gates=True)
    results, meta = evaluate_checkpoint(save, [corpus], split="800,150,50", seq_length=16, micro_batch_size=4,
                                        eval_iters=2, loops=[1, 2, 4], cache_dir=str(tmp_path / "cache"))
    assert [r.loops for r in results] == [1, 2, 4]
    assert len({round(r.loss, 6) for r in results}) == 3  # the loop count changes the model's output
    table = markdown_table(results, trained_loops=2).splitlines()
    assert table[0] == "| set | loops | loss | perplexity | bpb | tokens |" and len(table) == 5
    assert table[3].startswith("| valid | 2* |")

    main = tool_main("evaluate")
    out_json = str(tmp_path / "loops.json")
    assert main(["--load", save, "--data-path", corpus, "--split", "800,150,50", "--seq-length", "16",
                 "--micro-batch-size", "4", "--eval-iters", "2", "--loops", "1", "2", "4", "--json", out_json,
                 "--data-cache-path", str(tmp_path / "cache"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| set | loops | loss | perplexity | bpb | tokens |" in printed and "| valid | 4 |" in printed
    data = json.load(open(out_json))
    assert [r["loops"] for r in data["results"]] == [1, 2, 4] and data["trained_loops"] == 2
    assert data["results"][1]["loss"] == pytest.approx(results[1].loss, rel=1e-6)

    assert main(["--load", save, "--data-path", corpus, "--split", "800,150,50", "--seq-length", "16",
                 "--eval-iters", "1", "--eval-split", "test", "--data-cache-path", str(tmp_path / "cache")]) == 0
    assert capsys.readouterr().out.startswith("test loss ")


def test_split_without_eval_documents_is_one_sentence(tmp_path, corpus, capsys):
    save, _ = make_checkpoint(tmp_path, tiny_config())
    main = tool_main("evaluate")
    assert main(["--load", save, "--data-path", corpus, "--split", "100,0,0", "--seq-length", "16",
                 "--data-cache-path", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"evaluate.py: error: {corpus}: split '100,0,0' gives the valid set no documents; use a split "
                   f"with a non-zero valid share, e.g. 949,50,1.")
    assert main(["--load", str(tmp_path), "--data-path", corpus]) == 1
    assert "not a loop_megatron checkpoint" in capsys.readouterr().err
