"""Helpers shared by the SD3 / FLUX.1 / FLUX.2 adapter tests (tiny random pipelines).

The pipeline side of every comparison goes through the pipeline's own ``__call__`` and its
static packing helpers; the adapter side goes through ``FlowModel`` only.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from flowdppo.dynamics import get_dynamics
from flowdppo.models import FlowModel
from flowdppo.models.tiny import TINY_MAX_SEQUENCE_LENGTH, TINY_RESOLUTION, build_tiny_pipeline

PROMPTS = ["a red cat", "two dogs on a beach"]
RES = TINY_RESOLUTION
SEQ = TINY_MAX_SEQUENCE_LENGTH


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Import this into a test module: the tiny models run fastest on one thread (more
    threads only spin-wait, badly so on a loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def adapter(cls, family: str, seed: int = 0):
    """A fresh adapter around a fresh tiny pipeline (float32, CPU)."""
    return cls.from_pipeline(tiny_pipe(family, seed), resolution=RES, max_sequence_length=SEQ)


class TransformerCalls:
    """Records each transformer call's batch size and guidance, and the output's gradient."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.batches: list[int] = []
        self.guidance: list[Tensor | None] = []
        self.outputs: list[Tensor] = []
        self.output_grads: list[Tensor] = []
        self._handles = [
            transformer.register_forward_pre_hook(self._pre, with_kwargs=True),
            transformer.register_forward_hook(self._post, with_kwargs=True),
        ]

    def _pre(self, module, args, kwargs):
        self.batches.append(kwargs["hidden_states"].shape[0])
        self.guidance.append(kwargs.get("guidance"))

    def _post(self, module, args, kwargs, output):
        out = output[0]
        self.outputs.append(out)
        if out.requires_grad:
            out.register_hook(self.output_grads.append)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def check_sigmas_match_pipeline(family: str, cls, num_steps: int = 6) -> Tensor:
    """``adapter.sigmas(K)`` equals the grid the pipeline's scheduler used in ``__call__``."""
    model = adapter(cls, family)
    sigmas = model.sigmas(num_steps)
    noise = noise_for(model, 1)
    pipeline_latents(family, model.pipe, PROMPTS[:1], noise, num_steps, 1.0)
    used = model.pipe.scheduler.sigmas.to(torch.float64)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (num_steps + 1,)
    assert torch.equal(sigmas, used)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and bool((sigmas.diff() < 0).all())
    return sigmas


def check_ode_parity(family: str, cls, guidance_scale: float, num_steps: int = 4) -> None:
    """minGPT-style parity: our Euler loop over the adapter == the pipeline's ``__call__``."""
    model = adapter(cls, family)
    noise = noise_for(model, len(PROMPTS))
    ours = ode_sample(model, PROMPTS, noise, num_steps, guidance_scale)
    theirs = pipeline_latents(family, model.pipe, PROMPTS, noise, num_steps, guidance_scale)
    assert ours.dtype == torch.float32 and ours.shape == noise.shape
    assert (ours - noise).abs().max() > 0.1  # the loop moved
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def check_decode(family: str, cls) -> None:
    """``decode`` == the pipeline's decode; autocast does not leak into the fp32 VAE."""
    model = adapter(cls, family)
    latents = noise_for(model, 2, seed=3)
    images = model.decode(latents)
    assert images.shape == (2, 3, RES, RES) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0.01
    torch.testing.assert_close(images, pipeline_images(model.pipe, latents, family))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model.decode(latents), images)


