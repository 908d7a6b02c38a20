"""Synthetic reasoning tasks that need depth but few parameters, as prompt/answer JSONL (`tools/make_tasks.py`).

Three tasks, each with knobs that set its difficulty; a *level* is one setting of those knobs:

* ``phop``, p-hop induction (Sanford, Hsu & Telgarsky 2024; used for looped models by Saunshi et al. 2025).
  A sequence x_0..x_{n-1} over the first ``alphabet`` letters; from the last position, one hop goes to the
  most recent earlier occurrence of the current symbol and moves to the position just after it. The answer
  is the symbol reached after ``hops`` hops. Prompt ``"{hops}:{sequence}="`` (the hop count is written so
  that one model can be trained on several), answer one letter, e.g. ``"2:abcabcb="`` -> ``"a"``: from the
  last ``b`` (position 6) the previous ``b`` is at 4, so hop 1 lands on 5 (``c``); the previous ``c`` is at
  2, so hop 2 lands on 3 (``a``). Knobs: ``hops``, ``length`` (n), ``alphabet`` (k >= 3). Sequences never
  repeat a symbol twice in a row (each symbol is uniform over the k - 1 others than its predecessor), so
  every hop moves to a strictly earlier position (a repeat would make a hop land where it started) and p
  hops are p real steps; sequences in which a hop finds no earlier occurrence are redrawn.
* ``chain``, pointer chasing to a fixed point (the linked lists of looped-model work; unlike p-hop, every
  lookup is by position and has exactly one answer). The prompt is ``nodes`` letters and ``"="``: letter i
  names where position i points (``a`` = position 0, ``b`` = 1, ...). The pointers form disjoint chains,
  each ending at a position that points to itself; the queried chain starts at position 0 and has ``hops``
  hops, and the answer is its end, e.g. ``"cbbee="`` -> ``"b"`` (0 -> 2 -> 1, 1 -> 1; the other chain is
  3 -> 4, 4 -> 4). The other chains (distractors) have 1 to ``hops`` hops each, so a level's prompts all
  have the same length and the number of ends gives nothing away. One attention step can read the pointer
  at a fixed position, not at a position named by what an earlier step read, so a model needs one layer (or
  loop iteration) per hop; because an end points to itself, following more pointers than needed does not
  move, and a model that applies one lookup per iteration can answer longer chains with more iterations
  (the harder test levels). Knobs: ``hops``, ``nodes`` (hops + 3 to 26).
* ``addition``, multi-operand addition (Saunshi et al. 2025): ``operands`` numbers of exactly ``digits``
  digits (0-9 for one digit), prompt ``"12+345+6="`` style, answer the decimal sum. With ``reverse`` the
  answer is written least significant digit first (``"363"`` for 363, ``"01"`` for 10), the order in which
  a model produces carries left to right, which makes the task learnable for small models (Lee et al. 2023).

Splits: train and valid draw the trained levels, test draws its own (usually harder: more hops, more
operands or digits, plus the trained ones for comparison). Every (split, level) has its own seed, derived
from the base seed, so each split is deterministic on its own. Valid and test prompts are distinct within
their split, and none occurs in an earlier split (train, then valid): `check_disjoint` verifies it on the
result. The JSONL records carry the knobs as metadata (``task``, ``hops``, ``length``, ``alphabet`` or
``operands``, ``digits``, ``reversed``) for per-difficulty accuracy (inference/accuracy.py).

`write_task_tokenizer` writes the character-level tokenizer every task here fits: ``<|endoftext|>``
(id 0, the end-of-document token), the digits, ``+ : =`` and the 26 letters, one token per character, as a
Hugging Face ``tokenizer.json`` for ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR``.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import string
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..utils import fs
from .errors import DataError
from .tokenizer import EOD_TOKEN

TASKS = ("phop", "chain", "addition")
LETTERS = string.ascii_lowercase
VOCAB = [EOD_TOKEN] + list(string.digits) + list("+:=") + list(LETTERS)
"""The task tokenizer's tokens, id = index."""
SPLITS = ("train", "valid", "test")
MAX_TRIES = 100
"""Draws per example before a level is declared impossible (a p-hop sequence too short, too few prompts)."""


