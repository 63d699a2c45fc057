"""Rectified-flow pretraining of a toy model on (images, prompts): the base model of a world.

Loss (SPEC §1): ``x_t = (1 - t) x0 + t eps``, ``L = mean ||v_theta(x_t, t, c) - (eps - x0)||^2``,
with ``t`` drawn uniformly in [0, 1] by default (the toy samples with a linear grid, so every
time matters equally; ``time_sampling="logit_normal"`` gives SD3's choice). The transformer and
the word embeddings train together (AdamW, linear warmup then cosine decay); the text encoder
is frozen again afterwards. Deterministic on the CPU given ``seed``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models.toy import ToyFlowModel

TIME_SAMPLINGS = ("uniform", "logit_normal")


def sample_times(batch: int, how: str, generator: torch.Generator) -> Tensor:
    """Training times of shape `(batch,)` in (0, 1)."""
    if how == "uniform":
        return torch.rand(batch, generator=generator)
    if how == "logit_normal":
        return torch.sigmoid(torch.randn(batch, generator=generator))
    raise ValueError(f"time_sampling={how!r}: expected one of {TIME_SAMPLINGS}")


def flow_matching_loss(model: ToyFlowModel, x0: Tensor, ids: Tensor, t: Tensor,
                       eps: Tensor) -> Tensor:
    """Mean squared error of the velocity on one batch (text encoder in the graph).

    Args:
        x0 (`Tensor` of shape `(B, C, H, W)`): clean images in [-1, 1].
        ids (`Tensor` of shape `(B, L)`, long): word ids from ``model.tokenize``.
        t (`Tensor` of shape `(B,)`): times in [0, 1].
        eps (`Tensor` like ``x0``): standard normal noise.
    """
    from ..models.base import Conditioning

    embeds, pooled = model.text_encoder(ids)
    t_b = t.view(-1, *([1] * (x0.ndim - 1)))  # images (B, C, H, W) or clips (B, C, F, H, W)
    x_t = (1.0 - t_b) * x0 + t_b * eps
    cond = Conditioning({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled})
    v = model.predict_velocity(x_t, t, cond)
    return (v - (eps - x0)).pow(2).mean()


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``num_threads`` torch intra-op threads (None: unchanged)."""
    old = torch.get_num_threads()
    torch.set_num_threads(num_threads or old)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _check_data(images: Tensor, prompts: Sequence[str], model: ToyFlowModel) -> None:
    if tuple(images.shape[1:]) != tuple(model.latent_shape):
        raise ValueError(f"images have shape {tuple(images.shape)}; expected (N, "
                         f"{', '.join(map(str, model.latent_shape))}) for this model")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images; give one each")
    if float(images.min()) < -1.0 - 1e-6 or float(images.max()) > 1.0 + 1e-6:
        raise ValueError("images must lie in [-1, 1] (the toy model's pixel latent range)")


