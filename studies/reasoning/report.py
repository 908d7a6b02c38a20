"""Tables, figures and claims of the reasoning study (study.py beside this file), from what its runs left
on disk. Built on loop_megatron.experiments (the file readers and `archive_run` of `records`,
`markdown_table` / `mean_sd` / `mean_pm` / `splice_readme` of `tables`, the `plots` figure helpers); the
arms' roles, the thresholds of the claims and their prose are the study's own.

Reads OUT/settings.json, OUT/lr_sweep.json, OUT/eval/<arm>-s<seed>.test.json (tools/evaluate.py --task
accuracy --json: one row per hop count and setting, plus the all-records row) and the run records
RUNS/<arm>-s<seed>/{summary.json,config.yaml,metrics.jsonl}, which it first archives into
OUT/runs/<arm>-s<seed>/ (metrics thinned), so that OUT alone holds every number printed and a fresh
clone's --report-only needs no run folders. Writes
  OUT/results.md               every table below (also spliced into the README with readme=...)
  OUT/study.json               the aggregated numbers the tables show
  OUT/accuracy_vs_depth.png    test accuracy against effective depth, one panel per hop count: unshared
                               arms at their depth, looped arms at every inference loop count
  OUT/accuracy_by_hops.png     test accuracy against hop count at each arm's trained depth
Accuracies are exact-match fractions shown in percent, mean over seeds ± sample standard deviation;
comparisons are paired by seed (same data order).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

from loop_megatron.experiments.plots import pyplot, save_figure
from loop_megatron.experiments.records import ExperimentError, archive_run, read_json, read_yaml
from loop_megatron.experiments.tables import lr_sweep_table, markdown_table, mean_pm, mean_sd, splice_readme
from loop_megatron.utils import fs

README_BEGIN = "<!-- reasoning:begin -->"
README_END = "<!-- reasoning:end -->"
RUN_RECORD_FILES = ("summary.json", "metrics.jsonl", "config.yaml")
SOLVED = 0.90
"""Mean test accuracy over the claimed hop counts (claimed_hops) at which an arm counts as solving the task."""
NOT_SOLVED = 0.60
"""... and at or below which it clearly does not (chance is about 1/alphabet for p-hop, 1/ends for chain,
plus what heuristics get; one fixed-position lookup solves chain's 1 hop, which is why the claims leave it out: claimed_hops)."""
NEAR = 0.05
"""'Nearly matches': the paired mean deficit is at most this (5 accuracy points)."""
ALL = "all"


TASK_TITLES = {"phop": "p-hop induction", "chain": "pointer chasing"}


def task_description(s: Dict) -> str:
    """The task and its fixed knobs, from the study's settings (records from before `task` existed are p-hop)."""
    if s.get("task", "phop") == "chain":
        return (f"pointer chasing over {s['nodes']} positions (follow pointers from position 0 to the end of its "
                "chain; distractor chains of 1 to as many hops)")
    return f"p-hop induction over {s['alphabet']} letters, sequences of {s['length']}"


# ------------------------------------------------------------------------------------------- numbers
def _rows(path: str) -> List[Dict]:
    data = read_json(path)
    rows = data.get("results") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and "accuracy" in r for r in rows):
        raise ExperimentError(f"{path}: expected tools/evaluate.py --task accuracy --json output (a 'results' "
                              "list of rows with 'group', 'loops' and 'accuracy').")
    return rows


def _hops(row: Dict):
    group = row.get("group") or {}
    return int(group["hops"]) if "hops" in group else ALL


def overall_accuracy(path: str) -> float:
    """The all-records accuracy at the file's first fixed depth (the trained one for a valid evaluation)."""
    rows = [r for r in _rows(path) if r.get("exit_criterion", "none") == "none" and not r.get("group")]
    if not rows:
        raise ExperimentError(f"{path}: no all-records row at a fixed depth.")
    return float(rows[0]["accuracy"])


