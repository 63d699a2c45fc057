"""Rollouts: sample trajectories with a model and a dynamics, recording the trained steps.

A mixed schedule (MixGRPO / Flow-GRPO-Fast, SPEC §2) runs the stochastic dynamics on a
window of steps only and Euler ODE steps elsewhere. The record holds, for the window's
steps only, what an update needs to replay them: ``x_t``, ``x_next``, times, the frozen
old mean (fp32) and std, and optionally the reference policy's mean.

Noise comes from generators keyed by (seed, stream, draw, global sample index), so a
sample's noise does not depend on how the batch is split over processes or sampling chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..dynamics import Dynamics, get_dynamics
from ..models import Conditioning, FlowModel

_ODE = get_dynamics("ode")


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """Copy a host tensor to ``device`` without stalling the host on a GPU.

    A plain copy from pageable memory waits for the device's queue to drain; from pinned
    memory the copy is queued like a kernel, so the sampling loop keeps the GPU fed.
    """
    if torch.device(device).type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class NoiseSource:
    """Deterministic Gaussian noise for rows ``[start, stop)`` of a global batch.

    Attributes:
        seed: run seed; stream: e.g. the iteration (``-1`` for evaluation).
        global_batch: rows in the global batch; start, stop: this slice.
    """

    seed: int
    stream: int
    global_batch: int
    start: int
    stop: int

    def draw(self, index: int, shape: Sequence[int], device: torch.device) -> Tensor:
        """Noise for draw ``index`` (0 = initial latents, i + 1 = step i), float32.

        Each row has its own generator keyed by its global row number, so a process draws
        only its own rows (cost proportional to the local batch, not the global one).
        """
        base = (self.seed * 1_000_003 + self.stream * 10_007 + index) * 1_000_033
        generator = torch.Generator()
        rows = []
        for row in range(self.start, self.stop):
            generator.manual_seed((base + row) % (2**63 - 1))
            rows.append(torch.randn(tuple(shape), generator=generator))
        return to_device(torch.stack(rows), device)

    def slice(self, start: int, stop: int) -> NoiseSource:
        """Rows ``[start, stop)`` of this slice (for sampling in chunks)."""
        return NoiseSource(self.seed, self.stream, self.global_batch, self.start + start,
                           self.start + stop)


@dataclass(frozen=True)
class Plan:
    """What iteration ``it`` samples, identical on every process."""

    prompts: list[str]  # global batch, group-major
    metadata: list[dict[str, Any]]
    group_ids: Tensor  # (B_global,)
    trained_steps: list[int]  # the S trained step indices (or forward-process time indices)


def make_plan(cfg, sde_steps, train_prompts: Sequence, it: int) -> Plan:
    """Iteration ``it``'s prompts (``num_groups`` drawn, each ``group_size`` times) and its
    trained steps, from a generator keyed by (seed, it): identical on every process and
    after a resume. ``cfg`` is the run config, ``sde_steps`` the resolved step plan."""
    s = cfg.sampling
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + it)
    picks = torch.randint(0, len(train_prompts), (s.num_groups,), generator=generator).tolist()
    items = [train_prompts[i] for i in picks for _ in range(s.group_size)]
    group_ids = torch.arange(s.num_groups).repeat_interleave(s.group_size)
    steps = choose_sde_steps(generator, sde_steps.mode, sde_steps.count, sde_steps.first,
                             sde_steps.stop)
    return Plan([i.prompt for i in items], [dict(i.metadata) for i in items], group_ids, steps)


@dataclass(frozen=True)
class Rollout:
    """Sampled trajectories. ``k`` = number of recorded (trained) steps.

    Attributes:
        latents (`Tensor` of shape `(B, *latent)`): final samples at t = 0.
        x_t, x_next, mean_old (`Tensor` of shape `(B, k, *latent)`, float32).
        std (`Tensor` of shape `(B, k)`), t, t_next (`Tensor` of shape `(B, k)`).
        mean_ref (`Tensor` of shape `(B, k, *latent)` or `None`).
    """

    latents: Tensor
    x_t: Tensor
    x_next: Tensor
    mean_old: Tensor
    std: Tensor
    t: Tensor
    t_next: Tensor
    mean_ref: Tensor | None = None

    @staticmethod
    def cat(parts: Sequence[Rollout]) -> Rollout:
        def join(name: str) -> Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        return Rollout(**{name: join(name) for name in Rollout.__dataclass_fields__})

    def index(self, idx: Tensor) -> Rollout:
        return Rollout(**{
            name: None if getattr(self, name) is None else getattr(self, name)[idx]
            for name in Rollout.__dataclass_fields__
        })


@torch.no_grad()
def sample_rollout(
    model: FlowModel,
    dynamics: Dynamics,
    cond: Conditioning,
    sigmas: Tensor,
    noise: NoiseSource,
    trained_steps: Sequence[int],
    *,
    guidance_scale: float = 1.0,
    reference: Callable[[], object] | None = None,
) -> Rollout:
    """Sample ``len(cond)`` trajectories; stochastic ``dynamics`` on ``trained_steps``, ODE elsewhere.

    Args:
        model: the adapter (policy = its current weights).
        dynamics: the stochastic sampler of the trained steps.
        cond (`Conditioning` of length `B`): one row per sample.
        sigmas (`Tensor` of shape `(K + 1,)`): the time grid from 1 to 0.
        noise: noise for these B rows.
        trained_steps: step indices (0-based, < K) sampled stochastically and recorded.
        guidance_scale: CFG scale.
        reference: a context-manager factory under which ``model`` is the reference policy;
            when given, the reference mean is recorded at each trained step (for ``beta > 0``).
    """
    batch, device = len(cond), model.device
    x = noise.draw(0, model.latent_shape, device)
    steps = sorted(set(trained_steps))
    records: dict[str, list[Tensor]] = {k: [] for k in ("x_t", "x_next", "mean", "std", "t",
                                                          "t_next", "mean_ref")}
    for i in range(len(sigmas) - 1):
        t = torch.full((batch,), float(sigmas[i]), device=device)
        t_next = torch.full((batch,), float(sigmas[i + 1]), device=device)
        v = model.predict_velocity(x, t, cond, guidance_scale)
        if i not in steps:
            x = _ODE.mean_std(x, v, t, t_next)[0]
            continue
        mean, std = dynamics.mean_std(x, v, t, t_next)
        x_next = mean + std * noise.draw(i + 1, model.latent_shape, device)
        if reference is not None:
            with reference():
                v_ref = model.predict_velocity(x, t, cond, guidance_scale)
            records["mean_ref"].append(dynamics.mean_std(x, v_ref, t, t_next)[0])
        for key, value in (("x_t", x), ("x_next", x_next), ("mean", mean),
                           ("std", std.reshape(batch)), ("t", t), ("t_next", t_next)):
            records[key].append(value.float())
        x = x_next
    stack = {k: torch.stack(v, dim=1) if v else None for k, v in records.items()}
    empty = x.new_zeros((batch, 0, *model.latent_shape))
    return Rollout(
        latents=x,
        x_t=stack["x_t"] if steps else empty,
        x_next=stack["x_next"] if steps else empty,
        mean_old=stack["mean"] if steps else empty,
        std=stack["std"] if steps else x.new_zeros((batch, 0)),
        t=stack["t"] if steps else x.new_zeros((batch, 0)),
        t_next=stack["t_next"] if steps else x.new_zeros((batch, 0)),
        mean_ref=stack["mean_ref"],
    )


def choose_window(
    generator: torch.Generator, size: int, first: int, stop: int
) -> list[int]:
    """``size`` consecutive step indices starting uniformly in ``[first, stop - size]``."""
    start = first + int(torch.randint(0, stop - size - first + 1, (1,), generator=generator))
    return list(range(start, start + size))


def choose_random_steps(
    generator: torch.Generator, size: int, first: int, stop: int
) -> list[int]:
    """``size`` distinct step indices drawn uniformly from ``[first, stop)``, sorted."""
    picks = torch.randperm(stop - first, generator=generator)[:size] + first
    return sorted(picks.tolist())


def choose_sde_steps(generator: torch.Generator, mode: str, size: int, first: int,
                     stop: int) -> list[int]:
    """The trained steps of one rollout (``sampling.sde_steps``): ``"window"`` or ``"random"``."""
    choose = {"window": choose_window, "random": choose_random_steps}[mode]
    return choose(generator, size, first, stop)
