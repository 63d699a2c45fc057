"""Evaluation: ODE samples of held-out prompts, in-domain rewards, out-of-domain monitors,
the exact KL to the reference along the evaluation trajectories, and an image grid.

The KL is measured the same way for every method so runs compare on equal terms: at each
of the K steps of the ODE trajectory, the exact KL between the Flow-SDE (a = 0.7) step
policies of theta and of the reference, per-element mean, summed over the steps
(unit: nats per latent element).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..dynamics import gaussian_kl, get_dynamics
from ..models import FlowModel
from ..prompts import PromptItem
from ..rewards import Monitor, RewardSet
from .rollout import NoiseSource

KL_UNIT = "nats/element, summed over steps (Flow-SDE a=0.7)"
_KL_DYNAMICS = get_dynamics("flow_sde", noise_level=0.7)
_ODE = get_dynamics("ode")
EVAL_STREAM = -1  # noise stream of evaluation: the same noise at every evaluation


@dataclass(frozen=True)
class EvalResult:
    images: Tensor  # (N, C, H, W) in [0, 1]
    prompts: list[str]
    rewards: dict[str, Tensor]  # name -> (N,)
    row: dict[str, Any]  # flat metrics for eval.jsonl


@torch.no_grad()
def sample_ode_with_kl(
    model: FlowModel, prompts: Sequence[str], sigmas: Tensor, noise: NoiseSource,
    guidance_scale: float, reference: Callable[[], Any] | None,
) -> tuple[Tensor, Tensor]:
    """ODE samples and, per sample, the summed exact per-step KL to the reference (or zeros)."""
    cond = model.encode_prompts(list(prompts))
    batch, device = len(prompts), model.device
    x = noise.draw(0, model.latent_shape, device)
    kl = torch.zeros(batch, device=device)
    for i in range(len(sigmas) - 1):
        t = torch.full((batch,), float(sigmas[i]), device=device)
        t_next = torch.full((batch,), float(sigmas[i + 1]), device=device)
        v = model.predict_velocity(x, t, cond, guidance_scale)
        if reference is not None and float(sigmas[i + 1]) > 0:
            with reference():
                v_ref = model.predict_velocity(x, t, cond, guidance_scale)
            mean, std = _KL_DYNAMICS.mean_std(x, v, t, t_next)
            mean_ref, _ = _KL_DYNAMICS.mean_std(x, v_ref, t, t_next)
            kl += gaussian_kl(mean, mean_ref, std, reduce="mean")
        x = _ODE.mean_std(x, v, t, t_next)[0]
    return model.decode(x), kl


def evaluate(
    model: FlowModel, items: Sequence[PromptItem], *, samples_per_prompt: int, sigmas: Tensor,
    seed: int, guidance_scale: float, rewards: RewardSet, monitors: dict[str, Monitor],
    reference: Callable[[], Any] | None, batch_size: int, shard: int = 0, num_shards: int = 1,
    gather: Callable[[list], list] | None = None,
) -> EvalResult | None:
    """Sample, score and summarise the held-out prompts.

    With ``num_shards > 1`` the sampling chunks are dealt round-robin to the shards (processes),
    which each call this with their ``shard``; ``gather`` (all processes call it, e.g.
    accelerate's ``gather_object``) brings every shard's chunks to each process, and shard 0
    scores them and returns the result (the others return ``None``). Noise is keyed by global
    sample index, so the result does not depend on the number of shards.
    """
    start = time.perf_counter()
    expanded = [item for item in items for _ in range(samples_per_prompt)]
    prompts = [item.prompt for item in expanded]
    metadata = [dict(item.metadata) for item in expanded]
    total = len(expanded)
    if num_shards > 1 and gather is None:
        raise ValueError("evaluate: num_shards > 1 needs a gather function")
    chunks: list[tuple[int, Tensor, Tensor]] = []
    for lo in list(range(0, total, batch_size))[shard::num_shards]:
        hi = min(lo + batch_size, total)
        noise = NoiseSource(seed, EVAL_STREAM, total, lo, hi)
        img, kl = sample_ode_with_kl(model, prompts[lo:hi], sigmas, noise, guidance_scale, reference)
        chunks.append((lo, img.float().cpu(), kl.float().cpu()))
    if num_shards > 1:
        chunks = sorted(gather(chunks), key=lambda chunk: chunk[0])
        if shard != 0:
            return None
    image_batch = torch.cat([c[1] for c in chunks])
    kl_all = torch.cat([c[2] for c in chunks])
    values, _ = rewards.compute(image_batch, prompts, metadata)
    weights = rewards.weights
    combined = sum(weights[n] * v for n, v in values.items())
    row: dict[str, Any] = {"reward_mean": float(combined.mean()), "reward_std": float(combined.std())}
    for name, v in values.items():
        row[f"reward_{name}"] = float(v.mean())
    row["kl_ref"] = float(kl_all.mean())
    row["kl_ref_max"] = float(kl_all.max())
    row["kl_ref_unit"] = KL_UNIT
    for name, monitor in monitors.items():
        for key, value in monitor(image_batch, prompts, metadata).items():
            row[key if key not in row else f"{name}_{key}"] = float(value)
    row["time_eval_s"] = time.perf_counter() - start
    return EvalResult(image_batch, prompts, values, row)


def save_grid(result: EvalResult, path: Path, reward_name: str, max_rows: int = 8,
              max_cols: int = 4, samples_per_prompt: int = 1) -> Path:
    """A PNG grid: one row per prompt, its samples across, titled with the reward."""
    if result.images.ndim == 5:  # videos (N, C, F, H, W): a GIF beside a PNG frame strip
        from .video_grid import save_video_grid

        return save_video_grid(result, path, reward_name, max_rows, max_cols, samples_per_prompt)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = max(samples_per_prompt, 1)
    rows = min(max_rows, len(result.prompts) // per)
    cols = min(max_cols, per)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols + 1.6, 1.5 * rows), squeeze=False)
    scores = result.rewards[reward_name]
    for r in range(rows):
        for c in range(cols):
            i = r * per + c
            image = result.images[i].permute(1, 2, 0).clamp(0, 1).numpy()
            ax = axes[r][c]
            ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray",
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{float(scores[i]):.2f}", fontsize=7)
            if c == 0:
                ax.set_ylabel(result.prompts[i][:28], fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle(f"{reward_name} (title) per sample", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class EvalContext:
    """What a training run's evaluation needs (built once by the trainer)."""

    accelerator: Any
    model: FlowModel
    items: Sequence[PromptItem]  # held-out prompts (already cut to `eval.max_prompts`)
    rewards: RewardSet
    monitors: dict[str, Monitor]
    reference: Callable[[], Any]
    weights: Callable[[], Any]  # context factory: the weights to evaluate (EMA or live)


def evaluate_run(ctx: EvalContext, cfg, step: int) -> dict[str, Any] | None:
    """Evaluate the run at ``step``; the main process gets the result, the others ``None``.

    Each process samples its share of the evaluation's chunks through the bare transformer
    (a forward through the DDP wrapper would broadcast buffers to processes running other
    work) and the images are gathered to the main process. Under FSDP no process holds the
    whole model: every process runs the whole evaluation through the wrapper, whose forwards
    gather the weights.
    """
    from accelerate.utils import gather_object

    from .distributed import shards_parameters

    acc = ctx.accelerator
    sharded = shards_parameters(acc)
    world = acc.num_processes
    split = {} if sharded or world == 1 else dict(
        shard=acc.process_index, num_shards=world, gather=gather_object)
    bare = contextlib.nullcontext() if sharded else unwrapped(ctx.model)
    with ctx.weights(), bare, acc.autocast():
        return evaluate(
            ctx.model, ctx.items, samples_per_prompt=cfg.eval.samples_per_prompt,
            sigmas=ctx.model.sigmas(cfg.sampling.eval_num_steps).cpu(), seed=cfg.seed,
            guidance_scale=cfg.sampling.guidance_scale, rewards=ctx.rewards,
            monitors=ctx.monitors, reference=ctx.reference,
            batch_size=cfg.sampling.sample_batch_size, **split)


@contextlib.contextmanager
def unwrapped(model: FlowModel) -> Iterator[None]:
    """The bare transformer for work each process runs on its own (evaluation): a DDP
    forward would broadcast buffers and wait for processes that are not running it."""
    from .policy import unwrap

    wrapped = model.transformer
    model.transformer = unwrap(wrapped)
    try:
        yield
    finally:
        model.transformer = wrapped
