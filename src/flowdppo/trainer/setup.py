"""Building a run's parts from a validated config: accelerator, model, rewards, optimizer."""

from __future__ import annotations

import logging
import math
import os
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
    from accelerate.utils import InitProcessGroupKwargs

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"`device`={cfg.device!r} but no CUDA device is visible; use device=cpu "
                         "or device=auto")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if cpu and launched and _env_flag("ACCELERATE_USE_FSDP"):
        # accelerate enables FSDP only on accelerator devices; on the CPU it would run DDP.
        raise ValueError(f"`device`={cfg.device!r} under an FSDP launch: accelerate runs FSDP "
                         "only on GPUs (on the CPU it silently falls back to DDP); use GPUs or "
                         "launch with configs_accelerate/ddp.yaml / plain torchrun")
    kwargs = {}
    if cpu and _env_flag("ACCELERATE_USE_DEEPSPEED"):
        if torch.cuda.is_available():
            raise ValueError("`device`=cpu under a DeepSpeed launch while CUDA is visible: "
                             "DeepSpeed picks its accelerator itself; use device=auto or hide "
                             "the GPUs (CUDA_VISIBLE_DEVICES=)")
        # accelerate ignores DeepSpeed when cpu=True; DeepSpeed's CPU accelerator over gloo
        # works, but accelerate only counts the processes when it is told the backend.
        cpu = False
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision, **kwargs)
    if str(accelerator.distributed_type).endswith("DEEPSPEED"):
        configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, cfg,
                            accelerator.num_processes)
    return accelerator


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def configure_deepspeed(ds_config: dict, cfg: RunConfig, num_processes: int) -> None:
    """Fill the DeepSpeed config from the run before ``prepare``.

    The trainer prepares no dataloader, so accelerate cannot infer the micro batch; it is
    ``train.micro_batch_size``. DeepSpeed's own accumulation stays 1: the trainer accumulates
    micro-batches itself and marks the last one of each minibatch as the step boundary.
    Gradient clipping happens inside DeepSpeed's step, so it takes ``optim.grad_clip``.
    """
    accumulation = ds_config.get("gradient_accumulation_steps", "auto")
    if accumulation not in ("auto", 1):
        raise ValueError(f"DeepSpeed `gradient_accumulation_steps`={accumulation!r}: the trainer "
                         "accumulates micro-batches itself (`train.micro_batch_size`, "
                         "`train.minibatches_per_pass`); set it to 1 in the DeepSpeed config")
    clipping = ds_config.get("gradient_clipping", "auto")
    if clipping not in ("auto", cfg.optim.grad_clip):
        logger.warning("DeepSpeed `gradient_clipping`=%s replaced by the run's `optim.grad_clip`=%s",
                       clipping, cfg.optim.grad_clip)
    micro = cfg.train.micro_batch_size
    ds_config.update({"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
                      "train_batch_size": micro * num_processes,
                      "gradient_clipping": cfg.optim.grad_clip})


def resolve_pretrained(pretrained: str) -> str:
    if pretrained.startswith("builtin:"):
        from ..worlds import resolve_builtin_base

        return resolve_builtin_base(pretrained.split(":", 1)[1])
    return pretrained


def load_model(cfg: RunConfig, device: torch.device) -> FlowModel:
    from ..models.pipeline_checks import loading_progress

    with loading_progress(cfg.logging.progress_bar):  # diffusers' loading bars follow ours
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
    """Refuse a directory that does not suit the run (see :mod:`.run_dir`); create it."""
    from .run_dir import prepare_output_dir as prepare

    prepare(output_dir, resume)
