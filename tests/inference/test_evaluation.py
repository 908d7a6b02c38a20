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
    assert capsys.readouterr().out.splitlines()[-1].startswith("test loss ")


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


def test_exit_sweep_rows_table_json_and_plot(tmp_path, corpus, capsys):
    cfg = tiny_config(num_loops=3, loop_gates="vector")
    save, model = make_checkpoint(tmp_path, cfg, random_gates=True)
    ds = build_eval_dataset([corpus], "800,150,50", 16, "valid", cache_dir=str(tmp_path / "cache"))
    # never met: exactly the fixed-depth result; always met after iteration 2 (kl <= huge): 2 iterations each
    fixed = evaluate(model, ds, micro_batch_size=3, eval_iters=2, num_loops=4)
    never = evaluate(model, ds, micro_batch_size=3, eval_iters=2, num_loops=4, exit_criterion="kl", exit_threshold=0.0)
    assert never.loss == fixed.loss and never.mean_iterations == 4.0 == fixed.mean_iterations
    early = evaluate(model, ds, micro_batch_size=3, eval_iters=2, num_loops=4, exit_criterion="kl",
                     exit_threshold=1e9)
    assert early.mean_iterations == 2.0
    assert early.loss == pytest.approx(evaluate(model, ds, 3, 2, num_loops=2).loss, rel=1e-6)
    # a threshold in between: the mean iterations is the average of the per-token counts
    from loop_megatron.model.exit import ExitRule, ExitStats
    tokens = torch.stack([torch.as_tensor(ds[i]["tokens"]) for i in range(6)])
    stats = ExitStats()
    with torch.no_grad():
        model(tokens[:, :-1], depth=4, exit_rule=ExitRule("entropy", 10.6), exit_stats=stats)
    mid = evaluate(model, ds, 3, 2, num_loops=4, exit_criterion="entropy", exit_threshold=10.6)
    assert mid.mean_iterations == pytest.approx(stats.iterations.float().mean().item())

    main = tool_main("evaluate")
    out_json = str(tmp_path / "curve.json")
    assert main(["--load", save, "--data-path", corpus, "--split", "800,150,50", "--seq-length", "16",
                 "--micro-batch-size", "3", "--eval-iters", "2", "--loops", "1", "2", "4", "--exit-criterion",
                 "kl", "--exit-threshold", "0", "1e9", "--max-loops", "4", "--json", out_json,
                 "--data-cache-path", str(tmp_path / "cache"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| set | criterion | threshold | max loops | mean iterations / token | loss | bpb | tokens |" in printed
    assert "| kl | 1e+09 | 4 | 2.000 |" in printed
    rows = json.load(open(out_json))["results"]
    assert [(r["exit_criterion"], r["mean_iterations"]) for r in rows] == [("none", 1), ("none", 2), ("none", 4),
                                                                           ("kl", 4), ("kl", 2)]
    assert all(r["bpb"] > 0 and r["loss"] > 0 for r in rows)
    assert rows[3]["loss"] == pytest.approx(rows[2]["loss"], rel=1e-9)
    png = tmp_path / "curve.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bpb_matches_hand_computation(tmp_path, corpus):
    from loop_megatron.data.tokenizer import build_tokenizer

    cfg = tiny_config(num_loops=2)
    save, model = make_checkpoint(tmp_path, cfg)
    ds = build_eval_dataset([corpus], "800,150,50", 16, "valid", cache_dir=str(tmp_path / "cache"))
    lengths = torch.as_tensor(build_tokenizer().token_byte_lengths())
    result = evaluate(model, ds, micro_batch_size=3, eval_iters=1, byte_lengths=lengths)
    tokens = torch.stack([torch.as_tensor(ds[i]["tokens"]) for i in range(3)])
    with torch.no_grad():
        logits = model(tokens[:, :-1])[0]
    nll = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), reduction="none")
    nbytes = lengths[tokens[:, 1:].reshape(-1)]
    expected = float((nll * (nbytes > 0)).sum()) / (math.log(2) * float(nbytes.sum()))
    assert result.bpb == pytest.approx(expected, rel=1e-5)
