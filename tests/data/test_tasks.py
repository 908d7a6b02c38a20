"""Synthetic reasoning tasks (data/tasks.py, tools/make_tasks.py): answers checked by independent brute force,
seeded determinism, disjoint splits, harder test levels, the character-level tokenizer round-trips."""
import json
import re
from collections import Counter

import pytest

from loop_megatron.data.errors import DataError
from loop_megatron.data.tasks import (LETTERS, check_disjoint, check_round_trip, guess_chance, make_splits,
                                      task_levels, write_task_tokenizer)
from loop_megatron.data.tokenizer import build_tokenizer
from tests.hf.helpers import tool_main

COUNTS = {"train": 60, "valid": 20, "test": 20}


def phop_splits(seed=1):
    return make_splits("phop", task_levels("phop", hops=[1, 2], length=[24]),
                       task_levels("phop", hops=[1, 2, 5], length=[24, 32]), COUNTS, seed, alphabet=4)


def add_splits(seed=1, reverse=False):
    return make_splits("addition", task_levels("addition", operands=[2, 3], digits=[2]),
                       task_levels("addition", operands=[2, 5], digits=[2, 3]), COUNTS, seed, reverse=reverse)


def brute_force_hops(seq, hops):
    """Sanford et al.'s definition as written: find(i) = max{j <= i : x[j-1] = x[i]}, applied `hops` times
    from the last position; returns the positions visited (None when a find is empty)."""
    i, path = len(seq) - 1, []
    for _ in range(hops):
        found = [j for j in range(1, i + 1) if seq[j - 1] == seq[i]]
        if not found:
            return None
        i = max(found)
        path.append(i)
    return path


def check_phop(rec):
    m = re.fullmatch(r"(\d+):([a-z]+)=", rec["prompt"])
    assert m, rec
    hops, seq = int(m.group(1)), m.group(2)
    assert hops == rec["hops"] and len(seq) == rec["length"] and set(seq) <= set(LETTERS[:rec["alphabet"]])
    assert all(a != b for a, b in zip(seq, seq[1:]))  # no symbol twice in a row
    path = brute_force_hops(seq, hops)
    assert path is not None and len(path) == hops
    assert all(b < a for a, b in zip([len(seq) - 1] + path, path))  # every hop goes strictly back: p real steps
    assert rec["answer"] == seq[path[-1]]
    return path


def chain_splits(seed=1):
    return make_splits("chain", task_levels("chain", hops=[1, 2, 3], nodes=[12]),
                       task_levels("chain", hops=[1, 3, 6, 9], nodes=[12]), COUNTS, seed)


def check_chain(rec):
    """Pointers read from the prompt letters; walked independently: the answer is reached after exactly
    `hops` moves and points to itself, every pointer chain ends in a self-loop (no cycle), and every chain
    other than position 0's has 1 to `hops` hops."""
    assert re.fullmatch(r"[a-z]+=", rec["prompt"]) and len(rec["prompt"]) == rec["nodes"] + 1, rec
    points = [LETTERS.index(c) for c in rec["prompt"][:-1]]
    assert max(points) < rec["nodes"]

    def walk(i):
        seen = [i]
        while points[seen[-1]] != seen[-1]:
            seen.append(points[seen[-1]])
            assert len(seen) <= rec["nodes"], "a cycle"
        return seen

    path = walk(0)
    assert len(path) - 1 == rec["hops"] and rec["answer"] == LETTERS[path[-1]]
    targets = set(points)
    heads = [i for i in range(rec["nodes"]) if i not in targets]
    assert 0 in heads and all(1 <= len(walk(h)) - 1 <= rec["hops"] for h in heads)
    assert sorted(i for h in heads for i in walk(h)) == list(range(rec["nodes"]))  # disjoint chains cover all
    return len(heads)


def check_addition(rec):
    assert re.fullmatch(r"\d+(\+\d+)+=", rec["prompt"]), rec
    numbers = rec["prompt"][:-1].split("+")
    assert len(numbers) == rec["operands"]
    assert all(len(n) == rec["digits"] and (n[0] != "0" or len(n) == 1) for n in numbers)
    total = str(sum(int(n) for n in numbers))
    assert rec["answer"] == (total[::-1] if rec["reversed"] else total)


