"""Trust-region size under 4 passes on `digits`: GRPO's clip range and DPPO's KL threshold
scaled around their matched settings, everything else as `flowdppo compare`'s `updates_4`.

    python docs/results/digits_trust_region/run_sweep.py runs/trust_region   # ~6 min, 2 cores

Prints a markdown table and writes table.md and summary.json beside this file.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from flowdppo.compare.benchmarks import get_benchmark
from flowdppo.compare.methods import get_method
from flowdppo.compare.runner import execute, make_run, run_dir, variant_overrides

FACTORS = {"grpo": (0.03, 0.1, 0.3, 1.0, 3.0), "dppo": (0.1, 1.0, 10.0)}
SEEDS = (0, 1)
ITERATIONS = 30


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(root: Path) -> None:
    bench = get_benchmark("digits")
    extra = variant_overrides(bench, "updates_4")
    specs = [make_run(bench, method, seed, f"updates_4_x{factor:g}", ITERATIONS, factor, extra,
                      device="cpu")
             for method, factors in FACTORS.items() for factor in factors for seed in SEEDS]
    execute(root, specs, jobs=2, threads=1)
    summary = []
    for method, factors in FACTORS.items():
        preset = get_method(method)
        frac_key = "mask_frac" if method == "dppo" else "clip_frac"
        for factor in factors:
            finals, drops, kls, fracs = [], [], [], []
            for seed in SEEDS:
                spec = make_run(bench, method, seed, f"updates_4_x{factor:g}", ITERATIONS, factor,
                                extra, device="cpu")
                evals = rows(run_dir(root, spec) / "eval.jsonl")
                metrics = rows(run_dir(root, spec) / "metrics.jsonl")
                rewards = [r["reward_mean"] for r in evals]
                finals.append(rewards[-1])
                drops.append(max(rewards) - rewards[-1])
                kls.append(evals[-1]["kl_ref"])
                fracs.append(statistics.fmean(m.get(frac_key, 0.0) for m in metrics))
            summary.append({"method": method, "factor": factor,
                            "knob": preset.knob, "value": preset.knob_value(bench.latent_elements, factor),
                            "final": finals, "drop": drops, "kl_ref": kls, frac_key: fracs})
    lines = ["| method | factor | knob (per element) | final reward (seeds 0, 1) | mean | peak→final drop | final KL to ref | mask / clip frac |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        frac_key = "mask_frac" if s["method"] == "dppo" else "clip_frac"
        lines.append(
            f"| {s['method']} | x{s['factor']:g} | {s['knob']} {s['value']:.3g} | "
            f"{', '.join(f'{v:.3f}' for v in s['final'])} | {statistics.fmean(s['final']):.3f} | "
            f"{statistics.fmean(s['drop']):.3f} | {statistics.fmean(s['kl_ref']):.2f} | "
            f"{frac_key.split('_')[0]} {statistics.fmean(s[frac_key]):.3f} |")
    table = "\n".join(lines)
    here = Path(__file__).parent
    (here / "table.md").write_text(table + "\n")
    (here / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/trust_region"))
