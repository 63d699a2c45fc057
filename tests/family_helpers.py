"""Checks shared by the Qwen-Image / Z-Image / Wan adapter tests (tiny random pipelines, CPU).

The pipeline side of every comparison is the pipeline's own ``__call__`` (with its own
negative prompt and CFG convention) and its own packing helpers; the adapter side goes
through ``FlowModel`` only. A :class:`Spec` says how to call each pipeline.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from flowdppo.models.tiny import build_tiny_pipeline
from real_models_helpers import PROMPTS, SEQ, ode_sample, perturb_lora_b

REPO = Path(__file__).resolve().parent.parent
PROMPT_FILES = REPO / "examples" / "prompts"


@dataclass(frozen=True)
class Spec:
    family: str
    cls: type
    resolution: int = 64
    options: dict[str, Any] = field(default_factory=dict)  # adapter arguments
    negative: str = ""  # the adapter's default negative prompt, given to the pipeline


def tiny_pipe(spec: Spec, seed: int = 0) -> Any:
    pipe = build_tiny_pipeline(spec.family, seed=seed)
    if spec.family == "wan":  # the grid the adapter trains on (see models/wan.py)
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return pipe


def make(spec: Spec, seed: int = 0, pipe: Any = None) -> Any:
    """A fresh adapter around a fresh tiny pipeline (float32, CPU)."""
    return spec.cls.from_pipeline(pipe or tiny_pipe(spec, seed), resolution=spec.resolution,
                                  max_sequence_length=SEQ, **spec.options)


def noise_for(model: Any, batch: int, seed: int = 0) -> Tensor:
    return torch.randn((batch, *model.latent_shape), generator=torch.Generator().manual_seed(seed))


def pipeline_latents(spec: Spec, pipe: Any, noise: Tensor, num_steps: int,
                     guidance_scale: float) -> Tensor:
    """``pipe(..., output_type="latent")`` from ``noise``, in the adapter's latent layout."""
    res, cfg = spec.resolution, guidance_scale > 1.0
    common = dict(prompt=list(PROMPTS), height=res, width=res, num_inference_steps=num_steps,
                  output_type="latent", max_sequence_length=SEQ)
    negative = [spec.negative] * len(PROMPTS) if cfg else None
    if spec.family == "qwenimage":
        b, c, h, w = noise.shape
        out = pipe(latents=pipe._pack_latents(noise.clone(), b, c, h, w), negative_prompt=negative,
                   true_cfg_scale=guidance_scale, **common).images
        return pipe._unpack_latents(out, res, res, pipe.vae_scale_factor).squeeze(2)
    if spec.family == "zimage":  # the pipeline's g is our w - 1
        return pipe(latents=noise.clone(), negative_prompt=negative,
                    guidance_scale=guidance_scale - 1.0, **common).images
    return pipe(latents=noise.clone(), negative_prompt=negative, guidance_scale=guidance_scale,
                num_frames=spec.options["num_frames"], **common).frames


def pipeline_decode(spec: Spec, pipe: Any, latents: Tensor) -> Tensor:
    """The pipeline's decode of adapter-space latents, as in its ``__call__``, in [0, 1]."""
    vae = pipe.vae
    with torch.no_grad():
        if spec.family == "zimage":
            z = latents / vae.config.scaling_factor + vae.config.shift_factor
            return pipe.image_processor.postprocess(vae.decode(z)[0], output_type="pt")
        view = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(view)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(view)
        if spec.family == "qwenimage":
            z = latents.unsqueeze(2) / inv_std + mean
            image = vae.decode(z, return_dict=False)[0][:, :, 0]
            return pipe.image_processor.postprocess(image, output_type="pt")
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
        frames = pipe.video_processor.postprocess_video(video, output_type="pt")
        return frames  # (B, F, 3, H, W)


def check_ode_parity(spec: Spec, guidance_scale: float, num_steps: int = 4) -> float:
    """Our Euler loop over the adapter == the pipeline's ``__call__``; returns max |diff|."""
    model = make(spec)
    noise = noise_for(model, len(PROMPTS))
    ours = ode_sample(model, PROMPTS, noise, num_steps, guidance_scale)
    theirs = pipeline_latents(spec, model.pipe, noise, num_steps, guidance_scale)
    assert ours.dtype == torch.float32 and ours.shape == noise.shape == theirs.shape
    assert (ours - noise).abs().max() > 0.1  # the loop moved
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)
    used = model.pipe.scheduler.sigmas.to(torch.float64)
    assert torch.equal(model.sigmas(num_steps), used)  # the same grid as the pipeline
    return float((ours - theirs).abs().max())


def check_decode(spec: Spec, shape: tuple[int, ...]) -> None:
    """``decode`` == the pipeline's decode; autocast does not leak into the fp32 VAE."""
    model = make(spec)
    latents = noise_for(model, 2, seed=3)
    images = model.decode(latents)
    assert images.shape == (2, *shape) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0.01
    torch.testing.assert_close(images, pipeline_decode(spec, model.pipe, latents))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model.decode(latents), images)


