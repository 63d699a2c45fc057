"""What the diffusers adapters (SD3, FLUX.1, FLUX.2) share: dtype parsing, checked offline
loading (the checks live in :mod:`.pipeline_checks`), the prompt-embedding cache, the
sampling grid from a scheduler, LoRA export, and the adapter life cycle
(:class:`DiffusersFlowModel`).

A family adapter supplies small hooks: ``_encode_batch`` (the pipeline's own
``encode_prompt``), ``_forward`` (one transformer call, CFG included), ``_to_vae_latents``
(undo the latent normalisation), ``_schedule_kwargs`` (the pipeline's shift arguments),
``_prepare_latents`` (the pipeline's own initial noise) and, where the transformer limits
the image size, ``_resolution_rule``. Diffusers is imported lazily so importing flowdppo stays fast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ModelLoadError
from .base import Conditioning, FlowModel
from .pipeline_checks import (
    check_pipeline_class,
    check_resolution,
    family_for_pipeline,
    load_pipeline,
    locate_pipeline,
    read_component_config,
    vae_scale_factor,
)
from .prompt_cache import PromptCache

logger = logging.getLogger(__name__)

TINY = "tiny-random"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def parse_dtype(value: str | torch.dtype, name: str = "dtype") -> torch.dtype:
    """``"fp32" | "bf16" | "fp16"`` (or a torch dtype among them) as a torch dtype."""
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise ValueError(f"{name}={value!r}: expected one of {sorted(DTYPES)}")


def scheduler_sigmas(scheduler: Any, num_steps: int, **kwargs: Any) -> Tensor:
    """The grid ``t_0 = 1 > ... > t_K = 0`` a fresh copy of ``scheduler`` uses for ``num_steps``.

    ``kwargs`` go to ``set_timesteps`` as the pipeline passes them (``sigmas``, ``mu``).
    Returns a float64 tensor of shape `(num_steps + 1,)` on the CPU.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: need at least 1 sampling step")
    fresh = type(scheduler).from_config(scheduler.config)  # leave the pipeline's state alone
    fresh.set_timesteps(num_steps, device="cpu", **kwargs)
    sigmas = fresh.sigmas.to(torch.float64).cpu()
    if sigmas.shape != (num_steps + 1,) or float(sigmas[-1]) != 0.0:
        raise ValueError(f"{type(scheduler).__name__} gave sigmas of shape {tuple(sigmas.shape)} "
                         f"ending at {float(sigmas[-1])}; expected ({num_steps + 1},) ending at 0")
    return sigmas


def unwrap_module(module: nn.Module) -> nn.Module:
    """The module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def export_transformer_lora(pipeline_cls: type, transformer: nn.Module,
                            lora_state_dict: dict[str, Tensor], directory: str | Path) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` with ``pipeline_cls.save_lora_weights``.

    ``lora_state_dict`` is peft's ``get_peft_model_state_dict(transformer)`` (keys such as
    ``transformer_blocks.0.attn.to_q.lora_A.weight``: already the format diffusers' LoRA
    loaders read; a ``base_model.model.`` prefix from ``peft.get_peft_model`` is removed).
    The adapter's LoraConfig is stored as metadata so ``load_lora_weights`` restores
    ``lora_alpha`` (without it diffusers assumes alpha = r and the scale would be wrong).
    """
    if not lora_state_dict:
        raise ValueError("lora_state_dict is empty: pass get_peft_model_state_dict(transformer) "
                         "of a transformer with a LoRA adapter")
    prefix = "base_model.model."
    weights = {k.removeprefix(prefix): v.detach().to("cpu").contiguous()
               for k, v in lora_state_dict.items()}
    configs = getattr(unwrap_module(transformer), "peft_config", None) or {}
    config = configs.get("default") or (next(iter(configs.values())) if configs else None)
    if config is None:
        logger.warning("transformer has no peft_config: LoRA exported without metadata "
                       "(loaders will assume lora_alpha = r)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipeline_cls.save_lora_weights(
        str(directory), transformer_lora_layers=weights,
        transformer_lora_adapter_metadata=config.to_dict() if config is not None else None,
    )
    return directory / LORA_WEIGHT_NAME


