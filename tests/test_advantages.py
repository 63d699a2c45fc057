"""Advantages against hand-computed cases (numbers worked out in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowdppo.advantages import compute_advantages, gdpo_advantages, group_advantages, weighted_sum

R = torch.tensor([1.0, 3.0, 2.0, 6.0])
G = torch.tensor([0, 0, 1, 1])


def test_global_std_hand_case():
    # Group means 2, 2, 4, 4 -> deviations -1, 1, -2, 2. Global population std of
    # [1, 3, 2, 6]: mean 3, squared deviations 4, 0, 1, 9 -> var 3.5.
    adv = group_advantages(R, G, std_scope="global")
    expected = torch.tensor([-1.0, 1.0, -2.0, 2.0], dtype=torch.float64) / (math.sqrt(3.5) + 1e-4)
    assert adv.dtype == torch.float32 and adv.shape == (4,)
    torch.testing.assert_close(adv, expected.float())


def test_group_std_hand_case():
    # Group stds: [1, 3] -> 1; [2, 6] -> 2.
    adv = group_advantages(R, G, std_scope="group")
    expected = [-1 / (1 + 1e-4), 1 / (1 + 1e-4), -2 / (2 + 1e-4), 2 / (2 + 1e-4)]
    torch.testing.assert_close(adv, torch.tensor(expected))


def test_unsorted_group_ids_and_singleton_groups():
    rewards = torch.tensor([5.0, 1.0, 7.0, 3.0, 4.0])
    ids = torch.tensor([9, 2, 9, 2, 4])  # group 4 has one member: advantage 0
    adv = group_advantages(rewards, ids, std_scope="group")
    expected = [-1 / (1 + 1e-4), -1 / (1 + 1e-4), 1 / (1 + 1e-4), 1 / (1 + 1e-4), 0.0]
    torch.testing.assert_close(adv, torch.tensor(expected))


@pytest.mark.parametrize("std_scope", ["global", "group"])
@pytest.mark.parametrize("scale,shift", [(3.0, -7.0), (100.0, 42.0), (0.5, 0.0)])
def test_invariant_to_positive_affine_rescaling(std_scope, scale, shift):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(24, generator=g, dtype=torch.float64)
    ids = torch.arange(6).repeat_interleave(4)
    # eps (added to the std) is the only scale-dependent term: make it negligible.
    base = group_advantages(rewards, ids, std_scope=std_scope, eps=1e-12)
    moved = group_advantages(scale * rewards + shift, ids, std_scope=std_scope, eps=1e-12)
    torch.testing.assert_close(moved, base, rtol=1e-6, atol=1e-6)
    assert float(base.abs().min()) > 0


def test_clip_at_five():
    # One 1 among 49 zeros in a group: deviation 0.98, population std sqrt(0.02 * 0.98) = 0.14,
    # raw advantage 7.0 -> clipped to 5; the zeros get -0.02 / 0.14 = -0.1429 (unclipped).
    rewards = torch.zeros(50)
    rewards[0] = 1.0
    adv = group_advantages(rewards, torch.zeros(50, dtype=torch.long), std_scope="group")
    assert float(adv[0]) == 5.0
    assert float(adv[1]) == pytest.approx(-0.02 / (0.14 + 1e-4), rel=1e-6)
    assert float(group_advantages(rewards, torch.zeros(50, dtype=torch.long), std_scope="group",
                                  clip=2.0)[0]) == 2.0


def test_weighted_sum_hand_case():
    out = weighted_sum({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([10.0, 20.0])},
                       {"a": 2.0, "b": -0.5})
    torch.testing.assert_close(out.float(), torch.tensor([2 - 5.0, 4 - 10.0]))


def test_gdpo_hand_case():
    # Reward a: groups [0, 2] and [1, 1]; reward b: groups [3, 5] and [4, 8].
    a = torch.tensor([0.0, 2.0, 1.0, 1.0])
    b = torch.tensor([3.0, 5.0, 4.0, 8.0])
    ids = torch.tensor([0, 0, 1, 1])
    # Per-group normalisation: a -> [-1, 1]/(1 + e), [0, 0]; b -> [-1, 1]/(1 + e), [-2, 2]/(2 + e).
    e = 1e-4
    na = np.array([-1, 1, 0, 0]) / np.array([1 + e, 1 + e, 1, 1])
    nb = np.array([-1 / (1 + e), 1 / (1 + e), -2 / (2 + e), 2 / (2 + e)])
    for weights, (wa, wb) in [(None, (1.0, 1.0)), ({"a": 3.0, "b": 1.0}, (3.0, 1.0))]:
        s = wa * na + wb * nb
        expected = (s - s.mean()) / (s.std() + e)  # numpy's std is the population std
        got = gdpo_advantages({"a": a, "b": b}, ids, weights)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
        via_dispatch = compute_advantages({"a": a, "b": b}, weights or {"a": 1.0, "b": 1.0}, ids,
                                          mode="gdpo")
        torch.testing.assert_close(via_dispatch, got)


def test_gdpo_decouples_reward_scales_unlike_the_weighted_sum():
    # Reward b is 1000x larger: the weighted sum is dominated by b, GDPO is not.
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(16, generator=g), 1000 * torch.randn(16, generator=g)
    ids = torch.arange(4).repeat_interleave(4)
    summed = compute_advantages({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, ids, std_scope="group")
    only_b = group_advantages(b, ids, std_scope="group")
    gdpo = compute_advantages({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, ids, mode="gdpo")
    assert float((summed - only_b).abs().max()) < 0.05
    assert float((gdpo - only_b).abs().max()) > 0.3


def test_compute_advantages_weighted_sum_dispatch():
    rewards = {"a": R, "b": 2 * R}
    got = compute_advantages(rewards, {"a": 1.0, "b": 0.5}, G, std_scope="group", clip=1.0)
    torch.testing.assert_close(got, group_advantages(2 * R, G, std_scope="group", clip=1.0))


def test_advantage_errors():
    rewards = {"a": R}
    with pytest.raises(ValueError, match=r"reward 'a' has shape"):
        compute_advantages(rewards, {"a": 1.0}, G[:3])
    with pytest.raises(ValueError, match=r"mode='sum'"):
        compute_advantages(rewards, {"a": 1.0}, G, mode="sum")
    with pytest.raises(ValueError, match=r"std_scope='batch'"):
        compute_advantages(rewards, {"a": 1.0}, G, std_scope="batch")
    with pytest.raises(ValueError, match=r"weights name rewards \['b'\]"):
        compute_advantages(rewards, {"a": 1.0, "b": 1.0}, G)
    with pytest.raises(ValueError, match=r"rewards \['c'\] have no weight"):
        compute_advantages({"a": R, "c": R}, {"a": 1.0}, G)
    with pytest.raises(ValueError, match=r"reward 'pickscore' has non-finite"):
        compute_advantages({"pickscore": torch.tensor([1.0, float("nan"), 0.0, 1.0])},
                           {"pickscore": 1.0}, G)
    with pytest.raises(ValueError, match=r"group_ids must be an integer"):
        group_advantages(R, G.float())
    with pytest.raises(ValueError, match=r"clip=0"):
        group_advantages(R, G, clip=0.0)
    with pytest.raises(ValueError, match=r"std_scope='per_group'"):
        group_advantages(R, G, std_scope="per_group")
    with pytest.raises(ValueError, match=r"rewards is empty"):
        gdpo_advantages({}, G)