def hop_positions(seq: str, hops: int) -> Optional[List[int]]:
    """The positions that `hops` hops visit from the last one of `seq` (each the position just after the
    most recent earlier occurrence of the current symbol), or None when a hop finds no earlier occurrence."""
    i, path = len(seq) - 1, []
    for _ in range(hops):
        j = seq.rfind(seq[i], 0, i)
        if j < 0:
            return None
        i = j + 1
        path.append(i)
    return path


def phop_example(rng: random.Random, hops: int, length: int, alphabet: int) -> Dict[str, Any]:
    """One p-hop record (see the module docstring); DataError when MAX_TRIES sequences all run out of hops."""
    if not 3 <= alphabet <= len(LETTERS):
        raise DataError(f"p-hop: alphabet must be 3 to {len(LETTERS)} letters, got {alphabet}.")
    if hops < 1 or length < 2:
        raise DataError(f"p-hop: hops must be >= 1 and length >= 2, got hops {hops}, length {length}.")
    letters = LETTERS[:alphabet]
    for _ in range(MAX_TRIES):
        seq = [rng.choice(letters)]
        while len(seq) < length:
            nxt = rng.choice(letters[:-1])  # uniform over the letters other than the previous one
            seq.append(letters[-1] if nxt == seq[-1] else nxt)
        seq = "".join(seq)
        path = hop_positions(seq, hops)
        if path is not None:
            return {"task": "phop", "hops": hops, "length": length, "alphabet": alphabet,
                    "prompt": f"{hops}:{seq}=", "answer": seq[path[-1]]}
    raise DataError(f"p-hop: {MAX_TRIES} sequences of length {length} over {alphabet} letters all ran out of "
                    f"earlier occurrences before {hops} hops; use a longer length or fewer hops.")


def chain_parts(rng: random.Random, hops: int, nodes: int) -> List[int]:
    """Hop counts of the chains of one chain record: the queried one (`hops`) first, then distractors of
    1..`hops` hops (a chain of h hops has h + 1 nodes) filling exactly `nodes` nodes."""
    parts, left = [hops], nodes - (hops + 1)
    while left:
        # a distractor may not leave a single node over (a chain has at least two)
        fits = [h for h in range(1, hops + 1) if h + 1 == left or left - (h + 1) >= 2]
        h = rng.choice(fits) if fits else left - 1
        parts.append(h)
        left -= h + 1
    return parts


def chain_example(rng: random.Random, hops: int, nodes: int) -> Dict[str, Any]:
    """One pointer-chasing record (see the module docstring)."""
    if hops < 1 or not hops + 3 <= nodes <= len(LETTERS):
        raise DataError(f"chain: need hops >= 1 and hops + 3 <= nodes <= {len(LETTERS)}, got hops {hops}, "
                        f"nodes {nodes}.")
    order = [0] + rng.sample(range(1, nodes), nodes - 1)  # the queried chain's head is position 0
    points = [0] * nodes
    for h in chain_parts(rng, hops, nodes):
        chain, order = order[:h + 1], order[h + 1:]
        for src, dst in zip(chain, chain[1:] + chain[-1:]):  # the end points to itself
            points[src] = dst
    answer = LETTERS[follow_chain(points)]
    return {"task": "chain", "hops": hops, "nodes": nodes, "prompt": "".join(LETTERS[p] for p in points) + "=",
            "answer": answer}


def follow_chain(points: Sequence[int], start: int = 0) -> int:
    """The end of the chain from `start` (the first position that points to itself)."""
    node = start
    while points[node] != node:
        node = points[node]
    return node


