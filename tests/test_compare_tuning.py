"""The tuned protocol's arithmetic by hand: grid, selection, working range, bootstrap."""

from __future__ import annotations

import itertools

import pytest

from flowdppo.compare.tuning import (
    PointResult,
    bootstrap_diff_ci,
    log_grid,
    select_best,
    working_range,
)


def test_log_grid_spans_the_ratio_evenly_around_one():
    grid = log_grid(7, 1000.0)
    assert len(grid) == 7 and grid[-1] / grid[0] == pytest.approx(1000.0)
    assert grid[3] == pytest.approx(1.0)
    ratios = [b / a for a, b in itertools.pairwise(grid)]
    assert ratios == pytest.approx([10 ** 0.5] * 6)
    assert log_grid(2, 100.0) == pytest.approx((0.1, 10.0))
    assert log_grid(1, 1000.0) == (1.0,)
    with pytest.raises(ValueError, match="span"):
        log_grid(3, 0.5)


def _grid(seed, rewards_kls):
    return [PointResult(f, lr, seed, r, k) for (f, lr), (r, k) in rewards_kls.items()]


TUNING = {(0.1, 1e-3): (0.80, 0.2), (1.0, 1e-3): (0.90, 0.5), (10.0, 1e-3): (0.95, 3.0),
          (1.0, 3e-3): (0.70, 0.4)}


def test_selection_takes_the_best_reward_within_the_kl_budget():
    results = _grid(100, TUNING) + _grid(101, TUNING)
    chosen = select_best(results, [100, 101], kl_budget=1.0)
    assert (chosen.best.factor, chosen.best.lr) == (1.0, 1e-3)  # 10.0 is better but over budget
    assert chosen.within_budget and chosen.best.seeds == (100, 101)
    loose = select_best(results, [100, 101], kl_budget=5.0)
    assert loose.best.factor == 10.0


def test_ties_go_to_the_lower_kl_and_no_feasible_point_to_the_lowest_kl():
    tied = {(0.1, 1e-3): (0.898, 0.2), (1.0, 1e-3): (0.900, 0.5)}
    assert select_best(_grid(1, tied), [1], kl_budget=1.0).best.factor == 0.1  # within 0.005
    none = select_best(_grid(1, TUNING), [1], kl_budget=0.01)
    assert not none.within_budget and none.best.factor == 0.1


def test_selection_never_sees_held_out_seeds():
    tuning = _grid(100, TUNING) + _grid(101, TUNING)
    # Held-out results that would flip the choice if they were averaged in.
    poison = {(0.1, 1e-3): (0.99, 0.1), (1.0, 1e-3): (0.0, 0.1)}
    held_out = _grid(0, poison) + _grid(1, poison) + _grid(2, poison)
    alone = select_best(tuning, [100, 101], kl_budget=1.0)
    mixed = select_best(tuning + held_out, [100, 101], kl_budget=1.0)
    assert mixed == alone and mixed.best.factor == 1.0
    assert all(p.seeds == (100, 101) for p in mixed.points)
    # Asked to select on seeds it has no results for, it refuses instead of guessing.
    with pytest.raises(ValueError, match="no grid results"):
        select_best(held_out, [100, 101], kl_budget=1.0)


def test_a_point_missing_a_tuning_seed_is_refused():
    results = _grid(100, TUNING) + _grid(101, {(1.0, 1e-3): (0.9, 0.5)})
    with pytest.raises(ValueError, match="seeds \\[101\\]"):
        select_best(results, [100, 101], kl_budget=1.0)


def test_working_range_counts_points_within_tolerance_of_the_best():
    grid = {(0.01, 1e-3): (0.70, 0.1), (0.1, 1e-3): (0.89, 0.2), (1.0, 1e-3): (0.90, 0.3),
            (10.0, 1e-3): (0.885, 0.4), (100.0, 1e-3): (0.60, 0.6), (1.0, 3e-3): (0.881, 0.5)}
    chosen = select_best(_grid(1, grid), [1], kl_budget=1.0)
    assert chosen.best.factor == 1.0
    wr = working_range(chosen)
    assert wr.share_of_knob == pytest.approx(3 / 5)  # 0.1, 1, 10 at lr 1e-3
    assert wr.share_of_grid == pytest.approx(4 / 6)  # and (1.0, 3e-3) at 0.881 >= 0.88
    assert (wr.factor_low, wr.factor_high) == (0.1, 10.0) and wr.factor_span == pytest.approx(100.0)


def test_bootstrap_interval_by_hand():
    # Differences (0, 0, 0, 1): a resampled mean is k/4 with k ~ Binomial(4, 1/4).
    # P(k = 0) = 0.316 > 2.5 %, so the lower end is 0; P(k >= 3) = 0.051 > 2.5 % and
    # P(k = 4) = 0.004 < 2.5 %, so the upper end is 3/4.
    diff, low, high = bootstrap_diff_ci([1.0, 2.0, 3.0, 5.0], [1.0, 2.0, 3.0, 4.0], seed=3)
    assert diff == pytest.approx(0.25)
    assert (low, high) == (0.0, 0.75)
    # A constant difference has a zero-width interval; the function is pure in its seed.
    assert bootstrap_diff_ci([0.9, 0.8, 0.7], [0.4, 0.3, 0.2]) == pytest.approx((0.5, 0.5, 0.5))
    assert bootstrap_diff_ci([1, 2, 4], [0, 0, 0], seed=7) == bootstrap_diff_ci([1, 2, 4], [0, 0, 0], seed=7)
    with pytest.raises(ValueError, match="paired"):
        bootstrap_diff_ci([1.0, 2.0], [1.0])


def test_grid_edges_name_the_ends_the_choice_sits_on():
    from flowdppo.compare.tuned_report import grid_edges

    points = [PointResult(f, lr, 0, reward, 0.1) for f, lr, reward in
              [(0.1, 1e-3, 0.5), (1.0, 1e-3, 0.6), (10.0, 1e-3, 0.7), (0.1, 3e-3, 0.5), (1.0, 3e-3, 0.9),
               (10.0, 3e-3, 0.6)]]
    assert grid_edges(select_best(points, [0], kl_budget=1.0)) == ["largest lr"]
    points[2] = PointResult(10.0, 1e-3, 0, 0.95, 0.1)
    assert grid_edges(select_best(points, [0], kl_budget=1.0)) == ["largest factor", "smallest lr"]
