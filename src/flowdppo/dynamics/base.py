"""The dynamics interface and its registry.

A dynamics is a stateless sampler step from ``t`` to ``t_next < t`` (SPEC §2): every call
gets both times, there is no hidden step index. Times are floats or tensors of shape
``(B,)`` (one time per sample); they are broadcast against ``x`` of shape ``(B, *latent)``.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

TimeLike = float | Tensor


def as_time(t: TimeLike, x: Tensor, name: str = "t") -> Tensor:
    """Times as a tensor of shape ``(B, 1, ..., 1)`` in ``x``'s dtype and device."""
    batch = x.shape[0]
    if not isinstance(t, Tensor):
        t = float(t)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"{name}={t}: times must lie in [0, 1] (1 = noise, 0 = data)")
        return torch.full((batch,) + (1,) * (x.ndim - 1), t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}; expected a float or a tensor of shape ({batch},) "
            "(one time per sample)"
        )
    return t.to(dtype=x.dtype, device=x.device).view((batch,) + (1,) * (x.ndim - 1))


def _check_inputs(x: Tensor, v: Tensor, t: TimeLike, t_next: TimeLike) -> None:
    if x.shape != v.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but v has shape {tuple(v.shape)}")
    if x.ndim < 2:
        raise ValueError(f"x must be (B, *latent), got shape {tuple(x.shape)}")
    # Only float times are checked for order: a tensor check would sync the device.
    if not isinstance(t, Tensor) and not isinstance(t_next, Tensor) and not t_next < t:
        raise ValueError(f"t_next={t_next} must be smaller than t={t} (t runs from 1 to 0)")


class Dynamics(ABC):
    """One step of a flow sampler as a Gaussian ``N(mean, std^2 I)`` (std 0: deterministic)."""

    name: str = ""
    stochastic: bool = True

    @abstractmethod
    def _mean_std(self, x: Tensor, v: Tensor, t: Tensor, t_next: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std with ``t``, ``t_next`` already of shape ``(B, 1, ..., 1)``."""

    @abstractmethod
    def _mean_grad_v(self, t: Tensor, t_next: Tensor) -> Tensor:
        """``d mean / d v`` (a scalar per sample) with shaped times."""

    def mean_std(self, x: Tensor, v: Tensor, t: TimeLike, t_next: TimeLike) -> tuple[Tensor, Tensor]:
        """Mean and std of ``x_next`` given ``x`` at time ``t`` and velocity ``v``.

        Args:
            x (`Tensor` of shape `(B, *latent)`): the current sample at time `t`.
            v (`Tensor` of shape `(B, *latent)`): the predicted velocity ``eps - x0``.
            t, t_next (`float` or `Tensor` of shape `(B,)`): the step's start and end times.

        Returns:
            ``mean`` of shape `(B, *latent)` and ``std`` of shape `(B, 1, ..., 1)`.
        """
        _check_inputs(x, v, t, t_next)
        return self._mean_std(x, v, as_time(t, x, "t"), as_time(t_next, x, "t_next"))

    def mean_grad_v(self, t: TimeLike, t_next: TimeLike, like: Tensor) -> Tensor:
        """The scalar ``d mean / d v`` per sample, shape `(B, 1, ..., 1)` like ``like``."""
        return self._mean_grad_v(as_time(t, like, "t"), as_time(t_next, like, "t_next"))

    def step(
        self,
        x: Tensor,
        v: Tensor,
        t: TimeLike,
        t_next: TimeLike,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Sample ``x_next = mean + std * eps``, ``eps ~ N(0, I)``.

        Returns:
            ``(x_next, mean, std)``; ``x_next`` equals ``mean`` where ``std`` is 0.
        """
        mean, std = self.mean_std(x, v, t, t_next)
        if not self.stochastic:
            return mean, mean, std
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return mean + std * noise, mean, std


DYNAMICS: dict[str, Callable[..., Dynamics]] = {}


def register_dynamics(name: str) -> Callable[[type[Dynamics]], type[Dynamics]]:
    def wrap(cls: type[Dynamics]) -> type[Dynamics]:
        if name in DYNAMICS:
            raise ValueError(f"dynamics {name!r} registered twice")
        cls.name = name
        DYNAMICS[name] = cls
        return cls

    return wrap


def get_dynamics(name: str, **params: float) -> Dynamics:
    """Build a dynamics by name: ``"flow_sde"`` (noise_level), ``"cps"`` (eta), ``"ode"``."""
    if name not in DYNAMICS:
        hint = difflib.get_close_matches(name, DYNAMICS, n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"unknown dynamics {name!r}: expected one of {sorted(DYNAMICS)}{extra}")
    try:
        return DYNAMICS[name](**params)
    except TypeError as err:
        raise ValueError(f"dynamics {name!r}: bad parameters {sorted(params)} ({err})") from err
