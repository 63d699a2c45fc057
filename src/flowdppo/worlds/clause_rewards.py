"""Rewards and a monitor from a world's rule-based judge of prompt clauses.

A judged world (``shapes``, ``video``) supplies ``evaluate(media, prompts, metadata) ->
(scores, correct)``: per clause, a soft score in [0, 1] and a hard correctness, each `(B,)`.
This registers, for world ``w`` with clauses ``c1..cn``:

- reward ``w_clauses``: the mean of the soft clause scores; reward ``w_<c>`` per clause
  (``info`` holds ``score_<c>`` and ``correct_<c>`` for every clause);
- monitor ``w_judge``: ``w_acc_<c>`` (hard accuracy per clause), ``w_acc_all`` (every
  clause right, GenEval's "correct image") and ``w_score`` (mean soft score).

The factories take ``device`` for the reward protocol; the judges run on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..rewards.base import register_monitor, register_reward

Evaluate = Callable[[Tensor, Sequence[str], Sequence[dict[str, Any]] | None],
                    tuple[dict[str, Tensor], dict[str, Tensor]]]


def clause_reward(world: str, all_clauses: Sequence[str], clauses: Sequence[str],
                  evaluate: Evaluate):
    """The mean soft score of ``clauses`` as a reward ``(media, prompts, metadata)``."""
    def reward(media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
               ) -> tuple[Tensor, dict[str, Any]]:
        scores, correct = evaluate(media, prompts, metadata)
        value = torch.stack([scores[c] for c in clauses]).mean(dim=0).float()
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{world} judge produced a non-finite score; is the input finite?")
        info: dict[str, Any] = {f"score_{c}": scores[c] for c in all_clauses}
        info.update({f"correct_{c}": correct[c] for c in all_clauses})
        return value, info

    return reward


def _factory(world: str, all_clauses: Sequence[str], clauses: Sequence[str],
             evaluate: Evaluate, doc: str):
    def factory(device: str = "cpu"):
        del device  # the judge runs on the CPU
        return clause_reward(world, all_clauses, clauses, evaluate)

    factory.__doc__ = doc
    return factory


def register_clause_rewards(world: str, all_clauses: Sequence[str], evaluate: Evaluate) -> None:
    """Register ``{world}_clauses``, ``{world}_<clause>`` and the ``{world}_judge`` monitor."""
    all_clauses = tuple(all_clauses)
    register_reward(f"{world}_clauses")(_factory(
        world, all_clauses, all_clauses, evaluate,
        f"Mean of the soft {world} clause scores ({', '.join(all_clauses)}), in [0, 1]."))
    for clause in all_clauses:
        register_reward(f"{world}_{clause}")(_factory(
            world, all_clauses, (clause,), evaluate,
            f"Soft {clause} score of the {world} judge, in [0, 1]."))

    def judge_monitor(device: str = "cpu"):
        del device

        def monitor(media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
                    ) -> dict[str, float]:
            scores, correct = evaluate(media, prompts, metadata)
            out = {f"{world}_acc_{c}": float(correct[c].float().mean()) for c in all_clauses}
            hits = torch.stack([correct[c] for c in all_clauses]).all(0)
            out[f"{world}_acc_all"] = float(hits.float().mean())
            out[f"{world}_score"] = float(torch.stack([scores[c] for c in all_clauses]).mean())
            return out

        return monitor

    judge_monitor.__doc__ = (f"Per-clause accuracy of the {world} judge, all clauses right, "
                             "and the mean soft score: ``dict[str, float]``.")
    register_monitor(f"{world}_judge")(judge_monitor)
