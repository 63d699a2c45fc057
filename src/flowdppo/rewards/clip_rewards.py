"""CLIP image-text similarity rewards: PickScore and CLIPScore (transformers ``CLIPModel``).

Both score one image against its own prompt:

    cos_i = <f(image_i), g(prompt_i)> / (|f(image_i)| |g(prompt_i)|)
    pickscore_i = scale * exp(logit_scale) * cos_i     (PickScore, Kirstain et al. 2023)
    clipscore_i = scale * cos_i                        (CLIP similarity)

Scaling choices. PickScore defaults to ``scale=1``: the raw score papers report (about 18-24
for SD-class images; exp(logit_scale) = 100 for PickScore_v1). flow_grpo divides by 26
(``scale=1/26``) so PickScore sits near 1 beside other rewards; advantages are invariant to
the scale, which only matters for logging and weighted multi-reward sums. CLIPScore defaults to
the plain cosine; ``scale=100`` gives the usual "CLIP score" metric and ``scale=2.5`` the
CLIPScore paper's w (its max(cos, 0) clamp is not applied).

Models load offline (see :mod:`flowdppo.rewards.hub`) on the first call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Reward, RewardOutput, register_reward
from .hub import LazyModel, MissingModelError, parse_dtype, resolve_model_dir
from .preprocess import ClipPreprocess, check_batch


def pooled(output: Any) -> Tensor:
    """Projected embeddings from ``get_image_features``/``get_text_features``.

    transformers 4.x returns the tensor, 5.x a model output whose ``pooler_output`` is it.
    """
    return output if isinstance(output, Tensor) else output.pooler_output


def load_clip_model(directory: Path, *, device: str, dtype: torch.dtype, reward: str):
    """A frozen, eval-mode ``CLIPModel`` from a local directory (never downloads)."""
    from transformers import CLIPModel

    try:
        model = CLIPModel.from_pretrained(str(directory), local_files_only=True)
    except OSError as err:
        raise MissingModelError(
            f"{reward}: cannot load a CLIP model from {directory}: {err}"
        ) from None
    # Cast after loading: the loading dtype keyword differs across transformers versions.
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


class ClipSimilarity(LazyModel):
    """``scale * [exp(logit_scale)] * cos(image embedding, prompt embedding)`` per image.

    Args:
        reward (`str`): registry name, used in errors.
        model (`str`): CLIP model directory or cached hub id.
        processor (`str`, *optional*): directory or hub id with the tokenizer and
            ``preprocessor_config.json``; defaults to ``model``.
        use_logit_scale (`bool`): multiply by the model's exp(logit_scale) (PickScore).
        scale (`float`): final multiplier.
        device (`str`), dtype (`str`): where and in which precision the model runs.
        batch_size (`int`): images per forward pass.
    """

    def __init__(
        self,
        *,
        reward: str,
        model: str,
        processor: str | None,
        use_logit_scale: bool,
        scale: float,
        device: str,
        dtype: str,
        batch_size: int,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"{reward}: batch_size={batch_size}; expected >= 1")
        self.reward, self.device, self.batch_size = reward, device, batch_size
        self.dtype = parse_dtype(dtype, reward=reward)
        self.use_logit_scale, self.scale = use_logit_scale, float(scale)
        self.model_dir = resolve_model_dir(model, argument="model", reward=reward)
        self.processor_dir = resolve_model_dir(
            processor or model, argument="processor", reward=reward
        )

    def _load(self) -> None:
        from transformers import AutoTokenizer

        self.model = load_clip_model(
            self.model_dir, device=self.device, dtype=self.dtype, reward=self.reward
        )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                str(self.processor_dir), local_files_only=True
            )
        except OSError as err:
            raise MissingModelError(
                f"{self.reward}: no tokenizer in {self.processor_dir}: {err}"
            ) from None
        self.preprocess = ClipPreprocess.from_dir(self.processor_dir)
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> RewardOutput:
        check_batch(images, prompts, metadata, reward=self.reward)
        self.ensure_loaded()
        scores = [
            self._score(images[i : i + self.batch_size], prompts[i : i + self.batch_size])
            for i in range(0, images.shape[0], self.batch_size)
        ]
        rewards = torch.cat(scores) if scores else torch.zeros(0)
        return rewards.to("cpu", torch.float32), {}

    def _score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """`(b, C, H, W)` images and b prompts -> `(b,)` float32 scores."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)  # (b, 3, h, w)
        tokens = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        image_embeds = pooled(self.model.get_image_features(pixel_values=pixels))  # (b, P)
        text_embeds = pooled(
            self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
        )  # (b, P)
        # float32 for the normalisation: fp16 norms lose the third decimal PickScore differs in.
        cos = (
            F.normalize(image_embeds.float(), dim=-1) * F.normalize(text_embeds.float(), dim=-1)
        ).sum(-1)
        if self.use_logit_scale:
            cos = cos * self.model.logit_scale.float().exp()
        return self.scale * cos


@register_reward("pickscore")
def pickscore(
    model: str = "yuvalkirstain/PickScore_v1",
    processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    scale: float = 1.0,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 32,
) -> Reward:
    """PickScore: ``scale * exp(logit_scale) * cos`` (raw score by default; flow_grpo: scale=1/26).

    Fetch once: ``hf download yuvalkirstain/PickScore_v1`` and, for the tokenizer and
    preprocessing only,
    ``hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K --include "*.json" "*.txt"``.
    """
    return ClipSimilarity(
        reward="pickscore",
        model=model,
        processor=processor,
        use_logit_scale=True,
        scale=scale,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
    )


@register_reward("clipscore")
def clipscore(
    model: str = "openai/clip-vit-large-patch14",
    processor: str | None = None,
    scale: float = 1.0,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 32,
) -> Reward:
    """CLIP cosine similarity times ``scale`` (100: the common CLIP score; 2.5: CLIPScore's w).

    Fetch once: ``hf download openai/clip-vit-large-patch14``.
    """
    return ClipSimilarity(
        reward="clipscore",
        model=model,
        processor=processor,
        use_logit_scale=False,
        scale=scale,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
    )