def check_lora_roundtrip(family: str, cls, tmp_path, guidance_scale: float) -> None:
    """Exported LoRA loaded by a fresh pipeline reproduces the peft-wrapped adapter's ODE."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = adapter(cls, family)
    # alpha != r: a lost lora_alpha would change the scale and break the match below
    model.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                             target_modules=list(model.lora_target_modules)))
    assert perturb_lora_b(model.transformer) > 0
    noise = noise_for(model, len(PROMPTS))
    ours = ode_sample(model, PROMPTS, noise, 3, guidance_scale)
    path = model.export_lora(get_peft_model_state_dict(model.transformer), tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors" and path.is_file()

    fresh = tiny_pipe(family)
    before = pipeline_latents(family, fresh, PROMPTS, noise, 3, guidance_scale)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    after = pipeline_latents(family, fresh, PROMPTS, noise, 3, guidance_scale)
    assert (after - before).abs().max() > 0.1
    torch.testing.assert_close(after, ours, atol=5e-5, rtol=1e-5)


def velocity_loss(model: FlowModel, guidance_scale: float, seed: int = 0):
    """``L = sum(v * r)`` for random ``r`` (so dL/dv = r) at t = 0.7; returns (L, r)."""
    noise = noise_for(model, len(PROMPTS), seed=seed)
    cond = model.encode_prompts(PROMPTS)
    v = model.predict_velocity(noise, torch.full((len(PROMPTS),), 0.7), cond, guidance_scale)
    r = torch.randn(v.shape, generator=torch.Generator().manual_seed(seed + 1))
    return (v * r).sum(), r


def check_cfg_graph(family: str, cls, guidance_scale: float = 4.0) -> None:
    """CFG: one transformer call on 2B rows; dL/d(uncond half) = (1-w) r, d(cond half) = w r
    in norm (both halves in the graph); guidance 1 runs one call on B rows."""
    model = adapter(cls, family)
    model.transformer.requires_grad_(True)
    calls = TransformerCalls(model.transformer)
    loss, r = velocity_loss(model, guidance_scale)
    loss.backward()
    batch = len(PROMPTS)
    assert calls.batches == [2 * batch]
    uncond, cond = calls.output_grads[0].chunk(2)
    torch.testing.assert_close(uncond.norm(), abs(1 - guidance_scale) * r.norm())
    torch.testing.assert_close(cond.norm(), guidance_scale * r.norm())
    grads = [p.grad for p in model.transformer.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    velocity_loss(model, 1.0)
    assert calls.batches[1:] == [batch]
    calls.remove()


def check_gradient_checkpointing(family: str, cls) -> None:
    """Checkpointing on: backward runs and gives the same gradients as without it."""
    grads = []
    for checkpointing in (False, True):
        model = adapter(cls, family)
        model.transformer.requires_grad_(True)
        if checkpointing:
            model.enable_gradient_checkpointing()
            assert model.transformer.is_gradient_checkpointing
        loss, _ = velocity_loss(model, 1.0)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.transformer.parameters()
                                if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def check_peft_autocast(family: str, cls) -> None:
    """With a peft LoRA (fp32 adapter weights) and under bf16 autocast: finite, close to fp32."""
    from peft import LoraConfig

    model = adapter(cls, family)
    model.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                             target_modules=list(model.lora_target_modules)))
    perturb_lora_b(model.transformer, scale=0.1)
    noise = noise_for(model, 2)
    cond = model.encode_prompts(PROMPTS)
    t = torch.full((2,), 0.5)
    v32 = model.predict_velocity(noise, t, cond, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v16 = model.predict_velocity(noise, t, cond, 1.0)
    assert v16.dtype == torch.float32 and torch.isfinite(v16).all()
    assert (v16 - v32).norm() / v32.norm() < 0.05


def check_prompt_cache(family: str, cls) -> None:
    """Each distinct prompt is encoded once (one batched call); rows equal the pipeline's
    own ``encode_prompt`` of that prompt alone."""
    model = adapter(cls, family)
    calls: list[list[str]] = []
    original = model.pipe.encode_prompt

    def counting(*args, **kwargs):
        calls.append(list(kwargs["prompt"]))
        return original(*args, **kwargs)

    model.pipe.encode_prompt = counting
    cond = model.encode_prompts([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    model.encode_prompts(PROMPTS)
    assert calls == [PROMPTS]
    assert len(cond) == 3
    single = cls.from_pipeline(model.pipe, resolution=RES, max_sequence_length=SEQ)
    alone = single.encode_prompts([PROMPTS[1]])
    for name, value in cond.tensors.items():
        torch.testing.assert_close(value[1], alone.tensors[name][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(value[0], value[2])
    assert all(not v.requires_grad for v in cond.tensors.values())


def check_load_directory(family: str, cls, tmp_path) -> None:
    """``pretrained=<dir>`` loads offline with bf16 weights and an fp32 VAE; in fp32 it
    reproduces the saved pipeline."""
    pipe = tiny_pipe(family)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = cls(str(tmp_path / "pipe"), dtype="bf16", resolution=RES, max_sequence_length=SEQ)
    assert loaded.pipe.transformer.dtype == torch.bfloat16 and loaded.dtype == torch.bfloat16
    assert loaded.pipe.vae.dtype == torch.float32
    loaded32 = cls(str(tmp_path / "pipe"), dtype="fp32", resolution=RES, max_sequence_length=SEQ)
    wrapped = cls.from_pipeline(pipe, resolution=RES, max_sequence_length=SEQ)
    noise = noise_for(wrapped, 2)
    torch.testing.assert_close(ode_sample(loaded32, PROMPTS, noise, 2, 1.0),
                               ode_sample(wrapped, PROMPTS, noise, 2, 1.0))


def check_errors(family: str, cls) -> None:
    """Bad dtype, missing local path, uncached hub id, wrong pipeline, bad shapes."""
    with pytest.raises(ValueError, match=r"dtype='fp8'.*bf16"):
        cls("tiny-random", dtype="fp8")
    with pytest.raises(FileNotFoundError, match="/no/such/model"):
        cls("/no/such/model")
    with pytest.raises(FileNotFoundError, match="hf download flowdppo-test/nope"):
        cls("flowdppo-test/nope")
    other = "flux" if family != "flux" else "sd3"
    with pytest.raises(ValueError, match=cls.pipeline_class_name):
        cls.from_pipeline(tiny_pipe(other), resolution=RES)
    with pytest.raises(ValueError, match="resolution`=60"):
        cls.from_pipeline(tiny_pipe(family), resolution=60)
    with pytest.raises(ValueError, match="unknown arguments"):
        cls.from_pipeline(tiny_pipe(family), resolution=RES, frobnicate=1)
    model = adapter(cls, family)
    cond = model.encode_prompts(PROMPTS)
    bad = torch.zeros(2, *model.latent_shape[:-1], model.latent_shape[-1] + 2)
    with pytest.raises(ValueError, match="x_t has shape"):
        model.predict_velocity(bad, torch.ones(2), cond)
    with pytest.raises(ValueError, match="non-empty list"):
        model.encode_prompts("a cat")
