"""The shipped accelerate configs load with accelerate's own classes and launch the intended setup.

Each YAML goes through the path ``accelerate launch --config_file`` takes: accelerate's
``ClusterConfig`` (rejects unknown top-level keys), the launcher's argument validation,
and the environment it hands the training processes. For FSDP the plugin is then built
from that environment and its auto-wrap policy applied to tiny diffusers transformers.
No process group is started (that needs GPUs).
"""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs_accelerate"
EXPECTED = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "fsdp_flux": "FSDP", "deepspeed_zero2": "DEEPSPEED",
            "fsdp_qwenimage": "FSDP", "fsdp_wan": "FSDP"}
BLOCKS = {"fsdp": ["JointTransformerBlock"],
          "fsdp_flux": ["FluxTransformerBlock", "FluxSingleTransformerBlock"],
          "fsdp_qwenimage": ["QwenImageTransformerBlock"], "fsdp_wan": ["WanTransformerBlock"]}


def launch_env(name: str) -> tuple[object, dict[str, str]]:
    """What ``accelerate launch --config_file <name>.yaml -m flowdppo.cli train`` would export."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    argv = ["--config_file", str(CONFIG_DIR / f"{name}.yaml"), "-m", "flowdppo.cli", "train"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed:
        # Set by accelerate's deepspeed launcher before it builds the environment.
        args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config)
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


def test_every_shipped_file_is_checked():
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_cluster_config_loads(name):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import ComputeEnvironment, DistributedType

    config = ClusterConfig.from_yaml_file(str(CONFIG_DIR / f"{name}.yaml"))
    assert config.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    assert config.distributed_type == DistributedType[EXPECTED[name]]
    assert config.mixed_precision == "bf16"
    assert config.num_processes >= 2 and config.num_machines == 1
    assert bool(config.fsdp_config) == name.startswith("fsdp")
    assert bool(config.deepspeed_config) == name.startswith("deepspeed")


# Keys of a config file that select accelerate's setup rather than name a launch option.
_NOT_OPTIONS = {"compute_environment", "distributed_type", "fsdp_config", "deepspeed_config"}
_RENAMED = {"use_cpu": "cpu"}  # file key -> launch option
NESTED = {"ddp": None, "fsdp": "fsdp_config", "fsdp_flux": "fsdp_config",
          "fsdp_qwenimage": "fsdp_config", "fsdp_wan": "fsdp_config",
          "deepspeed_zero2": "deepspeed_config"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_nested_keys_are_launcher_options(name):
    """accelerate copies a file's keys (top-level and fsdp_config / deepspeed_config) onto
    launch options of that name; a misspelt key would be silently ignored, so each must be a
    real option. DDP has no nested section: its top-level keys are what is checked."""
    import yaml
    from accelerate.commands.launch import launch_command_parser

    options = {s for a in launch_command_parser()._actions for s in a.option_strings}
    raw = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    nested = raw.get(NESTED[name], {}) if NESTED[name] else {}
    assert set(raw) & {"fsdp_config", "deepspeed_config"} == ({NESTED[name]} - {None})
    assert bool(nested) == (NESTED[name] is not None)
    keys = [_RENAMED.get(k, k) for k in raw if k not in _NOT_OPTIONS] + list(nested)
    assert len(keys) >= 10  # num_processes, mixed_precision, ... and the nested ones
    for key in keys:
        assert f"--{key}" in options, f"{name}.yaml: {key} is not an accelerate launch option"
    assert "num_processes" in keys and "mixed_precision" in keys


def test_ddp_launch_environment():
    args, env = launch_env("ddp")
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_deepspeed_launch_environment():
    args, env = launch_env("deepspeed_zero2")
    assert args.use_deepspeed
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    assert env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "1"


def _tiny_sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=8,
        dual_attention_layers=(0,), qk_norm="rms_norm")


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4))


def _tiny_transformer(family: str):
    from flowdppo.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(family).transformer


@pytest.mark.parametrize("name, right, wrong", [
    ("fsdp", _tiny_sd3, _tiny_flux), ("fsdp_flux", _tiny_flux, _tiny_sd3),
    ("fsdp_qwenimage", lambda: _tiny_transformer("qwenimage"), _tiny_flux),
    ("fsdp_wan", lambda: _tiny_transformer("wan"), _tiny_sd3)])
def test_fsdp_plugin_wraps_the_family_blocks(monkeypatch, name, right, wrong):
    from accelerate.utils import FullyShardedDataParallelPlugin

    args, env = launch_env(name)
    assert args.use_fsdp
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1 and plugin.use_orig_params  # LoRA: frozen + trainable mixed
    assert plugin.transformer_cls_names_to_wrap == BLOCKS[name]
    model = right()
    # The listed blocks are the ones diffusers itself declares unsplittable.
    assert sorted(model._no_split_modules) == sorted(BLOCKS[name])
    plugin.set_auto_wrap_policy(model)
    wrapped = plugin.auto_wrap_policy.keywords["transformer_layer_cls"]
    assert sorted(cls.__name__ for cls in wrapped) == sorted(BLOCKS[name])
    with pytest.raises(ValueError, match="Could not find the transformer layer class"):
        FullyShardedDataParallelPlugin().set_auto_wrap_policy(wrong())


def _run_config(overrides: list[str]):
    from flowdppo.config import load_config
    from flowdppo.trainer.commands import RECIPES

    return load_config(str(RECIPES / "toy_dppo.yaml"), overrides)


def test_trainer_fills_the_deepspeed_batch_before_prepare(monkeypatch):
    """accelerate's prepare() needs train_micro_batch_size_per_gpu when no dataloader is
    prepared; the trainer fills it (and DeepSpeed's own accumulation and clipping) from the
    run config on the plugin the launcher's environment builds."""
    from accelerate.utils import DeepSpeedPlugin

    from flowdppo.trainer.setup import configure_deepspeed

    _, env = launch_env("deepspeed_zero2")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ds_config = DeepSpeedPlugin().deepspeed_config
    assert ds_config["train_micro_batch_size_per_gpu"] == "auto"  # what prepare() rejects
    cfg = _run_config(["train.micro_batch_size=12", "optim.grad_clip=0.5"])
    configure_deepspeed(ds_config, cfg, num_processes=8)
    assert ds_config["train_micro_batch_size_per_gpu"] == 12
    assert ds_config["train_batch_size"] == 12 * 8
    assert ds_config["gradient_accumulation_steps"] == 1
    assert ds_config["gradient_clipping"] == 0.5
    assert ds_config["zero_optimization"]["stage"] == 2
    with pytest.raises(ValueError, match="`gradient_accumulation_steps`=4"):
        configure_deepspeed({**ds_config, "gradient_accumulation_steps": 4}, cfg, 8)


def test_fsdp_launch_on_cpu_is_refused_not_run_as_ddp(monkeypatch):
    """accelerate ignores an FSDP launch on the CPU (it runs DDP): the trainer refuses."""
    from flowdppo.trainer.setup import make_accelerator

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="accelerate runs FSDP only on GPUs"):
        make_accelerator(_run_config(["device=cpu"]))
