"""Pure-torch sampler dynamics and exact Gaussian divergences (no diffusers import)."""

from .base import DYNAMICS, Dynamics, as_time, get_dynamics, register_dynamics
from .gaussian import REDUCTIONS, gaussian_kl, gaussian_log_prob, gaussian_tv
from .samplers import CPS, ODE, FlowSDE

__all__ = [
    "CPS",
    "DYNAMICS",
    "ODE",
    "REDUCTIONS",
    "Dynamics",
    "FlowSDE",
    "as_time",
    "gaussian_kl",
    "gaussian_log_prob",
    "gaussian_tv",
    "get_dynamics",
    "register_dynamics",
]
