"""Trust-region size under 4 passes on `digits`: GRPO's clip range and DPPO's KL threshold
scaled around their matched settings, everything else as `flowdppo compare`'s `updates_4`.

    OMP_NUM_THREADS=1 python docs/results/digits_trust_region/run_sweep.py runs/trust_region

36 runs of ~100 s each, 2 at a time (~30 min on 2 cores); finished runs under the output
directory are kept, so a repeat only runs what is missing. `flowdppo compare` cannot do this
itself: it applies one sweep factor to every seed and its `--set` is overridden by the
method's knob. Prints a markdown table and writes table.md, summary.json and
trust_region.png beside this file.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from flowdppo.compare.benchmarks import get_benchmark
from flowdppo.compare.methods import get_method
from flowdppo.compare.runner import execute, make_run, run_dir, variant_overrides

FACTORS = {"grpo": (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0), "dppo": (0.01, 0.1, 1.0, 10.0, 100.0)}
SEEDS = (0, 1, 2)
ITERATIONS = 30
HERE = Path(__file__).parent
KL_TICKS = (0.2, 0.5, 1.0, 2.0, 4.0)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def frac_key(method: str) -> str:
    return "mask_frac" if method == "dppo" else "clip_frac"


def mean_std(values: list[float], digits: int = 3) -> str:
    # population std over seeds, as in `flowdppo compare`'s tables (x sqrt(3/2) for ddof=1)
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def summarize(root: Path, specs_by_setting: dict) -> list[dict]:
    bench = get_benchmark("digits")
    summary = []
    for (method, factor), specs in specs_by_setting.items():
        preset = get_method(method)
        entry = {"method": method, "factor": factor, "knob": preset.knob,
                 "value": preset.knob_value(bench.latent_elements, factor), "seeds": [],
                 "final": [], "best": [], "drop": [], "kl_ref": [], frac_key(method): []}
        for spec in specs:
            evals = rows(run_dir(root, spec) / "eval.jsonl")
            metrics = rows(run_dir(root, spec) / "metrics.jsonl")
            rewards = [r["reward_mean"] for r in evals]  # evaluations at 0, 10, 20, 30
            entry["seeds"].append(spec.seed)
            entry["final"].append(rewards[-1])
            entry["best"].append(max(rewards))
            entry["drop"].append(max(rewards) - rewards[-1])
            entry["kl_ref"].append(evals[-1]["kl_ref"])
            # mean over all iterations (the first pass of each rollout never clips/masks)
            entry[frac_key(method)].append(
                statistics.fmean(m.get(frac_key(method), 0.0) for m in metrics))
        summary.append(entry)
    return summary


def table(summary: list[dict]) -> str:
    lines = ["| method | factor | knob (per element) | final reward, mean ± std | per seed | "
             "peak→final drop | final KL to ref | mask / clip frac |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        key = frac_key(s["method"])
        lines.append(
            f"| {s['method']} | x{s['factor']:g} | {s['knob']} {s['value']:.3g} | "
            f"{mean_std(s['final'])} | {', '.join(f'{v:.2f}' for v in s['final'])} | "
            f"{statistics.fmean(s['drop']):.3f} | {mean_std(s['kl_ref'], 2)} | "
            f"{key.split('_')[0]} {statistics.fmean(s[key]):.3f} |")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 3, figsize=(11.0, 3.1), dpi=90)
    for method, color in (("grpo", "tab:red"), ("dppo", "tab:blue")):
        entries = [s for s in summary if s["method"] == method]
        factors = [s["factor"] for s in entries]
        for ax, key in zip(axes[:2], ("final", "kl_ref"), strict=True):
            ax.plot(factors, [statistics.fmean(s[key]) for s in entries], "-o", color=color,
                    label=f"{method} ({entries[0]['knob']})")
            for s in entries:  # every seed, so two or three runs are not read as a band
                ax.scatter([s["factor"]] * len(s[key]), s[key], s=10, color=color, alpha=0.4)
        # the trade-off itself: each setting's mean reward against its mean KL
        kls = [statistics.fmean(s["kl_ref"]) for s in entries]
        finals = [statistics.fmean(s["final"]) for s in entries]
        axes[2].plot(kls, finals, "-o", color=color, label=method)
        for s, x, y in zip(entries, kls, finals, strict=True):
            axes[2].annotate(f"x{s['factor']:g}", (x, y), fontsize=6, xytext=(3, 3),
                             textcoords="offset points")
    axes[0].set_ylabel("final reward")
    axes[1].set_ylabel("final KL to ref")
    axes[1].set_yscale("log")
    axes[1].set_yticks(KL_TICKS, [f"{t:g}" for t in KL_TICKS])
    axes[1].yaxis.set_minor_formatter(NullFormatter())
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.set_xlabel("knob × matched value")
        ax.axvline(1.0, color="grey", lw=0.5)
    axes[2].set_xscale("log")
    axes[2].set_xticks(KL_TICKS, [f"{t:g}" for t in KL_TICKS])
    axes[2].xaxis.set_minor_formatter(NullFormatter())
    axes[2].set_xlabel("final KL to ref (mean)")
    axes[2].set_ylabel("final reward (mean)")
    axes[0].legend(fontsize=7)
    fig.suptitle("digits, 4 passes per rollout, 30 iterations", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def main(root: Path) -> None:
    bench = get_benchmark("digits")
    extra = variant_overrides(bench, "updates_4")
    specs_by_setting = {
        (method, factor): [make_run(bench, method, seed, f"updates_4_x{factor:g}", ITERATIONS,
                                    factor, extra, device="cpu") for seed in SEEDS]
        for method, factors in FACTORS.items() for factor in factors}
    execute(root, [s for specs in specs_by_setting.values() for s in specs], jobs=2, threads=1)
    summary = summarize(root, specs_by_setting)
    text = table(summary)
    (HERE / "table.md").write_text(text + "\n")
    (HERE / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, HERE / "trust_region.png")
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/trust_region"))
