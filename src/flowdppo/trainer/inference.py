"""Trained policies outside training: load one from a run directory or a LoRA file, and
draw reproducible ODE samples from it (``flowdppo sample``, ``flowdppo export``).

Sample ``j`` of a prompt starts from ``model.initial_noise(1, torch.Generator(device)
.manual_seed(seed + j))``: for the diffusers families that is the pipeline's own
``prepare_latents``, so ``pipe(prompt, generator=torch.Generator(device).manual_seed(seed + j),
num_inference_steps=K, guidance_scale=G)`` with the LoRA loaded gives the same image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..config import RunConfig, from_dict, read_yaml
from ..dynamics import get_dynamics
from ..errors import RunDirectoryError
from ..models import FlowModel
from . import setup
from .checkpoint import latest_checkpoint, load_checkpoint
from .policy import ReferencePolicy, apply_trainable, trainable_named_parameters

_ODE = get_dynamics("ode")


@dataclass
class LoadedPolicy:
    config: RunConfig
    model: FlowModel
    reference: ReferencePolicy
    checkpoint: Path | None


def read_run_config(run_dir: Path) -> RunConfig:
    """The resolved config a training run wrote (``config.yaml``)."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise RunDirectoryError(f"--run {run_dir}: no run there (config.yaml missing); give a "
                                "training output directory")
    return from_dict(RunConfig, read_yaml(config_path))


def find_checkpoint(run_dir: Path, checkpoint: Path | None = None, step: int | None = None) -> Path:
    """``checkpoint``, the one of iteration ``step``, or the latest under ``run_dir``."""
    root = run_dir / "checkpoints"
    if checkpoint is None and step is not None:
        checkpoint = root / f"step_{step:06d}"
        if not checkpoint.is_dir():
            have = sorted(int(p.name[5:]) for p in root.glob("step_*") if p.is_dir())
            raise RunDirectoryError(f"--step {step}: {run_dir} keeps no checkpoint of that "
                                    f"iteration; it has steps {have}")
    if checkpoint is None:
        checkpoint = latest_checkpoint(root)
        if checkpoint is None:
            raise RunDirectoryError(f"{run_dir}: no checkpoint yet under {root}")
    if not (checkpoint / "trainable.safetensors").is_file():
        raise RunDirectoryError(f"--checkpoint {checkpoint}: not a checkpoint directory "
                                "(trainable.safetensors missing)")
    return checkpoint


def load_policy(run_dir: Path, checkpoint: Path | None = None, device: str = "auto",
                base: bool = False, step: int | None = None) -> LoadedPolicy:
    """The run's model with its trained weights (latest checkpoint unless one is given).

    ``base=True`` skips loading trained weights (the reference model itself).
    """
    cfg = read_run_config(run_dir)
    if device != "auto":
        cfg.device = device
    if not base:
        checkpoint = find_checkpoint(run_dir, checkpoint, step)
    torch_device = setup.make_accelerator(cfg).device
    model = setup.load_model(cfg, torch_device)
    apply_trainable(model, cfg.lora, cfg.seed)
    if checkpoint is not None and not base:
        state = load_checkpoint(checkpoint, trainable_only=True)  # never optimizer or RNG state
        params = trainable_named_parameters(model.transformer)
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state.trainable[name])
    return LoadedPolicy(cfg, model, ReferencePolicy(model, lora=cfg.lora.enabled),
                        None if base else checkpoint)


def load_lora_model(name: str, pretrained: str, lora_file: Path, *, dtype: str = "fp32",
                    device: str = "cpu", **kwargs) -> FlowModel:
    """A diffusers family's base pipeline with ``lora_file`` loaded by ``load_lora_weights``
    (the path a diffusers user takes)."""
    from ..models import build_model

    if not lora_file.is_file():
        raise RunDirectoryError(f"--lora {lora_file}: no such file")
    model = build_model(name, pretrained=pretrained, dtype=dtype, device=device, **kwargs)
    pipe = getattr(model, "pipe", None)
    if pipe is None:
        raise RunDirectoryError(f"--lora needs a diffusers model family (sd3, flux, flux2); "
                                f"sample a {name} run with --run DIR")
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    model.transformer.eval()
    return model


def seeded_noise(model: FlowModel, seeds: Sequence[int]) -> Tensor:
    """One initial latent per seed, each from ``torch.Generator(device).manual_seed(seed)``."""
    rows = [model.initial_noise(1, torch.Generator(model.device).manual_seed(int(s)))
            for s in seeds]
    return torch.cat(rows)


@torch.no_grad()
def sample_images(model: FlowModel, prompts: Sequence[str], noise: Tensor, num_steps: int,
                  guidance_scale: float, batch_size: int = 8) -> Tensor:
    """Euler ODE over ``model.sigmas(num_steps)`` from ``noise``, decoded.

    Args:
        prompts: one per row of ``noise`` (`(N, *latent_shape)`).
    Returns:
        `Tensor` of shape `(N, C, H, W)`, float32 in [0, 1], on the CPU.
    """
    sigmas = model.sigmas(num_steps).cpu()
    chunks = []
    for lo in range(0, len(prompts), batch_size):
        x = noise[lo: lo + batch_size].to(model.device)
        cond = model.encode_prompts(list(prompts[lo: lo + batch_size]))
        for i in range(num_steps):
            t = torch.full((x.shape[0],), float(sigmas[i]), device=x.device)
            t_next = torch.full((x.shape[0],), float(sigmas[i + 1]), device=x.device)
            v = model.predict_velocity(x, t, cond, guidance_scale)
            x = _ODE.mean_std(x, v, t, t_next)[0]
        chunks.append(model.decode(x).float().cpu())
    return torch.cat(chunks)
