"""Method presets and the one scaling rule every method's settings go through.

Each method's trust-region knob starts from the default of its algorithm's hyperparameter
dataclass (``src/flowdppo/algorithms/``: the paper's recommended value, in the per-element
(mean) convention for SD3.5-M at 512px, D = 16 x 64 x 64 = 65,536 latent elements); no
default is written here. The benchmark's latents are far smaller, and a per-element
quantity of the same *true* (summed) size is larger by ``D_paper / D_bench``:

    knob_bench = knob_paper * D_paper / D_bench       (clip ranges and KL thresholds)

so the true per-step trust region (sum-convention log-ratio clip or KL threshold) is the
paper's. TV thresholds are probabilities (no per-element convention) and DiffusionNFT's
``beta`` is not a trust region: neither is rescaled. Two presets derive their paper value
from the default by a stated rule (``from_default``): DPPO under CPS (the paper's CPS
threshold is 10x its Flow-SDE one) and DPPO-TV (the TV matched to the KL threshold). A
sweep or the tuned protocol then multiplies the knob by factors; all other settings
(learning rate, batch, steps, evaluation) are shared.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..algorithms.cps import CPSHparams
from ..algorithms.dppo import DPPOHparams
from ..algorithms.grpo import GRPOHparams
from ..algorithms.guard import GuardHparams
from ..algorithms.nft import NFTHparams

D_PAPER = 16 * 64 * 64
SWEEP_FACTORS = (0.25, 1.0, 4.0)


def _same(default: float) -> float:
    return default


def _cps_threshold(default: float) -> float:
    """The paper's DPPO threshold under the CPS sampler is 10x its Flow-SDE one (SPEC.md)."""
    return 10.0 * default


def _tv_matched_to_kl(kl_threshold: float) -> float:
    """TV ~ sqrt(KL_sum / pi) for small Gaussian steps, with KL_sum = delta * D_PAPER (the
    sum convention is D-independent), so the TV mask binds where the KL mask does."""
    return math.sqrt(kl_threshold * D_PAPER / math.pi)


@dataclass(frozen=True)
class MethodPreset:
    """A compared method: algorithm, sampler and its trust-region knob.

    Attributes:
        algorithm: the algorithm's registry name.
        hparams_type: its hyperparameter dataclass; the knob's default is read from it.
        dynamics: the sampler (None: the algorithm's own).
        knob: the hyperparameter the sweep and the tuned grid scale.
        per_element: whether the knob scales by ``D_PAPER / D_bench``.
        from_default: the preset's paper value as a function of the dataclass default.
        hparams: other hyperparameter overrides of the preset.
        knob_max: exclusive upper bound of a valid knob (TV: a probability), or None.
    """

    algorithm: str
    hparams_type: type
    dynamics: str | None
    knob: str
    per_element: bool
    from_default: Callable[[float], float] = _same
    hparams: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    knob_max: float | None = None

    def __post_init__(self) -> None:
        names = {f.name for f in dataclasses.fields(self.hparams_type)}
        if self.knob not in names:
            raise ValueError(f"preset knob {self.knob!r} is not a field of "
                             f"{self.hparams_type.__name__} (fields: {sorted(names)})")

    @property
    def default(self) -> float:
        """The knob's default in the algorithm's hyperparameter dataclass."""
        return float(getattr(self.hparams_type(), self.knob))

    @property
    def paper_value(self) -> float:
        """Per-element value for SD3.5-M (or a probability / plain number)."""
        return self.from_default(self.default)

    def knob_value(self, latent_elements: int, factor: float = 1.0) -> float:
        scale = D_PAPER / latent_elements if self.per_element else 1.0
        return self.paper_value * scale * factor

    def valid_factor(self, latent_elements: int, factor: float) -> bool:
        return self.knob_max is None or self.knob_value(latent_elements, factor) < self.knob_max

    def overrides(self, latent_elements: int, factor: float = 1.0) -> dict[str, Any]:
        """Nested config overrides for this method at sweep ``factor``."""
        hparams = {**self.hparams, self.knob: self.knob_value(latent_elements, factor)}
        sampling = {"dynamics": self.dynamics} if self.dynamics else {}
        return {"algorithm": {"name": self.algorithm, "hparams": hparams}, "sampling": sampling}


METHODS: dict[str, MethodPreset] = {
    "dppo": MethodPreset("dppo", DPPOHparams, "flow_sde", "threshold", True,
                         description="Flow-DPPO, exact-KL mask, Flow-SDE"),
    "dppo_cps": MethodPreset("dppo", DPPOHparams, "cps", "threshold", True, _cps_threshold,
                             description="Flow-DPPO, exact-KL mask, CPS sampler"),
    "dppo_tv": MethodPreset("dppo", DPPOHparams, "flow_sde", "threshold", False, _tv_matched_to_kl,
                            {"divergence": "tv"}, "Flow-DPPO, exact-TV mask, Flow-SDE", knob_max=1.0),
    "dppo_pred": MethodPreset("dppo", DPPOHparams, "flow_sde", "threshold", True,
                              hparams={"mask": "predictive"},
                              description="Flow-DPPO, first-order predictive mask (App. E, experimental)"),
    "grpo": MethodPreset("grpo", GRPOHparams, "flow_sde", "clip_range", True,
                         description="Flow-GRPO, ratio clip, Flow-SDE"),
    "cps": MethodPreset("cps", CPSHparams, "cps", "clip_range", True,
                        description="Flow-CPS, ratio clip, CPS sampler"),
    "guard": MethodPreset("guard", GuardHparams, "flow_sde", "clip_range", True,
                          description="GRPO-Guard, normalised ratio clip, 1/dt weights"),
    "nft": MethodPreset("nft", NFTHparams, None, "beta", False,
                        description="DiffusionNFT, forward-process, ODE rollouts"),
}

DEFAULT_METHODS = ("dppo", "dppo_cps", "grpo", "cps", "guard", "nft", "dppo_tv", "dppo_pred")
TUNED_METHODS = ("dppo", "grpo", "guard", "nft")


def get_method(name: str) -> MethodPreset:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: expected one of {sorted(METHODS)}")
    return METHODS[name]
