"""Run configuration: typed dataclasses, strict YAML loading, validation."""

from .loader import ConfigError, apply_overrides, from_dict, read_yaml, to_dict
from .schema import (
    AdvantageConfig,
    AlgorithmConfig,
    CheckpointConfig,
    EvalConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    PromptConfig,
    RewardConfig,
    RewardItem,
    RunConfig,
    SamplingConfig,
    TrainConfig,
)
from .validate import ResolvedRun, load_config, resolve

__all__ = [
    "AdvantageConfig",
    "AlgorithmConfig",
    "CheckpointConfig",
    "ConfigError",
    "EvalConfig",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "PromptConfig",
    "ResolvedRun",
    "RewardConfig",
    "RewardItem",
    "RunConfig",
    "SamplingConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "read_yaml",
    "resolve",
    "to_dict",
]