def test_phop_answers_match_brute_force_and_harder_levels_take_more_hops():
    splits = phop_splits()
    lengths = {}
    for split, records in splits.items():
        for rec in records:
            lengths.setdefault((split, rec["hops"]), []).append(len(check_phop(rec)))
    assert {h for s, h in lengths if s == "train"} == {1, 2}
    assert max(lengths[("test", 5)]) == min(lengths[("test", 5)]) == 5  # held out: more hops than trained
    # answers are not constant: the task is not solvable by a prior
    assert len({r["answer"] for r in splits["test"]}) == 4
    assert {guess_chance(r) for r in splits["test"]} == {0.25}


def test_chain_answers_follow_the_pointers_and_ends_give_nothing_away():
    splits = chain_splits()
    chains = Counter()
    for records in splits.values():
        for rec in records:
            n = check_chain(rec)
            chains[n] += 1
            assert guess_chance(rec) == pytest.approx(1 / n)  # one end per chain
    assert {r["hops"] for r in splits["test"]} - {r["hops"] for r in splits["train"]} == {6, 9}
    assert len(chains) > 2  # the number of distractor chains varies
    # the answer is not a fixed position, and one lookup from position 0 is right only at one hop
    for hops in (3, 9):
        recs = [r for r in splits["test"] if r["hops"] == hops]
        assert len({r["answer"] for r in recs}) > 3
        assert not any(r["answer"] == r["prompt"][0] for r in recs)
    with pytest.raises(DataError, match=r"hops \+ 3 <= nodes"):
        make_splits("chain", [{"hops": 10, "nodes": 12}], [], {"train": 1}, 1)


@pytest.mark.parametrize("reverse", [False, True])
def test_addition_answers_match_the_sum(reverse):
    splits = add_splits(reverse=reverse)
    for records in splits.values():
        for rec in records:
            check_addition(rec)
    assert {r["operands"] for r in splits["test"]} - {r["operands"] for r in splits["train"]} == {5}
    assert {(r["operands"], r["digits"]) for r in splits["test"]} == {(2, 2), (2, 3), (5, 2), (5, 3)}


def test_same_seed_same_records_other_seed_other_records():
    assert phop_splits(1) == phop_splits(1)
    assert add_splits(3) == add_splits(3)
    assert chain_splits(2) == chain_splits(2) and chain_splits(1)["train"] != chain_splits(2)["train"]
    assert phop_splits(1)["train"] != phop_splits(2)["train"]
    a, b = phop_splits(1), phop_splits(2)
    assert [r["prompt"] for r in a["test"]] != [r["prompt"] for r in b["test"]]


def test_splits_are_disjoint_distinct_and_per_level():
    for splits in (phop_splits(), add_splits(), chain_splits()):
        train = {r["prompt"] for r in splits["train"]}
        valid = [r["prompt"] for r in splits["valid"]]
        test = [r["prompt"] for r in splits["test"]]
        assert len(set(valid)) == len(valid) and len(set(test)) == len(test)
        assert not train & set(valid) and not train & set(test) and not set(valid) & set(test)
        task = splits["test"][0]["task"]
        for split, levels in (("train", 3 if task == "chain" else 2), ("valid", 3 if task == "chain" else 2),
                              ("test", {"phop": 6, "chain": 4, "addition": 4}[task])):
            per_level = Counter(tuple(v for k, v in r.items() if k not in ("prompt", "answer")) for r in splits[split])
            assert len(per_level) == levels and set(per_level.values()) == {COUNTS[split]}
    # small levels collide by chance, so the new-prompt rule is really exercised: 2 one-digit operands have 100 prompts
    splits = make_splits("addition", [{"operands": 2, "digits": 1}], [{"operands": 2, "digits": 1}],
                         {"train": 40, "valid": 20, "test": 20}, 1)
    assert not {r["prompt"] for r in splits["train"]} & {r["prompt"] for r in splits["test"]}


