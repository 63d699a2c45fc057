"""The paper's claims, each checked against the tuned protocol's held-out runs.

Pure functions over per-seed summaries (``{setting: {method: {seed: {quantity: value}}}}``,
the quantities of ``report.run_summary``), so every verdict rule is tested by hand.

Every comparison is a paired difference over the held-out seeds with its bootstrap 95%
interval (``tuning.bootstrap_diff_ci``); its sign is +1 / -1 when the interval excludes 0
on that side, 0 when it straddles 0. With 3 seeds the interval is coarse (it is built from
3 values), so "0" means "not shown", not "equal".

Claims (settings named as ``compare --protocol tuned --transfer`` writes them):

1. *Higher reward at lower KL* (``main``): DPPO against each baseline, final reward and
   final KL. Reproduced against a baseline when DPPO is no worse on either and better on
   one (a Pareto improvement); not reproduced when the baseline is that much better or
   when neither differs; mixed when one is better and the other worse (a trade-off).
2. *Less forgetting* (``main``): the benchmark's monitors that are never trained on.
   Reproduced when DPPO is better on at least one and worse on none.
3. *Balanced multi-objective* (``multi_gdpo@main``): the smaller of the reward components
   at the end, DPPO against GRPO.
4. *Stable multi-epoch* (``updates_<n>@main``): what more passes per rollout cost each
   method (the change from ``main``, paired by seed), DPPO's against GRPO's.
5. *Robust to staleness* (``lag_<k>@main``): the same difference of changes, DPPO against
   each baseline, with rollouts k iterations old.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .tuning import bootstrap_diff_ci

Summaries = dict[str, dict[str, dict[int, dict[str, float]]]]  # setting -> method -> seed -> q


@dataclass(frozen=True)
class Diff:
    """A paired difference (first minus second) over ``seeds``, with its 95% interval."""

    quantity: str
    diff: float
    low: float
    high: float
    seeds: tuple[int, ...]

    @property
    def sign(self) -> int:
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    def cell(self) -> str:
        return f"{self.diff:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def paired(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]], quantity: str) -> Diff | None:
    """``a - b`` of ``quantity`` over the seeds both have (None when they share none)."""
    seeds = tuple(sorted(s for s in set(a) & set(b)
                         if math.isfinite(a[s].get(quantity, math.nan))
                         and math.isfinite(b[s].get(quantity, math.nan))))
    if not seeds:
        return None
    diff, low, high = bootstrap_diff_ci([a[s][quantity] for s in seeds], [b[s][quantity] for s in seeds])
    return Diff(quantity, diff, low, high, seeds)


def change(after: dict[int, dict[str, float]], before: dict[int, dict[str, float]],
           quantity: str) -> dict[int, dict[str, float]]:
    """Per seed, ``after - before`` of ``quantity`` (the cost of a stress to one method)."""
    return {s: {quantity: after[s][quantity] - before[s][quantity]}
            for s in set(after) & set(before) if quantity in after[s] and quantity in before[s]}


def pareto_verdict(reward: Diff | None, kl: Diff | None) -> str:
    """Claim 1 for one baseline (``reward`` and ``kl`` are DPPO minus the baseline)."""
    if reward is None or kl is None:
        return "not run"
    better, worse = (reward.sign, -kl.sign), (-reward.sign, kl.sign)
    if min(better) >= 0 and max(better) > 0:
        return "reproduced"
    if min(worse) >= 0 and max(worse) > 0:
        return "not reproduced (the baseline is better)"
    if reward.sign == 0 and kl.sign == 0:
        return "not reproduced (no difference shown)"
    return "mixed (a trade-off)"


def better_verdict(signs: Sequence[int]) -> str:
    """``signs``: +1 where DPPO is shown better, -1 worse, 0 not shown (one per comparison)."""
    if not signs:
        return "not run"
    if min(signs) >= 0 and max(signs) > 0:
        return "reproduced" if min(signs) > 0 else "partly (better on some, no difference on the rest)"
    if max(signs) <= 0 and min(signs) < 0:
        return "not reproduced (DPPO is worse)"
    if max(signs) == 0:
        return "not reproduced (no difference shown)"
    return "mixed"


@dataclass(frozen=True)
class Claim:
    name: str
    setting: str
    verdict: str
    evidence: list[str]  # one line per comparison, with its numbers


def _oriented(d: Diff, lower_is_better: bool) -> int:
    return -d.sign if lower_is_better else d.sign


def check_claims(runs: Summaries, *, reference: str = "dppo", monitors: Sequence[str] = (),
                 lower_is_better: Sequence[str] = (), components: Sequence[str] = ()) -> list[Claim]:
    """Every claim whose settings ran (``monitors``: never-trained quantities, as summary
    keys; ``components``: the multi-reward components' summary keys)."""
    claims: list[Claim] = []
    main = runs.get("main", {})
    ref = main.get(reference)
    baselines = [m for m in main if m != reference]
    if ref and baselines:
        lines, verdicts = [], []
        for b in baselines:
            reward, kl = paired(ref, main[b], "final_reward"), paired(ref, main[b], "final_kl_ref")
            verdict = pareto_verdict(reward, kl)
            verdicts.append(verdict)
            lines.append(f"vs {b}: Δ reward {reward.cell() if reward else '–'}, "
                         f"Δ KL {kl.cell() if kl else '–'}: {verdict}")
        claims.append(Claim("higher reward at lower KL", "main", _overall(verdicts), lines))
        lines, signs = [], []
        for b in baselines:
            parts = []
            for key in monitors:
                d = paired(ref, main[b], key)
                if d is None:
                    continue
                signs.append(_oriented(d, any(t in key for t in lower_is_better)))
                parts.append(f"{key.removesuffix('_final')} {d.cell()}")
            lines.append(f"vs {b}: " + ", ".join(parts))
        claims.append(Claim("less forgetting", "main", better_verdict(signs), lines))
    for setting, methods in runs.items():
        if setting.startswith("multi_gdpo@") and reference in methods and "grpo" in methods and components:
            low = {m: {s: {"min_component": min(q[c] for c in components)} for s, q in methods[m].items()
                       if all(c in q for c in components)} for m in (reference, "grpo")}
            d = paired(low[reference], low["grpo"], "min_component")
            parts = [f"smaller component, {reference} − grpo {d.cell()}" if d else "–"]
            for c in components:
                dc = paired(methods[reference], methods["grpo"], c)
                parts.append(f"{c.removesuffix('_final')} {dc.cell() if dc else '–'}")
            claims.append(Claim("balanced multi-objective", setting,
                                better_verdict([d.sign] if d else []), ["; ".join(parts)]))
        for prefix, name in (("updates_", "stable multi-epoch"), ("lag_", "robust to staleness")):
            if not setting.startswith(prefix) or reference not in methods or not main:
                continue
            own = {m: change(methods[m], main.get(m, {}), "final_reward") for m in methods}
            lines, signs = [], []
            for b in (m for m in methods if m != reference):
                d = paired(own[reference], own[b], "final_reward")
                mine, theirs = paired(methods[reference], main[reference], "final_reward"), \
                    paired(methods[b], main.get(b, {}), "final_reward")
                if d is None or mine is None or theirs is None:
                    continue
                signs.append(d.sign)
                lines.append(f"reward change from main: {reference} {mine.cell()}, {b} {theirs.cell()}; "
                             f"difference {d.cell()}")
            claims.append(Claim(name, setting, better_verdict(signs), lines))
    return claims


def _overall(verdicts: Sequence[str]) -> str:
    if verdicts and all(v == "reproduced" for v in verdicts):
        return "reproduced"
    if verdicts and all(v.startswith("not reproduced") for v in verdicts):
        return "not reproduced"
    return "mixed: " + "; ".join(sorted(set(verdicts)))


def claims_table(claims: Sequence[Claim]) -> str:
    lines = ["| claim | setting | verdict | evidence (DPPO minus the other, paired by held-out seed, "
             "[bootstrap 95% CI]) |", "|---|---|---|---|"]
    for c in claims:
        lines.append(f"| {c.name} | {c.setting} | {c.verdict} | " + "<br>".join(c.evidence) + " |")
    return "\n".join(lines)