def final_valid_loss(summary_path: str) -> Optional[float]:
    """The run's last validation loss (summary.json final_valid_loss), None when it has none."""
    if not os.path.isfile(summary_path):
        return None
    value = read_json(summary_path).get("final_valid_loss")
    return None if value is None else float(value)


class RunAccuracy:
    """One (arm, seed) run: test accuracy per hop count at each depth and exit threshold, and its records."""

    def __init__(self, arm: str, seed: int, path: str, run_dir: str):
        self.arm, self.seed = arm, seed
        data = read_json(path)
        self.trained_loops = int(data.get("trained_loops") or 1)
        self.fixed: Dict[object, Dict[int, float]] = {}
        self.exits: Dict[float, Dict[object, float]] = {}
        self.exit_iterations: Dict[float, float] = {}
        for row in _rows(path):
            h = _hops(row)
            if row.get("exit_criterion", "none") == "none":
                self.fixed.setdefault(h, {})[int(row["loops"])] = float(row["accuracy"])
            else:
                t = float(row["exit_threshold"])
                self.exits.setdefault(t, {})[h] = float(row["accuracy"])
                if h == ALL:
                    self.exit_iterations[t] = float(row.get("answer_iterations") or 0.0)
        missing = [f for f in RUN_RECORD_FILES if not os.path.isfile(os.path.join(run_dir, f))]
        if missing:
            raise ExperimentError(f"{os.path.join(run_dir, missing[0])} is missing: the evaluated run {arm}-s{seed} "
                                  f"needs its archived run record ({', '.join(RUN_RECORD_FILES)}); re-run the study "
                                  "(make reasoning) to write it.")
        self.summary = read_json(os.path.join(run_dir, "summary.json"))
        self.model = read_yaml(os.path.join(run_dir, "config.yaml")).get("model") or {}

    def depth(self, loops: int) -> int:
        """Effective depth (layers applied) at `loops` iterations."""
        m = self.model
        return int(m.get("prelude_layers", 0) + loops * m.get("num_layers", 1) * m.get("inner_loops", 1)
                   + m.get("coda_layers", 0))

    def at_trained(self, hops) -> Optional[float]:
        return self.fixed.get(hops, {}).get(self.trained_loops)

    def trained_level_accuracy(self, trained_hops: Sequence[int]) -> Optional[float]:
        vals = [self.at_trained(h) for h in trained_hops]
        return None if any(v is None for v in vals) else sum(vals) / len(vals)


def load_results(out_dir: str, arms: Sequence[str], seeds: Sequence[int]) -> Dict[str, List[RunAccuracy]]:
    """{arm: [RunAccuracy per seed with a test evaluation]}, run records from OUT/runs (the archive)."""
    out: Dict[str, List[RunAccuracy]] = {}
    for arm in arms:
        for seed in seeds:
            name = f"{arm}-s{seed}"
            path = os.path.join(out_dir, "eval", f"{name}.test.json")
            if os.path.isfile(path):
                out.setdefault(arm, []).append(RunAccuracy(arm, seed, path, os.path.join(out_dir, "runs", name)))
    return out


def paired(a: Sequence[RunAccuracy], b: Sequence[RunAccuracy], value) -> List[float]:
    """value(run_a) - value(run_b) for every seed both arms have (value None: that seed is left out)."""
    by_seed = {r.seed: r for r in b}
    diffs = []
    for r in a:
        if r.seed in by_seed:
            va, vb = value(r), value(by_seed[r.seed])
            if va is not None and vb is not None:
                diffs.append(va - vb)
    return diffs


def better_verdict(diffs: Sequence[float]) -> str:
    """'holds' when every seed's difference is > 0 and the mean exceeds twice their sd."""
    m, sd, n = mean_sd(diffs)
    if n < 2:
        return "one seed: no verdict" if n else "no paired runs"
    if all(d > 0 for d in diffs) and m > 2 * sd:
        return "holds"
    if all(d < 0 for d in diffs) and -m > 2 * sd:
        return "does not hold (the opposite, beyond the seed spread)"
    return "does not hold (no difference beyond the seed spread)"


