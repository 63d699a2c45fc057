"""Loading a trained policy from a run directory for sampling and evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RunConfig, from_dict, read_yaml
from ..models import FlowModel
from . import setup
from .checkpoint import latest_checkpoint, load_checkpoint
from .policy import ReferencePolicy, apply_trainable, trainable_named_parameters


@dataclass
class LoadedPolicy:
    config: RunConfig
    model: FlowModel
    reference: ReferencePolicy
    checkpoint: Path | None


def load_policy(run_dir: Path, checkpoint: Path | None = None, device: str = "auto",
                base: bool = False) -> LoadedPolicy:
    """The run's model with its trained weights (latest checkpoint unless one is given).

    ``base=True`` skips loading trained weights (the reference model itself).
    """
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ValueError(f"{run_dir} holds no run (config.yaml missing); give a training "
                         "output directory")
    cfg = from_dict(RunConfig, read_yaml(config_path))
    if device != "auto":
        cfg.device = device
    if checkpoint is None and not base:
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        if checkpoint is None:
            raise ValueError(f"{run_dir}: no checkpoint yet under {run_dir / 'checkpoints'}")
    if checkpoint is not None and not (checkpoint / "trainable.safetensors").is_file():
        raise ValueError(f"--checkpoint {checkpoint}: not a checkpoint directory "
                         "(trainable.safetensors missing)")
    torch_device = setup.make_accelerator(cfg).device
    model = setup.load_model(cfg, torch_device)
    apply_trainable(model, cfg.lora, cfg.seed)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, trainable_only=True)  # never optimizer or RNG state
        params = trainable_named_parameters(model.transformer)
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state.trainable[name])
    return LoadedPolicy(cfg, model, ReferencePolicy(model, lora=cfg.lora.enabled), checkpoint)
