"""Exact-match accuracy of greedy answers on prompt/answer tasks, as a function of test-time compute.

Each record of a JSONL task file (`tools/make_tasks.py`: ``{"prompt", "answer", "task", "hops", ...}``)
has its prompt encoded with the checkpoint's tokenizer and continued greedily by `generation.generate`
(KV cache, adaptive exits) for as many tokens as the answer has, stopping early at the end-of-document
token; the record counts as right when the decoded continuation equals the answer string exactly. This is
done once per loop count (fixed depth) and, with an exit criterion, once per threshold with the largest
loop count (or `max_loops`) as the cap, and counted per group of records with equal metadata (by default
every field but prompt and answer: task and its difficulty knobs), plus all records together.

Batches hold prompts of one token length only (records are sorted by it), so no padding enters and each
greedy continuation is the one its prompt gets alone (tested). Mean iterations per token count every
position run for a record (its prompt and the answer tokens it fed back); "answer iterations" count only
the positions whose outputs are the answer's tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .generation import generate

TEXT_FIELDS = ("prompt", "answer")


@dataclass
class AccuracyResult:
    """Exact match of one group of records at one setting: a fixed depth (`exit_criterion` 'none', `loops`
    iterations) or an adaptive exit (`loops` = the cap, `exit_threshold` set)."""

    group: Dict[str, Any]
    """The metadata the group's records share ({} for all records)."""
    loops: int
    correct: int
    total: int
    accuracy: float
    """correct / total."""
    mean_iterations: float
    """Loop iterations per position run (prompt and fed-back answer tokens)."""
    answer_iterations: float
    """Loop iterations per position whose output is an answer token."""
    exit_criterion: str = "none"
    exit_threshold: Optional[float] = None


@dataclass
class Answer:
    """One record's greedy answer and the loop iterations its positions used."""

    text: str
    correct: bool
    iterations: int = 0
    positions: int = 0
    answer_iterations: int = 0
    answer_positions: int = 0


def read_tasks(path: str) -> List[Dict[str, Any]]:
    """The records of a JSONL task file; ValueError naming file and line for a line that is not a JSON
    object with non-empty string fields prompt and answer."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n}: not JSON ({err.msg}).") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"{path}:{n}: a record must be a JSON object.")
                for key in TEXT_FIELDS:
                    if not isinstance(rec.get(key), str) or not rec[key]:
                        raise ValueError(f"{path}:{n}: field {key!r} must be a non-empty string.")
                records.append(rec)
    except OSError as err:
        raise ValueError(f"cannot read the tasks file: {err}") from None
    if not records:
        raise ValueError(f"{path}: no records.")
    return records


def _encode(tokenizer, records, model, prepend_eod: bool = False) -> Tuple[List[List[int]], List[int]]:
    """(prompt ids, answer token counts); ValueError for a record the model cannot be asked."""
    limit, vocab = model.cfg.max_position_embeddings, model.cfg.vocab_size
    start = [tokenizer.eod] if prepend_eod else []
    prompts = [start + ids for ids in tokenizer.encode_batch([r["prompt"] for r in records])]
    answers = [len(ids) for ids in tokenizer.encode_batch([r["answer"] for r in records])]
    for n, (ids, want) in enumerate(zip(prompts, answers), 1):
        if not ids or want == 0:
            raise ValueError(f"record {n}: its prompt or answer encodes to no tokens.")
        if max(ids) >= vocab:
            raise ValueError(f"record {n}: the prompt has token id {max(ids)}, outside the model's vocabulary of "
                             f"{vocab}; use the tokenizer the model was trained with.")
        if len(ids) + want > limit:
            raise ValueError(f"record {n}: prompt and answer are {len(ids) + want} tokens, more than the model's "
                             f"max_position_embeddings ({limit}).")
    return prompts, answers


@torch.no_grad()
def greedy_answers(model, tokenizer, records: Sequence[Dict[str, Any]], batch_size: int = 32,
                   num_loops: Optional[int] = None, exit_criterion: Optional[str] = None,
                   exit_threshold: Optional[float] = None, prepend_eod: bool = False) -> List[Answer]:
    """Each record's greedy answer (in record order), in batches of `batch_size` prompts of equal token length.
    `prepend_eod`: each prompt starts with the end-of-document token, as every document but the first does
    in data packed with it (preprocessing's --append-eod); that position counts as a prompt position."""
    if batch_size < 1:
        raise ValueError(f"the batch size must be >= 1, got {batch_size}.")
    prompts, wants = _encode(tokenizer, records, model, prepend_eod)
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))  # stable: file order within a length
    batches, start = [], 0
    while start < len(order):
        width = len(prompts[order[start]])
        end = start
        while end < len(order) and end - start < batch_size and len(prompts[order[end]]) == width:
            end += 1
        batches.append(order[start:end])
        start = end
    device = next(model.parameters()).device
    answers: List[Optional[Answer]] = [None] * len(records)
    for rows in batches:
        width = len(prompts[rows[0]])
        ids = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device)
        out, its = generate(model, ids, max_new_tokens=max(wants[i] for i in rows), temperature=0,
                            num_loops=num_loops, eos_token_id=tokenizer.eod, exit_criterion=exit_criterion,
                            exit_threshold=exit_threshold, return_iterations=True)
        for b, i in enumerate(rows):
            new = out[b, width:width + wants[i]].tolist()
            stop = new.index(tokenizer.eod) if tokenizer.eod in new else None
            text = tokenizer.decode(new[:stop])
            produced = len(new) if stop is None else stop + 1  # the end-of-document token was produced too
            # position p's output is token p + 1: the answer's tokens come from width - 1 .. width + produced - 2
            run, deciding = its[b, :width + produced - 1], its[b, width - 1:width + produced - 1]
            answers[i] = Answer(text, text == records[i]["answer"], int(run.sum()), int(run.numel()),
                                int(deciding.sum()), int(deciding.numel()))
    return answers


