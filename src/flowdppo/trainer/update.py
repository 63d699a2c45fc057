"""One optimizer step's gradients: replay stored entries through the model, call the loss.

The algorithm's loss is a pure function; this module only builds its batch:
likelihood methods replay stored sampler steps (:class:`PolicyStepBatch`), forward-process
methods noise clean samples (:class:`VelocityBatch`). Gradients accumulate over
micro-batches; the caller syncs and steps the optimizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..algorithms import AlgorithmSpec, PolicyStepBatch, VelocityBatch
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


def entries_for(samples: Tensor, num_steps: int) -> Entries:
    """All recorded steps of ``samples`` (sample-major)."""
    sample = samples.repeat_interleave(num_steps)
    step = torch.arange(num_steps).repeat(samples.shape[0])
    return Entries(sample, step)


def combine_metrics(parts: list[tuple[int, dict[str, Tensor]]]) -> dict[str, Tensor]:
    """Weighted mean of micro-batch metrics (NaN entries skipped; all NaN gives NaN);
    ``*_min``/``*_max`` combine as min/max."""
    total = sum(n for n, _ in parts)
    out: dict[str, Tensor] = {}
    for key in parts[0][1]:
        values = torch.stack([m[key].float() for _, m in parts])
        if key.endswith("_min"):
            out[key] = values.min()
        elif key.endswith("_max"):
            out[key] = values.max()
        else:  # NaN (e.g. a correlation over entries that have not moved) counts as missing
            # Python-float weights: a weight tensor built on the host would be a copy that
            # stalls the host once per key and optimizer step.
            finite = torch.isfinite(values).float()
            shares = [n / total for n, _ in parts]
            weighted = sum(w * v for w, v in zip(shares, torch.nan_to_num(values) * finite))
            out[key] = weighted / sum(w * f for w, f in zip(shares, finite))
    return out


def likelihood_batch(
    model: FlowModel, dynamics: Dynamics, rollout: Rollout, advantages: Tensor,
    cond: Conditioning, entries: Entries, guidance_scale: float,
) -> PolicyStepBatch:
    """Replay ``entries``: the current policy's mean at the stored states."""
    entries = entries.to(rollout.x_t.device)
    s, k = entries.sample, entries.step
    x_t, t, t_next = rollout.x_t[s, k], rollout.t[s, k], rollout.t_next[s, k]
    v = model.predict_velocity(x_t.to(model.device), t, cond.index(s), guidance_scale)
    mean, _ = dynamics.mean_std(x_t, v.float(), t, t_next)
    std = rollout.std[s, k].view(-1, *([1] * (x_t.ndim - 1)))
    mean_ref = None if rollout.mean_ref is None else rollout.mean_ref[s, k]
    return PolicyStepBatch(
        x_next=rollout.x_next[s, k], mean=mean, mean_old=rollout.mean_old[s, k], std=std,
        advantages=advantages[s], dt=t - t_next, t=t, mean_ref=mean_ref,
    )


def forward_batch(
    model: FlowModel, rollout: Rollout, advantages: Tensor, cond: Conditioning, entries: Entries,
    times: Tensor, noise: Tensor, old_policy: Callable[[], Any], guidance_scale: float,
) -> VelocityBatch:
    """Noise the clean samples at ``times[step]`` and predict with the old and current policy.

    ``noise`` (B, k, *latent) is fixed per rollout so every pass sees the same x_t.
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


def accumulate_gradients(
    spec: AlgorithmSpec, hparams: Any, make_batch: Callable[[Entries], Any], entries: Entries,
    micro_batch_size: int, no_sync: Callable[[], contextlib.AbstractContextManager],
    backward: Callable[[Tensor], None],
    diagnose: Callable[[Any], dict[str, Tensor]] | None = None,
) -> dict[str, Tensor]:
    """Sum the gradients of the mean loss over ``entries`` in micro-batches.

    Every micro-batch's loss is a mean over its entries; scaling by its share of the
    entries makes the accumulated gradient that of the mean over all of them.
    ``diagnose(batch)`` adds metrics computed on the same batch (no gradient).
    """
    parts: list[tuple[int, dict[str, Tensor]]] = []
    chunks = entries.split(micro_batch_size)
    for i, chunk in enumerate(chunks):
        sync = contextlib.nullcontext() if i == len(chunks) - 1 else no_sync()
        with sync:
            batch = make_batch(chunk)
            loss, metrics = spec(batch, hparams)
            if diagnose is not None:
                metrics = {**metrics, **diagnose(batch)}
            backward(loss * (len(chunk) / len(entries)))
        parts.append((len(chunk), {"loss": loss.detach(), **metrics}))
    return combine_metrics(parts)