def lora_modules_in(transformer: torch.nn.Module) -> set[str]:
    return {n.split(".lora_A")[0] for n, _ in transformer.named_parameters() if ".lora_A." in n}


def load_lora_cleanly(pipe: Any, directory: Path, caplog) -> None:
    """``load_lora_weights`` with no missing / unexpected keys: every exported module is
    wrapped, every wrapped module came from the file, and diffusers warned of nothing."""
    from safetensors.torch import load_file

    keys = load_file(str(directory / "pytorch_lora_weights.safetensors")).keys()
    exported = {k.removeprefix("transformer.").split(".lora_A")[0] for k in keys if ".lora_A" in k}
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        pipe.load_lora_weights(str(directory))
    assert not [r for r in caplog.records if r.name.startswith(("diffusers", "peft"))], caplog.text
    assert exported and lora_modules_in(pipe.transformer) == exported


def check_lora_roundtrip(spec: Spec, tmp_path: Path, guidance_scale: float, caplog) -> None:
    """Exported LoRA loaded by a fresh pipeline reproduces the peft-wrapped adapter's ODE."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = make(spec)
    model.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                             target_modules=list(model.lora_target_modules)))
    assert perturb_lora_b(model.transformer) > 0
    noise = noise_for(model, len(PROMPTS))
    ours = ode_sample(model, PROMPTS, noise, 3, guidance_scale)
    model.export_lora(get_peft_model_state_dict(model.transformer), tmp_path / "lora")
    fresh = tiny_pipe(spec)
    before = pipeline_latents(spec, fresh, noise, 3, guidance_scale)
    load_lora_cleanly(fresh, tmp_path / "lora", caplog)
    after = pipeline_latents(spec, fresh, noise, 3, guidance_scale)
    assert (after - before).abs().max() > 0.05
    torch.testing.assert_close(after, ours, atol=5e-5, rtol=1e-5)


class OutputGrads:
    """Per transformer call: the batch size, and the gradient of each output row (Z-Image's
    transformer takes and returns lists of per-sample tensors, the others batch tensors)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.batches: list[int] = []
        self.row_grads: dict[int, Tensor] = {}
        self._handles = [transformer.register_forward_pre_hook(self._pre, with_kwargs=True),
                         transformer.register_forward_hook(self._post)]

    def _pre(self, module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        self.batches.append(len(x))

    def _post(self, module, args, output):
        out = output[0]
        if isinstance(out, Tensor):  # one hook on the batch, split into rows
            out.register_hook(lambda g: self.row_grads.update(enumerate(g.unbind(0))))
            return
        for i, row in enumerate(out):
            row.register_hook(lambda g, i=i: self.row_grads.__setitem__(i, g))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def check_cfg_one_batch(spec: Spec, guidance_scale: float = 4.0) -> None:
    """CFG: one transformer call on 2B rows [negative, cond], the gradient reaching every
    row (both halves in the graph); w = 1: one call on B rows."""
    model = make(spec)
    model.transformer.requires_grad_(True)
    calls = OutputGrads(model.transformer)
    noise = noise_for(model, len(PROMPTS))
    cond = model.encode_prompts(PROMPTS)
    v = model.predict_velocity(noise, torch.full((2,), 0.7), cond, guidance_scale)
    v.square().sum().backward()
    assert calls.batches == [2 * len(PROMPTS)]
    assert sorted(calls.row_grads) == list(range(2 * len(PROMPTS)))
    assert all(float(g.abs().sum()) > 0 for g in calls.row_grads.values())
    model.predict_velocity(noise, torch.full((2,), 0.7), cond, 1.0)
    assert calls.batches[1:] == [len(PROMPTS)]
    calls.remove()


def check_gradient_checkpointing(spec: Spec) -> None:
    """Checkpointing on: backward runs and gives the same gradients as without it."""
    grads = []
    for checkpointing in (False, True):
        model = make(spec)
        model.transformer.requires_grad_(True)
        if checkpointing:
            model.enable_gradient_checkpointing()
            assert model.transformer.is_gradient_checkpointing
        noise = noise_for(model, 2)
        v = model.predict_velocity(noise, torch.full((2,), 0.6), model.encode_prompts(PROMPTS))
        (v * torch.linspace(-1, 1, v.numel()).view(v.shape)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.transformer.parameters()
                                if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def check_load_directory(spec: Spec, tmp_path: Path) -> None:
    """``pretrained=<dir>`` loads offline in bf16 (VAE fp32) and, in fp32, reproduces the
    saved pipeline; bf16 weights with bf16 autocast give finite velocities."""
    pipe = build_tiny_pipeline(spec.family)
    pipe.save_pretrained(tmp_path / "pipe")
    kwargs = dict(resolution=spec.resolution, max_sequence_length=SEQ, **spec.options)
    loaded = spec.cls(str(tmp_path / "pipe"), dtype="bf16", **kwargs)
    assert loaded.dtype == torch.bfloat16 and loaded.pipe.vae.dtype == torch.float32
    noise = noise_for(loaded, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = loaded.predict_velocity(noise, torch.full((2,), 0.5), loaded.encode_prompts(PROMPTS),
                                    4.0)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    loaded32 = spec.cls(str(tmp_path / "pipe"), dtype="fp32", **kwargs)
    wrapped = make(spec, pipe=pipe)
    torch.testing.assert_close(ode_sample(loaded32, PROMPTS, noise, 2, 1.0),
                               ode_sample(wrapped, PROMPTS, noise, 2, 1.0))


def train_overrides() -> list[str]:
    """Absolute prompt paths (tests may run from any directory); no weight decay."""
    return [f"prompts.train_file={PROMPT_FILES / 'train.txt'}",
            f"prompts.eval_file={PROMPT_FILES / 'eval.jsonl'}",
            "optim.weight_decay=0.0", "eval.at_start=false", "device=cpu"]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_first_update_is_on_policy(rows: list[dict]) -> None:
    """Each rollout is replayed once, first, under its sampling weights: r = 1, KL = 0."""
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float) and key != "diag_corr_logr_negkl":
                assert math.isfinite(value), (key, value)
        assert row["grad_norm"] > 0
        assert row["ratio_min"] == pytest.approx(1.0, abs=1e-5)
        assert row["ratio_max"] == pytest.approx(1.0, abs=1e-5)
        assert row["kl_old_new_max"] == pytest.approx(0.0, abs=1e-9)


def check_trained_lora(spec: Spec, trainer: Any, run: Path, caplog) -> float:
    """The run's exported LoRA loads into a fresh pipeline cleanly, changes its output and
    reproduces the trained adapter's ODE samples. Returns the change it made."""
    latest = (run / "checkpoints" / "latest").read_text().strip()
    lora_dir = run / "checkpoints" / latest / "lora"
    gs = trainer.cfg.sampling.guidance_scale
    noise = noise_for(trainer.model, len(PROMPTS))
    ours = ode_sample(trainer.model, PROMPTS, noise, 3, gs)
    fresh = tiny_pipe(spec)  # the adapter's tiny-random base (seed 0)
    base = pipeline_latents(spec, fresh, noise, 3, gs)
    load_lora_cleanly(fresh, lora_dir, caplog)
    loaded = pipeline_latents(spec, fresh, noise, 3, gs)
    change = float((loaded - base).abs().max())
    assert change > 1e-4, f"{spec.family}: the LoRA did not change the pipeline's output"
    torch.testing.assert_close(loaded, ours, atol=change * 0.02, rtol=0)
    return change


def train_tiny_recipe(spec: Spec, run: Path, extra: list[str] = ()) -> Any:
    """``configs/tiny_<family>.yaml`` through the Trainer (what ``flowdppo train`` runs)."""
    from accelerate.state import AcceleratorState

    from flowdppo.config import load_config, resolve
    from flowdppo.trainer.commands import RECIPES
    from flowdppo.trainer.loop import Trainer

    AcceleratorState._reset_state(reset_partial_state=True)  # one process-wide state
    cfg = load_config(str(RECIPES / f"tiny_{spec.family}.yaml"), [*train_overrides(), *extra])
    trainer = Trainer(resolve(cfg), run)
    trainer.run()
    return trainer


def run_recipe_with_a_tiny_model(spec: Spec, name: str, run: Path, extra: list[str] = ()) -> Any:
    """A real-model recipe as written (bf16 weights and autocast, its method, sampler, CFG,
    checkpointing), with only the weights, reward, sizes and batch shrunk: one iteration."""
    from accelerate.state import AcceleratorState

    from flowdppo.config import load_config, resolve
    from flowdppo.trainer.commands import RECIPES
    from flowdppo.trainer.loop import Trainer

    kwargs = {"resolution": spec.resolution, "max_sequence_length": SEQ, **spec.options}
    shrink = [*train_overrides(), "model.pretrained=tiny-random",
              f"model.kwargs={json.dumps(kwargs)}", "sampling.num_steps=6",
              "sampling.group_size=2", "sampling.num_groups=2", "sampling.sample_batch_size=4",
              "sampling.eval_num_steps=2", "rewards.items=[{name: jpeg_compressibility}]",
              "eval.monitors=[]", "eval.max_prompts=1", "eval.samples_per_prompt=2",
              "train.num_iterations=1", "train.micro_batch_size=4",
              "logging.progress_bar=false", "logging.tensorboard=false", *extra]
    AcceleratorState._reset_state(reset_partial_state=True)
    trainer = Trainer(resolve(load_config(str(RECIPES / f"{name}.yaml"), shrink)), run)
    assert trainer.model.dtype == torch.bfloat16
    trainer.run()
    AcceleratorState._reset_state(reset_partial_state=True)
    (row,) = read_rows(run / "metrics.jsonl")
    assert row["grad_norm"] > 0 and math.isfinite(row["grad_norm"])
    return trainer
