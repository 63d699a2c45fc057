"""Throughput of one Flow-DPPO iteration on SD3.5-Medium / FLUX.1-dev-sized transformers.

Random weights from the published configs, no downloads. Times per sample, for eager or
compiled and with or without gradient checkpointing: a no-grad forward, a rollout, an
update (one ``Updater.step``: LoRA forward + DPPO loss + backward + clipping + AdamW), the
issue's recipe iteration and the trainer's own ``Updater.update``, then compares them with
the floor built from the primitives and with issue 6's H100 floor. See bench/README.md.

Model setup lives in ``bench_models.py``, the measured stages in ``bench_measure.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from bench_measure import (  # noqa: F401 (Recipe, floor_ms: the CLI's public names)
    ISSUE_H100,
    Recipe,
    Stages,
    count_flops,
    count_host_syncs,
    floor_ms,
    measure,
)
from bench_models import Preset, build_bench_model, presets_with
from flowdppo.config import ConfigError, ResolvedRun, RunConfig, from_dict, resolve
from flowdppo.trainer import setup
from flowdppo.trainer.policy import apply_trainable, trainable_named_parameters, unwrap
from flowdppo.trainer.rollout import choose_sde_steps
from flowdppo.trainer.update import Updater, UpdateSettings

CONFIGS = ("eager", "eager+ckpt", "compiled", "compiled+ckpt")


def _load_model_specs() -> Any:
    """bench/model_specs.py (Qwen-Image, Wan 14B presets), loaded by path as this script is."""
    spec = importlib.util.spec_from_file_location(
        "bench_model_specs", Path(__file__).resolve().with_name("model_specs.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


# Families built by flowdppo's own adapters around a full-size transformer.
MODEL_SPECS = _load_model_specs()
ALL_MODELS = sorted({*presets_with(), *MODEL_SPECS.FAMILY_PRESETS})


def _all_presets(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    return {**presets_with(extra), **MODEL_SPECS.FAMILY_PRESETS}


def _build_model(name: str, preset, resolution: int, tokens: int, device, dtype, lora):
    if name not in MODEL_SPECS.FAMILY_PRESETS:
        return build_bench_model(preset, resolution, tokens, device, dtype, lora)
    torch.manual_seed(0)
    model = MODEL_SPECS.build_family_model(preset, resolution, tokens, device, dtype)
    apply_trainable(model, lora, seed=0)
    return model


def resolve_run(args: argparse.Namespace, preset: Preset, batch: int, device_type: str,
                compiled: bool) -> ResolvedRun:
    """The trainer's resolved run for this benchmark: one group of ``batch`` images, the
    recipe's K, S and U, and ``--old-means``; its derived settings (old-means replay,
    algorithm, dynamics, optimizer) are the trainer's own. The model section is unused (the
    benchmark builds its own transformer)."""
    micro = args.micro_batch_size or batch
    data = {"device": device_type, "mixed_precision": "bf16" if device_type == "cuda" else "no",
            "model": {"compile": compiled},
            "lora": {"rank": preset.lora_rank, "alpha": 2.0 * preset.lora_rank},
            "sampling": {"num_steps": args.num_steps, "num_groups": 1, "group_size": batch,
                         "sample_batch_size": batch,
                         "sde_steps": {"count": args.trained_steps, "range": [0.0, 0.5]}},
            "train": {"num_updates": args.num_updates, "minibatches_per_pass": args.minibatches,
                      "micro_batch_size": micro, "old_means": args.old_means}}
    try:
        return resolve(from_dict(RunConfig, data), device_type=device_type)
    except ConfigError as err:
        raise ValueError(f"the trainer rejects this benchmark's run (from --batch, --num-steps, "
                         f"--trained-steps, --num-updates, --minibatches, --micro-batch-size): "
                         f"{err}") from err


def make_updater(accelerator, model, resolved: ResolvedRun) -> Updater:
    """Optimizer, schedule, ``prepare`` and ``Updater`` exactly as ``Trainer.__init__`` builds them."""
    params = trainable_named_parameters(model.transformer)
    optimizer, scheduler = setup.make_optimizer(list(params.values()), resolved)
    model.transformer, optimizer = accelerator.prepare(model.transformer, optimizer)
    return Updater(accelerator, model, optimizer, scheduler, params, resolved.algorithm,
                   resolved.hparams, UpdateSettings.from_resolved(resolved))


def _check_args(args: argparse.Namespace, batch: int, tokens: int, cuda: bool) -> Recipe:
    if min(batch, tokens, args.repeats, args.num_updates, args.minibatches) < 1 or (
            args.micro_batch_size is not None and args.micro_batch_size < 1):
        raise ValueError("--batch, --text-tokens, --repeats, --num-updates, --minibatches and "
                         "--micro-batch-size must be >= 1")
    recipe = Recipe(args.num_steps, args.replays, args.num_updates, args.trained_steps)
    if not 0 < recipe.trained_steps <= recipe.num_steps // 2 or recipe.num_replays < 0:
        raise ValueError(f"--trained-steps {recipe.trained_steps} must lie in [1, num_steps // 2] "
                         f"(the window is in the first half) and --replays {recipe.num_replays} >= 0")
    if args.sync_check and not cuda:
        raise ValueError("--sync-check needs --device cuda (it uses CUDA's sync debug mode)")
    return recipe


def build(args: argparse.Namespace, presets: Mapping[str, Preset] | None = None
          ) -> tuple[Stages, torch.device, dict[str, Any]]:
    """The model with LoRA, the trainer's accelerator and :class:`Updater`, and the stages."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    presets = _all_presets(presets)
    name = args.model or ("sd35m" if device.type == "cuda" else "tiny")
    if name not in presets:
        raise ValueError(f"--model {name!r}: unknown; expected one of {sorted(presets)}")
    preset = presets[name]
    batch, resolution = args.batch or preset.batch, args.resolution or preset.resolution
    tokens = args.text_tokens or preset.text_tokens
    cuda = device.type == "cuda"
    recipe = _check_args(args, batch, tokens, cuda)
    configs = chosen_configs(args, device)  # a bad --configs fails before the model is built
    resolved = resolve_run(args, preset, batch, device.type, configs[0].startswith("compiled"))
    dtype = torch.bfloat16 if cuda else torch.float32
    accelerator = setup.make_accelerator(resolved.config)
    model = _build_model(name, preset, resolution, tokens, device, dtype, resolved.config.lora)
    updater = make_updater(accelerator, model, resolved)
    sde = resolved.sde_steps
    steps = choose_sde_steps(torch.Generator().manual_seed(0), sde.mode, sde.count, sde.first,
                             sde.stop)
    params = unwrap(model.transformer).parameters()
    info = {"model": name, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
            "dtype": str(dtype), "batch": batch, "resolution": resolution, "text_tokens": tokens,
            "latent_shape": list(model.latent_shape), "lora_rank": preset.lora_rank,
            "num_params": sum(p.numel() for p in params), "repeats": args.repeats,
            "recipe": asdict(recipe), "trained_step_indices": steps,
            "minibatches_per_pass": resolved.config.train.minibatches_per_pass,
            "micro_batch_size": resolved.config.train.micro_batch_size,
            "issue_h100_ms_per_sample": ISSUE_H100, "torch": torch.__version__}
    return Stages(model, updater, resolved, steps, recipe, batch, accelerator.autocast), device, info


