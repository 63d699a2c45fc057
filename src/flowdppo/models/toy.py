"""The toy adapter: a tiny diffusers SD3 transformer in pixel space plus a word-embedding
text encoder, small enough to pretrain and RL-fine-tune on a laptop CPU.

There is no VAE: the latent is the image in [-1, 1], shape ``(C, H, W)``. The text encoder
maps each word of the prompt vocabulary (and its position) to a vector; it is frozen
outside pretraining and its encodings are cached by prompt string. Words outside the
vocabulary raise a ValueError (no ``<unk>`` token: a silent fallback would hide typos).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .base import Conditioning, FlowModel, register_model

PAD = "<pad>"
_WORD = re.compile(r"[a-z0-9]+")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONFIG_NAME = "toy_config.json"
TEXT_ENCODER_NAME = "text_encoder.safetensors"


def model_timestep(t: Tensor) -> Tensor:
    """The SD3 transformer's timestep (0-1000) for times ``t`` in [0, 1]."""
    return t * 1000.0


def tokenize_words(prompt: str) -> list[str]:
    """Lower-cased alphanumeric words of ``prompt`` (punctuation dropped)."""
    return _WORD.findall(prompt.lower())


class ToyTextEncoder(nn.Module):
    """Word + position embeddings.

    ``forward(ids)`` with ids `(B, L)` long returns ``prompt_embeds`` `(B, L, text_dim)` and
    ``pooled_prompt_embeds`` `(B, text_dim)` (mean of the non-padding word embeddings).
    """

    def __init__(self, vocab_size: int, max_length: int, text_dim: int) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab_size, text_dim)
        self.positions = nn.Parameter(torch.randn(max_length, text_dim) * 0.02)
        self.norm = nn.LayerNorm(text_dim)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        words = self.words(ids)  # (B, L, text_dim)
        mask = (ids != 0).unsqueeze(-1).to(words.dtype)  # id 0 is <pad>
        pooled = (words * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.norm(words + self.positions[: ids.shape[1]]), pooled


class ToyFlowModel(FlowModel):
    """Tiny text-to-image flow model (see the module docstring).

    Args:
        transformer (`SD3Transformer2DModel`): the denoiser in pixel space.
        text_encoder (`ToyTextEncoder`): frozen word encoder.
        vocab (`list[str]`): the words; index 0 must be ``<pad>``.
        max_length (`int`): prompt length in words (prompts are padded to it).
        shift (`float`, defaults to 1.0): SD3 time shift of the sampling grid.
    """

    lora_target_modules = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    )

    def __init__(self, transformer: nn.Module, text_encoder: ToyTextEncoder, vocab: Sequence[str],
                 max_length: int, shift: float = 1.0) -> None:
        if not vocab or vocab[0] != PAD:
            raise ValueError(f"vocab must start with {PAD!r}; got {list(vocab[:3])}")
        self.transformer = transformer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.vocab = list(vocab)
        self.word_ids = {w: i for i, w in enumerate(self.vocab)}
        self.max_length = max_length
        self.shift = float(shift)
        cfg = transformer.config
        self.latent_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self.image_channels = cfg.in_channels
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    @classmethod
    def create(cls, vocab: Sequence[str], *, sample_size: int = 8, channels: int = 1,
               num_layers: int = 4, num_heads: int = 4, head_dim: int = 32, text_dim: int = 64,
               max_length: int = 12, shift: float = 1.0, seed: int = 0) -> ToyFlowModel:
        """A randomly initialised model (seeded); ``vocab`` without ``<pad>`` gets it prepended."""
        from diffusers import SD3Transformer2DModel

        vocab = list(vocab) if vocab and vocab[0] == PAD else [PAD, *vocab]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = SD3Transformer2DModel(
                sample_size=sample_size, patch_size=2, in_channels=channels, out_channels=channels,
                num_layers=num_layers, attention_head_dim=head_dim, num_attention_heads=num_heads,
                joint_attention_dim=text_dim, caption_projection_dim=num_heads * head_dim,
                pooled_projection_dim=text_dim, pos_embed_max_size=sample_size // 2)
            text_encoder = ToyTextEncoder(len(vocab), max_length, text_dim)
        return cls(transformer, text_encoder, vocab, max_length, shift)

    # -- prompts -------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Word ids of shape `(B, max_length)`, long, padded with 0."""
        ids = torch.zeros((len(prompts), self.max_length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = tokenize_words(prompt)
            if not 0 < len(words) <= self.max_length:
                raise ValueError(f"prompt {prompt!r} has {len(words)} words; the toy model takes "
                                 f"1 to {self.max_length}")
            for col, word in enumerate(words):
                if word not in self.word_ids:
                    raise ValueError(f"prompt {prompt!r}: word {word!r} is not in the toy model's "
                                     f"vocabulary of {len(self.vocab) - 1} words; use prompts of "
                                     "its world (see `vocab` in toy_config.json)")
                ids[row, col] = self.word_ids[word]
        return ids

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            embeds, pooled = self.text_encoder(self.tokenize(missing).to(self.device))
            for i, prompt in enumerate(missing):
                self._cache[prompt] = (embeds[i].to(self.dtype), pooled[i].to(self.dtype))
        rows = [self._cache[p] for p in prompts]
        return Conditioning({"prompt_embeds": torch.stack([r[0] for r in rows]),
                             "pooled_prompt_embeds": torch.stack([r[1] for r in rows])})

    def clear_prompt_cache(self) -> None:
        """Forget cached encodings (after the text encoder's weights change)."""
        self._cache.clear()

    # -- flow ----------------------------------------------------------------------------
    def predict_velocity(self, x_t: Tensor, t: Tensor, cond: Conditioning,
                         guidance_scale: float = 1.0) -> Tensor:
        if guidance_scale != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale}: the toy model has no "
                             "unconditional branch; use 1.0")
        dtype = self.dtype
        out = self.transformer(
            hidden_states=x_t.to(dtype),
            encoder_hidden_states=cond.tensors["prompt_embeds"].to(dtype),
            pooled_projections=cond.tensors["pooled_prompt_embeds"].to(dtype),
            timestep=model_timestep(t.to(x_t.device, torch.float32)).to(dtype),
            return_dict=False,
        )[0]
        return out.float()

    def decode(self, latents: Tensor) -> Tensor:
        return ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def sigmas(self, num_steps: int) -> Tensor:
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps}: need at least 1 sampling step")
        s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
        # SD3 shift: spends more steps at high noise when shift > 1.
        return self.shift * s / (1.0 + (self.shift - 1.0) * s)

    # -- I/O -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``transformer/`` (diffusers layout), the text encoder and ``toy_config.json``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(directory / "transformer")
        state = {k: v.detach().contiguous() for k, v in self.text_encoder.state_dict().items()}
        save_file(state, str(directory / TEXT_ENCODER_NAME))
        config = {"vocab": self.vocab, "max_length": self.max_length, "shift": self.shift,
                  "text_dim": self.text_encoder.words.embedding_dim}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=1))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | str = torch.float32,
                        device: str | torch.device = "cpu") -> ToyFlowModel:
        from diffusers import SD3Transformer2DModel
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise ValueError(f"{directory}: no {CONFIG_NAME}; give a directory written by "
                             "ToyFlowModel.save_pretrained or builtin:<world>")
        dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        config = json.loads((directory / CONFIG_NAME).read_text())
        transformer = SD3Transformer2DModel.from_pretrained(directory / "transformer",
                                                            torch_dtype=dtype)
        text_encoder = ToyTextEncoder(len(config["vocab"]), config["max_length"],
                                      config["text_dim"])
        text_encoder.load_state_dict(load_file(str(directory / TEXT_ENCODER_NAME)))
        model = cls(transformer.to(device), text_encoder.to(device), config["vocab"],
                    config["max_length"], config["shift"])
        return model

    def export_lora(self, lora_state_dict: dict[str, Tensor], directory: str | Path) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` as ``StableDiffusion3Pipeline`` saves it:
        keys prefixed ``transformer.``, the peft config (rank, alpha, targets) as metadata."""
        from diffusers.loaders import SD3LoraLoaderMixin

        inner = self.transformer
        while hasattr(inner, "module") or hasattr(inner, "_orig_mod"):  # DDP / compile
            inner = getattr(inner, "module", None) or inner._orig_mod
        peft_config = getattr(inner, "peft_config", {}).get("default")
        if peft_config is None:
            raise ValueError("export_lora: the transformer has no LoRA adapter named 'default'")
        metadata = peft_config.to_dict()
        SD3LoraLoaderMixin.save_lora_weights(
            directory, transformer_lora_layers={k: v.detach().cpu().contiguous()
                                                for k, v in lora_state_dict.items()},
            transformer_lora_adapter_metadata=metadata)
        return Path(directory) / "pytorch_lora_weights.safetensors"


@register_model("toy")
def build_toy(pretrained: str | None = None, dtype: str = "fp32", device: str = "cpu",
              **kwargs: Any) -> ToyFlowModel:
    """The toy adapter from a saved directory, or a random one (``pretrained`` None or
    ``"tiny-random"``; then ``kwargs`` are `ToyFlowModel.create`'s and ``vocab`` is required)."""
    if dtype not in _DTYPES:
        raise ValueError(f"`model.dtype`={dtype!r}: expected one of {sorted(_DTYPES)}")
    if pretrained in (None, "tiny-random"):
        if "vocab" not in kwargs:
            raise ValueError("a random toy model needs `model.kwargs.vocab` (a list of words); "
                             "or set `model.pretrained` to builtin:digits")
        model = ToyFlowModel.create(**kwargs)
        model.transformer.to(device=device, dtype=_DTYPES[dtype])
        model.text_encoder.to(device)
        return model
    if kwargs:
        raise ValueError(f"`model.kwargs` {sorted(kwargs)}: a pretrained toy model takes none")
    return ToyFlowModel.from_pretrained(pretrained, dtype=_DTYPES[dtype], device=device)
