"""Cross-field validation and derived values, run before any model or reward loads."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..algorithms import AlgorithmSpec, get_algorithm
from .loader import ConfigError, apply_overrides, from_dict, read_yaml
from .schema import RunConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SdeStepPlan:
    """Where the S trained steps of a K-step rollout may lie (``sampling.sde_steps``).

    ``count`` = S; indices are drawn from ``[first, stop)`` by ``mode`` each iteration.
    """

    mode: str  # "window" (consecutive) or "random" (distinct)
    count: int
    first: int
    stop: int


@dataclass(frozen=True)
class ResolvedRun:
    """A validated config plus the values derived from it (one place computes them)."""

    config: RunConfig
    algorithm: AlgorithmSpec
    hparams: Any  # the algorithm's hyperparameter dataclass
    dynamics: str  # the rollout sampler
    dynamics_params: dict[str, float]
    sde_steps: SdeStepPlan  # which of the K sampler steps are trained
    samples_per_iteration: int  # global: num_groups * group_size
    device_type: str  # "cpu" or "cuda" (what `device` resolves to here)
    compile: bool  # torch.compile the transformer (`model.compile`, None = on for CUDA)
    replay_old_means: bool  # `train.old_means` resolved (likelihood methods only)
    needs_reference_means: bool  # a likelihood method with beta > 0
    kl_reduce: str  # "mean" or "sum": the unit of log-ratios and KL in losses and metrics

    @property
    def num_trained_steps(self) -> int:
        """S: the trained (stochastic) steps per rollout."""
        return self.sde_steps.count


# Keys renamed since recipes were first written: old spelling -> new path.
_RENAMED = {("sampling", "sde_window"): ("sampling", "sde_steps", "count"),
            ("sampling", "sde_window_range"): ("sampling", "sde_steps", "range")}


def _translate_renamed(data: dict) -> None:
    for (section, old), new in _RENAMED.items():
        block = data.get(section)
        if isinstance(block, dict) and old in block:
            target = block.setdefault(new[1], {})
            if not isinstance(target, dict) or new[2] in target:
                raise ConfigError(f"`{section}.{old}` and `{'.'.join(new)}` both given; keep "
                                  f"only `{'.'.join(new)}`")
            target[new[2]] = block.pop(old)
            logger.warning("`%s.%s` is now `%s`; please rename it", section, old, ".".join(new))


def load_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (or the defaults) and apply ``key=value`` overrides, strictly."""
    data = read_yaml(path) if path else {}
    _translate_renamed(data)
    apply_overrides(data, [_renamed_override(o) for o in overrides or []])
    return from_dict(RunConfig, data)


def _renamed_override(override: str) -> str:
    key, sep, value = override.partition("=")
    new = _RENAMED.get(tuple(key.split(".")))
    if not sep or new is None:
        return override
    logger.warning("`%s` is now `%s`; please rename it", key, ".".join(new))
    return f"{'.'.join(new)}={value}"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_sampling(cfg: RunConfig, dynamics: str, forward: bool) -> SdeStepPlan:
    """Where the trained steps lie (count S, and the index range they are drawn from).

    Forward-process methods train at the same number of grid times, drawn the same way, so
    every method gets the same training forwards per image.
    """
    s = cfg.sampling
    _check(s.num_steps >= 2, f"`sampling.num_steps`={s.num_steps}: need at least 2 steps")
    _check(s.group_size >= 2, f"`sampling.group_size`={s.group_size}: group advantages need >= 2 "
           "images per prompt")
    _check(s.num_groups >= 1, f"`sampling.num_groups`={s.num_groups}: must be >= 1")
    _check(s.sample_batch_size >= 1, "`sampling.sample_batch_size` must be >= 1")
    _check(s.guidance_scale >= 1.0, f"`sampling.guidance_scale`={s.guidance_scale}: must be >= 1")
    sde = s.sde_steps
    ok = len(sde.range) == 2 and 0.0 <= sde.range[0] < sde.range[1] <= 1
    _check(ok, f"`sampling.sde_steps.range`={sde.range}: expected [lo, hi] with 0 <= lo < hi <= 1")
    # CPS's last step (t_next = 0) is deterministic and never trained.
    last_trainable = s.num_steps - 1 if dynamics == "cps" else s.num_steps
    if dynamics == "ode" and not forward:
        return SdeStepPlan(sde.mode, 0, 0, 0)
    if sde.count is None:
        return SdeStepPlan("window", last_trainable, 0, last_trainable)
    lo, hi = sde.range
    first, stop = round(lo * s.num_steps), min(round(hi * s.num_steps), last_trainable)
    span = stop - first
    _check(1 <= sde.count <= span,
           f"`sampling.sde_steps.count`={sde.count}: must be between 1 and the {span} steps that "
           f"`sampling.sde_steps.range`={sde.range} covers out of {s.num_steps}; widen the "
           "range or train fewer steps")
    return SdeStepPlan(sde.mode, sde.count, first, stop)


