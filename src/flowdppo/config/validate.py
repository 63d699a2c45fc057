"""Cross-field validation and derived values, run before any model or reward loads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..algorithms import AlgorithmSpec, get_algorithm
from .loader import ConfigError, apply_overrides, from_dict, read_yaml
from .schema import RunConfig


@dataclass(frozen=True)
class ResolvedRun:
    """A validated config plus the values derived from it (one place computes them)."""

    config: RunConfig
    algorithm: AlgorithmSpec
    hparams: Any  # the algorithm's hyperparameter dataclass
    dynamics: str  # the rollout sampler
    dynamics_params: dict[str, float]
    trained_steps: int  # stochastic steps per rollout
    window_first: int  # the earliest step index a window may start at
    window_stop: int  # one past the latest step index a window may cover
    samples_per_iteration: int  # global: num_groups * group_size


def load_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (or the defaults) and apply ``key=value`` overrides, strictly."""
    data = read_yaml(path) if path else {}
    apply_overrides(data, overrides or [])
    return from_dict(RunConfig, data)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_sampling(cfg: RunConfig, dynamics: str, forward: bool) -> tuple[int, int, int]:
    """Returns (trained steps per rollout, first window start, last window stop).

    Forward-process methods train at the same number of grid times, drawn from the same
    window, so every method gets the same training forwards per image.
    """
    s = cfg.sampling
    _check(s.num_steps >= 2, f"`sampling.num_steps`={s.num_steps}: need at least 2 steps")
    _check(s.group_size >= 2, f"`sampling.group_size`={s.group_size}: group advantages need >= 2 "
           "images per prompt")
    _check(s.num_groups >= 1, f"`sampling.num_groups`={s.num_groups}: must be >= 1")
    _check(s.sample_batch_size >= 1, "`sampling.sample_batch_size` must be >= 1")
    _check(s.guidance_scale >= 1.0, f"`sampling.guidance_scale`={s.guidance_scale}: must be >= 1")
    ok = len(s.sde_window_range) == 2 and 0.0 <= s.sde_window_range[0] < s.sde_window_range[1] <= 1
    _check(ok,
           f"`sampling.sde_window_range`={s.sde_window_range}: expected [lo, hi] with 0 <= lo < hi <= 1")
    # CPS's last step (t_next = 0) is deterministic and never trained.
    last_trainable = s.num_steps - 1 if dynamics == "cps" else s.num_steps
    if dynamics == "ode" and not forward:
        return 0, 0, 0
    if s.sde_window is None:
        return last_trainable, 0, last_trainable
    lo, hi = s.sde_window_range
    first, stop = round(lo * s.num_steps), min(round(hi * s.num_steps), last_trainable)
    span = stop - first
    _check(1 <= s.sde_window <= span,
           f"`sampling.sde_window`={s.sde_window}: must be between 1 and the {span} steps that "
           f"`sampling.sde_window_range`={s.sde_window_range} covers out of {s.num_steps}; widen the "
           "range or use fewer window steps")
    return s.sde_window, first, stop


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

    _check_name(MODELS, cfg.model.name, "model.name")
    pretrained = cfg.model.pretrained
    # A hub id is "owner/name" and may hold dots ("stable-diffusion-3.5-medium"): only an
    # anchored path, a deeper one, or an owner-less name with a suffix is surely local.
    slashes = pretrained.count("/")
    looks_local = (pretrained.startswith((".", "/", "~")) or slashes > 1
                   or (slashes == 0 and Path(pretrained).suffix != ""))
    if looks_local:
        _check(Path(pretrained).expanduser().exists(),
               f"`model.pretrained`={pretrained!r}: no such directory; give a local path, a hub id "
               "already in the cache, builtin:<world> or tiny-random")


def resolve(cfg: RunConfig, world_size: int = 1) -> ResolvedRun:
    """Validate ``cfg`` and derive the run's constants. Raises ConfigError naming the field."""
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
    trained_steps, first, stop = _check_sampling(cfg, dynamics, spec.kind == "forward")
    total = _check_batch_geometry(cfg, world_size)
    _check(cfg.num_threads >= 0, f"`num_threads`={cfg.num_threads}: must be >= 0 (0 = default)")
    _check(cfg.optim.lr > 0, f"`optim.lr`={cfg.optim.lr}: must be > 0")
    _check(cfg.train.num_iterations >= 1, "`train.num_iterations` must be >= 1")
    _check(0.0 <= cfg.train.ema_decay < 1.0, "`train.ema_decay` must lie in [0, 1)")
    _check(cfg.checkpoint.keep_last >= 1, "`checkpoint.keep_last` must be >= 1")
    _check_rewards(cfg)
    _check_model(cfg)
    _check_eval(cfg)
    _check_lora(cfg)
    _check_prompts(cfg)
    params = {"flow_sde": {"noise_level": cfg.sampling.noise_level},
              "cps": {"eta": cfg.sampling.eta}, "ode": {}}[dynamics]
    return ResolvedRun(cfg, spec, hparams, dynamics, params, trained_steps, first, stop, total)
