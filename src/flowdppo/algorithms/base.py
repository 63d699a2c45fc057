"""Inputs, outputs and the registry shared by every algorithm.

An algorithm is a pure loss over tensors: ``loss(batch, **hparams) -> (loss, metrics)``.
The trainer builds the batch, looks the algorithm up by name and never branches on the
name otherwise. Two kinds exist:

- ``"likelihood"``: replays stored stochastic sampler steps (Flow-GRPO, Flow-CPS,
  GRPO-Guard, Flow-DPPO); input :class:`PolicyStepBatch`.
- ``"forward"``: trains on the forward (noising) process of clean samples
  (DiffusionNFT); input :class:`VelocityBatch`.

Each entry of a batch is one (sample, step) pair; ``N`` = samples x trained steps.
Metrics are detached 0-d tensors (no ``.item()`` here: the trainer syncs once per step).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from ..registry import Registry

LossOutput = tuple[Tensor, dict[str, Tensor]]
AlgorithmKind = Literal["likelihood", "forward"]


@dataclass(frozen=True)
class PolicyStepBatch:
    """Stored stochastic steps with the current policy's means, flattened over (sample, step).

    Attributes:
        x_next (`Tensor` of shape `(N, *latent)`): the sample the old policy drew.
        mean (`Tensor` of shape `(N, *latent)`): the current policy's mean; carries the graph.
        mean_old (`Tensor` of shape `(N, *latent)`): the old (rollout) policy's mean, frozen fp32.
        std (`Tensor` of shape `(N, 1, ..., 1)`): the active sampler's std ``s_t``, > 0.
        advantages (`Tensor` of shape `(N,)`): the sample's advantage, repeated per step.
        dt (`Tensor` of shape `(N,)`): ``t - t_next`` of the step.
        t (`Tensor` of shape `(N,)`): the step's start time.
        mean_ref (`Tensor` of shape `(N, *latent)` or `None`): the reference policy's mean
            (adapter disabled), no graph; needed only when ``beta > 0``.
    """

    x_next: Tensor
    mean: Tensor
    mean_old: Tensor
    std: Tensor
    advantages: Tensor
    dt: Tensor
    t: Tensor
    mean_ref: Tensor | None = None


@dataclass(frozen=True)
class VelocityBatch:
    """Noised clean samples for forward-process methods, flattened over (sample, draw).

    Attributes:
        v (`Tensor` of shape `(N, *latent)`): the current policy's velocity; carries the graph.
        v_old (`Tensor` of shape `(N, *latent)`): the sampling ("old") policy's velocity.
        v_target (`Tensor` of shape `(N, *latent)`): ``eps - x0``.
        x_t (`Tensor` of shape `(N, *latent)`): ``(1 - t) x0 + t eps``.
        t (`Tensor` of shape `(N,)`): the training time.
        advantages (`Tensor` of shape `(N,)`): the sample's advantage.
        v_ref (`Tensor` of shape `(N, *latent)` or `None`): the reference policy's velocity.
    """

    v: Tensor
    v_old: Tensor
    v_target: Tensor
    x_t: Tensor
    t: Tensor
    advantages: Tensor
    v_ref: Tensor | None = None


@dataclass(frozen=True)
class AlgorithmSpec:
    """A registered method.

    Attributes:
        name: registry key (``"dppo"``, ``"grpo"``, ...).
        kind: ``"likelihood"`` or ``"forward"`` (which batch the loss takes).
        hparams: dataclass of the method's hyperparameters with the paper's defaults;
            its fields are exactly the keyword arguments of ``loss``.
        loss: ``loss(batch, **hparams) -> (loss, metrics)``.
        default_dynamics: the sampler the method's paper uses (``"flow_sde"``, ``"cps"``,
            ``"ode"``).
    """

    name: str
    kind: AlgorithmKind
    hparams: type
    loss: Callable[..., LossOutput]
    default_dynamics: str

    def make_hparams(self, **overrides: Any) -> Any:
        """The hyperparameter dataclass with overrides; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(self.hparams)}
        for key in overrides:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else ""
                raise ValueError(
                    f"algorithm {self.name!r}: unknown hyperparameter {key!r}{extra} "
                    f"(valid: {sorted(known)})"
                )
        return self.hparams(**overrides)

    def reference_weight(self, hparams: Any) -> float:
        """``beta``, the weight of KL(theta || ref) (0 for methods without that term)."""
        return float(getattr(hparams, "beta", 0.0)) if self.kind == "likelihood" else 0.0

    def kl_reduction(self, hparams: Any) -> str:
        """The unit of the method's log-ratios and KL: ``"mean"`` or ``"sum"`` over elements."""
        return getattr(hparams, "reduce", "mean")

    def __call__(self, batch: Any, hparams: Any) -> LossOutput:
        return self.loss(batch, **dataclasses.asdict(hparams))


def _spec_of(value: Any) -> AlgorithmSpec:
    """The spec a dotted path ``package.module:attr`` names: a spec, or a loss registered
    with `register_algorithm` (importing the module registered it)."""
    if isinstance(value, AlgorithmSpec):
        return value
    for spec in ALGORITHMS.values():
        if spec.loss is value:
            return spec
    raise ValueError(f"{value!r} is neither an AlgorithmSpec nor a loss decorated with "
                     "@register_algorithm")


ALGORITHMS: Registry[AlgorithmSpec] = Registry("algorithm", from_dotted=_spec_of)


def register_algorithm(
    name: str, *, kind: AlgorithmKind, hparams: type, default_dynamics: str
) -> Callable[[Callable[..., LossOutput]], Callable[..., LossOutput]]:
    """Decorator registering ``loss`` under ``name``."""

    def wrap(loss: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
        ALGORITHMS.add(name, AlgorithmSpec(name, kind, hparams, loss, default_dynamics))
        return loss

    return wrap


def get_algorithm(name: str) -> AlgorithmSpec:
    """The registered algorithm (or ``package.module:attr``); an unknown name raises with
    the sorted valid names."""
    return ALGORITHMS.lookup(name)
