"""The tuned protocol's arithmetic: the grid, best-point selection, working range, bootstrap.

Pure functions over plain numbers (no files, no runs), so each rule is tested by hand.

Selection rule (stated in every tuned report): on the **tuning seeds only**, each grid point
(knob factor, learning rate) is summarised by the mean over those seeds of its final
evaluation reward and final KL to the reference. Among the points whose mean final KL is
within the KL budget, the highest mean final reward wins; points within ``tie_tol`` of that
reward count as tied and the one with the lowest mean KL wins (then the smaller factor,
then the smaller learning rate, so the choice is deterministic). If no point fits the
budget, the point with the lowest mean KL is chosen and the selection says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TIE_TOL = 0.005  # rewards this close count as tied (below the seed spread seen on digits)
WORKING_TOL = 0.02  # "within 0.02 of its best" (issue 14)


def log_grid(points: int, span: float) -> tuple[float, ...]:
    """``points`` factors evenly spaced in log, geometric mean 1, largest / smallest = ``span``."""
    if points < 1:
        raise ValueError(f"grid points={points}: need at least 1")
    if not (span >= 1 and math.isfinite(span)):
        raise ValueError(f"grid span={span}: the ratio of the largest to the smallest factor, >= 1")
    if points == 1:
        return (1.0,)
    return tuple(float(span ** (i / (points - 1) - 0.5)) for i in range(points))


@dataclass(frozen=True)
class PointResult:
    """One finished run of a grid point."""

    factor: float  # knob factor (x the method's scaled paper value)
    lr: float  # learning rate
    seed: int
    final_reward: float
    final_kl: float


@dataclass(frozen=True)
class PointSummary:
    """A grid point summarised over the seeds it was given."""

    factor: float
    lr: float
    reward: float  # mean final reward over the seeds
    kl: float  # mean final KL to the reference over the seeds
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Selection:
    best: PointSummary
    within_budget: bool  # False: no point met the KL budget; the lowest-KL point was chosen
    kl_budget: float
    points: tuple[PointSummary, ...]  # every grid point, on the tuning seeds


def summarise(results: Sequence[PointResult], seeds: Sequence[int]) -> list[PointSummary]:
    """Each point's mean over exactly ``seeds``; results of other seeds are ignored, and a
    point missing one of ``seeds`` raises (a partial mean would favour it unfairly)."""
    wanted = tuple(sorted(set(seeds)))
    if not wanted:
        raise ValueError("no tuning seeds given")
    by_point: dict[tuple[float, float], dict[int, PointResult]] = {}
    for r in results:
        if r.seed in wanted:
            by_point.setdefault((r.factor, r.lr), {})[r.seed] = r
    out = []
    for (factor, lr), runs in sorted(by_point.items()):
        missing = sorted(set(wanted) - set(runs))
        if missing:
            raise ValueError(f"grid point factor={factor:g}, lr={lr:g} has no result for seeds "
                             f"{missing}; finish those runs (rerun the command) before selecting")
        rewards = [runs[s].final_reward for s in wanted]
        kls = [runs[s].final_kl for s in wanted]
        out.append(PointSummary(factor, lr, float(np.mean(rewards)), float(np.mean(kls)), wanted))
    return out


def select_best(results: Sequence[PointResult], tuning_seeds: Sequence[int], *, kl_budget: float,
                tie_tol: float = TIE_TOL) -> Selection:
    """The grid point chosen by the module's rule, from the tuning seeds' results only."""
    points = summarise(results, tuning_seeds)
    if not points:
        raise ValueError(f"no grid results for the tuning seeds {sorted(tuning_seeds)}")
    return select_point(points, kl_budget=kl_budget, tie_tol=tie_tol)


def select_point(points: Sequence[PointSummary], *, kl_budget: float, tie_tol: float = TIE_TOL) -> Selection:
    """The module's rule over grid points already summarised on the tuning seeds."""
    points = list(points)
    finite = [p for p in points if math.isfinite(p.reward) and math.isfinite(p.kl)]
    if not finite:
        raise ValueError("every grid point has a non-finite reward or KL; check the runs' logs")
    feasible = [p for p in finite if p.kl <= kl_budget]
    if not feasible:
        best = min(finite, key=lambda p: (p.kl, p.factor, p.lr))
        return Selection(best, False, kl_budget, tuple(points))
    top = max(p.reward for p in feasible)
    tied = [p for p in feasible if p.reward >= top - tie_tol]
    best = min(tied, key=lambda p: (p.kl, p.factor, p.lr))
    return Selection(best, True, kl_budget, tuple(points))


@dataclass(frozen=True)
class WorkingRange:
    share_of_grid: float  # share of all (factor, lr) points within tol of the best reward
    share_of_knob: float  # share of the knob grid at the chosen lr within tol
    factor_low: float  # smallest / largest factor within tol at the chosen lr
    factor_high: float

    @property
    def factor_span(self) -> float:
        return self.factor_high / self.factor_low


def working_range(selection: Selection, tol: float = WORKING_TOL) -> WorkingRange:
    """How much of the grid does (almost) as well as the chosen point: points whose mean
    tuning reward is at least ``best.reward - tol``."""
    best = selection.best
    good = [p for p in selection.points if p.reward >= best.reward - tol]
    at_lr = [p for p in selection.points if p.lr == best.lr]
    good_at_lr = [p for p in at_lr if p.reward >= best.reward - tol]
    factors = [p.factor for p in good_at_lr] or [best.factor]
    return WorkingRange(len(good) / len(selection.points), len(good_at_lr) / len(at_lr),
                        min(factors), max(factors))


def bootstrap_diff_ci(values: Sequence[float], reference: Sequence[float], *,
                      num_resamples: int = 10_000, confidence: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """Paired percentile bootstrap of ``mean(values - reference)`` over seeds.

    Args:
        values (`Sequence[float]` of length `n`): one method's per-seed results.
        reference (`Sequence[float]` of length `n`): the reference's, same seeds, same order.
        num_resamples (`int`, defaults to 10000): bootstrap draws of `n` seeds with replacement.
        confidence (`float`, defaults to 0.95): the interval's coverage.
        seed (`int`, defaults to 0): the generator's seed (the result is a pure function).

    Returns:
        `(difference, low, high)`: the observed mean difference and the interval's ends.
    """
    a, b = np.asarray(values, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"bootstrap needs two equal-length 1-d series paired by seed; got "
                         f"shapes {a.shape} and {b.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: must be in (0, 1)")
    diff = a - b
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(diff), size=(num_resamples, len(diff)))
    means = diff[draws].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(diff.mean()), float(low), float(high)