def near_verdict(diffs: Sequence[float], margin: float = NEAR) -> str:
    """'holds' when the paired mean deficit is at most `margin` (and one seed is not enough)."""
    m, sd, n = mean_sd(diffs)
    if n < 2:
        return "one seed: no verdict" if n else "no paired runs"
    return "holds" if m >= -margin else f"does not hold (behind by {-m:.1%})"


def level_verdict(values: Sequence[float], solved: bool) -> str:
    m, sd, n = mean_sd(values)
    if n == 0:
        return "no runs"
    ok = (min(values) >= SOLVED) if solved else (max(values) <= NOT_SOLVED)
    return "holds" if ok else "does not hold"


def _pct(values: Sequence[Optional[float]]) -> str:
    return mean_pm([None if v is None else 100 * v for v in values], ".1f")


def _family(settings: Dict) -> Dict[str, str]:
    return {a["name"]: a["family"] for a in settings.get("arms", [])}


def _by_family(settings: Dict, family: str) -> Optional[str]:
    for name, fam in _family(settings).items():
        if fam == family:
            return name
    return None


def claimed_hops(settings: Dict) -> List[int]:
    """The hop counts the level and paired claims are measured on: settings' claim_hops, else every trained one."""
    return list(settings.get("claim_hops") or settings["train_hops"])


def claims(results: Dict[str, List[RunAccuracy]], settings: Dict) -> List[Dict]:
    """The issue's claims, each with the numbers behind it and a verdict computed from them."""
    claimed = claimed_hops(settings)
    harder = [h for h in settings["test_hops"] if h > max(settings["train_hops"])]
    k1, kl, kL1, rec = (_by_family(settings, f) for f in ("k x 1", "k x L", "kL x 1", "recurrent"))
    acc = lambda r: r.trained_level_accuracy(claimed)  # noqa: E731
    rows = []

    def level(arm, solved):
        if arm not in results:
            return
        vals = [acc(r) for r in results[arm] if acc(r) is not None]
        what = f"{arm} solves hops {claimed} (every seed >= {SOLVED:.0%})" if solved else \
            f"{arm} clearly does not (every seed <= {NOT_SOLVED:.0%})"
        rows.append({"claim": what, "numbers": f"{_pct(vals)} % over hops {claimed}", "verdict": level_verdict(vals, solved)})

    level(kL1, True)
    level(k1, False)
    for a, b, kind in ((kl, kL1, "near"), (kl, k1, "better"), (rec, k1, "better"), (rec, kL1, "near")):
        if a in results and b in results:
            d = paired(results[a], results[b], acc)
            text = (f"{a} nearly matches {b} (paired deficit <= {NEAR:.0%})" if kind == "near"
                    else f"{a} beats {b}")
            rows.append({"claim": text, "numbers": f"Δ {_pct(d)} points (hops {claimed}, paired by seed)",
                         "verdict": near_verdict(d) if kind == "near" else better_verdict(d)})
    # Test-time depth: harder-than-trained hop counts at the best loop count above the trained one.
    for arm in (kl, rec):
        if arm not in results or not harder:
            continue
        runs = results[arm]
        deeper = sorted({L for r in runs for h in harder for L in r.fixed.get(h, {}) if L > r.trained_loops})
        if not deeper:
            continue

        def gain(r, L):
            at = [r.fixed.get(h, {}).get(L) for h in harder]
            base = [r.at_trained(h) for h in harder]
            if any(v is None for v in at + base):
                return None
            return sum(at) / len(at) - sum(base) / len(base)

        # A loop count fixed in advance (twice the trained one, else the deepest evaluated), never the best
        # one on the test split: picking that would let the test numbers choose the claim's evidence.
        best = 2 * runs[0].trained_loops if 2 * runs[0].trained_loops in deeper else deeper[-1]
        d = [g for g in (gain(r, best) for r in runs) if g is not None]
        rows.append({"claim": f"{arm} solves harder instances (hops {harder}) with more iterations",
                     "numbers": f"{best} loops vs trained {runs[0].trained_loops}: Δ {_pct(d)} points",
                     "verdict": better_verdict(d)})
    return rows


