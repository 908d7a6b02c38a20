"""Matplotlib figures (Agg backend, written atomically as PNG): loss curves of training runs side by side,
held-out loss against the loop count, and the test-time compute curve of `inference.evaluation` results."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

from ..utils import fs
from .records import LoopEval, Run

if TYPE_CHECKING:
    from ..inference.evaluation import EvalResult


def smooth(values: Sequence[float], weight: float) -> List[float]:
    """TensorBoard-style exponential moving average with bias correction."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(runs: Sequence[Run], path: str, smoothing: float = 0.6, x_axis: str = "iteration") -> str:
    """Two panels (train loss, valid loss) against the iteration (or 'tokens'), one line per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        tokens_per_step = None
        if x_axis == "tokens" and run.tokens_seen and run.summary.get("iterations"):
            tokens_per_step = run.tokens_seen / run.summary["iterations"]
        for ax, tag in zip(axes, ("train/loss", "valid/loss")):
            series = run.scalars.get(tag) or []
            if not series:
                continue
            xs = [s * tokens_per_step if tokens_per_step else s for s, _ in series]
            ys = [v for _, v in series]
            if tag == "train/loss" and smoothing > 0 and len(ys) > 2:
                ax.plot(xs, ys, color=color, alpha=0.2, linewidth=0.8)
                ax.plot(xs, smooth(ys, smoothing), color=color, label=run.label, linewidth=1.6)
            else:
                ax.plot(xs, ys, color=color, label=run.label, marker="o" if len(ys) < 40 else None,
                        markersize=3, linewidth=1.6)
    for ax, title in zip(axes, ("train loss" + (f" (EMA {smoothing})" if smoothing > 0 else ""), "valid loss")):
        ax.set_title(title)
        ax.set_xlabel("tokens" if x_axis == "tokens" else "iteration")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save_figure(fig, path)


def _save_figure(fig, path: str) -> str:
    """Write a matplotlib figure as PNG under a temporary name, then rename (never a half-written plot)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with fs.atomic_path(path, make_parent=True) as tmp:
            fig.savefig(tmp, dpi=120, format="png")  # the temporary name has no .png to infer the format from
    finally:
        plt.close(fig)
    return path


def plot_loss_vs_loops(evals: Sequence[LoopEval], path: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, e in enumerate(evals):
        xs = [p["loops"] for p in e.points]
        ys = [p["loss"] for p in e.points]
        color = f"C{i % 10}"
        ax.plot(xs, ys, marker="o", color=color, label=e.name)
        trained = [p for p in e.points if p["loops"] == e.trained_loops]
        if trained:
            ax.plot([trained[0]["loops"]], [trained[0]["loss"]], marker="*", markersize=16, color=color,
                    linestyle="none")
    ax.set_xlabel("loops at evaluation (star: trained loop count)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("loss vs. loop count")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, path)


def plot_compute_curve(results: Sequence["EvalResult"], path: str, title: str = "") -> str:
    """PNG of loss against mean loop iterations per token: the fixed-depth sweep and each exit criterion's
    thresholds as separate lines (the test-time compute curve), per evaluation set."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    groups: Dict[Tuple[str, str], List[EvalResult]] = {}
    for r in results:
        groups.setdefault((r.name, r.exit_criterion), []).append(r)
    several_sets = len({name for name, _ in groups}) > 1
    for i, ((name, criterion), rows) in enumerate(sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "none"))):
        rows = sorted(rows, key=lambda r: r.mean_iterations)
        label = "fixed depth (--loops)" if criterion == "none" else f"exit: {criterion} (cap {rows[0].loops})"
        label = f"{name}: {label}" if several_sets else label
        ax.plot([r.mean_iterations for r in rows], [r.loss for r in rows], marker="o", color=f"C{i}", label=label)
        if criterion != "none":
            for r in rows:
                ax.annotate(f"{r.exit_threshold:g}", (r.mean_iterations, r.loss), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("mean loop iterations per token")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title or "test-time compute curve")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, path)
