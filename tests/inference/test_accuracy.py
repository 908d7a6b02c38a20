"""Exact-match accuracy (inference/accuracy.py, tools/evaluate.py --task accuracy): counts and iteration means
from a generator whose output is known, grouping by metadata, batched = unbatched greedy (fixed depth and with
exits), the command line end to end, and clear errors."""
import json

import pytest
import torch

from loop_megatron.data.tasks import make_splits, task_levels, write_jsonl, write_task_tokenizer
from loop_megatron.data.tokenizer import build_tokenizer
from loop_megatron.inference import accuracy
from loop_megatron.inference.accuracy import (accuracy_table, evaluate_accuracy, greedy_answers, group_results,
                                              read_tasks)
from loop_megatron.inference.generation import generate
from tests.hf.helpers import make_checkpoint, tiny_config, tool_main
from tests.model.test_exit import build, tiny

VOCAB = 40  # the task tokenizer's


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer("HuggingFaceTokenizer", write_task_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def task_records():
    """Mixed prompt lengths: p-hop of two lengths and two- and three-operand additions."""
    phop = make_splits("phop", task_levels("phop", hops=[1, 2], length=[9, 12]), [], {"train": 2}, 1, alphabet=3)
    add = make_splits("addition", task_levels("addition", operands=[2, 3], digits=[1, 2]), [], {"train": 2}, 1)
    return phop["train"] + add["train"]


def replying(tok, replies, batches=None):
    """A stand-in for generate(): each prompt gets `replies[prompt]` (None: the end-of-document token; a reply
    "2" is followed by it), padded with EOD; position p used p % 3 + num_loops iterations."""
    def fake_generate(model, ids, max_new_tokens, temperature, num_loops, eos_token_id, exit_criterion,
                      exit_threshold, return_iterations):
        assert temperature == 0 and return_iterations and eos_token_id == tok.eod == 0
        if batches is not None:
            batches.append(tuple(ids.shape))
        rows = []
        for row in ids.tolist():
            reply = replies[tok.decode(row).removeprefix("<|endoftext|>")]
            new = [tok.eod] if reply is None else tok.encode(reply) + ([tok.eod] if reply == "2" else [])
            rows.append(row + (new + [tok.eod] * max_new_tokens)[:max_new_tokens])
        out = torch.tensor(rows)
        return out, (torch.arange(out.shape[1] - 1) % 3 + num_loops).expand(out.shape[0], -1)
    return fake_generate


def test_known_outputs_give_exact_counts_iterations_and_groups(tok, monkeypatch):
    """A stand-in for generate() replies with chosen tokens, so the right count of every group is known."""
    records = [  # (record, reply): right, wrong, end of document first, right then more, cut short by EOD
        ({"prompt": "12+34=", "answer": "46", "operands": 2}, "46"),
        ({"prompt": "12+35=", "answer": "47", "operands": 2}, "48"),
        ({"prompt": "1+2+3=", "answer": "6", "operands": 3}, None),
        ({"prompt": "10+20+30=", "answer": "60", "operands": 3}, "6000"),
        ({"prompt": "99+99+99=", "answer": "297", "operands": 3}, "2"),
    ]
    batches = []
    monkeypatch.setattr(accuracy, "generate", replying(tok, {r["prompt"]: reply for r, reply in records}, batches))
    model = build(tiny(vocab_size=VOCAB))
    answers = greedy_answers(model, tok, [r for r, _ in records], batch_size=2, num_loops=1)
    assert [a.correct for a in answers] == [True, False, False, True, False]
    assert [a.text for a in answers] == ["46", "48", "", "60", "2"]
    assert batches == [(2, 6), (1, 6), (2, 9)]  # one prompt length per batch, at most 2 rows, shortest first

    def expect(prompt_len, produced):  # iterations of positions 0 .. prompt_len + produced - 2, per the fake
        run = [p % 3 + 1 for p in range(prompt_len + produced - 1)]
        return sum(run), len(run), sum(run[prompt_len - 1:]), produced

    # produced tokens: 2, 2, 1 (the EOD), 2 (answer length), 2 (a "2" then the EOD)
    for a, (rec, _), produced in zip(answers, records, [2, 2, 1, 2, 2]):
        assert (a.iterations, a.positions, a.answer_iterations, a.answer_positions) == \
            expect(len(rec["prompt"]), produced), rec

    batches.clear()  # with an end-of-document token first: one more prompt position, the same answers
    eod_first = greedy_answers(model, tok, [r for r, _ in records], batch_size=2, num_loops=1, prepend_eod=True)
    assert batches == [(2, 7), (1, 7), (2, 10)] and [a.text for a in eod_first] == [a.text for a in answers]
    for a, (rec, _), produced in zip(eod_first, records, [2, 2, 1, 2, 2]):
        assert (a.iterations, a.positions, a.answer_iterations, a.answer_positions) == \
            expect(len(rec["prompt"]) + 1, produced), rec

    rows = group_results([r for r, _ in records], answers, ["operands"], loops=1)
    assert [(r.group, r.correct, r.total) for r in rows] == \
        [({"operands": 2}, 1, 2), ({"operands": 3}, 1, 3), ({}, 2, 5)]
    total = sum(a.iterations for a in answers) / sum(a.positions for a in answers)
    assert rows[2].mean_iterations == pytest.approx(total)
    assert rows[0].accuracy == 0.5
    table = accuracy_table(rows, trained_loops=1).splitlines()
    assert table[0] == "| operands | records | 1 loops* |"
    assert table[2:] == ["| 2 | 2 | 50.0 |", "| 3 | 3 | 33.3 |", "| all | 5 | 40.0 |"]


def test_grouping_by_default_uses_every_metadata_field(tok, monkeypatch):
    records = task_records()
    right = {r["prompt"]: r["answer"] if n % 3 else None for n, r in enumerate(records)}  # 2 in 3 right
    monkeypatch.setattr(accuracy, "generate", replying(tok, right))
    model = build(tiny(vocab_size=VOCAB))
    results = evaluate_accuracy(model, tok, records, loops=[2], batch_size=4)
    groups = [r.group for r in results]
    assert groups[0] == {"task": "phop", "hops": 1, "length": 9, "alphabet": 3, "operands": None,
                         "digits": None, "reversed": None}
    assert len(groups) == 4 + 4 + 1 and groups[-1] == {}
    assert all(r.total == 2 for r in results[:-1]) and results[-1].total == len(records)
    assert [r.correct for r in results] == [1, 1, 2, 1, 1, 2, 1, 1, 10]  # records 1, 2, 4, 5, 7, 8, ... right
    only = evaluate_accuracy(model, tok, records, loops=[2], batch_size=4, group_by=["task"])
    assert [(r.group, r.total) for r in only] == [({"task": "phop"}, 8), ({"task": "addition"}, 8), ({}, 16)]
    assert only[-1].correct == results[-1].correct
    with pytest.raises(ValueError, match="--group-by hop: no record has that field"):
        evaluate_accuracy(model, tok, records, loops=[2], group_by=["hop"])


@pytest.mark.parametrize("criterion,threshold", [(None, None), ("entropy", 3.0)])
def test_batched_equals_unbatched_greedy(tok, criterion, threshold):
    records = task_records()
    model = build(tiny(vocab_size=VOCAB))
    kw = dict(num_loops=4, exit_criterion=criterion, exit_threshold=threshold)
    one = greedy_answers(model, tok, records, batch_size=1, **kw)
    many = greedy_answers(model, tok, records, batch_size=5, **kw)
    assert one == many
    assert len({a.text for a in one}) > 3  # the model's answers vary, so the comparison means something
    if criterion:
        assert len({a.iterations / a.positions for a in one}) > 3  # exits vary by record
    for rec, ans in zip(records[::4], one[::4]):  # and each equals a plain generate() of its prompt
        prompt, want = tok.encode(rec["prompt"]), len(tok.encode(rec["answer"]))
        new = generate(model, prompt, max_new_tokens=want, temperature=0, eos_token_id=tok.eod, **kw)[0, len(prompt):]
        new = new.tolist()
        assert ans.text == tok.decode(new[:new.index(tok.eod)] if tok.eod in new else new)


def test_evaluate_task_accuracy_end_to_end(tmp_path, tok, capsys):
    cfg = tiny_config(num_loops=2, vocab_size=VOCAB, make_vocab_size_divisible_by=8)
    save, model = make_checkpoint(tmp_path, cfg)
    records = task_records()
    tasks = write_jsonl(str(tmp_path / "test.jsonl"), records)
    out = str(tmp_path / "acc.json")
    main = tool_main("evaluate")
    argv = ["--load", save, "--task", "accuracy", "--tasks-file", tasks, "--tokenizer-model", tok.model_path,
            "--loops", "1", "2", "--exit-criterion", "entropy", "--exit-threshold", "3.0", "--max-loops", "4",
            "--micro-batch-size", "6", "--group-by", "task", "--prepend-eod", "--json", out, "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| task | records | 1 loops | 2 loops* | entropy < 3 (cap 4) |" in printed
    data = json.load(open(out))
    assert data["records"] == 16 and data["trained_loops"] == 2 and data["prepend_eod"] is True
    direct = evaluate_accuracy(model, tok, records, [1, 2], "entropy", [3.0], 4, 6, ["task"], prepend_eod=True)
    assert [r["correct"] for r in data["results"]] == [r.correct for r in direct]
    assert [r["mean_iterations"] for r in data["results"]] == pytest.approx([r.mean_iterations for r in direct])
    assert [r["loops"] for r in data["results"]] == [1, 1, 1, 2, 2, 2, 4, 4, 4]
    assert data["results"][0]["mean_iterations"] == 1 and 1 <= data["results"][-1]["mean_iterations"] <= 4

    assert main(["--load", save, "--task", "accuracy", "--tasks-file", tasks, "--seq-length", "8"]) == 1
    assert "--seq-length: not used by --task accuracy" in capsys.readouterr().err
    assert main(["--load", save, "--task", "accuracy"]) == 1
    assert "needs --tasks-file" in capsys.readouterr().err
    assert main(["--load", save, "--tasks-file", tasks]) == 1
    assert "apply to --task accuracy" in capsys.readouterr().err


def test_bad_task_files_are_one_sentence(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "1+2=", "answer": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: field 'answer' must be a non-empty string"):
        read_tasks(str(bad))
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
        read_tasks(str(bad))
    model = build(tiny(vocab_size=VOCAB))  # 48 positions
    with pytest.raises(ValueError, match="record 1: prompt and answer are 51 tokens, more than the model's "
                                         "max_position_embeddings \\(48\\)"):
        greedy_answers(model, tok, [{"prompt": "1+" * 24 + "=", "answer": "25"}])