# ---------------------------------------------------------------------------------------------- tables
def _hop_label(h, trained: Sequence[int]) -> str:
    return f"hops {h}" + ("" if h in trained else " (easier)" if h < min(trained) else " (harder)")


def accuracy_table(results: Dict[str, List[RunAccuracy]], settings: Dict) -> str:
    trained, hops = list(settings["train_hops"]), list(settings["test_hops"])
    desc = {a["name"]: a["description"] for a in settings.get("arms", [])}
    lr = settings.get("lr") or {}
    rows = []
    for arm, runs in results.items():
        params = runs[0].summary.get("params")
        rows.append([f"{arm}: {desc.get(arm, '')}", f"{params:,}" if isinstance(params, int) else "–",
                     f"{lr[arm]:g}" if arm in lr else "–", str(runs[0].trained_loops), str(len(runs)),
                     *[_pct([r.at_trained(h) for r in runs]) for h in hops]])
    chance = settings.get("chance") or {}
    if chance:  # the floor: a uniform guess among the answers each record allows
        rows.append(["chance (a uniform guess among the allowed answers)", "", "", "", "",
                     *[f"{100 * chance[str(h)]:.1f}" if str(h) in chance else "–" for h in hops]])
    return markdown_table(["arm", "params", "LR", "loops", "seeds", *[_hop_label(h, trained) for h in hops]], rows)


def loops_table(results: Dict[str, List[RunAccuracy]], settings: Dict) -> str:
    trained = list(settings["train_hops"])
    looped = {a: runs for a, runs in results.items() if any(len(per) > 1 for per in runs[0].fixed.values())}
    if not looped:
        return ""
    loops = sorted({L for runs in looped.values() for r in runs for per in r.fixed.values() for L in per})
    rows = []
    for arm, runs in looped.items():
        for h in settings["test_hops"]:
            cells = []
            means = {L: mean_sd([r.fixed.get(h, {}).get(L) for r in runs])[0] for L in loops}
            finite = [m for m in means.values() if m == m]
            # bold marks a best loop count; when every count scores the same there is none
            best = max(finite) if finite and max(finite) > min(finite) else None
            for L in loops:
                vals = [r.fixed.get(h, {}).get(L) for r in runs]
                if all(v is None for v in vals):
                    cells.append("–")
                    continue
                cell = _pct(vals) + ("*" if L == runs[0].trained_loops else "")
                cells.append(f"**{cell}**" if best is not None and means[L] == best else cell)
            rows.append([arm, _hop_label(h, trained), *cells])
    return markdown_table(["arm", "test level", *[f"{L} loops" for L in loops]], rows)


def exit_table(results: Dict[str, List[RunAccuracy]], settings: Dict) -> str:
    trained, hops = list(settings["train_hops"]), list(settings["test_hops"])
    rows = []
    for arm, runs in results.items():
        for t in sorted({t for r in runs for t in r.exits}, reverse=True):
            rows.append([arm, f"{t:g}", mean_pm([r.exit_iterations.get(t) for r in runs], ".2f"),
                         *[_pct([r.exits.get(t, {}).get(h) for r in runs]) for h in hops]])
    if not rows:
        return ""
    return markdown_table(["arm", "KL threshold", "answer iterations", *[_hop_label(h, trained) for h in hops]], rows)


def lr_table(lr_sweep: Dict) -> str:
    return lr_sweep_table(lr_sweep, [
        ("valid accuracy %", lambda r: f"{100 * r['valid_accuracy']:.1f}"),
        ("final valid loss", lambda r: "–" if r.get("valid_loss") is None else f"{r['valid_loss']:.4f}")])


def claims_table(rows: Sequence[Dict]) -> str:
    return markdown_table(["claim", "numbers", "verdict"], [[r["claim"], r["numbers"], r["verdict"]] for r in rows],
                          align=["---", "---", "---"])


