"""One registry type behind models, rewards, monitors, algorithms, prompt sources and worlds:
the same duplicate check, unknown-name message and dotted paths everywhere."""

from __future__ import annotations

import pytest

from flowdppo.algorithms import ALGORITHMS, get_algorithm
from flowdppo.config import ConfigError, load_config, resolve
from flowdppo.models import MODELS, build_model
from flowdppo.prompts import PROMPT_SOURCES, build_prompts
from flowdppo.registry import Registry, UnknownNameError
from flowdppo.rewards import MONITORS, REWARDS, build_reward
from flowdppo.worlds import WORLDS, resolve_builtin_base

# Each public registry, a built-in name and a near miss of it.
REGISTRIES = [(MODELS, "toy", "toi"), (REWARDS, "digit_label", "digit_lable"),
              (MONITORS, "digit_judge", "digit_jugde"), (ALGORITHMS, "dppo", "dpo"),
              (PROMPT_SOURCES, "digits", "digit"), (WORLDS, "shapes", "shape")]


def test_duplicate_names_are_refused():
    registry: Registry[int] = Registry("thing")
    registry.register("a")(1)
    with pytest.raises(ValueError, match="thing 'a' registered twice"):
        registry.register("a")(2)
    with pytest.raises(ValueError, match="has no ':'"):
        registry.add("pkg.mod:a", 3)
    assert registry.lookup("a") == 1


@pytest.mark.parametrize("registry, name, typo", REGISTRIES, ids=lambda r: getattr(r, "kind", ""))
def test_every_registry_loads_builtins_and_hints_the_nearest_name(registry, name, typo):
    assert isinstance(registry, Registry)
    assert name in registry and name in registry.names()
    assert registry.names() == sorted(registry)
    with pytest.raises(UnknownNameError) as err:
        registry.lookup(typo)
    message = str(err.value)
    assert f"unknown {registry.kind} {typo!r}" in message
    assert f"did you mean {name!r}" in message
    valid = sorted(registry) + (["files"] if registry is PROMPT_SOURCES else [])
    assert f"expected one of {sorted(valid)}" in message
    with pytest.raises(ValueError, match=f"{registry.kind} {name!r} registered twice"):
        registry.register(name)(object())


def test_registration_into_every_registry_is_shared_by_name():
    """The package decorators write into the same registries the lookups read."""
    from flowdppo.algorithms import register_algorithm
    from flowdppo.models import register_model
    from flowdppo.prompts import register_prompts
    from flowdppo.rewards import register_monitor, register_reward
    from flowdppo.worlds import register_world

    for decorator, registry in ((register_model, MODELS), (register_reward, REWARDS),
                                (register_monitor, MONITORS), (register_prompts, PROMPT_SOURCES),
                                (register_world, WORLDS)):
        factory = decorator("test_shared_entry")(lambda **kwargs: kwargs)
        assert registry.lookup("test_shared_entry") is factory
        del registry["test_shared_entry"]
    loss = register_algorithm("test_shared_algo", kind="likelihood", hparams=type(
        get_algorithm("dppo").hparams), default_dynamics="flow_sde")(lambda batch: None)
    assert get_algorithm("test_shared_algo").loss is loss
    del ALGORITHMS["test_shared_algo"]


def test_dotted_paths_resolve_like_serve_reward():
    toy = build_model("flowdppo.models.toy:build_toy", pretrained=None, num_layers=1, num_heads=2,
                      head_dim=8, text_dim=16, max_length=4, vocab=["a", "b"])
    assert type(toy).__name__ == "ToyFlowModel"
    assert callable(build_reward("flowdppo.rewards.simple:jpeg_compressibility"))
    splits = build_prompts("flowdppo.worlds.shapes:shapes_prompts")
    assert len(splits.train) == 96 and len(splits.eval) == 32
    # An algorithm's dotted path may name the loss its decorator registered.
    assert get_algorithm("flowdppo.algorithms.dppo:dppo_loss") is get_algorithm("dppo")
    with pytest.raises(UnknownNameError, match=r"cannot import 'flowdppo\.nope'"):
        build_model("flowdppo.nope:factory")
    with pytest.raises(UnknownNameError, match="has no attribute 'missing'"):
        build_reward("flowdppo.rewards.simple:missing")
    with pytest.raises(ValueError, match="neither an AlgorithmSpec nor a loss"):
        get_algorithm("flowdppo.algorithms.dppo:dppo_keep_mask")


def test_unknown_world_names_the_key_and_the_worlds():
    with pytest.raises(ValueError, match=r"`model.pretrained`=builtin:shape: unknown world "
                                         r"'shape'.*did you mean 'shapes'"):
        resolve_builtin_base("shape")


def test_train_config_accepts_dotted_paths_and_checks_them_before_loading(tiny_base):
    cfg = load_config(None, ["model.name=flowdppo.models.toy:build_toy",
                             "rewards.items=[{name: 'flowdppo.worlds.digits_rewards:digit_ink_reward'}]",
                             "prompts.source=flowdppo.worlds.digits:build_digits_prompts",
                             "algorithm.name=flowdppo.algorithms.grpo:grpo_loss",
                             f"model.pretrained={tiny_base}"])
    resolved = resolve(cfg)
    assert resolved.algorithm is get_algorithm("grpo")
    bad = [("model.name=flowdppo.models.toy:nope", r"`model.name`='flowdppo.models.toy:nope'"),
           ("rewards.items=[{name: 'pkg_missing.mod:f'}]", r"`rewards.items\[0\].name`"),
           ("prompts.source=digts", r"`prompts.source`='digts': unknown prompt source.*'digits'")]
    for override, message in bad:
        with pytest.raises(ConfigError, match=message):
            resolve(load_config(None, [override]))


def test_flowdppo_train_runs_with_dotted_model_reward_and_prompts(tiny_base, tmp_path):
    from fast_runs import tiny_overrides
    from flowdppo.cli import main

    out = tmp_path / "run"
    dotted = ["model.name=flowdppo.models.toy:build_toy",
              "rewards.items=[{name: 'flowdppo.worlds.digits_rewards:digit_ink_reward'}]",
              "prompts.source=flowdppo.worlds.digits:build_digits_prompts", "eval.at_start=false"]
    assert main(["train", "--output-dir", str(out), *tiny_overrides(tiny_base, iterations=1),
                 *dotted]) == 0
    assert (out / "metrics.jsonl").read_text().count("\n") == 1