def _check_threshold(hparams: Any) -> None:
    threshold = getattr(hparams, "threshold", None)
    if threshold is None:
        return
    where = f"`algorithm.hparams.threshold`={threshold}"
    _check(threshold >= 0, f"{where}: must be >= 0")
    if getattr(hparams, "divergence", "kl") == "tv":
        _check(threshold < 1, f"{where}: with divergence tv the threshold is a probability in (0, 1)")
    elif getattr(hparams, "reduce", "mean") == "mean":
        # A per-element KL above 1 nat means means ~1.4 std apart in every element: that is a
        # sum-convention number given in the mean convention.
        _check(threshold <= 1.0, f"{where}: reduce=mean makes this a per-element KL; values above 1 "
               "are sum-convention thresholds. Set `algorithm.hparams.reduce: sum` or divide by D")


def _check_batch_geometry(cfg: RunConfig, world_size: int) -> int:
    total = cfg.sampling.num_groups * cfg.sampling.group_size
    _check(total % world_size == 0,
           f"`sampling.num_groups` x `sampling.group_size` = {total} images must divide evenly over "
           f"{world_size} processes")
    per_process = total // world_size
    _check(per_process % cfg.train.minibatches_per_pass == 0,
           f"{per_process} images per process do not split into `train.minibatches_per_pass`="
           f"{cfg.train.minibatches_per_pass} equal minibatches")
    _check(cfg.train.num_updates >= 1, "`train.num_updates` must be >= 1")
    _check(cfg.train.micro_batch_size >= 1, "`train.micro_batch_size` must be >= 1")
    return total


def _check_eval(cfg: RunConfig) -> None:
    e = cfg.eval
    _check(e.max_prompts >= 1, f"`eval.max_prompts`={e.max_prompts}: must be >= 1 (evaluation "
           "needs at least one held-out prompt)")
    _check(e.samples_per_prompt >= 1,
           f"`eval.samples_per_prompt`={e.samples_per_prompt}: must be >= 1")
    _check(e.every >= 0, f"`eval.every`={e.every}: must be >= 0 (0 = only at start and end)")


def _check_name(registry: Any, name: str, where: str) -> None:
    """``name`` is registered in ``registry`` or is a dotted path that imports."""
    try:
        registry.lookup(name)
    except ValueError as err:
        raise ConfigError(f"`{where}`={name!r}: {err}") from None


def _check_rewards(cfg: RunConfig) -> None:
    from ..registry import is_dotted_path
    from ..rewards import MONITORS, REWARDS

    _check(len(cfg.rewards.items) >= 1, "`rewards.items`: a run needs at least one reward")
    names = [item.name for item in cfg.rewards.items]
    _check(len(set(names)) == len(names), f"`rewards.items`: duplicate reward names {names}")
    for i, item in enumerate(cfg.rewards.items):
        _check_name(REWARDS, item.name, f"rewards.items[{i}].name")
        _check(math.isfinite(item.weight), f"`rewards.items[{i}].weight` must be finite")
    for i, item in enumerate(cfg.eval.monitors):
        known = is_dotted_path(item.name) or item.name in MONITORS or item.name in REWARDS
        _check(known, f"`eval.monitors[{i}].name`={item.name!r}: unknown monitor; expected one of "
               f"{sorted(set(MONITORS) | set(REWARDS))} or a dotted path package.module:factory")
        if is_dotted_path(item.name):
            _check_name(MONITORS, item.name, f"eval.monitors[{i}].name")


def _check_prompts(cfg: RunConfig) -> None:
    from ..prompts import PROMPT_SOURCES

    if cfg.prompts.source != "files":
        _check_name(PROMPT_SOURCES, cfg.prompts.source, "prompts.source")


def _check_lora(cfg: RunConfig) -> None:
    lora = cfg.lora
    if not lora.enabled:
        return
    _check(lora.rank >= 1, f"`lora.rank`={lora.rank}: must be >= 1")
    # alpha / rank scales the adapter's output: a NaN or inf turns every forward into NaN.
    _check(math.isfinite(lora.alpha) and lora.alpha > 0,
           f"`lora.alpha`={lora.alpha}: must be a finite number > 0 (the scale is alpha / rank)")
    _check(math.isfinite(lora.dropout) and 0.0 <= lora.dropout < 1.0,
           f"`lora.dropout`={lora.dropout}: must lie in [0, 1)")