# ---------------------------------------------------------------------------------------------- figures
def _band(ax, xs, per_seed, color, label, marker="o"):
    means = [mean_sd(v)[0] * 100 for v in per_seed]
    lo = [min(v) * 100 for v in per_seed]
    hi = [max(v) * 100 for v in per_seed]
    ax.plot(xs, means, marker=marker, color=color, label=label)
    if any(len(v) > 1 for v in per_seed):
        ax.fill_between(xs, lo, hi, color=color, alpha=0.2)


def plot_accuracy_vs_depth(results: Dict[str, List[RunAccuracy]], settings: Dict, path: str) -> str:
    plt = pyplot()
    hops = list(settings["test_hops"])
    fig, axes = plt.subplots(1, len(hops), figsize=(3.6 * len(hops), 3.6), squeeze=False, sharey=True)
    for ax, h in zip(axes[0], hops):
        for i, (arm, runs) in enumerate(results.items()):
            loops = sorted({L for r in runs for L in r.fixed.get(h, {})})
            pts = [(runs[0].depth(L), [r.fixed[h][L] for r in runs if L in r.fixed.get(h, {})]) for L in loops]
            pts = [(x, v) for x, v in pts if v]
            if not pts:
                continue
            if len(pts) == 1:
                v = pts[0][1]
                ax.errorbar([pts[0][0]], [mean_sd(v)[0] * 100], yerr=[[mean_sd(v)[0] * 100 - min(v) * 100],
                            [max(v) * 100 - mean_sd(v)[0] * 100]], marker="s", markersize=8, color=f"C{i}",
                            linestyle="none", label=arm)
            else:
                _band(ax, [x for x, _ in pts], [v for _, v in pts], f"C{i}", f"{arm} (inference loops)")
                t = runs[0].trained_loops
                if t in loops:
                    ax.plot([runs[0].depth(t)], [mean_sd([r.fixed[h][t] for r in runs if t in r.fixed.get(h, {})])[0] * 100],
                            marker="*", markersize=14, color=f"C{i}", linestyle="none")
        ax.set_title(_hop_label(h, settings["train_hops"]))
        ax.set_xlabel("effective depth (layers applied)")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test exact match % (star: trained depth)")
    axes[0][-1].legend(fontsize=7)
    return save_figure(fig, path)


