"""Helpers for tests that train: the overrides that make a toy recipe a seconds-long run."""

from __future__ import annotations

from pathlib import Path


def tiny_overrides(base: Path, iterations: int = 2) -> list[str]:
    """Overrides that make any toy recipe a seconds-long run on ``base``."""
    return [f"model.pretrained={base}", f"train.num_iterations={iterations}",
            "sampling.num_steps=4", "sampling.sde_steps.count=2", "sampling.sde_steps.range=[0.0, 0.75]",
            "sampling.group_size=3", "sampling.num_groups=2", "sampling.eval_num_steps=3",
            "eval.max_prompts=2", "eval.samples_per_prompt=2", "eval.every=1",
            "checkpoint.every=1", "logging.progress_bar=false", "optim.lr=0.05", "device=cpu"]
