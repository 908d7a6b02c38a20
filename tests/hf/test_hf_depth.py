"""Depth through standard clients: the export loads at any loop count and exit setting passed to
`from_pretrained` (what lm-eval-harness's --model_args does), with logits equal to the package model at that
depth; and EleutherAI's lm-eval-harness scores it at 1 loop, the trained depth and 4x it, offline."""
import importlib.util
import json
import math
import os

import pytest
import torch

from loop_megatron.hf.convert import export_to_hf
from loop_megatron.model import full_state_dict
from loop_megatron.model.exit import ExitRule, ExitStats

from .helpers import VOCAB, make_checkpoint, tiny_config

ATOL = 1e-4


def _export(tmp_path, **model):
    # vector gates owned by the default count (loop_gate_count 0 = num_loops): the case that used to fail
    cfg = tiny_config(**dict(dict(num_layers=1, num_loops=3, prelude_layers=1, coda_layers=1, loop_gates="vector",
                                  loop_injection="linear", loop_state_init="zeros"), **model))
    _, model = make_checkpoint(tmp_path, cfg, random_gates=True)
    out = str(tmp_path / "hf")
    export_to_hf(full_state_dict(model), cfg, out)
    return model, out


def test_from_pretrained_at_any_loop_count_and_exit_setting(tmp_path):
    from transformers import AutoModelForCausalLM

    model, out = _export(tmp_path)
    assert json.load(open(os.path.join(out, "config.json")))["loop_gate_count"] == 3
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    for loops in (1, 3, 12):
        hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, num_loops=loops).eval()
        assert hf.config.num_loops == loops
        with torch.no_grad():
            # the package's depth= override: iterations beyond the trained gates reuse the last gate
            assert (hf(x).logits - model(x, depth=loops)[0]).abs().max().item() < ATOL, loops
    for t in (0.02, 0.05, 0.1, 0.2, 0.4, 0.8):  # a threshold at which tokens exit at different iterations
        stats = ExitStats()
        with torch.no_grad():
            ours = model(x, depth=12, exit_rule=ExitRule("delta", t), exit_stats=stats)[0]
        if len(set(stats.iterations.flatten().tolist())) >= 2:
            break
    else:
        pytest.fail("no delta threshold gives mixed exits")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, num_loops=12, exit_criterion="delta",
                                              exit_threshold=t).eval()
    with torch.no_grad():
        assert (hf(x).logits - ours).abs().max().item() < ATOL
        assert (ours - model(x, depth=12)[0]).abs().max().item() > 1e-3  # the exit changed something


TASK = """task: loop_depth_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval-harness is not installed "
                    "(pip install -e '.[eval]')")
def test_lm_eval_harness_scores_the_export_at_several_depths(tmp_path, monkeypatch):
    """lm-eval's `hf` model with --model_args pretrained=DIR,trust_remote_code=True,num_loops=L: at 1, the
    trained 3 and 12 loops, its loglikelihoods equal the package model's at that depth."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    model, out = _export(tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    docs = [{"context": "The state of the", "continuation": " Union"},
            {"context": "We hold these truths", "continuation": " to be self-evident"},
            {"context": "Fellow citizens", "continuation": " of the Senate"}]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy.yaml").write_text(TASK.format(data=data))
    manager = TaskManager(include_path=str(tasks))
    for loops in (1, 3, 12):
        res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out},trust_remote_code=True,"
                                      f"num_loops={loops},dtype=float32", tasks=["loop_depth_toy"],
                                      task_manager=manager, batch_size=1, device="cpu", log_samples=True)
        got = [s["resps"][0][0][0] for s in res["samples"]["loop_depth_toy"]]
        want = []
        for d in res["samples"]["loop_depth_toy"]:
            ctx, cont = tok.encode(d["doc"]["context"]), tok.encode(d["doc"]["continuation"])
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids, depth=loops)[0][0].double(), -1)
            want.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        assert len(got) == 3 and max(abs(a - b) for a, b in zip(got, want)) < 1e-3, (loops, got, want)
        ppl = res["results"]["loop_depth_toy"]["perplexity,none"]
        assert math.isfinite(ppl) and ppl > 1
