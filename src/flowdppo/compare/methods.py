"""Method presets and the one scaling rule every method's settings go through.

Each method starts from its own paper's recommended trust-region setting, given in the
per-element (mean) convention for SD3.5-M at 512px (D = 16 x 64 x 64 = 65,536 latent
elements). The benchmark's latents are far smaller, and a per-element quantity of the
same *true* (summed) size is larger by ``D_paper / D_bench``:

    knob_bench = knob_paper * D_paper / D_bench       (clip ranges and KL thresholds)

so the true per-step trust region (sum-convention log-ratio clip or KL threshold) is the
paper's. TV thresholds are probabilities (no per-element convention) and DiffusionNFT's
``beta`` is not a trust region: neither is rescaled. A sweep then multiplies every
method's knob by the same factors (``SWEEP_FACTORS``) and keeps the best by validation
reward; all other settings (learning rate, batch, steps, evaluation) are shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

D_PAPER = 16 * 64 * 64
SWEEP_FACTORS = (0.25, 1.0, 4.0)


@dataclass(frozen=True)
class MethodPreset:
    """A compared method: algorithm, sampler and its trust-region knob."""

    algorithm: str
    dynamics: str | None  # None: the algorithm's own
    knob: str  # the hyperparameter the sweep scales
    paper_value: float  # per-element value for SD3.5-M (or a probability / plain number)
    per_element: bool  # scale by D_PAPER / D_bench
    hparams: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def knob_value(self, latent_elements: int, factor: float = 1.0) -> float:
        scale = D_PAPER / latent_elements if self.per_element else 1.0
        return self.paper_value * scale * factor

    def overrides(self, latent_elements: int, factor: float = 1.0) -> dict[str, Any]:
        """Nested config overrides for this method at sweep ``factor``."""
        hparams = {**self.hparams, self.knob: self.knob_value(latent_elements, factor)}
        sampling = {"dynamics": self.dynamics} if self.dynamics else {}
        return {"algorithm": {"name": self.algorithm, "hparams": hparams}, "sampling": sampling}


# DPPO with TV: the TV matched to DPPO's KL threshold, TV ~ sqrt(KL_sum / pi) for small
# steps, with KL_sum = 1e-7 * D_PAPER (D-independent in the sum convention).
_TV_FROM_KL = math.sqrt(1e-7 * D_PAPER / math.pi)

METHODS: dict[str, MethodPreset] = {
    "dppo": MethodPreset("dppo", "flow_sde", "threshold", 1e-7, True,
                         description="Flow-DPPO, exact-KL mask, Flow-SDE"),
    "dppo_cps": MethodPreset("dppo", "cps", "threshold", 1e-6, True,
                             description="Flow-DPPO, exact-KL mask, CPS sampler"),
    "dppo_tv": MethodPreset("dppo", "flow_sde", "threshold", _TV_FROM_KL, False,
                            {"divergence": "tv"}, "Flow-DPPO, exact-TV mask, Flow-SDE"),
    "dppo_pred": MethodPreset("dppo", "flow_sde", "threshold", 1e-7, True,
                              {"mask": "predictive"},
                              "Flow-DPPO, first-order predictive mask (App. E, experimental)"),
    "grpo": MethodPreset("grpo", "flow_sde", "clip_range", 1e-4, True,
                         description="Flow-GRPO, ratio clip, Flow-SDE"),
    "cps": MethodPreset("cps", "cps", "clip_range", 1e-4, True,
                        description="Flow-CPS, ratio clip, CPS sampler"),
    "guard": MethodPreset("guard", "flow_sde", "clip_range", 4e-6, True,
                          description="GRPO-Guard, normalised ratio clip, 1/dt weights"),
    "nft": MethodPreset("nft", None, "beta", 1.0, False,
                        description="DiffusionNFT, forward-process, ODE rollouts"),
}

DEFAULT_METHODS = ("dppo", "dppo_cps", "grpo", "cps", "guard", "nft", "dppo_tv", "dppo_pred")


def get_method(name: str) -> MethodPreset:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: expected one of {sorted(METHODS)}")
    return METHODS[name]
