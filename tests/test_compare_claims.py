"""The claim verdicts by hand: paired differences whose sign is known, and the rules on them."""

import pytest

from flowdppo.compare.claims import (
    Diff,
    better_verdict,
    change,
    check_claims,
    paired,
    pareto_verdict,
)


def _runs(values: dict[str, list[float]], key: str = "final_reward", **more: dict[str, list[float]]):
    """``{method: {seed: {key: value}}}`` from per-seed lists (seeds 0, 1, 2)."""
    out = {m: {s: {key: v} for s, v in enumerate(vals)} for m, vals in values.items()}
    for other, by_method in more.items():
        for m, vals in by_method.items():
            for s, v in enumerate(vals):
                out[m][s][other] = v
    return out


def _d(sign: int) -> Diff:
    return Diff("q", float(sign), {1: 0.1, 0: -0.1, -1: -2.0}[sign], {1: 2.0, 0: 0.1, -1: -0.1}[sign], (0,))


def test_paired_difference_and_its_sign():
    a = {0: {"r": 1.0}, 1: {"r": 2.0}, 2: {"r": 3.0}, 7: {"r": 9.0}}
    b = {0: {"r": 0.5}, 1: {"r": 1.5}, 2: {"r": 2.5}}
    d = paired(a, b, "r")
    assert d.seeds == (0, 1, 2) and d.diff == pytest.approx(0.5)
    assert (d.low, d.high) == pytest.approx((0.5, 0.5)) and d.sign == 1  # equal gaps: no spread
    mixed = paired({0: {"r": 1.0}, 1: {"r": 0.0}}, {0: {"r": 0.0}, 1: {"r": 1.0}}, "r")
    assert mixed.low < 0 < mixed.high and mixed.sign == 0
    assert paired(a, {5: {"r": 1.0}}, "r") is None
    assert change(a, b, "r") == {0: {"r": 0.5}, 1: {"r": 0.5}, 2: {"r": 0.5}}


def test_pareto_verdict_cases():
    assert pareto_verdict(_d(1), _d(-1)) == "reproduced"  # more reward, less KL
    assert pareto_verdict(_d(0), _d(-1)) == "reproduced"  # same reward, less KL
    assert pareto_verdict(_d(1), _d(0)) == "reproduced"
    assert pareto_verdict(_d(-1), _d(0)).startswith("not reproduced (the baseline")
    assert pareto_verdict(_d(0), _d(1)).startswith("not reproduced (the baseline")
    assert pareto_verdict(_d(0), _d(0)) == "not reproduced (no difference shown)"
    assert pareto_verdict(_d(1), _d(1)) == "mixed (a trade-off)"
    assert pareto_verdict(None, _d(1)) == "not run"


def test_better_verdict_cases():
    assert better_verdict([1, 1]) == "reproduced"
    assert better_verdict([1, 0]).startswith("partly")
    assert better_verdict([0, 0]) == "not reproduced (no difference shown)"
    assert better_verdict([-1, 0]) == "not reproduced (DPPO is worse)"
    assert better_verdict([1, -1]) == "mixed"
    assert better_verdict([]) == "not run"


def test_check_claims_on_a_hand_made_study():
    main = _runs({"dppo": [0.90, 0.91, 0.92], "grpo": [0.80, 0.81, 0.82]},
                 final_kl_ref={"dppo": [0.2, 0.2, 0.2], "grpo": [0.5, 0.6, 0.7]},
                 judge_acc_final={"dppo": [0.9, 0.9, 0.9], "grpo": [0.9, 0.9, 0.9]},
                 digit_fd_final={"dppo": [0.5, 0.5, 0.5], "grpo": [0.9, 1.0, 1.1]})
    # 4 passes: DPPO unchanged, GRPO loses 0.3 on every seed.
    epochs = _runs({"dppo": [0.90, 0.91, 0.92], "grpo": [0.50, 0.51, 0.52]})
    # staleness: both lose the same.
    stale = _runs({"dppo": [0.85, 0.86, 0.87], "grpo": [0.75, 0.76, 0.77]})
    multi = _runs({"dppo": [0.7, 0.7, 0.7], "grpo": [0.9, 0.9, 0.9]}, key="a_final",
                  b_final={"dppo": [0.7, 0.7, 0.7], "grpo": [0.3, 0.35, 0.4]})
    claims = {c.name: c for c in check_claims(
        {"main": main, "updates_4@main": epochs, "lag_2@main": stale, "multi_gdpo@main": multi},
        monitors=["judge_acc_final", "digit_fd_final"], lower_is_better=["fd"],
        components=["a_final", "b_final"])}
    assert claims["higher reward at lower KL"].verdict == "reproduced"
    # judge equal, FD lower (better) for DPPO: better on one, worse on none.
    assert claims["less forgetting"].verdict.startswith("partly")
    assert claims["stable multi-epoch"].verdict == "reproduced"
    assert "difference +0.300" in claims["stable multi-epoch"].evidence[0]
    assert claims["robust to staleness"].verdict == "not reproduced (no difference shown)"
    # GDPO: DPPO's smaller component 0.7 against GRPO's 0.3-0.4.
    assert claims["balanced multi-objective"].verdict == "reproduced"
    assert claims["balanced multi-objective"].setting == "multi_gdpo@main"


def test_check_claims_when_the_baseline_wins():
    main = _runs({"dppo": [0.80, 0.81, 0.82], "nft": [0.90, 0.91, 0.92]},
                 final_kl_ref={"dppo": [0.3, 0.3, 0.3], "nft": [0.1, 0.1, 0.1]})
    [first, forgetting] = check_claims({"main": main})
    assert first.verdict == "not reproduced"
    assert forgetting.verdict == "not run"  # no monitors given
