"""A tiny deterministic FlowModel for testing the trainer's plumbing without diffusers."""

from __future__ import annotations

import torch
from torch import nn

from flowdppo.models import Conditioning, FlowModel


class _Net(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim + 2, dim)

    def forward(self, x, t, c):
        flat = x.flatten(1)
        out = self.lin(torch.cat([flat, t[:, None], c[:, None]], dim=1))
        return out.view_as(x)


class FakeFlowModel(FlowModel):
    """v = Linear([x, t, c]) with c a number per prompt (its length)."""

    lora_target_modules = ("lin",)
    image_channels = 1

    def __init__(self, shape=(1, 2, 2), seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.latent_shape = shape
        self.transformer = _Net(int(torch.tensor(shape).prod()))

    def encode_prompts(self, prompts):
        return Conditioning({"c": torch.tensor([float(len(p)) / 10 for p in prompts])})

    def predict_velocity(self, x_t, t, cond, guidance_scale=1.0):
        return self.transformer(x_t, t.to(x_t.dtype), cond.tensors["c"].to(x_t.dtype)).float()

    def decode(self, latents):
        return ((latents + 1) / 2).clamp(0, 1)

    def sigmas(self, num_steps):
        return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