def metadata_fields(records: Sequence[Dict[str, Any]]) -> List[str]:
    """Every field but prompt and answer, in order of first appearance."""
    names: Dict[str, None] = {}
    for rec in records:
        names.update((k, None) for k in rec if k not in TEXT_FIELDS)
    return list(names)


def group_results(records: Sequence[Dict[str, Any]], answers: Sequence[Answer], group_by: Sequence[str],
                  loops: int, exit_criterion: str = "none",
                  exit_threshold: Optional[float] = None) -> List[AccuracyResult]:
    """One AccuracyResult per distinct value of the `group_by` fields (in order of first appearance; a
    record without a field has None there), then one for all records (group {})."""
    groups: Dict[str, Tuple[Dict[str, Any], List[Answer]]] = {}
    for rec, ans in zip(records, answers):
        group = {k: rec.get(k) for k in group_by}
        groups.setdefault(json.dumps(group, sort_keys=True), (group, []))[1].append(ans)
    rows = list(groups.values()) + ([({}, list(answers))] if group_by else [])
    out = []
    for group, members in rows:
        correct = sum(a.correct for a in members)
        out.append(AccuracyResult(
            group=group, loops=loops, correct=correct, total=len(members), accuracy=correct / len(members),
            mean_iterations=sum(a.iterations for a in members) / max(1, sum(a.positions for a in members)),
            answer_iterations=(sum(a.answer_iterations for a in members)
                               / max(1, sum(a.answer_positions for a in members))),
            exit_criterion=exit_criterion, exit_threshold=None if exit_criterion == "none" else exit_threshold))
    return out


def evaluate_accuracy(model, tokenizer, records: Sequence[Dict[str, Any]], loops: Sequence[int],
                      exit_criterion: str = "none", exit_thresholds: Sequence[float] = (), max_loops: int = 0,
                      batch_size: int = 32, group_by: Optional[Sequence[str]] = None,
                      prepend_eod: bool = False) -> List[AccuracyResult]:
    """Group results at every depth of `loops`, then (with an exit criterion) at every threshold with
    `max_loops` (default: the largest of `loops`) as the cap. `group_by` default: `metadata_fields`;
    `prepend_eod`: see `greedy_answers`."""
    fields = metadata_fields(records)
    group_by = fields if group_by is None else list(group_by)
    for name in group_by:
        if name not in fields:
            raise ValueError(f"--group-by {name}: no record has that field (they have: {', '.join(fields) or 'none'}).")
    results = []
    for n in loops:
        answers = greedy_answers(model, tokenizer, records, batch_size, num_loops=n, prepend_eod=prepend_eod)
        results += group_results(records, answers, group_by, n)
    adaptive = bool(exit_criterion) and exit_criterion != "none"
    for threshold in (exit_thresholds if adaptive else ()):
        cap = max_loops or max(loops)
        answers = greedy_answers(model, tokenizer, records, batch_size, num_loops=cap,
                                 exit_criterion=exit_criterion, exit_threshold=threshold, prepend_eod=prepend_eod)
        results += group_results(records, answers, group_by, cap, exit_criterion, threshold)
    return results


