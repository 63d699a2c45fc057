"""The loss's inputs: replay stored (sample, step) entries through the current weights.

Likelihood methods replay stored sampler steps (:class:`PolicyStepBatch`); forward-process
methods noise clean samples (:class:`VelocityBatch`). :class:`BatchSource` binds one
iteration's rollout, conditioning and advantages so the updater asks only for entries.

``S`` below is the number of trained (stochastic) steps per sample, not the sampler's ``K``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..algorithms import PolicyStepBatch, VelocityBatch
from ..dynamics import Dynamics
from ..models import Conditioning, FlowModel
from .rollout import Rollout, to_device


@dataclass(frozen=True)
class Entries:
    """Flattened (sample, step) entries of a rollout, the unit of replay.

    ``sample`` (N,) indexes the rollout's samples; ``step`` (N,) its recorded steps.
    """

    sample: Tensor
    step: Tensor

    def __len__(self) -> int:
        return self.sample.shape[0]

    def split(self, size: int) -> list[Entries]:
        return [Entries(s, t) for s, t in zip(self.sample.split(size), self.step.split(size))]

    def to(self, device: torch.device) -> Entries:
        """The indices on ``device`` (indexing device tensors with host indices syncs)."""
        return Entries(to_device(self.sample, device), to_device(self.step, device))


def entries_for(samples: Tensor, num_trained_steps: int) -> Entries:
    """All ``S`` recorded steps of ``samples`` (sample-major)."""
    sample = samples.repeat_interleave(num_trained_steps)
    step = torch.arange(num_trained_steps).repeat(samples.shape[0])
    return Entries(sample, step)


def likelihood_batch(
    model: FlowModel, dynamics: Dynamics, rollout: Rollout, advantages: Tensor,
    cond: Conditioning, entries: Entries, guidance_scale: float, *, record_old: bool = False,
) -> PolicyStepBatch:
    """Replay ``entries``: the current policy's mean at the stored states.

    ``record_old=True`` (the first optimizer step, before any weight moved): the old mean
    IS this forward's mean, detached, and is written back into ``rollout.mean_old`` for
    the later passes. Then ``mu == mu_old`` holds bit for bit, so ``r == 1`` and
    ``KL == 0`` exactly whatever kernels, dtype or compile mode the forward used.
    """
    entries = entries.to(rollout.x_t.device)
    s, k = entries.sample, entries.step
    x_t, t, t_next = rollout.x_t[s, k], rollout.t[s, k], rollout.t_next[s, k]
    v = model.predict_velocity(x_t.to(model.device), t, cond.index(s), guidance_scale)
    mean, _ = dynamics.mean_std(x_t, v.float(), t, t_next)
    if record_old:
        mean_old = mean.detach()
        rollout.mean_old[s, k] = mean_old.to(rollout.mean_old.dtype)
    else:
        mean_old = rollout.mean_old[s, k]
    std = rollout.std[s, k].view(-1, *([1] * (x_t.ndim - 1)))
    mean_ref = None if rollout.mean_ref is None else rollout.mean_ref[s, k]
    return PolicyStepBatch(
        x_next=rollout.x_next[s, k], mean=mean, mean_old=mean_old, std=std,
        advantages=advantages[s], dt=t - t_next, t=t, mean_ref=mean_ref,
    )


def forward_batch(
    model: FlowModel, rollout: Rollout, advantages: Tensor, cond: Conditioning, entries: Entries,
    times: Tensor, noise: Tensor, old_policy: Callable[[], Any], guidance_scale: float,
) -> VelocityBatch:
    """Noise the clean samples at ``times[step]`` and predict with the old and current policy.

    ``noise`` (B, S, *latent) is fixed per rollout so every pass sees the same x_t.
    """
    entries = entries.to(rollout.latents.device)
    s, k = entries.sample, entries.step
    x0, eps = rollout.latents[s], noise[s, k]
    t = times.to(x0.device, x0.dtype)[k]
    t_b = t.view(-1, *([1] * (x0.ndim - 1)))
    x_t = (1 - t_b) * x0 + t_b * eps
    rows = cond.index(s)
    # The old-policy forward runs first: its parameter swap must not touch a pending graph.
    with torch.no_grad(), old_policy():
        v_old = model.predict_velocity(x_t, t, rows, guidance_scale).float()
    v = model.predict_velocity(x_t, t, rows, guidance_scale).float()
    return VelocityBatch(v=v, v_old=v_old, v_target=eps - x0, x_t=x_t, t=t,
                         advantages=advantages[s])


@dataclass(frozen=True)
class BatchSource:
    """One iteration's replay inputs; ``source(entries)`` builds the loss's batch.

    Attributes:
        forward_inputs: ``(times (S,), noise (B, S, *latent))`` for forward-process methods,
            ``None`` for likelihood methods.
        old_policy: context factory under which the model is the sampling policy
            (forward-process methods' EMA policy); ``None`` when it is the live weights.
        autocast: the accelerator's autocast context factory.
    """

    model: FlowModel
    dynamics: Dynamics
    rollout: Rollout
    cond: Conditioning
    advantages: Tensor
    guidance_scale: float
    autocast: Callable[[], contextlib.AbstractContextManager]
    forward_inputs: tuple[Tensor, Tensor] | None = None
    old_policy: Callable[[], contextlib.AbstractContextManager] | None = None

    @property
    def likelihood(self) -> bool:
        return self.forward_inputs is None

    def __call__(self, entries: Entries, *, record_old: bool = False) -> Any:
        with self.autocast():
            if self.forward_inputs is None:
                return likelihood_batch(self.model, self.dynamics, self.rollout, self.advantages,
                                        self.cond, entries, self.guidance_scale,
                                        record_old=record_old)
            times, eps = self.forward_inputs
            return forward_batch(self.model, self.rollout, self.advantages, self.cond, entries,
                                 times, eps, self.old_policy or contextlib.nullcontext,
                                 self.guidance_scale)


def means_at_entries(source: BatchSource, entries: Entries, micro_batch_size: int,
                     *, grad_mode: bool) -> Tensor:
    """The model's mean at each entry (N, *latent), float32, in micro-batches of the update's
    size; ``grad_mode`` builds the update's own graph (torch.compile keeps one per mode)."""
    out = []
    for chunk in entries.split(micro_batch_size):
        with torch.set_grad_enabled(grad_mode):
            out.append(source(chunk).mean.detach().float())
    return torch.cat(out) if out else source.rollout.mean_old.new_zeros((0, *source.rollout.mean_old.shape[2:]))


def write_means(target: Tensor, entries: Entries, means: Tensor) -> None:
    """``target[sample, step] = means`` for every entry (target (B, S, *latent))."""
    index = entries.to(target.device)
    target[index.sample, index.step] = means.to(target.dtype)
