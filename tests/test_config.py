"""Strict config loading and validation: every error names the field and the fix."""

from __future__ import annotations

import pytest

from flowdppo.config import ConfigError, RunConfig, apply_overrides, from_dict, load_config, resolve
from flowdppo.trainer.commands import recipe_path


def test_defaults_round_trip_through_the_loader():
    cfg = from_dict(RunConfig, {})
    assert cfg.algorithm.name == "dppo"
    assert cfg.sampling.group_size == 8


def test_unknown_key_is_rejected_with_a_hint():
    with pytest.raises(ConfigError, match=r"`algorithm.nmae`: unknown key; did you mean `name`"):
        from_dict(RunConfig, {"algorithm": {"nmae": "dppo"}})


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match=r"`sampling.group_size`: expected an integer"):
        from_dict(RunConfig, {"sampling": {"group_size": "eight"}})
    with pytest.raises(ConfigError, match=r"`optim.lr`: expected a number"):
        from_dict(RunConfig, {"optim": {"lr": True}})


def test_literal_fields_list_the_choices():
    with pytest.raises(ConfigError, match=r"`rewards.nonfinite`: 'ignore' is not one of"):
        from_dict(RunConfig, {"rewards": {"nonfinite": "ignore"}})


def test_yaml_exponent_without_dot_is_a_number():
    cfg = from_dict(RunConfig, {"optim": {"lr": "1e-4"}})
    assert cfg.optim.lr == pytest.approx(1e-4)


def test_overrides_use_dotted_keys_and_yaml_values():
    data = apply_overrides({}, ["train.num_iterations=3", "sampling.sde_steps.range=[0.1, 0.4]",
                                "algorithm.hparams.threshold=1e-6"])
    cfg = from_dict(RunConfig, data)
    assert cfg.train.num_iterations == 3
    assert cfg.sampling.sde_steps.range == [0.1, 0.4]
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["train.lr"])


def _resolve(**sections):
    return resolve(from_dict(RunConfig, sections))


def test_algorithm_hyperparameters_are_strict():
    with pytest.raises(ConfigError, match=r"`algorithm.hparams.treshold`: unknown key; did you mean `threshold`"):
        _resolve(algorithm={"name": "dppo", "hparams": {"treshold": 1e-5}})


def test_unknown_algorithm_lists_valid_names():
    with pytest.raises(ConfigError, match=r"`algorithm.name`: unknown algorithm 'ppo'"):
        _resolve(algorithm={"name": "ppo"})


def test_threshold_units_are_checked():
    with pytest.raises(ConfigError, match="with divergence tv the threshold is a probability"):
        _resolve(algorithm={"name": "dppo", "hparams": {"divergence": "tv", "threshold": 2.0}})
    with pytest.raises(ConfigError, match="sum-convention thresholds"):
        _resolve(algorithm={"name": "dppo", "hparams": {"threshold": 50.0}})
    with pytest.raises(ConfigError, match="must be >= 0"):
        _resolve(algorithm={"name": "dppo", "hparams": {"threshold": -1e-5}})


def test_batch_geometry_is_checked_before_anything_loads():
    with pytest.raises(ConfigError, match="group advantages need >= 2"):
        _resolve(sampling={"group_size": 1})
    with pytest.raises(ConfigError, match="divide evenly over 3 processes"):
        resolve(from_dict(RunConfig, {"sampling": {"num_groups": 2, "group_size": 4}}), world_size=3)
    with pytest.raises(ConfigError, match=r"do not split into `train\.minibatches_per_pass`=3"):
        _resolve(sampling={"num_groups": 2, "group_size": 4}, train={"minibatches_per_pass": 3})


def test_sde_window_must_fit_its_range():
    with pytest.raises(ConfigError, match=r"`sampling\.sde_steps\.count`=6"):
        _resolve(sampling={"num_steps": 10, "sde_steps": {"count": 6, "range": [0.0, 0.5]}})
    resolved = _resolve(sampling={"num_steps": 10, "sde_steps": {"count": 3, "range": [0.0, 0.5]}})
    sde = resolved.sde_steps
    assert (sde.count, sde.first, sde.stop) == (3, 0, 5)


def test_renamed_sde_window_keys_still_load():
    from flowdppo.config import load_config

    cfg = load_config(None, ["sampling.sde_window=2", "sampling.sde_window_range=[0.1, 0.6]"])
    assert (cfg.sampling.sde_steps.count, cfg.sampling.sde_steps.range) == (2, [0.1, 0.6])
    # An old-style override still overrides a recipe written with the new keys.
    from flowdppo.trainer.commands import RECIPES

    cfg = load_config(str(RECIPES / "toy_dppo.yaml"), ["sampling.sde_window=1"])
    assert cfg.sampling.sde_steps.count == 1


def test_cps_never_trains_its_deterministic_last_step():
    resolved = _resolve(algorithm={"name": "cps"},
                        sampling={"num_steps": 4, "sde_steps": {"count": None, "range": [0.0, 1.0]}})
    assert resolved.dynamics == "cps"
    assert resolved.sde_steps.stop == 3


def test_dynamics_must_suit_the_algorithm():
    with pytest.raises(ConfigError, match="needs a stochastic sampler"):
        _resolve(algorithm={"name": "grpo"}, sampling={"dynamics": "ode"})
    with pytest.raises(ConfigError, match="Flow-SDE only"):
        _resolve(algorithm={"name": "guard"}, sampling={"dynamics": "cps"})


def test_unknown_reward_and_model_are_named():
    with pytest.raises(ConfigError, match=r"`rewards.items\[0\].name`='nope'"):
        _resolve(rewards={"items": [{"name": "nope"}]})
    with pytest.raises(ConfigError, match=r"`model.name`='sd5'"):
        _resolve(model={"name": "sd5"})
    with pytest.raises(ConfigError, match="no such directory"):
        _resolve(model={"name": "toy", "pretrained": "/does/not/exist"})


SHIPPED_RECIPES = sorted(recipe_path("toy_dppo").parent.glob("*.yaml"))


def test_the_shipped_recipes_are_found():
    """The parametrised test below would pass on an empty glob: count what it checks."""
    names = {p.stem for p in SHIPPED_RECIPES}
    assert len(SHIPPED_RECIPES) >= 17
    assert {"toy_dppo", "toy_grpo", "toy_nft", "tiny_sd3", "sd35_dppo", "flux1_dppo"} <= names


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path):
    cfg = load_config(str(path))
    resolved = resolve(cfg)
    assert resolved.config is cfg and resolved.algorithm.name == cfg.algorithm.name
    assert resolved.samples_per_iteration == cfg.sampling.num_groups * cfg.sampling.group_size
