"""Log-probability and exact divergences of isotropic Gaussians with a shared std.

Every per-step policy of a flow sampler is ``N(mu, s^2 I)`` with the same ``s`` for the
old, new and reference parameters (SPEC §1, §3), so KL and TV are closed forms.

Symbols: ``x`` sample (B, *latent), ``mu`` mean (B, *latent), ``s`` std broadcastable to
``x`` (typically (B, 1, ..., 1)), ``D`` number of elements of one latent.

Reduction over the D elements (SPEC §3): ``"sum"`` is the true log-density / KL;
``"mean"`` divides it by D (the per-element convention of all public code).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _check_reduce(reduce: str) -> None:
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce={reduce!r}: expected one of {REDUCTIONS}")


def _check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; "
            "they must match exactly (batch first)"
        )
    if a.ndim < 1:
        raise ValueError(f"{name_a} must have a batch dimension, got a 0-d tensor")


def _check_std(std: Tensor | float, like: Tensor, *, allow_zero: bool = False) -> Tensor:
    std = torch.as_tensor(std, dtype=like.dtype, device=like.device)
    try:
        torch.broadcast_shapes(std.shape, like.shape)
    except RuntimeError as err:
        raise ValueError(
            f"std of shape {tuple(std.shape)} does not broadcast against {tuple(like.shape)}; "
            "give it shape (B, 1, ..., 1) or a scalar"
        ) from err
    if std.ndim > like.ndim:
        raise ValueError(f"std has more dimensions ({std.ndim}) than the sample ({like.ndim})")
    ok = std >= 0 if allow_zero else std > 0
    message = ("std must be > 0 for a log-probability or divergence; a deterministic (ODE or "
               "final CPS) step has no density and is never a training step")
    check_all(ok, message)
    return std


def check_all(ok: Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless every element of ``ok`` is true.

    On CUDA the check is queued on the device (``torch._assert_async``) instead of
    read back: a read-back would stall the host on every loss call. A failure there surfaces
    as a device-side assertion at the next synchronisation.
    """
    if ok.device.type == "cuda":
        torch._assert_async(ok.all(), message)
    elif not bool(ok.all()):  # CPU (free) and devices without an asynchronous assert
        raise ValueError(message)


def _reduce(per_element: Tensor, reduce: str) -> Tensor:
    dims = tuple(range(1, per_element.ndim))
    if not dims:
        return per_element
    return per_element.mean(dim=dims) if reduce == "mean" else per_element.sum(dim=dims)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor | float, reduce: str = "mean") -> Tensor:
    """Log-density of ``x`` under ``N(mean, std^2 I)``, per sample.

    ``log p = -||x - mu||^2 / (2 s^2) - D log s - (D/2) log(2 pi)`` for ``reduce="sum"``;
    divided by D for ``reduce="mean"``.

    Args:
        x (`Tensor` of shape `(B, *latent)`): the sample.
        mean (`Tensor` of shape `(B, *latent)`): the mean.
        std (`Tensor` broadcastable to `x`, or float): the std, > 0.
        reduce (`str`, defaults to `"mean"`): `"mean"` or `"sum"` over the non-batch dims.

    Returns:
        `Tensor` of shape `(B,)` in the dtype of `x`.
    """
    _check_reduce(reduce)
    _check_pair("x", x, "mean", mean)
    std = _check_std(std, x)
    per_element = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return _reduce(per_element, reduce)


def gaussian_kl(
    mean_p: Tensor, mean_q: Tensor, std: Tensor | float, reduce: str = "mean"
) -> Tensor:
    """Exact ``KL(N(mean_p, s^2 I) || N(mean_q, s^2 I)) = ||mean_p - mean_q||^2 / (2 s^2)``.

    Symmetric in ``p`` and ``q`` because the covariances are equal.

    Args:
        mean_p, mean_q (`Tensor` of shape `(B, *latent)`): the two means.
        std (`Tensor` broadcastable to the means, or float): the shared std, > 0.
        reduce (`str`, defaults to `"mean"`): `"sum"` is the true KL, `"mean"` is KL / D.

    Returns:
        `Tensor` of shape `(B,)`, >= 0.
    """
    _check_reduce(reduce)
    _check_pair("mean_p", mean_p, "mean_q", mean_q)
    std = _check_std(std, mean_p)
    return _reduce((mean_p - mean_q) ** 2 / (2 * std**2), reduce)


def gaussian_tv(mean_p: Tensor, mean_q: Tensor, std: Tensor | float) -> Tensor:
    """Exact total variation ``2 Phi(||mean_p - mean_q|| / (2 s)) - 1`` (paper Remark 3).

    Written as ``erf(||d|| / (2 sqrt(2) s))``, which keeps full precision for tiny ``d``.
    TV is a probability in [0, 1] and has no per-element convention.

    Args:
        mean_p, mean_q (`Tensor` of shape `(B, *latent)`): the two means.
        std (`Tensor` broadcastable to the means, or float): the shared std, > 0.

    Returns:
        `Tensor` of shape `(B,)` in [0, 1].
    """
    _check_pair("mean_p", mean_p, "mean_q", mean_q)
    std = _check_std(std, mean_p)
    # ||d|| / s per sample: the std is per sample, so fold it in before the norm.
    scaled = ((mean_p - mean_q) / std).flatten(1)
    return torch.erf(scaled.norm(dim=1) / (2 * math.sqrt(2.0)))
