"""Building a run's parts from a validated config: accelerator, model, rewards, optimizer."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ResolvedRun, RunConfig
from ..models import FlowModel, build_model
from ..prompts import PromptSplits, build_prompts
from ..rewards import Monitor, RewardSet, WeightedReward, build_monitor, build_reward
from ..rewards.base import MONITORS

logger = logging.getLogger(__name__)


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"`device`={cfg.device!r} but no CUDA device is visible; use device=cpu "
                         "or device=auto")
    return Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision)


def resolve_pretrained(pretrained: str) -> str:
    if pretrained.startswith("builtin:"):
        from ..worlds import resolve_builtin_base

        return resolve_builtin_base(pretrained.split(":", 1)[1])
    return pretrained


def load_model(cfg: RunConfig, device: torch.device) -> FlowModel:
    model = build_model(cfg.model.name, pretrained=resolve_pretrained(cfg.model.pretrained),
                        dtype=cfg.model.dtype, device=str(device), **cfg.model.kwargs)
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    # Eval mode always: no dropout, so the replayed mean equals the rollout's (r = 1).
    model.transformer.eval()
    return model


def build_rewards(cfg: RunConfig, device: torch.device) -> RewardSet:
    items = [WeightedReward(item.name, build_reward(item.name, **_with_device(item.kwargs, device)),
                            item.weight) for item in cfg.rewards.items]
    return RewardSet(items, num_workers=cfg.rewards.async_workers)


def build_monitors(cfg: RunConfig, device: torch.device) -> dict[str, Monitor]:
    monitors: dict[str, Monitor] = {}
    for item in cfg.eval.monitors:
        kwargs = _with_device(item.kwargs, device)
        if item.name in MONITORS:
            monitors[item.name] = build_monitor(item.name, **kwargs)
        else:  # a reward used as a monitor: its mean over the evaluation images
            monitors[item.name] = _reward_monitor(item.name, build_reward(item.name, **kwargs))
    return monitors


def _reward_monitor(name: str, reward):
    def monitor(images, prompts, metadata) -> dict[str, float]:
        values, _ = reward(images, prompts, metadata)
        return {f"{name}_mean": float(torch.as_tensor(values).float().mean())}

    return monitor


def _with_device(kwargs: dict, device: torch.device) -> dict:
    return {"device": str(device), **kwargs} if "device" not in kwargs else dict(kwargs)


def load_prompts(cfg: RunConfig) -> PromptSplits:
    p = cfg.prompts
    splits = build_prompts(p.source, train_file=p.train_file, eval_file=p.eval_file, **p.kwargs)
    if not splits.train:
        raise ValueError(f"`prompts.source`={p.source!r} yielded no training prompts")
    return splits


@dataclass(frozen=True)
class Schedule:
    """Optimizer steps of the run, for the LR schedule."""

    total_steps: int
    warmup_steps: int


def make_optimizer(params: list[torch.nn.Parameter], resolved: ResolvedRun):
    cfg = resolved.config
    optim = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                  weight_decay=optim.weight_decay)
    steps_per_iteration = cfg.train.num_updates * cfg.train.minibatches_per_pass
    schedule = Schedule(cfg.train.num_iterations * steps_per_iteration,
                        optim.warmup_iterations * steps_per_iteration)

    def factor(step: int) -> float:
        if step < schedule.warmup_steps:
            return (step + 1) / schedule.warmup_steps
        progress = (step - schedule.warmup_steps) / max(1, schedule.total_steps - schedule.warmup_steps)
        if optim.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if optim.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def prepare_output_dir(output_dir: Path, resume: bool) -> None:
    """Refuse to overwrite an existing run unless resuming it."""
    has_run = (output_dir / "config.yaml").is_file()
    if resume and not has_run:
        raise ValueError(f"--resume {output_dir}: no run there (config.yaml missing); give the "
                         "output directory of an earlier run")
    if not resume and has_run:
        raise ValueError(f"output directory {output_dir} already holds a run; pass --resume "
                         f"{output_dir} to continue it or choose another --output-dir")
    output_dir.mkdir(parents=True, exist_ok=True)
