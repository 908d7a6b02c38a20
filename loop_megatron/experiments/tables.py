"""Markdown tables: the results of training runs and held-out loss against the loop count, and for tables
of one's own (studies/): `markdown_table` (a header and rows), `mean_sd` / `mean_pm` (a mean over seeds
with its sample standard deviation), `lr_sweep_table` (a per-arm learning-rate sweep) and `splice_readme`
(a generated block between two markers)."""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .records import ExperimentError, LoopEval, Run, format_params
from ..utils import fs


def baseline_run(runs: Sequence[Run], name: Optional[str] = None) -> Optional[Run]:
    """The run step times are compared to: `name` (run or preset name) if given, else the 1-layer
    baseline tiny-1l (or lite-45m) when present, else the first run."""
    if not runs:
        return None
    wanted = [name] if name else ["tiny-1l", "lite-45m"]
    for w in wanted:
        for run in runs:
            if run.name == w:
                return run
        for run in runs:
            if run.preset == w and run.num_loops == 1:
                return run
    if name:
        raise ExperimentError(f"--baseline {name}: no run of that name or preset.")
    return runs[0]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Optional[Sequence[str]] = None) -> str:
    """A Markdown table: the header row, the alignment row (`align`, one '---' / '---:' / ... per column;
    default: the first column left, the others right-aligned) and one line per row (cells through str),
    joined by newlines with no trailing one."""
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def lr_sweep_table(sweep: Dict[str, Any], columns: Sequence[Tuple[str, Callable[[Dict[str, Any]], str]]]) -> str:
    """| arm | peak LR | <columns> | of a per-arm learning-rate sweep (the file StudyDriver.sweep_learning_rates
    writes): a row per arm and LR, the chosen LR marked '(chosen)', or '(chosen, grid edge)' when it is the
    grid's smallest or largest (the best LR may lie outside the grid). `columns`: (header, cell of a row)."""
    rows = []
    for arm, entry in sweep.get("arms", {}).items():
        for r in entry["rows"]:
            mark = ""
            if r["lr"] == entry["chosen_lr"]:
                mark = " (chosen, grid edge)" if entry.get("at_grid_edge") else " (chosen)"
            rows.append([arm, f"{r['lr']:g}{mark}", *[cell(r) for _, cell in columns]])
    return markdown_table(["arm", "peak LR", *[h for h, _ in columns]], rows)


def mean_sd(values: Sequence[Optional[float]]) -> Tuple[float, float, int]:
    """(mean, sample standard deviation (0 for one value), n) of the finite values; (nan, nan, 0) if none."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan"), 0
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd, len(vals)


def mean_pm(values: Sequence[Optional[float]], spec: str = ".4f") -> str:
    """'mean ± sd' of the finite values ('mean' alone for one, '–' for none)."""
    m, sd, n = mean_sd(values)
    if n == 0:
        return "–"
    return f"{m:{spec}} ± {sd:{spec}}" if n > 1 else f"{m:{spec}}"


def splice_readme(readme: str, block: str, begin: str, end: str, required: bool = True) -> str:
    """Replace the text between the begin and end markers in readme (atomically) by block. A README
    without the markers is an ExperimentError when required, else left alone."""
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        if not required:
            return readme
        raise ExperimentError(f"{readme}: no '{begin}' ... '{end}' block to replace.")
    new = pattern.sub(lambda _: f"{begin}\n{block}{end}", text, count=1)
    return fs.write_text(readme, new)


def _fmt(value: Optional[float], spec: str) -> str:
    return "–" if value is None else format(value, spec)


def results_rows(runs: Sequence[Run], baseline: Optional[Run] = None) -> List[Dict[str, Any]]:
    base_time = baseline.step_time if baseline is not None else None
    rows = []
    for run in runs:
        rel = run.step_time / base_time if run.step_time and base_time else None
        rows.append({"run": run.name, "params": run.params, "unique_layers": run.unique_layers,
                     "loops": run.num_loops, "inner_loops": run.inner_loops, "gates": run.gates,
                     "effective_depth": run.effective_depth, "tokens_seen": run.tokens_seen,
                     "final_train_loss": run.final_train_loss, "final_valid_loss": run.final_valid_loss,
                     "tokens_per_sec": run.tokens_per_sec, "step_time": run.step_time, "relative_step_time": rel})
    return rows


def results_markdown(runs: Sequence[Run], baseline: Optional[Run] = None) -> str:
    """| run | params | unique layers | loops | effective depth | gates | tokens seen | final train loss |
    final valid loss | tokens/s | step time (x baseline) |"""
    baseline = baseline if baseline is not None else baseline_run(runs)
    base_name = baseline.name if baseline is not None else "baseline"
    lines = [f"| run | params | unique layers | loops | effective depth | gates | tokens seen | final train loss | "
             f"final valid loss | tokens/s | step time (x {base_name}) |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in results_rows(runs, baseline):
        loops = f"{r['loops']}" + (f" x {r['inner_loops']} inner" if r["inner_loops"] > 1 else "")
        gates = r["gates"] if (r["loops"] > 1 or r["inner_loops"] > 1) else "–"
        tokens = f"{int(r['tokens_seen']):,}" if r["tokens_seen"] is not None else "–"
        lines.append(f"| {r['run']} | {format_params(r['params']) if r['params'] is not None else '–'} | "
                     f"{_fmt(r['unique_layers'], 'd')} | {loops} | {_fmt(r['effective_depth'], 'd')} | {gates} | "
                     f"{tokens} | {_fmt(r['final_train_loss'], '.4f')} | {_fmt(r['final_valid_loss'], '.4f')} | "
                     f"{_fmt(r['tokens_per_sec'], ',.0f')} | {_fmt(r['relative_step_time'], '.2f')} |")
    return "\n".join(lines)


def loops_markdown(evals: Sequence[LoopEval], metric: str = "loss") -> str:
    """One row per model, one column per loop count evaluated; * marks the trained loop count."""
    counts = sorted({p["loops"] for e in evals for p in e.points})
    header = "| model | trained loops | " + " | ".join(f"{n} loop{'s' if n > 1 else ''}" for n in counts) + \
             " | best |"
    lines = [header, "|---|---:|" + "---:|" * len(counts) + "---|"]
    for e in evals:
        by_loops = {p["loops"]: p[metric] for p in e.points}
        cells = []
        for n in counts:
            if n in by_loops:
                mark = "*" if n == e.trained_loops else ""
                cells.append(f"{by_loops[n]:.4f}{mark}" if metric == "loss" else f"{by_loops[n]:.2f}{mark}")
            else:
                cells.append("–")
        best = min(e.points, key=lambda p: p[metric])
        lines.append(f"| {e.name} | {e.trained_loops if e.trained_loops is not None else '–'} | "
                     + " | ".join(cells) + f" | {best['loops']} loops |")
    lines.append("")
    lines.append(f"Held-out {metric} at each loop count (* = the loop count the model was trained with).")
    return "\n".join(lines)