def plot_accuracy_by_hops(results: Dict[str, List[RunAccuracy]], settings: Dict, path: str) -> str:
    plt = pyplot()
    hops = list(settings["test_hops"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (arm, runs) in enumerate(results.items()):
        per = [[r.at_trained(h) for r in runs if r.at_trained(h) is not None] for h in hops]
        xs = [h for h, v in zip(hops, per) if v]
        _band(ax, xs, [v for v in per if v], f"C{i}", arm)
    chance = settings.get("chance") or {}
    if chance:
        ax.plot(hops, [100 * chance.get(str(h), float("nan")) for h in hops], color="black", linestyle=":",
                linewidth=1, label="chance (a uniform guess)")
    ax.axvline(max(settings["train_hops"]) + 0.5, color="grey", linestyle="--", linewidth=1)
    ax.text(max(settings["train_hops"]) + 0.6, 2, "harder than trained", fontsize=7, color="grey")
    ax.set_xlabel("hops")
    ax.set_ylabel("test exact match % at the trained depth")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- report
def write_reasoning_report(out_dir: str, runs_dir: str, readme: Optional[str] = None) -> Dict[str, str]:
    """Write results.md, study.json and the two figures into out_dir; splice into readme when given."""
    settings_path = os.path.join(out_dir, "settings.json")
    if not os.path.isfile(settings_path):
        raise ExperimentError(f"{settings_path}: not found; run the study first (python -m studies.reasoning.study).")
    settings = read_json(settings_path)
    arms = [a["name"] for a in settings.get("arms", [])]
    seeds = settings.get("seeds", [])
    for arm in arms:
        for seed in seeds:
            name = f"{arm}-s{seed}"
            src = os.path.join(runs_dir, name)
            if os.path.isfile(os.path.join(out_dir, "eval", f"{name}.test.json")) and \
                    os.path.isfile(os.path.join(src, "metrics.jsonl")):
                archive_run(src, os.path.join(out_dir, "runs", name))
    results = load_results(out_dir, arms, seeds)
    if not results:
        raise ExperimentError(f"{out_dir}/eval: no evaluated run yet.")
    lr_path = os.path.join(out_dir, "lr_sweep.json")
    lr_sweep = read_json(lr_path) if os.path.isfile(lr_path) else None
    claim_rows = claims(results, settings)
    written = {"depth": plot_accuracy_vs_depth(results, settings, os.path.join(out_dir, "accuracy_vs_depth.png")),
               "hops": plot_accuracy_by_hops(results, settings, os.path.join(out_dir, "accuracy_by_hops.png"))}
    loops_md, exits_md = loops_table(results, settings), exit_table(results, settings)

    def block(prefix: str) -> str:
        s = settings
        parts = [
            "Setup (from `settings.json` beside `results.md`): "
            f"{task_description(s)}, trained on hop counts {', '.join(map(str, s['train_hops']))} "
            f"({s['train_records']:,} records each), tested on {', '.join(map(str, s['test_hops']))} "
            f"({s['test_records']} new prompts each); {s['train_iters']} steps of {s['micro_batch']} x "
            f"{s['seq_length']} packed tokens, loss on the answer tokens only; d=128, 4 heads; seeds "
            f"{', '.join(map(str, seeds))}. Accuracy is exact match of the greedy answer in percent, "
            "`±` the sample standard deviation over seeds.",
        ]
        if lr_sweep:
            parts += ["", f"**Learning rate per arm**, chosen on the validation split (seed {lr_sweep['seed']}; "
                      f"{lr_sweep['criterion']}):", "", lr_table(lr_sweep)]
        if claim_rows:
            parts += ["", "**The claims, checked** (paired comparisons hold when every seed agrees and the mean "
                      "exceeds twice the seed sd):", "", claims_table(claim_rows)]
        parts += ["", "**Test accuracy at the trained depth**, per hop count:", "", accuracy_table(results, settings)]
        if loops_md:
            parts += ["", "**Test accuracy against inference loops** (* trained depth, bold best):", "", loops_md]
        if exits_md:
            parts += ["", "**Adaptive exit** (KL between successive iterations' next-token distributions, cap "
                      "the largest loop count; answer iterations: mean loop iterations at the answer's positions):",
                      "", exits_md]
        parts += ["", f"![accuracy vs depth]({prefix}accuracy_vs_depth.png)", "",
                  f"![accuracy by hops]({prefix}accuracy_by_hops.png)"]
        return "\n".join(parts) + "\n"

    written["results"] = fs.write_text(os.path.join(out_dir, "results.md"),
                                       f"# Where looping pays: {TASK_TITLES.get(settings.get('task', 'phop'))}\n\n"
                                       + block(""))
    summary = {"settings": settings, "lr_sweep": lr_sweep, "claims": claim_rows,
               "arms": {arm: {"seeds": [r.seed for r in runs], "trained_loops": runs[0].trained_loops,
                              "params": runs[0].summary.get("params"),
                              "accuracy": {str(h): {str(L): [r.fixed.get(h, {}).get(L) for r in runs]
                                                    for L in sorted({L for r in runs for L in r.fixed.get(h, {})})}
                                           for h in settings["test_hops"]},
                              "exits": {f"{t:g}": {"answer_iterations": [r.exit_iterations.get(t) for r in runs],
                                                   **{str(h): [r.exits.get(t, {}).get(h) for r in runs]
                                                      for h in settings["test_hops"]}}
                                        for t in sorted({t for r in runs for t in r.exits})}}
                        for arm, runs in results.items()}}
    written["json"] = fs.write_json(os.path.join(out_dir, "study.json"), summary)
    if readme:
        prefix = os.path.relpath(out_dir, os.path.dirname(os.path.abspath(readme)) or ".") + "/"
        written["readme"] = splice_readme(readme, block(prefix), README_BEGIN, README_END)
    return written