def evaluate_accuracy_checkpoint(load: str, tasks_file: str, tag: Optional[str] = None,
                                 loops: Optional[Sequence[int]] = None, exit_criterion: str = "none",
                                 exit_thresholds: Sequence[float] = (), max_loops: Optional[int] = None,
                                 batch_size: int = 32, group_by: Optional[Sequence[str]] = None, device: str = "cpu",
                                 tokenizer_type: Optional[str] = None, tokenizer_model: Optional[str] = None,
                                 prepend_eod: bool = False) -> Tuple[List[AccuracyResult], Dict[str, Any]]:
    """Load a checkpoint (and its tokenizer, or the one named) as tools/generate.py does and run
    `evaluate_accuracy` on `tasks_file`; loops default to the trained count. Returns (results, info)."""
    from ..checkpoint import load_model, read_meta, resolve_checkpoint, tokenizer_for
    from .evaluation import compute_settings

    records = read_tasks(tasks_file)
    path = resolve_checkpoint(load, tag)
    model = load_model(load, tag, device=device)
    tokenizer = tokenizer_for(checkpoint=path, tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model)
    notes = []
    if prepend_eod and documents_kept_apart(read_meta(path).get("config", {}).get("data", {}), path):
        prepend_eod = False
        notes.append("--prepend-eod left out: the run reset positions and attention at every end-of-document "
                     "token, so its documents were seen as if each stood alone, as a prompt alone is")
    trained = model.loop.num_loops
    depths, _, cap = compute_settings(loops, trained, exit_criterion, exit_thresholds, max_loops)
    results = evaluate_accuracy(model, tokenizer, records, depths, exit_criterion, exit_thresholds, cap,
                                batch_size, group_by, prepend_eod)
    return results, {"checkpoint": path, "tasks_file": tasks_file, "records": len(records),
                     "trained_loops": trained, "tokenizer": tokenizer.name, "prepend_eod": prepend_eod,
                     "notes": notes}


def documents_kept_apart(data: Dict[str, Any], path: str = "the checkpoint") -> bool:
    """True when a run's data settings (a config's data section) reset both positions and attention at each
    end-of-document token (model/documents.py): a document was then seen exactly as it would be alone, so a
    prompt needs no leading end-of-document token. ValueError when only one of the two was reset: greedy
    decoding cannot reproduce that view of a prompt after an end-of-document token."""
    positions, attention = bool(data.get("reset_position_ids")), bool(data.get("reset_attention_mask"))
    if positions != attention:
        done, other = ("reset_position_ids", "reset_attention_mask") if positions else \
            ("reset_attention_mask", "reset_position_ids")
        raise ValueError(f"{path} was trained with data.{done} but not data.{other}; --prepend-eod cannot "
                         "reproduce what it saw after an end-of-document token: leave --prepend-eod out.")
    return positions and attention


def _setting(r: AccuracyResult) -> str:
    if r.exit_criterion == "none":
        return f"{r.loops} loops"
    return f"{r.exit_criterion} < {r.exit_threshold:g} (cap {r.loops})"


def accuracy_table(results: Sequence[AccuracyResult], trained_loops: Optional[int] = None) -> str:
    """Markdown: one row per group (then 'all'), its group fields and record count, one column per
    setting with the accuracy in percent (exit columns add the mean iterations per token); the trained
    loop count is marked with *."""
    settings: Dict[str, None] = {}
    cells: Dict[Tuple[str, str], AccuracyResult] = {}
    groups: Dict[str, Dict[str, Any]] = {}
    for r in results:
        key = json.dumps(r.group, sort_keys=True)
        settings[_setting(r)] = None
        groups.setdefault(key, r.group)
        cells[(key, _setting(r))] = r
    fields = list(dict.fromkeys(k for g in groups.values() for k in g)) or ["set"]
    heads = [s + ("*" if trained_loops is not None and s == f"{trained_loops} loops" else "") for s in settings]
    lines = ["| " + " | ".join(fields + ["records"] + heads) + " |",
             "|" + "|".join([":---"] * len(fields) + ["---:"] * (1 + len(heads))) + "|"]
    for key, group in groups.items():
        names = [("-" if group.get(k) is None else str(group[k])) for k in fields] if group else \
            ["all"] + [""] * (len(fields) - 1)
        row = [cells.get((key, s)) for s in settings]
        total = next(r.total for r in row if r is not None)
        shown = ["-" if r is None else f"{100 * r.accuracy:.1f}" + (
            "" if r.exit_criterion == "none" else f" ({r.mean_iterations:.2f} it)") for r in row]
        lines.append("| " + " | ".join(names + [str(total)] + shown) + " |")
    return "\n".join(lines)