def chain_ends(prompt: str) -> int:
    """The number of chains in a chain prompt: its positions that point to themselves (one end each)."""
    return sum(c == LETTERS[i] for i, c in enumerate(prompt[:-1]))


def guess_chance(record: Dict[str, Any]) -> Optional[float]:
    """The accuracy of a uniform guess among the answers the record's form allows, the floor a model
    reaches without solving it: p-hop 1 / alphabet, chain 1 / (its number of chain ends, the positions
    that point to themselves), addition None (no small candidate set)."""
    if record.get("task") == "phop":
        return 1.0 / record["alphabet"]
    if record.get("task") == "chain":
        return 1.0 / chain_ends(record["prompt"])
    return None


def addition_example(rng: random.Random, operands: int, digits: int, reverse: bool = False) -> Dict[str, Any]:
    """One multi-operand addition record (see the module docstring)."""
    if operands < 2 or digits < 1:
        raise DataError(f"addition: operands must be >= 2 and digits >= 1, got operands {operands}, digits {digits}.")
    low = 10 ** (digits - 1) if digits > 1 else 0
    numbers = [rng.randrange(low, 10 ** digits) for _ in range(operands)]
    total = str(sum(numbers))
    return {"task": "addition", "operands": operands, "digits": digits, "reversed": bool(reverse),
            "prompt": "+".join(map(str, numbers)) + "=", "answer": total[::-1] if reverse else total}


EXAMPLES: Dict[str, Callable[..., Dict[str, Any]]] = {"phop": phop_example, "chain": chain_example,
                                                      "addition": addition_example}


def task_levels(task: str, **knobs: Sequence[int]) -> List[Dict[str, int]]:
    """Every combination of the knob values, e.g. task_levels('phop', hops=[1, 2], length=[64]) ->
    [{'hops': 1, 'length': 64}, {'hops': 2, 'length': 64}]."""
    names = list(knobs)
    return [dict(zip(names, values)) for values in itertools.product(*(knobs[n] for n in names))]


def level_name(level: Dict[str, Any]) -> str:
    """'hops=2,length=64' (also the level's part of its seed)."""
    return ",".join(f"{k}={v}" for k, v in level.items())


def _rng(seed: int, split: str, task: str, level: Dict[str, Any]) -> random.Random:
    # a string seed is hashed (sha512) by random.Random: the same stream on every platform and run
    return random.Random(f"{seed}/{split}/{task}/{level_name(level)}")


def make_splits(task: str, train_levels: Sequence[Dict[str, int]], test_levels: Sequence[Dict[str, int]],
                counts: Dict[str, int], seed: int = 1, **options) -> Dict[str, List[Dict[str, Any]]]:
    """``{'train': [...], 'valid': [...], 'test': [...]}``: ``counts[split]`` records per level (train and
    valid: `train_levels`, test: `test_levels`), in level order. `options` go to every example (p-hop:
    alphabet; addition: reverse). Valid and test prompts are distinct and new (not in an earlier split);
    DataError when a level has too few such prompts."""
    if task not in EXAMPLES:
        raise DataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    make = EXAMPLES[task]
    splits: Dict[str, List[Dict[str, Any]]] = {}
    seen: set = set()
    for split in SPLITS:
        records = []
        for level in (test_levels if split == "test" else train_levels):
            rng, want = _rng(seed, split, task, level), counts.get(split, 0)
            if split == "train":  # repeats are fine for training
                records += [make(rng, **level, **options) for _ in range(want)]
                continue
            got: Dict[str, Dict[str, Any]] = {}
            for _ in range(MAX_TRIES * want):
                if len(got) == want:
                    break
                rec = make(rng, **level, **options)
                if rec["prompt"] not in seen:
                    got.setdefault(rec["prompt"], rec)
            if len(got) < want:
                raise DataError(f"{task} {level_name(level)}: only {len(got)} of {want} {split} prompts are new "
                                f"(not in an earlier split or this one) after {MAX_TRIES * want} draws; ask for "
                                f"fewer or a larger level (more digits, a longer sequence).")
            records += got.values()
        seen |= {r["prompt"] for r in records}
        splits[split] = records
    check_disjoint(splits)
    return splits