def flux_timestep(t: Tensor, dtype: torch.dtype) -> Tensor:
    """The FLUX transformers' timestep for times ``t`` in [0, 1].

    They take ``t`` itself (and multiply by 1000 inside); the pipelines first round the
    scheduler's 0-1000 value to the latents' dtype and divide by 1000, which we mirror so
    bf16 runs see the same timestep embedding as the pipeline.
    """
    return (t * 1000.0).to(dtype) / 1000.0


class DiffusersFlowModel(FlowModel):
    """Shared life cycle of the diffusers adapters; a family subclass adds the hooks.

    Args:
        pretrained (`str`, defaults to ``"tiny-random"``): a local pipeline directory, a hub
            id in the local Hugging Face cache, or ``"tiny-random"`` (a random pipeline from
            :mod:`flowdppo.models.tiny`, built in-process).
        dtype (`str`, defaults to ``"bf16"``): transformer and text-encoder weights.
        vae_dtype (`str`, defaults to ``"fp32"``): VAE weights (decode runs in this dtype).
        resolution (`int`, *optional*): image side in pixels; 512 (64 for tiny-random).
        max_sequence_length (`int`, *optional*): text tokens; the pipeline's default (32 for
            tiny-random).
        device (`str`, defaults to ``"cpu"``): where every component lives.
        seed (`int`, defaults to 0): weights of ``"tiny-random"``.
        allow_download (`bool`, defaults to False): let ``from_pretrained`` download a hub id
            missing from the cache (never when ``HF_HUB_OFFLINE=1``).
        cache_dir (`str`, *optional*): Hugging Face cache to look in (default: the HF one).
        text_encoder_device (`str`, *optional*): put the text encoders elsewhere (e.g. "cpu"
            to save accelerator memory; prompts are encoded once and cached).
        prompt_cache_size (`int`, defaults to 256): prompts whose encodings are kept.
        **options: family-specific arguments (see the subclass).
    """

    family: ClassVar[str] = ""
    pipeline_class_name: ClassVar[str] = ""
    default_max_sequence_length: ClassVar[int] = 512
    # The pipeline's own ``__call__`` defaults (what `flowdppo sample --lora` uses).
    default_num_steps: ClassVar[int] = 28
    default_guidance_scale: ClassVar[float] = 1.0

    def __init__(self, pretrained: str = TINY, *, dtype: str | torch.dtype = "bf16",
                 vae_dtype: str | torch.dtype = "fp32", resolution: int | None = None,
                 max_sequence_length: int | None = None, device: str | torch.device = "cpu",
                 seed: int = 0, allow_download: bool = False, cache_dir: str | None = None,
                 text_encoder_device: str | torch.device | None = None,
                 prompt_cache_size: int = 256, **options: Any) -> None:
        weights, vae_weights = parse_dtype(dtype), parse_dtype(vae_dtype, "vae_dtype")
        if pretrained == TINY:
            from .tiny import TINY_MAX_SEQUENCE_LENGTH, TINY_RESOLUTION, build_tiny_pipeline

            pipe = build_tiny_pipeline(self.family, seed)  # float32
            for name, component in pipe.components.items():
                wanted = vae_weights if name == "vae" else weights
                if isinstance(component, nn.Module) and wanted != torch.float32:
                    component.to(dtype=wanted)
            resolution = resolution or TINY_RESOLUTION
            max_sequence_length = max_sequence_length or TINY_MAX_SEQUENCE_LENGTH
        else:
            self.check_pretrained(pretrained, resolution=resolution,
                                  allow_download=allow_download, cache_dir=cache_dir)
            pipe = load_pipeline(self.pipeline_class(), pretrained, dtype=weights,
                                 vae_dtype=vae_weights, allow_download=allow_download,
                                 cache_dir=cache_dir)
        pipe.to(device)
        for name, component in pipe.components.items():
            if (text_encoder_device is not None and name.startswith("text_encoder")
                    and component is not None):
                component.to(text_encoder_device)
        pipe.set_progress_bar_config(disable=True)
        self._setup(pipe, resolution or 512, max_sequence_length, prompt_cache_size, options)

    @classmethod
    def check_pretrained(cls, pretrained: str, *, resolution: int | None = None,
                         allow_download: bool = False, cache_dir: str | None = None,
                         missing_ok: bool = False, **_: Any) -> None:
        """The checks that need no weights, run before any loads (``config/validate.py`` too).

        The folder (or cached hub snapshot) exists, its ``model_index.json`` names this
        family's pipeline, and the transformer's config takes ``resolution``. A hub id not
        on disk yet is left to the loader with ``missing_ok`` (validation) or when it may be
        downloaded. Other keyword arguments (the rest of ``model.kwargs``) are ignored.

        Raises:
            ModelLoadError / ModelNotFoundError: naming the key to change.
        """
        if pretrained == TINY:
            return
        folder = locate_pipeline(pretrained, allow_download=allow_download, cache_dir=cache_dir,
                                 missing_ok=missing_ok)
        if folder is None:
            return
        check_pipeline_class(folder, pretrained, cls.family, cls.pipeline_class_name)
        transformer = read_component_config(folder, "transformer")
        if transformer is not None:
            factor = vae_scale_factor(read_component_config(folder, "vae"))
            cls._check_resolution(resolution or 512, transformer, factor)

    @classmethod
    def pipeline_class(cls) -> type:
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    @classmethod
    def from_pipeline(cls, pipe: Any, *, resolution: int = 512,
                      max_sequence_length: int | None = None, prompt_cache_size: int = 256,
                      **options: Any) -> DiffusersFlowModel:
        """Wrap an existing pipeline (its weights, dtypes and device are used as they are)."""
        model = cls.__new__(cls)
        model._setup(pipe, resolution, max_sequence_length, prompt_cache_size, options)
        return model

    def _setup(self, pipe: Any, resolution: int, max_sequence_length: int | None,
               prompt_cache_size: int, options: dict[str, Any]) -> None:
        if not isinstance(pipe, self.pipeline_class()):
            found = type(pipe).__name__
            other = family_for_pipeline(found)
            hint = f"; use `model.name={other}`" if other else ""
            raise ModelLoadError(f"{type(self).__name__} wraps a {self.pipeline_class_name}; got "
                                 f"{found}{hint}")
        self.pipe = pipe
        self.transformer = pipe.transformer
        # Recorded now: the trainer may wrap the transformer (DDP, compile) later.
        self._weight_dtype = pipe.transformer.dtype
        self._text_device = pipe.transformer.device
        for name, component in pipe.components.items():
            if name != "transformer" and isinstance(component, nn.Module):
                component.requires_grad_(False).eval()  # frozen, never in the graph
            if name.startswith("text_encoder") and isinstance(component, nn.Module):
                self._text_device = next(component.parameters()).device
        self.resolution = int(resolution)
        self.max_sequence_length = int(max_sequence_length or self.default_max_sequence_length)
        self._cache = PromptCache(prompt_cache_size)
        self._negative: Conditioning | None = None
        self._init_family(**options)
        # Video pipelines name their spatial factor apart from the temporal one.
        factor = getattr(pipe, "vae_scale_factor", None) or pipe.vae_scale_factor_spatial
        self._check_resolution(self.resolution, pipe.transformer.config, factor)
        self.latent_shape = self._latent_shape(self.resolution)

    def _init_family(self, **options: Any) -> None:
        """Family-specific set-up; the base rejects unknown options."""
        if options:
            raise ValueError(f"{type(self).__name__}: unknown arguments {sorted(options)}")

    @classmethod
    def _check_resolution(cls, resolution: int, transformer_config: Any, vae_factor: int) -> None:
        multiple, largest, why = cls._resolution_rule(transformer_config, vae_factor)
        check_resolution(resolution, family=cls.family, multiple=multiple, largest=largest,
                         why_largest=why)

    @classmethod
    def _resolution_rule(cls, transformer_config: Any, vae_factor: int
                         ) -> tuple[int, int | None, str]:
        """(pixel multiple, largest side or None, where the largest comes from) for a
        transformer config (a dict or diffusers' FrozenDict) and the VAE's spatial factor."""
        return 2 * vae_factor, None, ""  # 2x2 latent packing, rotary positions: no upper bound

    # -- prompts -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Encode with the pipeline's ``encode_prompt``, once per distinct prompt (cached).

        Returns:
            `Conditioning` of length ``len(prompts)`` on the model's device (see the family
            for the tensor names).
        """
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of strings; got {prompts!r}")
        rows = self._cache.rows(list(prompts), self._encode_batch)
        device = self.device
        return Conditioning({k: torch.stack([r[k] for r in rows]).to(device) for k in rows[0]})

    def clear_prompt_cache(self) -> None:
        """Forget cached encodings (after a text encoder's weights change)."""
        self._cache.clear()
        self._negative = None

    def _negative_rows(self, batch: int) -> dict[str, Tensor]:
        """The empty prompt's encoding (the pipelines' default negative), ``batch`` rows."""
        if self._negative is None:
            self._negative = self.encode_prompts([""])
        return {k: v.expand(batch, *v.shape[1:]) for k, v in self._negative.tensors.items()}

    # -- flow ----------------------------------------------------------------------------
    def predict_velocity(self, x_t: Tensor, t: Tensor, cond: Conditioning,
                         guidance_scale: float = 1.0) -> Tensor:
        batch = x_t.shape[0]
        if tuple(x_t.shape[1:]) != tuple(self.latent_shape):
            raise ValueError(f"x_t has shape {tuple(x_t.shape)}; expected (B, "
                             f"{', '.join(map(str, self.latent_shape))}) at resolution "
                             f"{self.resolution}")
        if t.shape != (batch,) or len(cond) != batch:
            raise ValueError(f"t has shape {tuple(t.shape)} and cond {len(cond)} rows; expected "
                             f"({batch},) and {batch} (one per sample)")
        device, dtype = x_t.device, self._weight_dtype
        tensors = {k: v.to(device, dtype) for k, v in cond.tensors.items()}
        v = self._forward(x_t.to(dtype), t.to(device, torch.float32), tensors,
                          float(guidance_scale))
        return v.float()

    def _guided(self, run: Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor], x: Tensor,
                t: Tensor, tensors: dict[str, Tensor], guidance_scale: float,
                use_cfg: bool) -> Tensor:
        """``run`` once, or CFG with [uncond, cond] in ONE batch, both halves in the graph:
        ``v = v_u + w (v_c - v_u)``."""
        if not use_cfg:
            return run(x, t, tensors)
        negative = self._negative_rows(x.shape[0])
        both = {k: torch.cat([negative[k].to(v.dtype), v]) for k, v in tensors.items()}
        v_uncond, v_cond = run(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    def _to_vae_latents(self, latents: Tensor) -> Tensor:
        """Undo the latent normalisation (SD3 / FLUX.1: scaling and shift factors)."""
        config = self.pipe.vae.config
        return latents / config.scaling_factor + config.shift_factor

    def decode(self, latents: Tensor) -> Tensor:
        """VAE decode in the VAE's dtype (autocast off); images `(B, 3, H, W)` in [0, 1]."""
        vae = self.pipe.vae
        with torch.autocast(latents.device.type, enabled=False):
            z = self._to_vae_latents(latents.to(vae.device, torch.float32)).to(vae.dtype)
            images = vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0.0, 1.0)

    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Latents from the pipeline's own ``prepare_latents``, in the adapter's layout, float32.

        With ``generator = torch.Generator(device).manual_seed(s)`` this is the noise
        ``pipe(..., generator=torch.Generator(device).manual_seed(s))`` starts from (drawn in
        the weights' dtype, as the pipeline does), so its images can be reproduced there.
        """
        return self._prepare_latents(batch_size, generator).float()

    def save_pretrained(self, directory: str | Path) -> Path:
        """The whole pipeline as a diffusers folder that ``<Pipeline>.from_pretrained`` loads."""
        self.pipe.save_pretrained(str(directory))
        return Path(directory)

    def sigmas(self, num_steps: int) -> Tensor:
        return scheduler_sigmas(self.pipe.scheduler, num_steps, **self._schedule_kwargs(num_steps))

    def export_lora(self, lora_state_dict: dict[str, Tensor], directory: str | Path) -> Path:
        return export_transformer_lora(self.pipeline_class(), self.transformer, lora_state_dict,
                                       directory)

    # -- family hooks --------------------------------------------------------------------
    def _latent_shape(self, resolution: int) -> tuple[int, int, int]:
        raise NotImplementedError

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    def _prepare_latents(self, batch: int, generator: torch.Generator | None) -> Tensor:
        """Default: standard normal latents in the adapter's layout, drawn in the weights'
        dtype (what diffusers' ``randn_tensor`` does for an unpacked latent); families whose
        pipeline packs or orders its noise otherwise override this."""
        return torch.randn((batch, *self.latent_shape), generator=generator, device=self.device,
                           dtype=self._weight_dtype)

    def _forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor],
                 guidance_scale: float) -> Tensor:
        raise NotImplementedError

    def _schedule_kwargs(self, num_steps: int) -> dict[str, Any]:
        raise NotImplementedError
