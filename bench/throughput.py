"""Throughput of one Flow-DPPO iteration on SD3.5-Medium / FLUX.1-dev-sized transformers.

Random weights from the published configs, no downloads. Times per sample, for eager or
compiled and with or without gradient checkpointing: a no-grad forward, a rollout, an
update (LoRA forward + DPPO loss + backward + AdamW step through the trainer's replay code)
and a full iteration, then compares the iteration with the floor built from the primitives
and with issue 6's H100 floor. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowdppo.algorithms import get_algorithm
from flowdppo.config import LoraConfig
from flowdppo.dynamics import get_dynamics
from flowdppo.models import Conditioning, FlowModel
from flowdppo.trainer.policy import apply_trainable, trainable_named_parameters, unwrap
from flowdppo.trainer.rollout import NoiseSource, sample_rollout
from flowdppo.trainer.update import Entries, accumulate_gradients, likelihood_batch

# Issue 6, measured on an H100 (SD3.5-M, bf16, 512 px, 333 tokens, batch 16), ms/sample.
ISSUE_H100 = {"eager": {"forward_ms": 9.5, "update_ms": 25.8},
              "compiled": {"forward_ms": 5.3, "update_ms": 14.4}}
# LoRA targets: the attention projections (flow_grpo's SD3.5 set; FLUX blocks share the names).
_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
         "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")


@dataclass(frozen=True)
class Recipe:
    """One iteration: K rollout forwards, R no-grad replays, U update passes x S trained steps."""

    num_steps: int = 10
    num_replays: int = 3
    num_updates: int = 2
    trained_steps: int = 3


def floor_ms(forward_ms: float, update_ms: float, recipe: Recipe) -> float:
    """``(K + R) * forward + U * S * update``: the iteration if nothing else cost time."""
    forwards = recipe.num_steps + recipe.num_replays
    return forwards * forward_ms + recipe.num_updates * recipe.trained_steps * update_ms


@dataclass(frozen=True)
class Preset:
    """A transformer family's config (diffusers kwargs) and the benchmark defaults."""

    family: str  # "sd3" or "flux"
    config: dict[str, Any]
    batch: int
    resolution: int
    text_tokens: int
    lora_rank: int


PRESETS = {
    # stabilityai/stable-diffusion-3.5-medium transformer/config.json (2.5B parameters).
    "sd35m": Preset("sd3", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"), 16, 512, 333, 32),
    # black-forest-labs/FLUX.1-dev transformer/config.json (12B parameters); paper: LoRA r64.
    "flux1": Preset("flux", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56)), 16, 512, 512, 64),
    # The SD3.5-M code paths (dual attention, RMS qk-norm) at toy size, for CPU checks.
    "tiny": Preset("sd3", dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=32, pooled_projection_dim=16, pos_embed_max_size=16,
        dual_attention_layers=(0,), qk_norm="rms_norm"), 4, 64, 8, 4),
}


