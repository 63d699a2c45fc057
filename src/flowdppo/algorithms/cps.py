"""Flow-CPS: Flow-GRPO's clipped loss on coefficients-preserving-sampling steps (SPEC §4).

Its published code uses ``log p = -reduce((x' - mu)^2)`` (no ``1/(2 s^2)``, no constants),
``log_prob_norm="simple"`` here (the default, following that paper); ``"full"`` is the
Gaussian log-density of SPEC §3. The two log-ratios differ by the factor ``2 s^2``
(``log r_simple = 2 s^2 log r_full``), so one clip range means a different trust region.
Metrics' ``kl_old_new_*`` are always the exact Gaussian KL in the ``reduce`` unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import LossOutput, PolicyStepBatch, register_algorithm
from .grpo import clip_loss

LOG_PROB_NORMS = ("simple", "full")


@dataclass(frozen=True)
class CPSHparams:
    clip_range: float = 1e-4  # PPO clip on r, in the chosen log-prob's unit
    log_prob_norm: Literal["simple", "full"] = "simple"  # published -mean((x'-mu)^2) or Gaussian
    reduce: Literal["mean", "sum"] = "mean"  # log-prob / KL over latent elements
    beta: float = 0.0  # weight of KL(theta || ref); > 0 needs mean_ref


@register_algorithm("cps", kind="likelihood", hparams=CPSHparams, default_dynamics="cps")
def cps_loss(
    batch: PolicyStepBatch, *, clip_range: float, log_prob_norm: str, reduce: str, beta: float
) -> LossOutput:
    """Flow-CPS's loss: :func:`flowdppo.algorithms.grpo.clip_loss` with its log-prob."""
    if log_prob_norm not in LOG_PROB_NORMS:
        raise ValueError(f"log_prob_norm={log_prob_norm!r}: expected one of {LOG_PROB_NORMS}")
    return clip_loss(batch, clip_range=clip_range, reduce=reduce, beta=beta,
                     normalised=log_prob_norm == "full")