def check_disjoint(splits: Dict[str, List[Dict[str, Any]]]) -> None:
    """DataError when a valid or test prompt occurs in an earlier split, or twice in its own."""
    earlier: set = set(r["prompt"] for r in splits.get("train", []))
    for split in ("valid", "test"):
        prompts = [r["prompt"] for r in splits.get(split, [])]
        if len(set(prompts)) != len(prompts):
            raise DataError(f"the {split} split repeats a prompt.")
        clash = earlier.intersection(prompts)
        if clash:
            raise DataError(f"{split} prompt {sorted(clash)[0]!r} is also in an earlier split.")
        earlier |= set(prompts)


def new_task_tokenizer():
    """The character-level ``tokenizers.Tokenizer`` over VOCAB (no unknown token: a character outside it
    is an encoding error, not a silent substitute)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters back together, no spaces between them
    tok.add_special_tokens([EOD_TOKEN])
    return tok


def write_task_tokenizer(out_dir: str) -> str:
    """Write the task tokenizer as `out_dir`/tokenizer.json (+ tokenizer_config.json); return its path."""
    from .tokenizer_training import write_tokenizer_folder

    return write_tokenizer_folder(new_task_tokenizer(), out_dir)


def check_round_trip(tokenizer, records: Sequence[Dict[str, Any]], where: str = "records") -> None:
    """DataError unless every prompt + answer encodes (one token per character) and decodes back to itself."""
    for n, rec in enumerate(records, 1):
        text = rec["prompt"] + rec["answer"]
        try:
            ids = tokenizer.encode(text)
        except DataError:
            raise DataError(f"{where} record {n}: {text!r} has a character outside the tokenizer's "
                            "vocabulary.") from None
        if len(ids) != len(text) or tokenizer.decode(ids) != text:
            raise DataError(f"{where} record {n}: {text!r} does not round-trip through the tokenizer.")


def write_jsonl(path: str, records: Sequence[Dict[str, Any]]) -> str:
    """One JSON object per line, written atomically."""
    with fs.atomic_open(path, "w", make_parent=True) as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return path


def write_task_files(out_dir: str, splits: Dict[str, List[Dict[str, Any]]], settings: Dict[str, Any]) -> Dict[str, str]:
    """`out_dir`/{train,valid,test}.jsonl, tokenizer.json (+ tokenizer_config.json) and tasks.json (the
    settings and the count per split and level). Every record is checked to round-trip through the tokenizer
    before anything is written. Returns name -> path."""
    from .tokenizer import HuggingFaceTokenizer

    os.makedirs(out_dir, exist_ok=True)
    paths = {"tokenizer": write_task_tokenizer(out_dir)}
    tokenizer = HuggingFaceTokenizer(paths["tokenizer"])
    for split, records in splits.items():
        check_round_trip(tokenizer, records, split)
    for split, records in splits.items():
        paths[split] = write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), records)
    manifest = dict(settings, counts=level_counts(splits), tokenizer_vocab_size=tokenizer.vocab_size)
    paths["manifest"] = fs.write_json(os.path.join(out_dir, "tasks.json"), manifest, trailing_newline=True)
    return paths


def level_counts(splits: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Dict[str, int]]:
    """split -> level name -> records (levels in order of first appearance)."""
    out: Dict[str, Dict[str, int]] = {}
    for split, records in splits.items():
        counts: Dict[str, int] = {}
        for rec in records:
            name = level_name({k: v for k, v in rec.items() if k not in ("task", "prompt", "answer")})
            counts[name] = counts.get(name, 0) + 1
        out[split] = counts
    return out
