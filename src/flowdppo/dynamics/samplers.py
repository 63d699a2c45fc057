"""Flow-SDE, CPS and ODE steps (SPEC §2).

Symbols: ``t`` current time (1 = noise), ``t'`` = ``t_next``, ``dt = t - t'`` > 0,
``v`` predicted velocity, ``a`` Flow-SDE noise level, ``eta`` CPS noise angle,
``sigma_t`` Flow-SDE diffusion coefficient, ``s`` the step's std.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Dynamics, register_dynamics


@register_dynamics("flow_sde")
class FlowSDE(Dynamics):
    """Flow-GRPO's SDE: ``sigma_t = a sqrt(t / (1 - t))``, ``s = sigma_t sqrt(dt)``.

    1. ``mean = x (1 - sigma_t^2 dt / (2t)) - v (1 + sigma_t^2 (1 - t) / (2t)) dt``.
    2. At ``t = 1`` the denominator ``1 - t`` is 0; like all public code we use
       ``1 - t_next`` there, which keeps the step finite.
    3. ``noise_level = 0`` gives the Euler step ``x - v dt`` with std 0.
    """

    def __init__(self, noise_level: float = 0.7) -> None:
        if not noise_level >= 0:
            raise ValueError(f"noise_level={noise_level}: must be >= 0 (Flow-GRPO uses 0.7)")
        self.noise_level = float(noise_level)
        self.stochastic = noise_level > 0

    def sigma(self, t: Tensor, t_next: Tensor) -> Tensor:
        t_denominator = torch.where(t >= 1.0, t_next, t)
        return self.noise_level * torch.sqrt(t / (1.0 - t_denominator))

    def _mean_std(self, x: Tensor, v: Tensor, t: Tensor, t_next: Tensor) -> tuple[Tensor, Tensor]:
        dt = t - t_next
        sigma = self.sigma(t, t_next)
        mean = x * (1.0 - sigma**2 * dt / (2.0 * t)) + v * self._mean_grad_v(t, t_next)
        return mean, sigma * torch.sqrt(dt)

    def _mean_grad_v(self, t: Tensor, t_next: Tensor) -> Tensor:
        sigma = self.sigma(t, t_next)
        return -(1.0 + sigma**2 * (1.0 - t) / (2.0 * t)) * (t - t_next)


@register_dynamics("cps")
class CPS(Dynamics):
    """Coefficients-preserving sampling: the next sample keeps the rectified-flow marginal.

    1. ``x0_hat = x - t v``, ``x1_hat = x + (1 - t) v``.
    2. ``mean = (1 - t') x0_hat + t' cos(eta pi/2) x1_hat``, ``s = t' sin(eta pi/2)``.
    3. The last step (``t' = 0``) has ``s = 0``: it returns ``x0_hat`` deterministically and
       is never a training step (a log-prob there raises).
    4. ``eta = 0`` gives the Euler step.
    """

    def __init__(self, eta: float = 0.8) -> None:
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta={eta}: must lie in [0, 1] (CPS uses 0.8)")
        self.eta = float(eta)
        self.stochastic = eta > 0

    def _mean_std(self, x: Tensor, v: Tensor, t: Tensor, t_next: Tensor) -> tuple[Tensor, Tensor]:
        angle = self.eta * math.pi / 2
        x0_hat = x - t * v
        x1_hat = x + (1.0 - t) * v
        mean = (1.0 - t_next) * x0_hat + t_next * math.cos(angle) * x1_hat
        return mean, t_next * math.sin(angle)

    def _mean_grad_v(self, t: Tensor, t_next: Tensor) -> Tensor:
        angle = self.eta * math.pi / 2
        return -(1.0 - t_next) * t + t_next * (1.0 - t) * math.cos(angle)


@register_dynamics("ode")
class ODE(Dynamics):
    """Deterministic Euler step ``x' = x - v dt`` (std 0, no log-probability)."""

    stochastic = False

    def _mean_std(self, x: Tensor, v: Tensor, t: Tensor, t_next: Tensor) -> tuple[Tensor, Tensor]:
        return x - v * (t - t_next), torch.zeros_like(t)

    def _mean_grad_v(self, t: Tensor, t_next: Tensor) -> Tensor:
        return -(t - t_next)