def _check_model(cfg: RunConfig) -> None:
    from ..models import MODELS
    from ..models.pipeline_checks import is_hub_id, missing_folder_error

    _check_name(MODELS, cfg.model.name, "model.name")
    pretrained = cfg.model.pretrained
    special = pretrained.startswith("builtin:") or pretrained == "tiny-random"
    if not special and not is_hub_id(pretrained) and not Path(pretrained).expanduser().exists():
        raise ConfigError(str(missing_folder_error(pretrained)))
    # What needs no weights (the folder's pipeline class, the resolution), checked now.
    check = getattr(MODELS.lookup(cfg.model.name), "check_pretrained", None)
    if check is not None and not special:
        check(pretrained, missing_ok=True, **cfg.model.kwargs)


def resolve(cfg: RunConfig, world_size: int = 1, device_type: str | None = None) -> ResolvedRun:
    """Validate ``cfg`` and derive the run's constants. Raises ConfigError naming the field.

    ``device_type`` (``"cpu"``/``"cuda"``) defaults to what ``cfg.device`` gives here.
    """
    try:
        spec = get_algorithm(cfg.algorithm.name)
    except ValueError as err:
        raise ConfigError(f"`algorithm.name`: {err}") from err
    hparams = from_dict(spec.hparams, dict(cfg.algorithm.hparams), "algorithm.hparams")
    dynamics = cfg.sampling.dynamics or spec.default_dynamics
    if spec.kind == "likelihood":
        _check(dynamics != "ode", f"`sampling.dynamics`=ode: {spec.name} needs a stochastic sampler "
               "(flow_sde or cps) for its log-probabilities")
    else:
        _check(dynamics == "ode", f"`sampling.dynamics`={dynamics}: {spec.name} trains on the forward "
               "process and samples with the deterministic ODE; remove the setting")
    if spec.name == "guard":
        _check(dynamics == "flow_sde", "GRPO-Guard is defined for Flow-SDE only: set "
               "`sampling.dynamics: flow_sde`")
    _check_threshold(hparams)
    sde_steps = _check_sampling(cfg, dynamics, spec.kind == "forward")
    total = _check_batch_geometry(cfg, world_size)
    _check(cfg.num_threads >= 0, f"`num_threads`={cfg.num_threads}: must be >= 0 (0 = default)")
    _check(cfg.optim.lr > 0, f"`optim.lr`={cfg.optim.lr}: must be > 0")
    _check(cfg.train.num_iterations >= 1, "`train.num_iterations` must be >= 1")
    _check(0.0 <= cfg.train.ema_decay < 1.0, "`train.ema_decay` must lie in [0, 1)")
    _check(cfg.checkpoint.keep_last >= 1, "`checkpoint.keep_last` must be >= 1")
    _check(cfg.checkpoint.every >= 1, f"`checkpoint.every`={cfg.checkpoint.every}: must be >= 1 "
           "(iterations between checkpoints; the last iteration always writes one, so "
           "`checkpoint.every` >= `train.num_iterations` checkpoints only at the end)")
    _check_rewards(cfg)
    _check_model(cfg)
    _check_eval(cfg)
    _check_lora(cfg)
    _check_prompts(cfg)
    params = {"flow_sde": {"noise_level": cfg.sampling.noise_level},
              "cps": {"eta": cfg.sampling.eta}, "ode": {}}[dynamics]
    _check(cfg.rewards.max_empty_iterations >= 1, "`rewards.max_empty_iterations`="
           f"{cfg.rewards.max_empty_iterations}: must be >= 1")
    _check(cfg.train.policy_lag >= 0, f"`train.policy_lag`={cfg.train.policy_lag}: must be >= 0")
    device_type = _device_type(cfg.device) if device_type is None else device_type
    compiled = cfg.model.compile if cfg.model.compile is not None else device_type == "cuda"
    likelihood = spec.kind == "likelihood"
    mode = cfg.train.old_means
    replay = likelihood and (mode == "replay" or (mode == "auto" and (
        compiled or device_type == "cuda" or cfg.mixed_precision != "no")))
    return ResolvedRun(
        cfg, spec, hparams, dynamics, params, sde_steps, total, device_type, compiled, replay,
        needs_reference_means=likelihood and spec.reference_weight(hparams) > 0,
        kl_reduce=spec.kl_reduction(hparams))


def _device_type(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]