def for_mode(resolved: ResolvedRun, compiled: bool) -> ResolvedRun:
    """The same run resolved again with ``model.compile`` set (it changes the old-means rule)."""
    cfg = resolved.config
    return resolve(replace(cfg, model=replace(cfg.model, compile=compiled)),
                   device_type=resolved.device_type)


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
                  on_row: Callable[[dict[str, Any]], None] | None = None,
                  presets: Mapping[str, Preset] | None = None) -> dict[str, Any]:
    """Build the model, count FLOPs once (eager, no checkpointing), measure each configuration.

    ``on_row(report)`` is called after each row (the JSON is rewritten then, so a run cut
    short by a time limit keeps the rows it finished). ``presets``: extra model specs.
    """
    stages, device, report = build(args, presets)
    configs = chosen_configs(args, device)
    # Model FLOPs (no recomputation); CPU's fused attention kernel has no FLOP formula.
    flops = None
    if args.flops:
        flops = {"forward": count_flops(stages.forward) / stages.batch,
                 "update": count_flops(stages.update) / stages.batch}
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
        # The trainer's own rule for this mode (`train.old_means` resolved by ResolvedRun).
        stages.use(for_mode(stages.resolved, mode == "compiled"))
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
             f"{report['resolution']} px, {report['text_tokens']} tokens, {report['recipe']}, "
             f"{report['minibatches_per_pass']} minibatch(es)/pass, micro-batch "
             f"{report['micro_batch_size']}",
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


def parse_args(argv: list[str] | None, presets: Mapping[str, Preset] | None = None
               ) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(_all_presets(presets)),
                   help="default: sd35m on CUDA, tiny on CPU")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when visible")
    p.add_argument("--batch", type=int, help="samples per batch, >= 2 (default: the preset's)")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the preset's)")
    p.add_argument("--text-tokens", type=int, help="prompt tokens (default: the preset's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure torch.compile (default: on for CUDA, off for CPU)")
    p.add_argument("--checkpointing", action="store_true",
                   help="also measure with gradient checkpointing")
    p.add_argument("--configs", help=f"comma list of {', '.join(CONFIGS)} (overrides "
                   "--compile/--checkpointing), measured in that order")
    p.add_argument("--old-means", choices=("auto", "rollout", "replay"), default="auto",
                   help="the trainer stage's train.old_means, resolved by the trainer's rule "
                   "(auto: replay on CUDA, mixed precision or compiled); it replays only the "
                   "minibatches after the first of the first pass, so with --minibatches 1 none")
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
    p.add_argument("--minibatches", type=int, default=1,
                   help="the trainer stage's train.minibatches_per_pass (must divide --batch)")
    p.add_argument("--micro-batch-size", type=int,
                   help="train.micro_batch_size: entries per forward/backward (default: --batch)")
    p.add_argument("--threads", type=int, help="CPU threads while benchmarking (default: torch's)")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, presets: Mapping[str, Preset] | None = None) -> int:
    """The CLI; ``presets``: extra model specs (name -> ``Preset``) beside the built-in ones."""
    args = parse_args(argv, presets)
    threads = torch.get_num_threads()
    try:
        if args.threads:  # 1 thread keeps the tiny model's timings stable on a shared CPU
            torch.set_num_threads(args.threads)
        with attention_backend(args.attention):
            report = run_benchmark(args, lambda r: _progress(r, args.json), presets)
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