def _load_model_specs() -> Any:
    """bench/model_specs.py (Qwen-Image, Wan 14B presets), loaded by path as this script is."""
    spec = importlib.util.spec_from_file_location(
        "bench_model_specs", Path(__file__).resolve().with_name("model_specs.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


MODEL_SPECS = _load_model_specs()
ALL_MODELS = sorted({*PRESETS, *MODEL_SPECS.FAMILY_PRESETS})


class BenchModel(FlowModel):
    """A random-weights transformer behind the adapter interface, random prompt embeddings."""

    def __init__(self, preset: Preset, resolution: int, text_tokens: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

        if resolution % 16:
            raise ValueError(f"--resolution {resolution}: must be a multiple of 16 (VAE 8 x patch 2)")
        self.family, self.text_tokens = preset.family, text_tokens
        cls = SD3Transformer2DModel if preset.family == "sd3" else FluxTransformer2DModel
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build in the final dtype: FLUX in fp32 would not fit
        try:
            with torch.device(device):
                self.transformer = cls(**preset.config).eval()
        finally:
            torch.set_default_dtype(previous)
        self.lora_target_modules = _ATTN
        self.text_dim = preset.config["joint_attention_dim"]
        self.pooled_dim = preset.config["pooled_projection_dim"]
        side = resolution // 8  # VAE latent side
        if self.family == "sd3":
            self.latent_shape = (preset.config["in_channels"], side, side)
        else:  # FLUX packs 2x2 latent patches: (tokens, 16 * 4)
            self.latent_shape = ((side // 2) ** 2, preset.config["in_channels"])
            rows, cols = torch.meshgrid(torch.arange(side // 2), torch.arange(side // 2), indexing="ij")
            ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
            self.img_ids = ids.to(device, dtype)
            self.txt_ids = torch.zeros(text_tokens, 3, device=device, dtype=dtype)

    def encode_prompts(self, prompts) -> Conditioning:
        gen = torch.Generator().manual_seed(len(prompts))
        embeds = torch.randn(len(prompts), self.text_tokens, self.text_dim, generator=gen)
        pooled = torch.randn(len(prompts), self.pooled_dim, generator=gen)
        return Conditioning({"prompt_embeds": embeds.to(self.device, self.dtype),
                             "pooled_prompt_embeds": pooled.to(self.device, self.dtype)})

    def predict_velocity(self, x_t: Tensor, t: Tensor, cond: Conditioning,
                         guidance_scale: float = 1.0) -> Tensor:
        kwargs = dict(hidden_states=x_t.to(self.dtype), return_dict=False,
                      encoder_hidden_states=cond.tensors["prompt_embeds"],
                      pooled_projections=cond.tensors["pooled_prompt_embeds"])
        if self.family == "sd3":
            return self.transformer(timestep=t * 1000.0, **kwargs)[0].float()
        guidance = torch.full_like(t, 3.5)  # FLUX.1-dev is guidance-distilled
        return self.transformer(timestep=t, guidance=guidance, img_ids=self.img_ids,
                                txt_ids=self.txt_ids, **kwargs)[0].float()

    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError("the benchmark has no VAE")

    def sigmas(self, num_steps: int) -> Tensor:
        s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
        return 3.0 * s / (1.0 + 2.0 * s)  # SD3 time shift 3


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> dict[str, Any]:
    """One warm-up call (compilation included), then ``repeats`` timed calls between syncs.

    Returns ``first_call_s``, ``ms`` (mean per call) and ``peak_gib`` (CUDA
    ``max_memory_allocated`` over the timed calls; ``None`` on CPU).
    """
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    ms = (time.perf_counter() - start) * 1e3 / repeats
    return {"first_call_s": first, "ms": ms,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class Stages:
    """The measured closures over one model, optimizer and stored rollout."""

    def __init__(self, model: BenchModel, batch: int, recipe: Recipe, autocast) -> None:
        self.model, self.batch, self.recipe, self.autocast = model, batch, recipe, autocast
        self.cond = model.encode_prompts(["p"] * batch)
        self.sigmas = model.sigmas(recipe.num_steps)
        self.window = list(range(1, 1 + recipe.trained_steps))  # inside the first half
        self.dynamics = get_dynamics("flow_sde", noise_level=0.7)
        self.spec = get_algorithm("dppo")
        self.hparams = self.spec.make_hparams()
        params = list(trainable_named_parameters(model.transformer).values())
        self.optimizer = torch.optim.AdamW(params, lr=3e-4)
        self.advantages = torch.randn(batch, generator=torch.Generator().manual_seed(1))
        self.advantages = self.advantages.to(model.device)
        self.stored = self.rollout()
        self.replay_old_means = False

    def forward(self) -> None:
        x = torch.randn(self.batch, *self.model.latent_shape, device=self.model.device)
        t = torch.full((self.batch,), 0.7, device=self.model.device)
        with torch.no_grad(), self.autocast():
            self.model.predict_velocity(x, t, self.cond)

    def rollout(self):
        noise = NoiseSource(0, 0, self.batch, 0, self.batch)
        with self.autocast():
            return sample_rollout(self.model, self.dynamics, self.cond, self.sigmas, noise, self.window)

    def _entries(self, step: int) -> Entries:
        return Entries(torch.arange(self.batch), torch.full((self.batch,), step))

    def _batch(self, rollout, entries: Entries):
        with self.autocast():
            return likelihood_batch(self.model, self.dynamics, rollout, self.advantages, self.cond,
                                    entries, 1.0)

    def update(self, rollout=None, step: int = 0, optimize: bool = True) -> None:
        """One optimizer step on all samples at recorded step ``step`` of ``rollout``."""
        rollout = self.stored if rollout is None else rollout
        accumulate_gradients(self.spec, self.hparams, lambda e: self._batch(rollout, e),
                             self._entries(step), self.batch, contextlib.nullcontext,
                             lambda loss: loss.backward())
        if optimize:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def iteration(self, replays: int | None = None) -> None:
        """The issue's recipe: rollout, ``R`` no-grad replays, ``U x S`` optimizer steps."""
        r = self.recipe
        rollout = self.rollout()
        with torch.no_grad():
            for j in range(r.num_replays if replays is None else replays):
                self._batch(rollout, self._entries(j % r.trained_steps))
        for _ in range(r.num_updates):
            for step in torch.randperm(r.trained_steps).tolist():
                self.update(rollout, step)

    def trainer(self) -> None:
        """What ``flowdppo train`` runs: the rollout records the old means, so there are no
        no-grad replays; with ``train.old_means: replay`` (the default on CUDA and with
        torch.compile) each trained step is replayed once in grad mode, as the update's
        forward, to refresh them (see ``Trainer._replay_old_means``)."""
        r = self.recipe
        rollout = self.rollout()
        if self.replay_old_means:
            for step in range(r.trained_steps):
                with torch.enable_grad():
                    mean = self._batch(rollout, self._entries(step)).mean.detach()
                rollout.mean_old[:, step] = mean
        for _ in range(r.num_updates):
            for step in torch.randperm(r.trained_steps).tolist():
                self.update(rollout, step)


def measure(stages: Stages, mode: str, checkpointing: bool, repeats: int,
            flops: dict[str, float] | None) -> dict[str, Any]:
    """One table row; times and FLOPs per sample, memory the peak of the whole batch."""
    device, recipe = stages.model.device, stages.recipe
    names = ["forward", "rollout", "update", "iteration"]
    # The trainer replays S steps (old means) or none; when that equals R, it is the recipe.
    trainer_replays = recipe.trained_steps if stages.replay_old_means else 0
    if recipe.num_replays != trainer_replays:
        names.append("trainer")
    t = {name: timed(getattr(stages, name), repeats, device) for name in names}
    ms = {name: t[name]["ms"] / stages.batch for name in t}
    ms.setdefault("trainer", ms["iteration"])
    # Its floor counts a replay as a no-grad forward (a grad-mode forward also stores
    # activations, so this is a lower bound).
    trainer_recipe = replace(recipe, num_replays=trainer_replays)
    floor = floor_ms(ms["forward"], ms["update"], recipe)
    issue = ISSUE_H100[mode]["forward_ms"], ISSUE_H100[mode]["update_ms"]
    issue_floor = floor_ms(*issue, recipe)
    # The floor's formula also counts an iteration's FLOPs from the primitives' FLOPs.
    f = flops or {"forward": math.nan, "update": math.nan}  # --no-flops: TF/s are NaN
    work = {**f, "iteration": floor_ms(f["forward"], f["update"], recipe),
            "trainer": floor_ms(f["forward"], f["update"], trainer_recipe)}
    row: dict[str, Any] = {"mode": mode, "checkpointing": checkpointing,
                           "trainer_replays_old_means": stages.replay_old_means,
                           "first_call_s": sum(x["first_call_s"] for x in t.values())}
    row.update({f"{name}_ms": value for name, value in ms.items()})
    row.update(floor_ms=floor, ratio_to_floor=ms["iteration"] / floor, issue_floor_ms=issue_floor,
               ratio_to_issue_floor=ms["iteration"] / issue_floor)
    # The trainer against its own floor and against the issue's recipe floor.
    trainer_floor = floor_ms(ms["forward"], ms["update"], trainer_recipe)
    row.update(trainer_floor_ms=trainer_floor, ratio_trainer_to_floor=ms["trainer"] / trainer_floor,
               ratio_trainer_to_issue_floor=ms["trainer"] / issue_floor)
    row.update({f"peak_gib_{name}": t[name]["peak_gib"] for name in t if name != "rollout"})
    row.update({f"tflops_{name}": work[name] / ms[name] * 1e-9 for name in work})
    return row


def count_host_syncs(stages: Stages) -> dict[str, Any]:
    """Host-device synchronisations during one trainer iteration (CUDA only).

    ``torch.cuda.set_sync_debug_mode`` warns on every synchronising call; the warnings'
    source lines say where they come from.
    """
    import warnings

    stages.trainer()  # warm: first-call allocations are not the loop's
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            stages.trainer()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    sites: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            site = f"{w.filename}:{w.lineno}"
            sites[site] = sites.get(site, 0) + 1
    return {"count": sum(sites.values()), "sites": sites}


def build(args: argparse.Namespace) -> tuple[Stages, torch.device, dict[str, Any]]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = args.model or ("sd35m" if device.type == "cuda" else "tiny")
    preset = PRESETS.get(name) or MODEL_SPECS.FAMILY_PRESETS[name]
    batch, resolution = args.batch or preset.batch, args.resolution or preset.resolution
    tokens = args.text_tokens or preset.text_tokens
    if min(batch, tokens, args.repeats, args.num_updates) < 1:
        raise ValueError("--batch, --text-tokens, --repeats and --num-updates must be >= 1")
    recipe = Recipe(args.num_steps, args.replays, args.num_updates, args.trained_steps)
    if not 0 < recipe.trained_steps <= recipe.num_steps // 2 or recipe.num_replays < 0:
        raise ValueError(f"--trained-steps {recipe.trained_steps} must lie in [1, num_steps // 2] "
                         f"(the window is in the first half) and --replays {recipe.num_replays} >= 0")
    cuda = device.type == "cuda"
    if args.sync_check and not cuda:
        raise ValueError("--sync-check needs --device cuda (it uses CUDA's sync debug mode)")
    chosen_configs(args, device)  # a bad --configs fails before the model is built
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    if name in MODEL_SPECS.FAMILY_PRESETS:  # the flowdppo adapter around the full transformer
        model = MODEL_SPECS.build_family_model(preset, resolution, tokens, device, dtype)
    else:
        model = BenchModel(preset, resolution, tokens, device, dtype)
    apply_trainable(model, LoraConfig(rank=preset.lora_rank, alpha=2.0 * preset.lora_rank), seed=0)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda
                else contextlib.nullcontext)
    params = unwrap(model.transformer).parameters()
    info = {"model": name, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
            "dtype": str(dtype), "batch": batch, "resolution": resolution, "text_tokens": tokens,
            "latent_shape": list(model.latent_shape), "lora_rank": preset.lora_rank,
            "num_params": sum(p.numel() for p in params), "repeats": args.repeats,
            "recipe": asdict(recipe), "issue_h100_ms_per_sample": ISSUE_H100,
            "torch": torch.__version__}
    return Stages(model, batch, recipe, autocast), device, info


CONFIGS = ("eager", "eager+ckpt", "compiled", "compiled+ckpt")


def chosen_configs(args: argparse.Namespace, device: torch.device) -> list[str]:
    """``--configs`` if given, else eager (+ compiled on CUDA), each also +ckpt with
    ``--checkpointing``."""
    if args.configs:
        chosen = [c.strip() for c in args.configs.split(",") if c.strip()]
        unknown = [c for c in chosen if c not in CONFIGS]
        if unknown or not chosen:
            raise ValueError(f"--configs {args.configs!r}: expected a comma list of {CONFIGS}")
        return chosen
    compile_on = args.compile if args.compile is not None else device.type == "cuda"
    modes = ("eager", "compiled") if compile_on else ("eager",)
    return [m + c for m in modes for c in (("", "+ckpt") if args.checkpointing else ("",))]


def run_benchmark(args: argparse.Namespace,
                  on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Build the model, count FLOPs once (eager, no checkpointing), measure each configuration.

    ``on_row(report)`` is called after each row (the JSON is rewritten then, so a run cut
    short by a time limit keeps the rows it finished).
    """
    stages, device, report = build(args)
    configs = chosen_configs(args, device)
    # Model FLOPs (no recomputation); CPU's fused attention kernel has no FLOP formula.
    flops = None
    if args.flops:
        flops = {"forward": count_flops(stages.forward) / stages.batch,
                 "update": count_flops(lambda: stages.update(optimize=False)) / stages.batch}
    report["flops_per_sample"] = flops
    if args.sync_check:
        report["host_syncs_per_trainer_iteration"] = count_host_syncs(stages)
    inner = stages.model.transformer
    compiled = None
    report["rows"] = []
    for config in configs:
        mode, _, ckpt = config.partition("+")
        if mode == "compiled" and compiled is None:
            compiled = torch.compile(inner)
        stages.model.transformer = compiled if mode == "compiled" else inner
        # The trainer's `train.old_means: auto`: replay on CUDA or when compiled.
        stages.replay_old_means = (args.old_means == "replay" or (
            args.old_means == "auto" and (device.type == "cuda" or mode == "compiled")))
        getattr(unwrap(inner), f"{'enable' if ckpt else 'disable'}_gradient_checkpointing")()
        report["rows"].append(measure(stages, mode, bool(ckpt), args.repeats, flops))
        if on_row is not None:
            on_row(report)
    return report


_COLUMNS = (("fwd", "forward_ms"), ("rollout", "rollout_ms"), ("update", "update_ms"),
            ("iter", "iteration_ms"), ("floor", "floor_ms"), ("/floor", "ratio_to_floor"),
            ("/issue", "ratio_to_issue_floor"), ("trainer", "trainer_ms"),
            ("tr/floor", "ratio_trainer_to_floor"), ("tr/issue", "ratio_trainer_to_issue_floor"),
            ("GiB upd", "peak_gib_update"),
            ("GiB iter", "peak_gib_iteration"), ("TF/s fwd", "tflops_forward"),
            ("TF/s upd", "tflops_update"), ("1st s", "first_call_s"))


def format_table(report: dict[str, Any]) -> str:
    """Header lines and one row per configuration (memory "n/a" on CPU)."""
    lines = [f"{report['model']} on {report['device_name']}, batch {report['batch']}, "
             f"{report['resolution']} px, {report['text_tokens']} tokens, {report['recipe']}",
             "ms/sample; /issue = iter / issue-6 H100 floor (SD3.5-M, 512 px, batch 16)",
             f"{'config':<14}" + "".join(f"{name:>10}" for name, _ in _COLUMNS)]
    for row in report["rows"]:
        cells = ["n/a" if row[key] is None else f"{row[key]:.4g}" for _, key in _COLUMNS]
        config = row["mode"] + ("+ckpt" if row["checkpointing"] else "")
        lines.append(f"{config:<14}" + "".join(f"{c:>10}" for c in cells))
    syncs = report.get("host_syncs_per_trainer_iteration")
    if syncs is not None:
        lines.append(f"host syncs in one trainer iteration: {syncs['count']}")
        lines.extend(f"  {n:>4} at {site}" for site, n in sorted(syncs["sites"].items()))
    return "\n".join(lines)


_ATTENTION = ("auto", "flash", "efficient", "cudnn", "math")


def attention_backend(name: str) -> contextlib.AbstractContextManager:
    """A context pinning ``scaled_dot_product_attention`` to one backend (``auto``: none)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel(backend)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=ALL_MODELS, help="default: sd35m on CUDA, tiny on CPU")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when visible")
    p.add_argument("--batch", type=int, help="samples per batch (default: the preset's)")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the preset's)")
    p.add_argument("--text-tokens", type=int, help="prompt tokens (default: the preset's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure torch.compile (default: on for CUDA, off for CPU)")
    p.add_argument("--checkpointing", action="store_true",
                   help="also measure with gradient checkpointing")
    p.add_argument("--configs", help=f"comma list of {', '.join(CONFIGS)} (overrides "
                   "--compile/--checkpointing), measured in that order")
    p.add_argument("--old-means", choices=("auto", "rollout", "replay"), default="auto",
                   help="the trainer stage's train.old_means (auto: replay on CUDA or compiled)")
    p.add_argument("--attention", choices=sorted(_ATTENTION), default="auto",
                   help="pin PyTorch's SDPA backend (auto: PyTorch's choice)")
    p.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True,
                   help="count model FLOPs once with FlopCounterMode (--no-flops skips it)")
    p.add_argument("--sync-check", action="store_true",
                   help="count host-device syncs in one trainer iteration (CUDA)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    p.add_argument("--num-steps", type=int, default=10, help="K: sampling steps per rollout")
    p.add_argument("--replays", type=int, default=3, help="R: no-grad replay forwards")
    p.add_argument("--num-updates", type=int, default=2, help="U: update passes per rollout")
    p.add_argument("--trained-steps", type=int, default=3, help="S: trained steps per sample")
    p.add_argument("--threads", type=int, help="CPU threads while benchmarking (default: torch's)")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads:  # 1 thread keeps the tiny model's timings stable on a shared CPU
            torch.set_num_threads(args.threads)
        with attention_backend(args.attention):
            report = run_benchmark(args, on_row=lambda r: _progress(r, args.json))
    except ValueError as err:
        print(f"throughput: error: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    print(format_table(report))
    return 0


def _progress(report: dict[str, Any], path: str | None) -> None:
    """After each row: its line on stderr, and the JSON so far (written atomically)."""
    row = report["rows"][-1]
    print(f"[{row['mode']}{'+ckpt' if row['checkpointing'] else ''}] iter "
          f"{row['iteration_ms']:.4g} trainer {row['trainer_ms']:.4g} ms/sample", file=sys.stderr,
          flush=True)
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
