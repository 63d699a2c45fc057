"""Batches and independent reference formulas for the algorithm tests.

The references are the SPEC §3 formulas written directly (difference of two full Gaussian
log-densities, per-element KL), not the factored forms the library uses.
"""

from __future__ import annotations

import math

import torch

from flowdppo.algorithms import PolicyStepBatch, get_algorithm


def make_batch(
    n: int = 8, shape: tuple[int, ...] = (2, 3), *, scale: float = 1e-2, seed: int = 0,
    dtype: torch.dtype = torch.float64, advantages: torch.Tensor | None = None,
    with_ref: bool = False, same_mean: bool = False,
) -> tuple[PolicyStepBatch, torch.Tensor]:
    """A batch with ``x' = mu_old + s eps`` and ``mu = mu_old + d`` (a leaf with grad).

    Returns the batch and ``eps`` (N, *shape).
    """
    g = torch.Generator().manual_seed(seed)
    kw = {"generator": g, "dtype": torch.float64}
    mean_old = torch.randn(n, *shape, **kw)
    s = 0.2 + 0.5 * torch.rand(n, **kw)
    std = s.view(-1, *([1] * len(shape)))
    eps = torch.randn(n, *shape, **kw)
    d = torch.zeros_like(mean_old) if same_mean else scale * torch.randn(n, *shape, **kw)
    adv = torch.randn(n, **kw) if advantages is None else advantages.double()
    t = 0.15 + 0.8 * torch.rand(n, **kw)
    dt = t * (0.05 + 0.25 * torch.rand(n, **kw))
    mean_ref = mean_old + scale * torch.randn(n, *shape, **kw) if with_ref else None
    mean = (mean_old + d).to(dtype).requires_grad_(True)
    batch = PolicyStepBatch(
        x_next=(mean_old + std * eps).to(dtype), mean=mean, mean_old=mean_old.to(dtype),
        std=std.to(dtype), advantages=adv.to(dtype), dt=dt.to(dtype), t=t.to(dtype),
        mean_ref=None if mean_ref is None else mean_ref.to(dtype),
    )
    return batch, eps


def elementwise_reduce(x: torch.Tensor, reduce: str) -> torch.Tensor:
    flat = x.flatten(1)
    return flat.mean(1) if reduce == "mean" else flat.sum(1)


def ref_log_prob(x: torch.Tensor, mu: torch.Tensor, std: torch.Tensor, reduce: str) -> torch.Tensor:
    """Full Gaussian log-density, per element then reduced."""
    per = -((x - mu) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return elementwise_reduce(per, reduce)


def ref_log_ratio(batch: PolicyStepBatch, mean: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    return ref_log_prob(batch.x_next, mean, batch.std, reduce) - ref_log_prob(
        batch.x_next, batch.mean_old, batch.std, reduce)


def ref_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor, reduce: str) -> torch.Tensor:
    return elementwise_reduce((mean_p - mean_q) ** 2 / (2 * std**2), reduce)


def run(name: str, batch: PolicyStepBatch, **overrides):
    """Call the registered loss the way the trainer does: ``spec(batch, hparams)``."""
    spec = get_algorithm(name)
    return spec(batch, spec.make_hparams(**overrides))
