"""HPSv2 (Human Preference Score v2, Wu et al. 2023) as a reward, through ``open_clip``.

HPSv2 is an open_clip ViT-H-14 fine-tuned on human preferences; its score is the plain
cosine similarity of the normalised image and prompt embeddings (about 0.2-0.35):

    hps_i = <f(image_i), g(prompt_i)> / (|f(image_i)| |g(prompt_i)|)

The checkpoint (``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt`` from the hub repo
``xswu/HPSv2``) is a local file holding ``{"state_dict": ...}``; the architecture is built
with ``pretrained=None``, so nothing is downloaded. Preprocessing is the torch one of
:mod:`flowdppo.rewards.preprocess` (shortest edge to 224, centre crop, OpenAI mean/std),
which equals HPSv2's resize-longest-side transform for the square images a T2I model makes.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Reward, RewardOutput, register_reward
from .hub import LazyModel, parse_dtype, require_file
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipPreprocess, check_batch

PIP_LINE = "pip install open_clip_torch"
_CHECKPOINT_HINT = (
    "a local HPSv2 checkpoint, e.g. `hf download xswu/HPSv2 HPS_v2.1_compressed.pt` "
    "and pass the downloaded file"
)


def require_open_clip() -> None:
    """Raise an `ImportError` with the install line unless ``open_clip`` is importable."""
    if importlib.util.find_spec("open_clip") is None:
        raise ImportError(f"the hpsv2 reward needs open_clip: {PIP_LINE}")


class HPSv2Reward(LazyModel):
    """Cosine similarity of an open_clip model loaded from an HPSv2 checkpoint."""

    def __init__(
        self, *, checkpoint: str | None, model_name: str, device: str, dtype: str, batch_size: int
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"hpsv2: batch_size={batch_size}; expected >= 1")
        require_open_clip()
        self.checkpoint = require_file(
            checkpoint, argument="checkpoint", reward="hpsv2", hint=_CHECKPOINT_HINT
        )
        self.model_name, self.device, self.batch_size = model_name, device, batch_size
        self.dtype = parse_dtype(dtype, reward="hpsv2")

    def _load(self) -> None:
        import open_clip

        model = open_clip.create_model(self.model_name, pretrained=None, device="cpu")
        state = torch.load(str(self.checkpoint), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        # Checkpoints saved from DistributedDataParallel prefix every key with "module.".
        state = {key.removeprefix("module."): value for key, value in state.items()}
        model.load_state_dict(state)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(self.model_name)
        size = model.visual.image_size
        size = size if isinstance(size, int) else int(size[0])
        self.preprocess = ClipPreprocess(
            size=size,
            crop_size=(size, size),
            mean=tuple(getattr(model.visual, "image_mean", None) or OPENAI_CLIP_MEAN),
            std=tuple(getattr(model.visual, "image_std", None) or OPENAI_CLIP_STD),
        )

    @torch.no_grad()
    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> RewardOutput:
        check_batch(images, prompts, metadata, reward="hpsv2")
        self.ensure_loaded()
        scores = [
            self._score(images[i : i + self.batch_size], prompts[i : i + self.batch_size])
            for i in range(0, images.shape[0], self.batch_size)
        ]
        rewards = torch.cat(scores) if scores else torch.zeros(0)
        return rewards.to("cpu", torch.float32), {}

    def _score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)  # (b, 3, 224, 224)
        tokens = self.tokenizer(list(prompts)).to(self.device)  # (b, 77) token ids
        image_embeds = self.model.encode_image(pixels).float()  # (b, P)
        text_embeds = self.model.encode_text(tokens).float()  # (b, P)
        return (F.normalize(image_embeds, dim=-1) * F.normalize(text_embeds, dim=-1)).sum(-1)


@register_reward("hpsv2")
def hpsv2(
    checkpoint: str | None = None,
    model_name: str = "ViT-H-14",
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 32,
) -> Reward:
    """HPSv2 score. ``checkpoint``: local HPS_v2(.1)_compressed.pt (required); needs open_clip."""
    return HPSv2Reward(
        checkpoint=checkpoint,
        model_name=model_name,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
    )
