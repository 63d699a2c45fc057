"""The comparison benchmarks: a base recipe each, shared by every method.

``digits``: text-to-digits (8x8 grey, D = 64); the in-domain reward is p(label) times a
stroke-thickness style score (p(label) alone saturates at 0.98-0.998 for every method);
its two factors are reported separately. Its components, legibility (``digit_label``) and
ink (``digit_ink``), are also the ``multi_*`` variants' rewards, combined with equal weights.
``shapes``: coloured shapes with captions (16x16 RGB, D = 768); the reward is the mean
clause correctness of a programmatic judge.

Out-of-domain monitors are never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Benchmark:
    name: str
    latent_elements: int  # D of one latent
    recipe: dict[str, Any]  # nested config shared by all methods
    iterations: int  # full run
    quick_iterations: int
    eval_every: int
    # Monitor keys where lower is better (the rest: higher is better).
    lower_is_better: tuple[str, ...] = ("fd",)
    # Reward components trained on by the multi_sum / multi_gdpo variants (equal weights).
    multi_rewards: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    # Monitor keys (as evaluation rows name them) that measure what training should not
    # lose: the "less forgetting" claim reads their final values (compare/claims.py).
    forgetting_monitors: tuple[str, ...] = ()

    @property
    def component_keys(self) -> tuple[str, ...]:
        """Evaluation-row keys of the components (the evaluator writes ``reward_<name>``)."""
        return tuple(f"reward_{item['name']}" for item in self.multi_rewards)


def _recipe(model: str, prompts: str, rewards: list[dict], monitors: list[dict]) -> dict[str, Any]:
    return {
        "num_threads": 1,  # runs go in parallel, one core each
        "model": {"name": "toy", "pretrained": model},
        "prompts": {"source": prompts},
        "lora": {"enabled": True, "rank": 8, "alpha": 16.0},
        "sampling": {"num_steps": 10, "sde_steps": {"count": 4, "range": [0.0, 0.7]},
                     "group_size": 8, "num_groups": 8, "sample_batch_size": 64,
                     "eval_num_steps": 10},
        "rewards": {"items": rewards},
        "optim": {"lr": 1e-3, "grad_clip": 1.0},
        "train": {"num_updates": 1, "minibatches_per_pass": 2, "micro_batch_size": 256},
        "eval": {"samples_per_prompt": 8, "max_prompts": 20, "monitors": monitors},
        "checkpoint": {"every": 1000, "keep_last": 1},
        "logging": {"tensorboard": False, "progress_bar": False},
    }


BENCHMARKS: dict[str, Benchmark] = {
    "digits": Benchmark(
        "digits", 64,
        _recipe("builtin:digits", "digits", [{"name": "digit_label_ink", "weight": 1.0}],
                [{"name": "digit_label"}, {"name": "digit_ink"}, {"name": "digit_judge"},
                 {"name": "diversity"}, {"name": "digit_fd"}]),
        iterations=30, quick_iterations=20, eval_every=10,
        multi_rewards=({"name": "digit_label", "weight": 0.5}, {"name": "digit_ink", "weight": 0.5}),
        forgetting_monitors=("judge_acc", "digit_fd", "diversity"),
    ),
    "shapes": Benchmark(
        "shapes", 768,
        _recipe("builtin:shapes", "shapes", [{"name": "shapes_clauses", "weight": 1.0}],
                [{"name": "shapes_judge"}, {"name": "diversity"}]),
        iterations=30, quick_iterations=20, eval_every=10,
        forgetting_monitors=("shapes_acc_count", "shapes_acc_position", "diversity"),
    ),
    # Headroom: RL on the held-out colour-shape pairs the base never saw (shape accuracy at
    # chance), rewarded on the shape clause; evaluated on those pairs at unseen placements.
    "shapes_novel": Benchmark(
        "shapes_novel", 768,
        _recipe("builtin:shapes", "shapes_novel", [{"name": "shapes_shape", "weight": 1.0}],
                [{"name": "shapes_judge"}, {"name": "shapes_silhouette"}, {"name": "diversity"}]),
        iterations=30, quick_iterations=20, eval_every=10,
        forgetting_monitors=("shapes_acc_color", "shapes_acc_count", "shapes_acc_position", "diversity"),
    ),
    # Clips (3, 4, 16, 16) of a moving shape, D = 3072; the monitors are never trained on.
    "video": Benchmark(
        "video", 3072,
        {**_recipe("builtin:video", "video", [{"name": "video_clauses", "weight": 1.0}],
                   [{"name": "video_judge"}, {"name": "temporal_consistency"},
                    {"name": "diversity"}]),
         "model": {"name": "toy_video", "pretrained": "builtin:video"}},
        iterations=40, quick_iterations=20, eval_every=10,
    ),
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}: expected one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]
