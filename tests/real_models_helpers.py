"""Helpers shared by the SD3 / FLUX.1 / FLUX.2 adapter tests (tiny random pipelines).

The pipeline side of every comparison goes through the pipeline's own ``__call__`` and its
static packing helpers; the adapter side goes through ``FlowModel`` only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowdppo.dynamics import get_dynamics
from flowdppo.models import FlowModel
from flowdppo.models.tiny import TINY_MAX_SEQUENCE_LENGTH, TINY_RESOLUTION, build_tiny_pipeline

PROMPTS = ["a red cat", "two dogs on a beach"]
RES = TINY_RESOLUTION
SEQ = TINY_MAX_SEQUENCE_LENGTH


def tiny_pipe(family: str, seed: int = 0):
    return build_tiny_pipeline(family, seed=seed)


def noise_for(model: FlowModel, batch: int, seed: int = 0) -> Tensor:
    return torch.randn((batch, *model.latent_shape), generator=torch.Generator().manual_seed(seed))


def ode_sample(model: FlowModel, prompts: list[str], noise: Tensor, num_steps: int,
               guidance_scale: float) -> Tensor:
    """Euler ODE through the adapter over ``model.sigmas(num_steps)`` (what rollouts do)."""
    ode = get_dynamics("ode")
    cond = model.encode_prompts(prompts)
    sigmas = model.sigmas(num_steps)
    x = noise.clone()
    batch = x.shape[0]
    with torch.no_grad():
        for i in range(num_steps):
            t = torch.full((batch,), float(sigmas[i]))
            t_next = torch.full((batch,), float(sigmas[i + 1]))
            v = model.predict_velocity(x, t, cond, guidance_scale)
            x = ode.step(x, v, t, t_next)[0]
    return x


def pipeline_latents(family: str, pipe, prompts: list[str], noise: Tensor, num_steps: int,
                     guidance_scale: float) -> Tensor:
    """``pipe(..., output_type="latent")`` from ``noise``, mapped to the adapter's latent space.

    SD3 returns its latents as they are; FLUX.1 returns packed tokens (unpacked here with the
    pipeline's helper); FLUX.2 returns de-normalised, un-patchified VAE latents (mapped back
    with the pipeline's batch-norm statistics and its patchify helper).
    """
    kwargs = dict(prompt=prompts, height=RES, width=RES, num_inference_steps=num_steps,
                  guidance_scale=guidance_scale, output_type="latent",
                  max_sequence_length=SEQ)
    if family == "sd3":
        return pipe(latents=noise.clone(), **kwargs).images
    if family == "flux":
        b, c, h, w = noise.shape
        packed = pipe._pack_latents(noise.clone(), b, c, h, w)
        out = pipe(latents=packed, **kwargs).images
        return pipe._unpack_latents(out, RES, RES, pipe.vae_scale_factor)
    out = pipe(latents=noise.clone(), **kwargs).images  # flux2
    z = pipe._patchify_latents(out)
    mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    return (z - mean) / std


def pipeline_images(pipe, latents: Tensor, family: str) -> Tensor:
    """The pipeline's decode of adapter-space latents, as in its ``__call__``, in [0, 1]."""
    with torch.no_grad():
        if family == "flux2":
            mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
            std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1)
                             + pipe.vae.config.batch_norm_eps)
            z = pipe._unpatchify_latents(latents * std + mean)
        else:
            z = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(z, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pt")


def perturb_lora_b(module: torch.nn.Module, seed: int = 1, scale: float = 0.5) -> int:
    """Fill every ``lora_B`` weight with random values (they start at zero). Returns the count."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
                count += 1
    return count
