"""Tables and plots of the "does looping pay?" study (study.py beside this file), from what its runs left
on disk. Built on loop_megatron.experiments' public analysis API (the file readers of `records`,
`tables.markdown_table`, the `plots` figure helpers); the comparisons, the claims and their prose are the
study's own.

Reads OUT/settings.json, OUT/lr_sweep.json, OUT/eval/<arm>-s<seed>.{valid,test,loops,exit}.json
(tools/evaluate.py --json) and RUNS/<arm>-s<seed>/{summary.json,config.yaml,metrics.jsonl}; first copies
each evaluated run's three files into OUT/runs/<arm>-s<seed>/ (metrics thinned to every 5th training step
plus every evaluation), so that OUT alone holds every number the report prints and a later --report-only
needs no run folders; writes
  OUT/runs/...              the archived run records above
  OUT/results.md            every table below (also spliced into the README with readme=...)
  OUT/study.json            the aggregated numbers the tables show
  OUT/curves.png            train loss and mean valid BPB against tokens, mean over seeds with a min-max band
  OUT/bpb_vs_depth.png      valid BPB against effective depth, unshared vs shared
  OUT/bpb_vs_loops.png      valid BPB against inference loops, and the adaptive-exit curve
Every number is a mean over seeds with its sample standard deviation ("±"); comparisons are paired by
seed (same data order). The headline metric is bits per byte averaged over the five sources (each source
weighs the same, whatever its size).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from loop_megatron.experiments.plots import pyplot, save_figure, smooth
from loop_megatron.experiments.records import ExperimentError, read_json, read_jsonl, read_yaml
from loop_megatron.experiments.records import archive_run as _archive_run
from loop_megatron.experiments.tables import lr_sweep_table, markdown_table, mean_pm, mean_sd
from loop_megatron.experiments.tables import splice_readme as _splice_readme
from loop_megatron.utils import fs

README_BEGIN = "<!-- study:begin -->"
README_END = "<!-- study:end -->"
# The test-time compute section of the README carries the recurrent-depth arm's compute curve in its own
# block (optional: spliced only where the README has these markers).
README_TTC_BEGIN = "<!-- study-ttc:begin -->"
README_TTC_END = "<!-- study-ttc:end -->"
# The archived record of an evaluated run (OUT/runs/<arm>-s<seed>/), which the report needs whole.
RUN_RECORD_FILES = ("summary.json", "metrics.jsonl", "config.yaml")
# Training records kept in the archived metrics.jsonl: every Nth training step (and every evaluation).
ARCHIVE_EVERY = 5

# (A, B, matched on, note): the comparisons the issue and the papers ask about.
PAIRS: Tuple[Tuple[str, str, str, str], ...] = (
    ("1Lx2", "1L", "parameters", "paper: loop-45m (1x2) 3.67 vs lite-45m (1x1) 3.98 val loss"),
    ("1Lx4", "1L", "parameters", ""),
    ("2Lx2", "2L", "parameters", ""),
    ("rec", "2L", "parameters", "the recurrent-depth recipe"),
    ("1Lx4-prog", "1Lx4", "parameters", "progressive vs fixed loops"),
    ("1Lx2", "2L", "effective depth", ""),
    ("1Lx4", "4L", "effective depth", ""),
    ("2Lx2", "4L", "effective depth", "paper: loop-81m (6x6) 3.11 vs gpt2-124m (12L) 3.12"),
    ("rec", "4L", "training FLOPs (about)", ""),
)


# ------------------------------------------------------------------------------------------- numbers
def _pm(values: Sequence[float], spec: str = ".4f") -> str:
    return mean_pm(values, spec)


def _eval_rows(path: str) -> List[Dict]:
    data = read_json(path)
    rows = data.get("results") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ExperimentError(f"{path}: expected tools/evaluate.py --json output with a 'results' list.")
    return rows


def per_source(path: str, metric: str = "bpb") -> Dict[str, float]:
    """{set name: metric} of an evaluate.py JSON at one depth (the file's only row per set)."""
    out: Dict[str, float] = {}
    for row in _eval_rows(path):
        if row.get("exit_criterion", "none") not in (None, "none"):
            continue
        out.setdefault(row.get("name") or "valid", float(row[metric]))
    return out


def macro_bpb(path: str) -> float:
    """Mean over the sets of an evaluate.py JSON of their bits per byte (each set weighs the same)."""
    values = list(per_source(path).values())
    return sum(values) / len(values)


@dataclass
class RunResult:
    """One (arm, seed) run: its held-out numbers, sweeps and training records."""

    arm: str
    seed: int
    valid_bpb: Dict[str, float] = field(default_factory=dict)
    valid_loss: Dict[str, float] = field(default_factory=dict)
    test_bpb: Dict[str, float] = field(default_factory=dict)
    loops: List[Dict] = field(default_factory=list)
    exits: List[Dict] = field(default_factory=list)
    summary: Dict = field(default_factory=dict)
    records: List[Dict] = field(default_factory=list)
    config: Dict = field(default_factory=dict)

    @property
    def macro_valid_bpb(self) -> float:
        return sum(self.valid_bpb.values()) / len(self.valid_bpb) if self.valid_bpb else float("nan")

    @property
    def macro_valid_loss(self) -> float:
        return sum(self.valid_loss.values()) / len(self.valid_loss) if self.valid_loss else float("nan")

    @property
    def macro_test_bpb(self) -> float:
        return sum(self.test_bpb.values()) / len(self.test_bpb) if self.test_bpb else float("nan")

    @property
    def train_flops_per_token(self) -> float:
        """Mean training FLOPs per token over the steps run (sampled/scheduled depth included); exact from
        the archived summary (its records are thinned), else from the records."""
        if self.summary.get("train_flops_per_token") is not None:
            return float(self.summary["train_flops_per_token"])
        flops = [r["flops_per_token"] for r in self.records if r.get("flops_per_token") is not None]
        return sum(flops) / len(flops) if flops else float("nan")


def _macro(sweep_rows: Sequence[Dict], key) -> Dict:
    """Group sweep rows by key(row) and average bpb and mean_iterations over the sets."""
    groups: Dict = {}
    for row in sweep_rows:
        groups.setdefault(key(row), []).append(row)
    return {k: {"bpb": sum(r["bpb"] for r in rows) / len(rows),
                "mean_iterations": sum(r.get("mean_iterations", 0) for r in rows) / len(rows)}
            for k, rows in groups.items()}


def archive_run(run_dir: str, dest: str) -> None:
    """loop_megatron.experiments.records.archive_run, every ARCHIVE_EVERY-th training step kept."""
    _archive_run(run_dir, dest, every=ARCHIVE_EVERY)


def archive_runs(out_dir: str, runs_dir: str, names: Sequence[str]) -> None:
    """archive_run for every named run that has both an evaluation in out_dir and a folder in runs_dir."""
    for name in names:
        src = os.path.join(runs_dir, name)
        if os.path.isfile(os.path.join(out_dir, "eval", f"{name}.valid.json")) and \
                os.path.isfile(os.path.join(src, "metrics.jsonl")):
            archive_run(src, os.path.join(out_dir, "runs", name))


def load_results(out_dir: str, arms: Sequence[str], seeds: Sequence[int]) -> Dict[str, List[RunResult]]:
    """{arm: [RunResult per seed that has a valid evaluation]}; run records from OUT/runs (the archive)."""
    results: Dict[str, List[RunResult]] = {}
    for arm in arms:
        for seed in seeds:
            name = f"{arm}-s{seed}"
            valid = os.path.join(out_dir, "eval", f"{name}.valid.json")
            if not os.path.isfile(valid):
                continue
            r = RunResult(arm, seed, per_source(valid), per_source(valid, "loss"))
            test = os.path.join(out_dir, "eval", f"{name}.test.json")
            if os.path.isfile(test):
                r.test_bpb = per_source(test)
            for kind, attr in (("loops", "loops"), ("exit", "exits")):
                path = os.path.join(out_dir, "eval", f"{name}.{kind}.json")
                if os.path.isfile(path):
                    setattr(r, attr, _eval_rows(path))
            run_dir = os.path.join(out_dir, "runs", name)
            missing = [f for f in RUN_RECORD_FILES if not os.path.isfile(os.path.join(run_dir, f))]
            if missing:  # parameters, FLOPs and curves come from these: without them the tables would be wrong
                raise ExperimentError(
                    f"{os.path.join(run_dir, missing[0])} is missing: the evaluated run {name} needs its archived "
                    f"run record ({', '.join(RUN_RECORD_FILES)}); re-run the study (make experiments) to write it.")
            r.summary = read_json(os.path.join(run_dir, "summary.json"))
            r.records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
            r.config = read_yaml(os.path.join(run_dir, "config.yaml"))
            results.setdefault(arm, []).append(r)
    return results


# --------------------------------------------------------------------------------------- comparisons
def compare(a: List[RunResult], b: List[RunResult]) -> Optional[Dict]:
    """Paired (by seed) difference of mean valid BPB, A - B, and a verdict against the seed spread."""
    by_seed = {r.seed: r for r in b}
    diffs = [ra.macro_valid_bpb - by_seed[ra.seed].macro_valid_bpb for ra in a if ra.seed in by_seed]
    if not diffs:
        return None
    d_mean, d_sd, n = mean_sd(diffs)
    _, sd_a, _ = mean_sd([r.macro_valid_bpb for r in a])
    _, sd_b, _ = mean_sd([r.macro_valid_bpb for r in b])
    noise = math.sqrt((sd_a ** 2 + sd_b ** 2) / 2)
    a_better = sum(d < 0 for d in diffs)
    if n < 2:
        verdict = "one seed: no verdict"
    elif a_better in (0, n) and abs(d_mean) > 2 * noise:
        verdict = "A better" if d_mean < 0 else "B better"
    else:
        verdict = "within noise"
    return {"delta": d_mean, "delta_sd": d_sd, "n": n, "a_better": a_better, "seed_sd": noise, "verdict": verdict,
            "diffs": diffs}


def equivalent_layers(bpb: float, unshared: Dict[int, float]) -> Optional[float]:
    """Unique layers an unshared model would need for this bpb: piecewise-linear in log2(layers) through
    the unshared points, extended linearly past the ends. Only the points up to the first one that does
    not improve on its predecessor are used (where unique depth still pays); None when fewer than two."""
    pts = sorted(unshared.items())
    for i in range(1, len(pts)):
        if not pts[i][1] < pts[i - 1][1]:
            pts = pts[:i]
            break
    if len(pts) < 2:
        return None
    xs = [math.log2(L) for L, _ in pts]
    ys = [v for _, v in pts]
    for i in range(len(pts) - 1):
        last = i == len(pts) - 2
        if ys[i + 1] <= bpb or last:
            if bpb > ys[0]:
                i = 0
            t = (ys[i] - bpb) / (ys[i] - ys[i + 1])
            return 2 ** (xs[i] + t * (xs[i + 1] - xs[i]))
    return None


# ---------------------------------------------------------------------------------------------- tables
def _arm_meta(settings: Dict) -> Dict[str, Dict]:
    return {a["name"]: a for a in settings.get("arms", [])}


def _fmt_params(n: Optional[float]) -> str:
    if n is None or not math.isfinite(n):
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _unique_block_params(r: RunResult) -> Optional[float]:
    s = r.summary
    if s.get("non_embedding_params") is None:
        return None
    return float(s["non_embedding_params"])


def results_table(results: Dict[str, List[RunResult]], sources: Sequence[str], meta: Dict[str, Dict]) -> str:
    header = ["arm", "what", "seeds", "params", "non-emb. params", "train MFLOP/token", "**valid bpb (mean of sources)**",
              *sources, "valid loss (mean)", "test bpb (mean)"]
    rows = []
    for arm, runs in results.items():
        rows.append([f"**{arm}**", meta.get(arm, {}).get("description", ""), str(len(runs)),
                     _fmt_params(runs[0].summary.get("params")), _fmt_params(_unique_block_params(runs[0])),
                     _pm([r.train_flops_per_token / 1e6 for r in runs], ".2f"),
                     "**" + _pm([r.macro_valid_bpb for r in runs]) + "**",
                     *[_pm([r.valid_bpb.get(s, float("nan")) for r in runs], ".3f") for s in sources],
                     _pm([r.macro_valid_loss for r in runs]), _pm([r.macro_test_bpb for r in runs])])
    align = ["---", "---"] + ["---:"] * (len(header) - 2)
    return markdown_table(header, rows, align)


def comparison_rows(results: Dict[str, List[RunResult]]) -> List[Dict]:
    out = []
    for a, b, matched, note in PAIRS:
        if a not in results or b not in results:
            continue
        c = compare(results[a], results[b])
        if c is None:
            continue
        ra, rb = results[a][0], results[b][0]
        params = (ra.summary.get("params") or float("nan")) / (rb.summary.get("params") or float("nan"))
        flops = (mean_sd([r.train_flops_per_token for r in results[a]])[0]
                 / mean_sd([r.train_flops_per_token for r in results[b]])[0])
        out.append(dict(c, a=a, b=b, matched=matched, note=note, params_ratio=params, flops_ratio=flops))
    return out


def comparison_table(rows: Sequence[Dict]) -> str:
    header = ["A", "B", "matched on", "params A/B", "train FLOPs A/B", "Δ valid bpb (A − B)", "seeds A better",
              "seed sd", "verdict", "note"]
    body = [[r["a"], r["b"], r["matched"], f"{r['params_ratio']:.2f}", f"{r['flops_ratio']:.2f}",
             f"{r['delta']:+.4f} ± {r['delta_sd']:.4f}", f"{r['a_better']}/{r['n']}", f"{r['seed_sd']:.4f}",
             r["verdict"], r["note"]] for r in rows]
    return markdown_table(header, body, ["---", "---", "---", "---:", "---:", "---:", "---:", "---:", "---", "---"])


def recurrence_worth(results: Dict[str, List[RunResult]], meta: Dict[str, Dict]) -> List[Dict]:
    """Per looped arm: the unique layers an unshared model would need for its BPB (paired by seed), and
    what one extra block application is worth in unique blocks: (L_eq - U) / (applications - U)."""
    unshared_arms = {1: "1L", 2: "2L", 4: "4L"}
    if not all(a in results for a in unshared_arms.values()):
        return []
    out = []
    for arm, runs in results.items():
        if meta.get(arm, {}).get("family") == "unshared":
            continue
        model = runs[0].config.get("model") or {}
        unique = sum(int(model.get(k) or 0) for k in ("prelude_layers", "num_layers", "coda_layers"))
        applications = runs[0].summary.get("effective_depth")
        if not applications or applications <= unique:
            continue
        eq, worth = [], []
        for r in runs:
            points = {L: next((x.macro_valid_bpb for x in results[name] if x.seed == r.seed), float("nan"))
                      for L, name in unshared_arms.items()}
            L_eq = equivalent_layers(r.macro_valid_bpb, points)
            if L_eq is not None:
                eq.append(L_eq)
                worth.append((L_eq - unique) / (applications - unique))
        out.append({"arm": arm, "unique_layers": unique, "applications": applications,
                    "equivalent_layers": eq, "worth": worth, "seeds": len(runs)})
    return out


def worth_table(rows: Sequence[Dict]) -> str:
    body = [[r["arm"], str(r["unique_layers"]), str(r["applications"]),
             _pm(r["equivalent_layers"], ".2f") if r["equivalent_layers"] else "n/a",
             _pm(r["worth"], ".2f") if r["worth"] else "n/a", f"{len(r['worth'])}/{r['seeds']}"] for r in rows]
    return markdown_table(["arm", "unique layers U", "block applications A", "equivalent unshared layers L_eq",
                           "worth of one extra application (L_eq − U)/(A − U)", "seeds placed"], body)


def loop_sweep(results: Dict[str, List[RunResult]]) -> Dict[str, Dict[int, List[float]]]:
    """{arm: {inference loops: [mean-of-sources bpb per seed]}} from the loops sweep."""
    out: Dict[str, Dict[int, List[float]]] = {}
    for arm, runs in results.items():
        for r in runs:
            if not r.loops:
                continue
            for loops, v in _macro(r.loops, lambda row: int(row["loops"])).items():
                out.setdefault(arm, {}).setdefault(loops, []).append(v["bpb"])
    return out


def exit_sweep(results: Dict[str, List[RunResult]]) -> Dict[str, Dict[float, Dict[str, List[float]]]]:
    """{arm: {threshold: {'bpb': [...], 'mean_iterations': [...]}}} from the adaptive-exit sweep."""
    out: Dict[str, Dict[float, Dict[str, List[float]]]] = {}
    for arm, runs in results.items():
        for r in runs:
            rows = [row for row in r.exits if row.get("exit_criterion") not in (None, "none")]
            for thr, v in _macro(rows, lambda row: float(row["exit_threshold"])).items():
                cell = out.setdefault(arm, {}).setdefault(thr, {"bpb": [], "mean_iterations": []})
                cell["bpb"].append(v["bpb"])
                cell["mean_iterations"].append(v["mean_iterations"])
    return out


def loops_table(sweep: Dict[str, Dict[int, List[float]]], trained: Dict[str, int]) -> str:
    all_loops = sorted({L for per in sweep.values() for L in per})
    body = []
    for arm, per in sweep.items():
        best = min(per, key=lambda L: mean_sd(per[L])[0])
        cells = []
        for L in all_loops:
            if L not in per:
                cells.append("–")
                continue
            text = _pm(per[L], ".3f") + ("*" if L == trained.get(arm) else "")
            cells.append(f"**{text}**" if L == best else text)
        body.append([arm, *cells])
    return markdown_table(["arm", *[f"{L} loops" for L in all_loops]], body)


def exit_table(exits: Dict[str, Dict[float, Dict[str, List[float]]]]) -> str:
    body = []
    for arm, per in exits.items():
        for thr in sorted(per, reverse=True):
            body.append([arm, f"kl < {thr:g}", _pm(per[thr]["mean_iterations"], ".2f"), _pm(per[thr]["bpb"], ".3f")])
    return markdown_table(["arm", "exit rule", "mean iterations / token", "valid bpb (mean of sources)"], body)


# ------------------------------------------------------------------------------------ claims, compute
# Two inference settings of one checkpoint count as equally good when their BPB differs by less than this
# fraction (0.1%, about 0.0024 bpb here): smaller than the seed-to-seed sd of the paired comparisons the
# study can call (0.003 bpb and up), so a gap below it is not one a user could rely on.
EXIT_MATCH_TOLERANCE = 1e-3
PAPER_WORTH = 0.46


def cheapest_matching_exit(sweep: Dict[int, List[float]], exits: Dict[float, Dict[str, List[float]]],
                           depth: int) -> Optional[Dict]:
    """The exit threshold with the fewest mean iterations whose BPB (mean over seeds) is within
    EXIT_MATCH_TOLERANCE of fixed depth `depth` on the same batches; None when none is."""
    if depth not in sweep or not exits:
        return None
    fixed = mean_sd(sweep[depth])[0]
    ok = [(mean_sd(v["mean_iterations"])[0], thr, mean_sd(v["bpb"])[0]) for thr, v in exits.items()
          if mean_sd(v["bpb"])[0] <= fixed * (1 + EXIT_MATCH_TOLERANCE)]
    if not ok:
        return None
    iters, thr, bpb = min(ok)
    return {"threshold": thr, "mean_iterations": iters, "bpb": bpb, "fixed_depth": depth, "fixed_bpb": fixed,
            "saving": 1 - iters / depth}


def fixed_depth_at(per_depth: Dict[int, float], iterations: float) -> Optional[float]:
    """Fixed-depth BPB at a fractional number of iterations: linear between the swept depths on either
    side; None outside the swept range."""
    if iterations in per_depth:
        return per_depth[iterations]
    depths = sorted(per_depth)
    for lo, hi in zip(depths, depths[1:]):
        if lo < iterations < hi:
            t = (iterations - lo) / (hi - lo)
            return per_depth[lo] + t * (per_depth[hi] - per_depth[lo])
    return None


def exit_advantage(sweep: Dict[int, List[float]], exits: Dict[float, Dict[str, List[float]]]) -> Dict[float, List[float]]:
    """{threshold: per seed, exit BPB minus the fixed-depth BPB at the same mean iterations} (< 0: the exit
    spends its iterations better than a uniform depth would). Seeds are paired by position."""
    out: Dict[float, List[float]] = {}
    for thr, v in exits.items():
        diffs = []
        for k, (bpb, iters) in enumerate(zip(v["bpb"], v["mean_iterations"])):
            fixed = fixed_depth_at({L: vals[k] for L, vals in sweep.items() if k < len(vals)}, iters)
            if fixed is not None:
                diffs.append(bpb - fixed)
        out[thr] = diffs
    return out


def _paired_verdict(diffs: Sequence[float], floor: float = 0.0) -> str:
    """Verdict on paired per-seed differences (< 0 good) of two settings of the same checkpoints: every seed
    agrees and |mean| exceeds twice their sd (the sd of the differences: the seeds' own spread cancels in
    the pairing), and |mean| is at least `floor`, below which a difference counts as none in practice."""
    m, sd, n = mean_sd(diffs)
    if n < 2:
        return "one seed: no verdict"
    if abs(m) < floor:
        return f"not reproduced (the gap is below {floor:.4f} bpb, the {EXIT_MATCH_TOLERANCE:.1%} that counts as equal)"
    if all(d < 0 for d in diffs) and abs(m) > 2 * sd:
        return f"reproduced, by {abs(m):.4f} bpb"
    if all(d > 0 for d in diffs) and abs(m) > 2 * sd:
        return "not reproduced (the opposite, beyond the seed spread)"
    return "not reproduced (no difference beyond the seed spread)"


def _verdict_word(c: Optional[Dict], want: str) -> str:
    """Map a comparison verdict to whether the claim (want: 'A better' or 'A not worse') held."""
    if c is None:
        return "not run"
    v = c["verdict"]
    if v == "A better":
        return "reproduced"
    if v == "B better":
        return "not reproduced (the opposite, beyond the seed spread)"
    if v == "within noise":
        return "reproduced (no difference beyond the seed spread)" if want == "A not worse" else \
            "not reproduced (no difference beyond the seed spread)"
    return v


def claims(comps: Sequence[Dict], worth: Sequence[Dict], sweep: Dict[str, Dict[int, List[float]]],
           exits: Dict[str, Dict[float, Dict[str, List[float]]]], trained: Dict[str, int]) -> List[Dict]:
    """The papers' claims, each against the study's numbers and a verdict that follows from the tables."""
    by_pair = {(c["a"], c["b"]): c for c in comps}

    def delta(a: str, b: str) -> str:
        c = by_pair.get((a, b))
        return "–" if c is None else f"{a} − {b}: {c['delta']:+.4f} ± {c['delta_sd']:.4f} bpb ({c['a_better']}/{c['n']} seeds better)"

    rows = []
    for a, b in (("1Lx2", "1L"), ("1Lx4", "1L"), ("2Lx2", "2L")):
        rows.append({"claim": f"Looping beats no looping at equal parameters ({a} vs {b})",
                     "paper": "1x2 vs 1x1: 3.67 vs 3.98 val loss (arXiv 2409.14199)" if a == "1Lx2" else "",
                     "ours": delta(a, b), "verdict": _verdict_word(by_pair.get((a, b)), "A better")})
    for a in ("2Lx2", "1Lx4"):
        rows.append({"claim": f"A looped model approaches the deeper unshared one of its effective depth ({a} vs 4L)",
                     "paper": "6x6 vs 12L: 3.11 vs 3.12 val loss at 0.65x the parameters" if a == "2Lx2" else "",
                     "ours": delta(a, "4L"), "verdict": _verdict_word(by_pair.get((a, "4L")), "A not worse")})
    for w in worth:
        if not w["worth"]:
            continue
        m, sd, n = mean_sd(w["worth"])
        inside = abs(m - PAPER_WORTH) <= max(2 * sd, 0.1)
        rows.append({"claim": f"One extra application of the shared block is worth about {PAPER_WORTH} of a unique "
                              f"block ({w['arm']})",
                     "paper": "≈0.46 (arXiv 2604.21106)", "ours": f"{_pm(w['worth'], '.2f')} ({n} seeds)",
                     "verdict": "reproduced" if inside else ("not reproduced (worth less)" if m < PAPER_WORTH
                                                             else "not reproduced (worth more)")})
    for arm, per in exits.items():
        depth = trained.get(arm)
        if arm not in sweep or depth not in sweep[arm]:
            continue
        deepest = max(sweep[arm])
        diffs = [x - y for x, y in zip(sweep[arm][deepest], sweep[arm][depth])]
        m, sd, n = mean_sd(diffs)
        stable = m <= EXIT_MATCH_TOLERANCE * mean_sd(sweep[arm][depth])[0]
        rows.append({"claim": f"Injection + sampled depth extrapolate: more loops at inference than trained do "
                              f"not hurt ({arm}, {depth} -> {deepest} loops)",
                     "paper": "Huginn (arXiv 2502.05171)",
                     "ours": f"bpb({deepest}) − bpb({depth}): {m:+.4f} ± {sd:.4f} ({n} seeds)",
                     "verdict": "reproduced" if stable else "not reproduced (degrades)"})
        best = cheapest_matching_exit(sweep[arm], per, depth)
        rows.append({"claim": f"A per-token exit keeps the trained depth's quality (within {EXIT_MATCH_TOLERANCE:.1%}) "
                              f"with fewer iterations ({arm})",
                     "paper": "Huginn, Ouro (arXiv 2510.25741)",
                     "ours": "no threshold matched" if best is None else
                     f"kl < {best['threshold']:g}: {best['mean_iterations']:.2f} iterations/token, "
                     f"{best['saving']:.0%} fewer than depth {depth}, bpb {best['bpb']:.4f} vs {best['fixed_bpb']:.4f}",
                     "verdict": "reproduced" if best is not None and best["saving"] > 0 else "not reproduced"})
        adv = {t: d for t, d in exit_advantage(sweep[arm], per).items() if d}
        if adv:
            thr = min(adv, key=lambda t: mean_sd(adv[t])[0])
            m, sd, n = mean_sd(adv[thr])
            rows.append({"claim": f"A per-token exit beats a uniform depth of the same mean iterations ({arm}; "
                                  "fixed depths interpolated; the best of the thresholds)",
                         "paper": "Huginn, Ouro, Mixture-of-Recursions",
                         "ours": f"kl < {thr:g}: {m:+.4f} ± {sd:.4f} bpb vs fixed depth at "
                                 f"{mean_sd(per[thr]['mean_iterations'])[0]:.2f} iterations "
                                 f"({sum(d < 0 for d in adv[thr])}/{n} seeds better)",
                         "verdict": _paired_verdict(adv[thr], EXIT_MATCH_TOLERANCE * mean_sd(sweep[arm][depth])[0])})
    for a, b, what in (("rec", "2L", "The recurrent-depth recipe beats spending the same unique parameters unshared"),
                       ("1Lx4-prog", "1Lx4", "Progressive looping beats fixed looping")):
        if (a, b) in by_pair:
            rows.append({"claim": f"{what} ({a} vs {b})", "paper": "", "ours": delta(a, b),
                         "verdict": _verdict_word(by_pair[(a, b)], "A better")})
    return rows


def claims_table(rows: Sequence[Dict]) -> str:
    return markdown_table(["claim", "paper", "this study", "verdict"],
                          [[r["claim"], r["paper"] or "–", r["ours"], r["verdict"]] for r in rows], ["---"] * 4)


def compute_curve_block(sweep: Dict[str, Dict[int, List[float]]], exits: Dict[str, Dict[float, Dict[str, List[float]]]],
                        trained: Dict[str, int], plot: str) -> str:
    """For each arm with an exit sweep: fixed depths and exit thresholds as one table sorted by compute."""
    parts = []
    for arm, per in exits.items():
        adv = exit_advantage(sweep.get(arm, {}), per)
        rows = [(float(L), f"fixed depth {L}", f"{L}", _pm(v, ".4f"), "–") for L, v in sweep.get(arm, {}).items()]
        rows += [(mean_sd(v["mean_iterations"])[0], f"kl < {thr:g}", _pm(v["mean_iterations"], ".2f"),
                  _pm(v["bpb"], ".4f"), _pm(adv.get(thr, []), "+.4f")) for thr, v in per.items()]
        rows.sort(key=lambda r: (r[0], r[1]))
        parts += [f"`{arm}` (mean of the five sources' valid bpb, ± over seeds; fixed depths and the `kl` exit on "
                  "the same batches, sorted by iterations per token; the last column is the exit's bpb minus "
                  "the fixed-depth bpb interpolated at the same iterations, paired by seed, < 0: the exit "
                  "spends its iterations better):", "",
                  markdown_table(["setting", "iterations / token", "valid bpb",
                                  "Δ vs uniform depth at equal iterations"], [r[1:] for r in rows]), ""]
        best = cheapest_matching_exit(sweep.get(arm, {}), per, trained.get(arm, 0))
        if best is not None:
            parts += [f"The cheapest exit within {EXIT_MATCH_TOLERANCE:.1%} of the trained depth's bpb is "
                      f"kl < {best['threshold']:g}: {best['mean_iterations']:.2f} iterations per token, "
                      f"{best['saving']:.0%} fewer than depth {best['fixed_depth']}.", ""]
    parts.append(f"![test-time compute]({plot})")
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------- plots
def _curve(runs: Sequence[RunResult], key, smooth_weight: float = 0.0):
    """(x tokens, mean, min, max) over seeds of the records that have key(record)."""
    series = []
    for r in runs:
        pts = [(rec.get("tokens_seen") or rec["iteration"], key(rec)) for rec in r.records if key(rec) is not None]
        if pts:
            xs, ys = zip(*pts)
            series.append((list(xs), smooth(ys, smooth_weight) if smooth_weight else list(ys)))
    if not series:
        return None
    n = min(len(s[0]) for s in series)
    xs = series[0][0][:n]
    cols = [[s[1][i] for s in series] for i in range(n)]
    return xs, [sum(c) / len(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def _valid_points(records: Sequence[Dict], tokens_per_step: float) -> List[Dict]:
    """One record per validation point: the trainer writes one line per named set, without tokens_seen."""
    merged: Dict[int, Dict] = {}
    for rec in records:
        if any(k.startswith("valid_") for k in rec):
            point = merged.setdefault(int(rec["iteration"]), {"iteration": int(rec["iteration"]),
                                                              "tokens_seen": int(rec["iteration"]) * tokens_per_step})
            point.update({k: v for k, v in rec.items() if k.startswith("valid_")})
    return [merged[i] for i in sorted(merged)]


def plot_curves(results: Dict[str, List[RunResult]], sources: Sequence[str], path: str) -> str:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))

    def valid_bpb(rec):
        vals = [rec.get(f"valid_{s}_bpb") for s in sources]
        return sum(vals) / len(vals) if all(v is not None for v in vals) else None

    for arm, runs in results.items():
        per_step = (runs[0].summary.get("tokens_seen") or 0) / max(1, runs[0].summary.get("iterations") or 1)
        train = _curve(runs, lambda rec: rec.get("loss") if "loss" in rec else None, 0.9)
        if train:
            xs, m, lo, hi = train
            (line,) = ax1.plot(xs, m, label=arm, lw=1.2)
            ax1.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
        valid = _curve([RunResult(r.arm, r.seed, records=_valid_points(r.records, per_step)) for r in runs], valid_bpb)
        if valid:
            xs, m, lo, hi = valid
            (line,) = ax2.plot(xs, m, marker="o", ms=3, label=arm, lw=1.2)
            ax2.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
    ax1.set(xlabel="training tokens", ylabel="train loss (EMA 0.9)", title="Training loss (band: min-max over seeds)")
    ax2.set(xlabel="training tokens", ylabel="valid bits per byte (mean of sources)",
            title="Validation during training (first micro-batches of each source)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    lows = [r.macro_valid_bpb for runs in results.values() for r in runs]
    if lows:
        ax2.set_ylim(min(lows) - 0.05, min(lows) + 1.0)
        ax1.set_ylim(None, None)
    return save_figure(fig, path)


def plot_bpb_vs_depth(results: Dict[str, List[RunResult]], meta: Dict[str, Dict], path: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    styles = {"unshared": ("o", "-"), "looped": ("s", ""), "recurrent": ("D", ""), "progressive": ("^", "")}
    unshared = []
    for arm, runs in results.items():
        family = meta.get(arm, {}).get("family", "looped")
        depth = runs[0].summary.get("effective_depth")
        m, sd, _ = mean_sd([r.macro_valid_bpb for r in runs])
        if depth is None:
            continue
        marker, _ = styles.get(family, ("s", ""))
        ax.errorbar([depth], [m], yerr=[sd], marker=marker, capsize=3, ms=7,
                    color="black" if family == "unshared" else None, label=None if family == "unshared" else arm)
        ax.annotate(arm, (depth, m), textcoords="offset points", xytext=(6, 4), fontsize=8)
        if family == "unshared":
            unshared.append((depth, m))
    if unshared:
        xs, ys = zip(*sorted(unshared))
        ax.plot(xs, ys, "k-", lw=1, label="unshared 1L, 2L, 4L")
    ax.set(xlabel="effective depth (block applications at evaluation)", ylabel="valid bits per byte (mean of sources)",
           title="Depth: unique vs shared (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_bpb_vs_loops(sweep, exits, trained: Dict[str, int], path: str) -> str:
    """Left: every swept arm's BPB against fixed inference loops. Right: the arms with an adaptive-exit sweep,
    zoomed, fixed depth beside the exit curve (x = mean iterations per token): the test-time compute curve."""
    plt = pyplot()
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(13, 4.8))
    for arm, per in sweep.items():
        xs = sorted(per)
        stats = [mean_sd(per[L]) for L in xs]
        m = [s[0] for s in stats]
        sd = [s[1] for s in stats]
        color = None  # the arm's colour in both panels
        for a in (ax, zoom) if arm in exits else (ax,):
            (line,) = a.plot(xs, m, marker="o", ms=4, color=color,
                             label=f"{arm} fixed depth (trained {trained.get(arm, '?')})")
            color = line.get_color()
            a.fill_between(xs, [p - q for p, q in zip(m, sd)], [p + q for p, q in zip(m, sd)], color=color, alpha=0.15)
        if arm in exits:
            per_exit = exits[arm]
            thr = sorted(per_exit, reverse=True)
            ex = [mean_sd(per_exit[t]["mean_iterations"])[0] for t in thr]
            ey = [mean_sd(per_exit[t]["bpb"])[0] for t in thr]
            for a in (ax, zoom):
                a.plot(ex, ey, "--", marker="x", color=color, label=f"{arm} adaptive exit (KL threshold)")
            for t, x, y in zip(thr, ex, ey):
                zoom.annotate(f"{t:g}", (x, y), textcoords="offset points", xytext=(3, 5), fontsize=7)
    ax.set(xlabel="loop iterations at inference (mean per token for adaptive exit)",
           ylabel="valid bits per byte (mean of sources)", title="Depth as a dial: all looped arms")
    zoom.set(xlabel="loop iterations at inference (mean per token for adaptive exit)",
             ylabel="valid bits per byte (mean of sources)", title="Sampled-depth model: fixed depth vs adaptive exit")
    for a in (ax, zoom):
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- report
def write_study_report(out_dir: str, runs_dir: str, readme: Optional[str] = None) -> Dict[str, str]:
    """Write results.md, study.json and the three plots into out_dir; splice into readme when given."""
    settings_path = os.path.join(out_dir, "settings.json")
    if not os.path.isfile(settings_path):
        raise ExperimentError(f"{settings_path}: not found; run the study first (python -m studies.looping_pays.study).")
    settings = read_json(settings_path)
    meta = _arm_meta(settings)
    sources = settings.get("sources", [])
    names = [f"{arm}-s{seed}" for arm in meta for seed in settings.get("seeds", [])]
    archive_runs(out_dir, runs_dir, names)
    results = load_results(out_dir, list(meta), settings.get("seeds", []))
    if not results:
        raise ExperimentError(f"{out_dir}/eval: no evaluated run yet.")
    trained = {arm: int(runs[0].summary.get("num_loops") or 1) for arm, runs in results.items()}
    comps = comparison_rows(results)
    worth = recurrence_worth(results, meta)
    sweep = loop_sweep(results)
    exits = exit_sweep(results)
    claim_rows = claims(comps, worth, sweep, exits, trained)
    lr_path = os.path.join(out_dir, "lr_sweep.json")
    lr = read_json(lr_path) if os.path.isfile(lr_path) else None

    written = {
        "curves": plot_curves(results, sources, os.path.join(out_dir, "curves.png")),
        "depth": plot_bpb_vs_depth(results, meta, os.path.join(out_dir, "bpb_vs_depth.png")),
    }
    if sweep:
        written["loops"] = plot_bpb_vs_loops(sweep, exits, trained, os.path.join(out_dir, "bpb_vs_loops.png"))

    def block(prefix: str) -> str:
        s = settings
        parts = [
            f"Setup (from `{settings_path}`): {s['tokens_per_run']:,} training tokens per run "
            f"({s['train_iters']} steps of {s['micro_batch']} x {s['seq_length']} tokens), seeds "
            f"{', '.join(map(str, s['seeds']))}, "
            + (f"peak LR {s['lr']:g}" if not isinstance(s["lr"], dict) else "the peak LR chosen per arm (below)")
            + f" (cosine to {s['min_lr_ratio']:g}x, "
            f"{s['warmup_fraction']:.0%} warm-up), d=128, 4 heads, a {s['vocab_size']:,}-token BPE trained on the "
            f"training documents; each source's held-out valid and test documents ({s['holdout']:.0%} each) "
            + ("are evaluated whole" if not s.get("final_eval_iters") else
               f"are evaluated on their first {s['final_eval_iters']} micro-batches (quick mode)")
            + ". `±` is the sample standard deviation over seeds.",
        ]
        if lr and "arms" in lr:  # one grid for every arm, each arm's LR chosen on its own valid BPB
            parts += ["", "**Learning rate per arm**: every arm trained at each LR of one grid (seed "
                      f"{lr['seed']}); its LR is the one with its lowest valid bpb ({lr['criterion']}; the validation "
                      "split only):", "", lr_sweep_table(lr, [("valid bpb", lambda r: f"{r['valid_bpb']:.4f}")])]
        elif lr:
            parts += ["", "**Learning rate**, chosen once on the validation split for the 1-layer baseline "
                      f"(seed {lr['seed']}; {lr['criterion']}) and used for every arm:", "",
                      markdown_table(["peak LR", "valid bpb"],
                                     [[f"{r['lr']:g}" + (" (chosen)" if r["lr"] == lr["chosen_lr"] else ""),
                                       f"{r['valid_bpb']:.4f}"] for r in lr["rows"]])]
        if claim_rows:
            parts += ["", "**The claims, checked** (each verdict follows from the tables below: a comparison "
                      "counts when every seed agrees and the mean difference exceeds twice the seed sd):", "",
                      claims_table(claim_rows)]
        parts += ["", "**Valid bits per byte by source** (held-out sets, trained depth):", "",
                  results_table(results, sources, meta)]
        if comps:
            parts += ["", "**Comparisons**, paired by seed (Δ < 0: A is better). Verdict: 'A better' / 'B better' when "
                      "every seed agrees and |Δ| exceeds twice the seed sd; otherwise 'within noise':", "",
                      comparison_table(comps)]
        if worth:
            parts += ["", "**What one recurrence is worth** (arXiv 2604.21106 reports about 0.46 of a unique block): "
                      "the unshared 1L/2L/4L results, interpolated linearly in log(layers) per seed (only as deep "
                      "as unique depth keeps improving; extended linearly past the ends), give the unique layers "
                      "L_eq that would reach each shared model's BPB; a negative worth means the extra "
                      "applications left the model worse than its unique layers alone would be:", "", worth_table(worth)]
        if sweep:
            parts += ["", "**BPB against inference loops** (first "
                      f"{s['sweep_eval_iters']} micro-batches of each source's valid set; * trained depth, bold best):",
                      "", loops_table(sweep, trained)]
        if exits:
            parts += ["", "**Adaptive per-token exit** (KL between successive iterations' next-token distributions; "
                      "same valid batches as the sweep):", "", exit_table(exits)]
        parts += ["", f"![training curves]({prefix}curves.png)", "", f"![bpb vs depth]({prefix}bpb_vs_depth.png)"]
        if sweep:
            parts += ["", f"![bpb vs loops]({prefix}bpb_vs_loops.png)"]
        return "\n".join(parts) + "\n"

    written["results"] = fs.write_text(os.path.join(out_dir, "results.md"), "# Does looping pay?\n\n" + block(""))
    summary = {
        "settings": settings, "lr_sweep": lr,
        "arms": {arm: {"seeds": [r.seed for r in runs], "valid_bpb": [r.macro_valid_bpb for r in runs],
                       "valid_bpb_by_source": {s: [r.valid_bpb.get(s) for r in runs] for s in sources},
                       "test_bpb": [r.macro_test_bpb for r in runs],
                       "train_flops_per_token": [r.train_flops_per_token for r in runs],
                       "params": runs[0].summary.get("params")} for arm, runs in results.items()},
        "claims": claim_rows, "comparisons": comps, "recurrence_worth": worth,
        "loop_sweep": {arm: {str(L): v for L, v in per.items()} for arm, per in sweep.items()},
        "exit_sweep": {arm: {str(t): v for t, v in per.items()} for arm, per in exits.items()},
    }
    written["json"] = fs.write_json(os.path.join(out_dir, "study.json"), summary)
    if readme:
        prefix = os.path.relpath(out_dir, os.path.dirname(os.path.abspath(readme)) or ".") + "/"
        written["readme"] = splice_readme(readme, block(prefix))
        if exits and "loops" in written:
            splice_readme(readme, compute_curve_block(sweep, exits, trained, prefix + "bpb_vs_loops.png"),
                          README_TTC_BEGIN, README_TTC_END, required=False)
    return written


def splice_readme(readme: str, block: str, begin: str = README_BEGIN, end: str = README_END,
                  required: bool = True) -> str:
    """loop_megatron.experiments.tables.splice_readme, with this study's markers by default."""
    return _splice_readme(readme, block, begin, end, required)