def test_check_disjoint_and_impossible_levels_are_one_sentence():
    rec = {"prompt": "1+2=", "answer": "3"}
    with pytest.raises(DataError, match="test prompt '1\\+2=' is also in an earlier split"):
        check_disjoint({"train": [rec], "valid": [], "test": [rec]})
    with pytest.raises(DataError, match="the valid split repeats a prompt"):
        check_disjoint({"train": [], "valid": [rec, rec], "test": []})
    with pytest.raises(DataError, match=r"operands=2,digits=1: only \d+ of 80 valid prompts are new"):
        make_splits("addition", [{"operands": 2, "digits": 1}], [], {"train": 100, "valid": 80}, 1)
    with pytest.raises(DataError, match="use a longer length or fewer hops"):
        make_splits("phop", [{"hops": 8, "length": 8}], [], {"train": 1}, 1, alphabet=3)  # a hop moves back >= 1


def test_tokenizer_round_trips_every_record(tmp_path):
    tok = build_tokenizer("HuggingFaceTokenizer", write_task_tokenizer(str(tmp_path / "tok")))
    assert tok.eod == 0 and tok.vocab_size == 40
    for splits in (phop_splits(), add_splits(reverse=True), chain_splits()):
        for records in splits.values():
            check_round_trip(tok, records)
            for rec in records[:5]:
                ids = tok.encode(rec["prompt"])
                assert len(ids) == len(rec["prompt"]) and tok.decode(ids) == rec["prompt"]
    with pytest.raises(DataError, match="tokenizer.json: cannot encode the text"):  # no unknown token: one sentence
        tok.encode_batch(["1+2=", "1 + 2="])
    with pytest.raises(DataError, match="record 1: '1 \\+ 2=3' has a character outside the tokenizer's vocabulary"):
        check_round_trip(tok, [{"prompt": "1 + 2=", "answer": "3"}])


def test_make_tasks_tool_writes_files_and_counts(tmp_path, capsys):
    out = tmp_path / "phop"
    assert tool_main("make_tasks")(["phop", "--out", str(out), "--hops", "1", "2", "--length", "20",
                                    "--train", "30", "--valid", "5", "--test", "7", "--seed", "4"]) == 0
    printed = capsys.readouterr().out
    assert "| test | hops=4,length=20 (harder than trained) | 7 |" in printed  # default test hops: 1 2 3 4
    assert "| train | hops=2,length=20 | 30 |" in printed
    lines = {s: (out / f"{s}.jsonl").read_text().splitlines() for s in ("train", "valid", "test")}
    assert [len(v) for v in lines.values()] == [60, 10, 28]
    rec = json.loads(lines["test"][-1])
    assert rec["task"] == "phop" and rec["hops"] == 4
    assert isinstance(rec["prompt"], str) and isinstance(rec["answer"], str)
    manifest = json.loads((out / "tasks.json").read_text())
    assert manifest["seed"] == 4 and manifest["counts"]["test"]["hops=3,length=20,alphabet=4"] == 7
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert tool_main("make_tasks")(["addition", "--out", str(tmp_path / "a"), "--digits", "1", "--operands", "2",
                                    "--train", "50", "--valid", "80"]) == 1
    assert "only" in capsys.readouterr().err
    assert tool_main("make_tasks")(["chain", "--out", str(tmp_path / "c"), "--hops", "2", "--test-hops", "2", "5",
                                    "--nodes", "9", "--train", "20", "--valid", "4", "--test", "4"]) == 0
    assert "| test | hops=5,nodes=9 (harder than trained) | 4 |" in capsys.readouterr().out
    for line in (tmp_path / "c" / "test.jsonl").read_text().splitlines():
        check_chain(json.loads(line))
    assert tool_main("make_tasks")(["chain", "--out", str(tmp_path / "c2"), "--hops", "7", "--nodes", "9"]) == 1
    assert "hops + 3 <= nodes" in capsys.readouterr().err