def pretrain_flow_model(
    model: ToyFlowModel,
    images: Tensor,
    prompts: Sequence[str],
    *,
    num_steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    warmup_steps: int = 50,
    weight_decay: float = 0.0,
    time_sampling: str = "uniform",
    num_threads: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train ``model`` (in place) with the rectified-flow loss.

    Args:
        model (`ToyFlowModel`): its transformer and text encoder are trained.
        images (`Tensor` of shape `(N, C, H, W)`): float in [-1, 1], on the CPU.
        prompts (`list[str]` of length N): one caption per image.
        num_steps, batch_size (`int`): optimizer steps and images per step.
        lr (`float`): peak AdamW learning rate (warmup then cosine to 10%).
        seed (`int`): seeds batches, times and noise; same seed, same weights (CPU).
        time_sampling (`str`): ``"uniform"`` or ``"logit_normal"``.
        num_threads (`int`, optional): torch intra-op threads while training (restored after).
            A tiny model gains little from threads, and on a busy CPU spinning threads can make
            it 10x slower: 1 is the safe choice there. None keeps torch's setting.
        progress (`bool`): show a tqdm bar.

    Returns:
        ``{"loss_first", "loss_last", "wall_s", "cpu_s", "num_steps", "num_params"}``;
        losses are means over the first and last 10% of steps.
    """
    _check_data(images, prompts, model)
    if num_steps < 1 or batch_size < 1:
        raise ValueError(f"num_steps={num_steps}, batch_size={batch_size}: both must be >= 1")
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"time_sampling={time_sampling!r}: expected one of {TIME_SAMPLINGS}")
    with torch_threads(num_threads):
        return _train(model, images, prompts, num_steps=num_steps, batch_size=batch_size, lr=lr,
                      seed=seed, warmup_steps=warmup_steps, weight_decay=weight_decay,
                      time_sampling=time_sampling, progress=progress)


def _train(model: ToyFlowModel, images: Tensor, prompts: Sequence[str], *, num_steps: int,
           batch_size: int, lr: float, seed: int, warmup_steps: int, weight_decay: float,
           time_sampling: str, progress: bool) -> dict[str, float]:
    from tqdm.auto import tqdm

    device = model.device
    images = images.float()
    ids_all = model.tokenize(list(prompts))  # tokenised once: also validates every prompt
    modules = [model.transformer, model.text_encoder]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps))
        * (0.55 + 0.45 * math.cos(math.pi * min(1.0, s / num_steps))))
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    wall, cpu = time.perf_counter(), time.process_time()
    bar = tqdm(range(num_steps), desc="pretrain", disable=None if progress else True,
               leave=False)  # None: off when stderr is not a terminal
    for _ in bar:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        t = sample_times(batch_size, time_sampling, generator)
        eps = torch.randn((batch_size, *images.shape[1:]), generator=generator)
        loss = flow_matching_loss(model, images[idx].to(device), ids_all[idx].to(device),
                                  t.to(device), eps.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    for m in modules:
        m.requires_grad_(False).eval()
    model.clear_prompt_cache()
    tail = max(1, num_steps // 10)
    return {"loss_first": sum(losses[:tail]) / tail, "loss_last": sum(losses[-tail:]) / tail,
            "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
            "num_steps": float(num_steps), "num_params": float(sum(p.numel() for p in params))}


# -- cached artefacts --------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$FLOWDPPO_CACHE`` or ``~/.cache/flowdppo``."""
    return Path(os.environ.get("FLOWDPPO_CACHE") or Path.home() / ".cache" / "flowdppo").expanduser()


def recipe_hash(recipe: dict[str, Any]) -> str:
    """A short hash of a JSON-able recipe: any change of the recipe changes the cache key."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def ensure_cached(name: str, recipe: dict[str, Any], build: Callable[[Path], None], *,
                  cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """The directory ``<cache>/<name>-<hash(recipe)>``, built by ``build(tmp_dir)`` if missing.

    The build writes into a temporary sibling that is renamed into place, so an interrupted
    build never leaves a half-written cache entry. ``recipe.json`` is written beside the files.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / f"{name}-{recipe_hash(recipe)}"
    if target.is_dir() and not force:
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        build(tmp)
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=1, sort_keys=True))
        if target.is_dir():  # force: replace the old entry
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not a concurrent build that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@torch.no_grad()
def sample_ode(model: ToyFlowModel, prompts: Sequence[str], *, num_steps: int, seed: int,
               batch_size: int = 256) -> Tensor:
    """Euler-ODE samples, decoded: `(len(prompts), C, H, W)` float32 in [0, 1] on the CPU.

    Noise comes from one CPU generator seeded with ``seed`` (drawn for all rows at once).
    """
    from ..dynamics import get_dynamics

    ode = get_dynamics("ode")
    sigmas = model.sigmas(num_steps)
    noise = torch.randn((len(prompts), *model.latent_shape), generator=torch.Generator().manual_seed(seed))
    out = []
    for lo in range(0, len(prompts), batch_size):
        x = noise[lo:lo + batch_size].to(model.device)
        cond = model.encode_prompts(list(prompts[lo:lo + batch_size]))
        for i in range(num_steps):
            t = torch.full((x.shape[0],), float(sigmas[i]), device=x.device)
            v = model.predict_velocity(x, t, cond)
            x, _, _ = ode.step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
        out.append(model.decode(x).cpu())
    return torch.cat(out)
