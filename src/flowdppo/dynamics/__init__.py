"""Pure-torch sampler dynamics and exact Gaussian divergences (no diffusers import)."""

from .base import DYNAMICS, Dynamics, as_time, get_dynamics, register_dynamics
from .gaussian import REDUCTIONS, check_all, gaussian_kl, gaussian_log_prob, gaussian_tv
from .samplers import CPS, ODE, FlowSDE

__all__ = [
    "CPS",
    "DYNAMICS",
    "ODE",
    "REDUCTIONS",
    "Dynamics",
    "FlowSDE",
    "as_time",
    "check_all",
    "gaussian_kl",
    "gaussian_log_prob",
    "gaussian_tv",
    "get_dynamics",
    "register_dynamics",
]
