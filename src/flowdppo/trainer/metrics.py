"""Reducing loss metrics over micro-batches, processes and optimizer steps.

A metric's key says how it combines (the losses and diagnostics name theirs so):

- ``*_min`` / ``*_max``: extremes;
- ``*_sum``: additive totals (e.g. the moments behind a correlation), summed everywhere;
- anything else: a mean over (sample, step) entries, weighted by each part's entries, so
  micro-batches and processes of unequal size (dropped images) give the batch's mean.

Each optimizer step's metrics are combined over all processes first; the iteration reports
the mean over its steps (totals are summed over steps). Moments then become correlations
(:func:`flowdppo.algorithms.diagnostics.finish_correlations`), null when undefined.
Everything stays on the device until one gather and one read-back per iteration.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..algorithms.diagnostics import finish_correlations

# A step's local metrics: key -> (value, weight), both 0-d float64. The value of a mean
# key is the weighted sum (divided by the summed weight after the gather).
StepMetrics = dict[str, tuple[Tensor, Tensor]]


def kind(key: str) -> str:
    for suffix in ("_min", "_max", "_sum"):
        if key.endswith(suffix):
            return suffix[1:]
    return "mean"


def combine_parts(parts: list[tuple[float, dict[str, Tensor]]]) -> StepMetrics:
    """One process's metrics of one step from its micro-batches ``(entries, metrics)``.

    A part with 0 entries (a padding micro-batch) only names the keys. NaN values of mean
    keys (e.g. an undefined quantity) count as missing, not as 0.
    """
    out: StepMetrics = {}
    for key in parts[0][1]:
        how = kind(key)
        values = torch.stack([m[key].detach().double().reshape(()) for _, m in parts])
        weights = [float(n) for n, _ in parts]
        real = [w > 0 for w in weights]
        if how in ("min", "max"):
            fill = math.inf if how == "min" else -math.inf
            masked = torch.stack([v if r else v.new_tensor(fill) for v, r in zip(values, real)])
            value = masked.min() if how == "min" else masked.max()
            out[key] = (value, value.new_zeros(()))
        elif how == "sum":
            value = sum((v for v, r in zip(values, real) if r), values.new_zeros(()))
            out[key] = (value, value.new_zeros(()))
        else:
            # Python-float weights: a weight tensor built on the host would be a copy that
            # stalls the host once per key and optimizer step.
            finite = torch.isfinite(values).double()
            value = sum(w * v for w, v in zip(weights, torch.nan_to_num(values) * finite))
            weight = sum(w * f for w, f in zip(weights, finite))
            out[key] = (torch.as_tensor(value, dtype=torch.float64),
                        torch.as_tensor(weight, dtype=torch.float64))
    return out


def weighted_mean(parts: list[tuple[float, dict[str, Tensor]]]) -> dict[str, Tensor]:
    """The combined value of each key over ``parts`` (one process, one step)."""
    return {k: _value(kind(k), v, w) for k, (v, w) in combine_parts(parts).items()}


def _value(how: str, value: Tensor, weight: Tensor) -> Tensor:
    if how != "mean":
        return value
    return torch.where(weight > 0, value / weight.clamp_min(1e-300),
                       torch.full_like(value, math.nan))


def reduce_steps(per_step: list[StepMetrics], gather=None) -> dict[str, float | None]:
    """The iteration's metrics from every optimizer step's local metrics.

    ``gather(tensor)`` concatenates a ``(1, ...)`` tensor over processes along dim 0 (the
    accelerator's gather); ``None`` on one process.
    """
    keys = sorted(per_step[0])
    device = per_step[0][keys[0]][0].device
    local = torch.stack([torch.stack([torch.stack(m[k]) for k in keys]) for m in per_step])
    table = (gather(local[None].to(device)) if gather is not None else local[None]).cpu()
    # table: (world, steps, keys, 2) = value, weight
    out: dict[str, float | None] = {}
    for j, key in enumerate(keys):
        how, values, weights = kind(key), table[:, :, j, 0], table[:, :, j, 1]
        if how == "min":
            per = values.min(0).values
        elif how == "max":
            per = values.max(0).values
        elif how == "sum":
            out[key] = float(values.sum())
            continue
        else:
            per = _value("mean", values.sum(0), weights.sum(0))
        finite = per[torch.isfinite(per)] if how == "mean" else per
        out[key] = float(finite.mean()) if len(finite) else None
    return finish_correlations(out)
