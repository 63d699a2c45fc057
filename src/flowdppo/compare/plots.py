"""The comparison's figures (small PNGs): curves are means over seeds with a ±1 std band."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .report import RunCurves


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(curves: Sequence[RunCurves], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    series = [c.series(key) for c in curves if len(c.series(key)[0])]
    if not series:
        return np.array([]), np.array([]), np.array([])
    length = min(len(s[0]) for s in series)
    steps = series[0][0][:length]
    values = np.stack([s[1][:length] for s in series])
    return steps, values.mean(0), values.std(0)


def curves_vs_images(by_method: dict[str, list[RunCurves]], key: str, ylabel: str, path: Path,
                     images_per_step: int) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for method, curves in by_method.items():
        steps, mean, std = _mean_curve(curves, key)
        if len(steps) == 0:
            continue
        x = steps * images_per_step
        ax.plot(x, mean, label=method, lw=1.5)
        ax.fill_between(x, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("images generated")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def reward_vs_kl(by_method: dict[str, list[RunCurves]], path: Path, kl_unit: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for method, curves in by_method.items():
        _, kl, _ = _mean_curve(curves, "kl_ref")
        _, reward, _ = _mean_curve(curves, "reward_mean")
        if len(kl):
            ax.plot(kl, reward, marker="o", ms=2.5, lw=1.2, label=method)
    ax.set_xscale("symlog", linthresh=1e-4)
    ax.set_xlabel(f"KL to reference ({kl_unit})", fontsize=7)
    ax.set_ylabel("in-domain reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def monitors_vs_images(by_method: dict[str, list[RunCurves]], keys: Sequence[str], path: Path,
                       images_per_step: int) -> Path:
    plt = _plt()
    cols = min(3, max(1, len(keys)))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for method, curves in by_method.items():
            steps, mean, std = _mean_curve(curves, key)
            if len(steps):
                ax.plot(steps * images_per_step, mean, label=method, lw=1.2)
                ax.fill_between(steps * images_per_step, mean - std, mean + std, alpha=0.12)
        ax.set_title(key, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=5, ncol=2)
    fig.supxlabel("images generated", fontsize=8)
    return _save(fig, path)


def axis_study(study: dict[str, dict[int, dict[str, tuple[float, float]]]], path: Path,
               xlabel: str, log2: bool = True) -> Path:
    """``study[method][value][quantity] = (mean, std)`` for final reward, drop and final KL
    along one axis (updates per rollout on a log2 scale, or policy lag on a linear one)."""
    import matplotlib.ticker

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    values = sorted({v for by_value in study.values() for v in by_value})
    for ax, (key, title) in zip(axes, (("final_reward", "final reward"),
                                       ("peak_to_final_drop", "peak→final drop"),
                                       ("final_kl_ref", "final KL to ref"))):
        for method, by_value in study.items():
            xs = [v for v in sorted(by_value) if key in by_value[v]]
            ax.errorbar(xs, [by_value[v][key][0] for v in xs], yerr=[by_value[v][key][1] for v in xs],
                        marker="o", ms=3, capsize=2, label=method)
        if log2:
            ax.set_xscale("log", base=2)
        ax.set_xticks(values)
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    return _save(fig, path)


def noise_diagnostic(by_method: dict[str, list[RunCurves]], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for method, curves in by_method.items():
        for ax, key in zip(axes, ("diag_clip_kl_disagree", "diag_corr_logr_negkl")):
            rows = [np.array([r.get(key, np.nan) for r in c.metric_rows], dtype=float) for c in curves]
            rows = [r for r in rows if len(r) and np.isfinite(r).any()]
            if not rows:
                continue
            length = min(len(r) for r in rows)
            with warnings.catch_warnings():  # a step where every seed logged null: a gap, not an error
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean([r[:length] for r in rows], axis=0)
            ax.plot(np.arange(1, length + 1), mean, label=method, lw=1)
    axes[0].set_title("clip vs exact-KL decision disagreement", fontsize=8)
    axes[1].set_title("corr(log r, -KL) per update", fontsize=8)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    return _save(fig, path)


def grid_frontier(selections, path: Path, kl_unit: str) -> Path:
    """Reward against KL of every tuning grid point (mean over tuning seeds); chosen points starred."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for method, sel in selections.items():
        kl = np.array([p.kl for p in sel.points])
        reward = np.array([p.reward for p in sel.points])
        (line,) = ax.plot(kl, reward, "o", ms=3, alpha=0.7, label=method)
        ax.plot([sel.best.kl], [sel.best.reward], "*", ms=11, color=line.get_color(), mec="k")
    budget = next(iter(selections.values())).kl_budget if selections else None
    if budget is not None:
        ax.axvline(budget, color="grey", ls="--", lw=0.8, label="KL budget")
    ax.set_xscale("log")
    ax.set_xlabel(f"final KL to reference ({kl_unit})", fontsize=7)
    ax.set_ylabel("final reward (tuning seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def knob_vs_reward(selections, path: Path) -> Path:
    """Final reward against the knob factor, one panel per method, one line per learning rate."""
    plt = _plt()
    fig, axes = plt.subplots(1, max(1, len(selections)), figsize=(3.2 * max(1, len(selections)), 2.8),
                             squeeze=False, sharey=True)
    for ax, (method, sel) in zip(axes.flat, selections.items()):
        for lr in sorted({p.lr for p in sel.points}):
            points = sorted((p for p in sel.points if p.lr == lr), key=lambda p: p.factor)
            ax.plot([p.factor for p in points], [p.reward for p in points], marker="o", ms=3,
                    label=f"lr {lr:.3g}")
        ax.plot([sel.best.factor], [sel.best.reward], "k*", ms=10)
        ax.set_xscale("log")
        ax.set_title(method, fontsize=8)
        ax.set_xlabel("knob factor (× scaled paper value)", fontsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=5)
    axes.flat[0].set_ylabel("final reward (tuning seeds)")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path
