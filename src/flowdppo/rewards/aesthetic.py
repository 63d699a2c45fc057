"""The LAION aesthetic predictor v2 ("improved aesthetic predictor") as a reward.

    e_i = f(image_i) / |f(image_i)|          CLIP ViT-L/14 image embedding, L2-normalised (768)
    aesthetic_i = MLP(e_i)                   768-1024-128-64-16-1, dropouts 0.2/0.2/0.1, no
                                             activations (the released model is piecewise linear)

Scores are on the AVA 1-10 scale. The MLP weights are the released
``sac+logos+ava1-l14-linearMSE.pth``
(https://github.com/christophschuhmann/improved-aesthetic-predictor),
given as a local ``.pth`` or ``.safetensors`` file; its state-dict keys (``layers.0.weight`` ...)
load as they are. The CLIP model loads offline from a directory or cached hub id.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Reward, RewardOutput, register_reward
from .clip_rewards import load_clip_model, pooled
from .hub import LazyModel, parse_dtype, require_file, resolve_model_dir
from .preprocess import ClipPreprocess, check_batch

_WEIGHTS_HINT = (
    "a local .pth/.safetensors file of the LAION aesthetic MLP, e.g. "
    "sac+logos+ava1-l14-linearMSE.pth "
    "from https://github.com/christophschuhmann/improved-aesthetic-predictor"
)


class AestheticMLP(nn.Module):
    """The predictor head: `(B, D)` normalised embeddings -> `(B,)` scores (ViT-L/14: D = 768)."""

    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        # Indices match the released state dict: layers.{0,2,4,6,7}.{weight,bias}.
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: Tensor) -> Tensor:
        return self.layers(embeds).squeeze(-1)


def load_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` or (weights-only) torch file; ``state_dict`` is unwrapped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_aesthetic_mlp(path: Path) -> AestheticMLP:
    """An eval-mode `AestheticMLP` whose input size is read from the weights."""
    state = load_state_dict(path)
    if "layers.0.weight" not in state:
        raise ValueError(f"aesthetic: {path} has no 'layers.0.weight'; keys: {sorted(state)[:8]}")
    mlp = AestheticMLP(embed_dim=state["layers.0.weight"].shape[1])
    mlp.load_state_dict(state)
    return mlp.eval().requires_grad_(False)


class AestheticReward(LazyModel):
    """``MLP(normalised CLIP image embedding)`` per image; prompts are ignored."""

    def __init__(
        self, *, weights: str | None, clip_model: str, device: str, dtype: str, batch_size: int
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"aesthetic: batch_size={batch_size}; expected >= 1")
        self.weights = require_file(
            weights, argument="weights", reward="aesthetic", hint=_WEIGHTS_HINT
        )
        self.clip_dir = resolve_model_dir(clip_model, argument="clip_model", reward="aesthetic")
        self.device, self.batch_size = device, batch_size
        self.dtype = parse_dtype(dtype, reward="aesthetic")

    def _load(self) -> None:
        self.mlp = load_aesthetic_mlp(self.weights).to(self.device)  # float32: a tiny head
        self.clip = load_clip_model(
            self.clip_dir, device=self.device, dtype=self.dtype, reward="aesthetic"
        )
        self.preprocess = ClipPreprocess.from_dir(self.clip_dir)
        if self.clip.config.projection_dim != self.mlp.layers[0].in_features:
            raise ValueError(
                f"aesthetic: CLIP {self.clip_dir} embeds to {self.clip.config.projection_dim} "
                f"but the MLP in {self.weights} expects {self.mlp.layers[0].in_features}; "
                "use ViT-L/14 weights"
            )

    @torch.no_grad()
    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> RewardOutput:
        check_batch(images, prompts, metadata, reward="aesthetic")
        self.ensure_loaded()
        scores = [
            self._score(images[i : i + self.batch_size])
            for i in range(0, images.shape[0], self.batch_size)
        ]
        rewards = torch.cat(scores) if scores else torch.zeros(0)
        return rewards.to("cpu", torch.float32), {}

    def _score(self, images: Tensor) -> Tensor:
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)  # (b, 3, 224, 224)
        embeds = pooled(self.clip.get_image_features(pixel_values=pixels)).float()  # (b, 768)
        return self.mlp(F.normalize(embeds, dim=-1))


@register_reward("aesthetic")
def aesthetic(
    weights: str | None = None,
    clip_model: str = "openai/clip-vit-large-patch14",
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 32,
) -> Reward:
    """LAION aesthetic score (1-10). ``weights``: path to the MLP file (required)."""
    return AestheticReward(
        weights=weights, clip_model=clip_model, device=device, dtype=dtype, batch_size=batch_size
    )
