"""``flowdppo train``, ``flowdppo sample`` and ``flowdppo eval``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..arguments import HelpConfigAction, positive_int

logger = logging.getLogger(__name__)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_RECIPE = "toy_dppo"


def recipe_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a shipped recipe (``toy_dppo`` -> recipes/toy_dppo.yaml)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            shipped = RECIPES / path.name
            if shipped.is_file() and path.parent.name == "configs":
                return shipped
            raise ValueError(f"--config {name_or_path}: no such file")
        return path
    shipped = RECIPES / f"{name_or_path}.yaml"
    if not shipped.is_file():
        names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
        raise ValueError(f"--config {name_or_path}: not a file and not a shipped recipe {names}")
    return shipped


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="RL fine-tuning (default: the toy DPPO recipe)")
    train.add_argument("--config", default=None, help=f"recipe YAML or name (default {DEFAULT_RECIPE})")
    train.add_argument("--output-dir", default=None,
                       help="run directory (default: the config's output_dir, else a new "
                       "runs/<recipe>__seed<seed>__<YYYYmmdd-HHMMSS>)")
    train.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR")
    train.add_argument("--resume-from", default=None, metavar="STEP",
                       help="with --resume: the checkpoint to continue from (step_N or N; "
                       "default: the latest, else the previous complete one); newer ones are "
                       "set aside as abandoned-step_N")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the finished or abandoned run in --output-dir (deletes "
                       "only what a run writes; a folder with other files is refused)")
    train.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, e.g. optim.lr=1e-4")
    train.add_argument("--help-config", action=HelpConfigAction,
                       help="list every config key with its documentation and exit")
    train.set_defaults(func=run_train)

    _add_sample_cli(subparsers)

    evaluate = subparsers.add_parser("eval", help="evaluate a run's checkpoint on held-out prompts")
    evaluate.add_argument("--run", required=True, help="training output directory")
    evaluate.add_argument("--checkpoint", default=None, help="checkpoint dir (default: latest)")
    evaluate.add_argument("--base", action="store_true", help="evaluate the base model")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--output", default=None, help="JSON file for the results")
    evaluate.set_defaults(func=run_eval)


def run_train(args: argparse.Namespace) -> int:
    from ..errors import RemoteRewardError
    from .loop import Trainer
    from .run_dir import resume_hint

    resolved, output_dir = _train_config(args)
    _prepare_run_dir(args, output_dir)
    trainer = Trainer(resolved, output_dir, resume=bool(args.resume))
    try:
        trainer.run()
    except RemoteRewardError as err:
        raise RemoteRewardError(f"{err}. {resume_hint(output_dir)}") from err
    if trainer.main:
        print(f"run written to {output_dir}")
    return 0


def _train_config(args: argparse.Namespace):
    """The validated run and its directory: a resumed run's saved config plus the overrides
    it may take, or the recipe plus overrides in ``--output-dir`` / the config's
    ``output_dir`` / a new ``runs/<recipe>__seed<seed>__<time>`` (created only once the
    config is valid)."""
    from ..config import load_config, resolve, to_dict
    from .run_dir import check_resume_changes, default_output_dir

    if args.resume_from and not args.resume:
        raise ValueError("--resume-from needs --resume DIR (the run to continue)")
    if args.resume:
        if args.overwrite or args.output_dir:
            raise ValueError("--resume continues the run in its own folder: drop --overwrite "
                             "and --output-dir")
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise ValueError(f"--resume {run_dir}: no run there (config.yaml missing)")
        cfg = load_config(str(run_dir / "config.yaml"), args.overrides)
        saved = load_config(str(run_dir / "config.yaml"))
        check_resume_changes(run_dir, to_dict(saved), to_dict(cfg))
        cfg.output_dir = str(run_dir)
        return resolve(cfg, world_size=_world_size()), run_dir
    recipe = recipe_path(args.config or DEFAULT_RECIPE)
    cfg = load_config(str(recipe), args.overrides)
    chosen = args.output_dir or cfg.output_dir
    if chosen is None and _world_size() > 1:
        raise ValueError("a multi-process launch needs --output-dir (every process must name "
                         "the same run directory)")
    resolved = resolve(cfg, world_size=_world_size())
    output_dir = Path(chosen) if chosen else default_output_dir(recipe.stem, cfg.seed)
    cfg.output_dir = str(output_dir)
    return resolved, output_dir


def _prepare_run_dir(args: argparse.Namespace, output_dir: Path) -> None:
    """``--overwrite`` / ``--resume-from`` on disk, by the main process only (before the
    trainer: its first collective orders the other processes after this)."""
    import os

    from .checkpoint import rewind
    from .run_dir import clear_run

    if os.environ.get("RANK", "0") != "0":
        return
    if args.overwrite:
        clear_run(output_dir)
    if args.resume_from:
        step = rewind(output_dir / "checkpoints", args.resume_from)
        logger.info("--resume-from: continuing %s from step %d", output_dir, step)


def _world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def _add_sample_cli(subparsers: argparse._SubParsersAction) -> None:
    sample = subparsers.add_parser(
        "sample", help="reproducible images from a trained run or a LoRA file",
        description="Sample j of each prompt starts from torch.Generator(device).manual_seed("
        "SEED + j) through the pipeline's own latent preparation, so the diffusers pipeline "
        "with the same LoRA, seed, steps and guidance gives the same image.")
    source = sample.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="training output directory")
    source.add_argument("--lora", help="pytorch_lora_weights.safetensors (needs --model, "
                        "--pretrained)")
    sample.add_argument("--checkpoint", default=None, help="with --run: checkpoint dir "
                        "(default: latest)")
    sample.add_argument("--base", action="store_true", help="with --run: the base model")
    sample.add_argument("--model", default=None, help="with --lora: family (sd3, flux, flux2)")
    sample.add_argument("--pretrained", default=None, help="with --lora: base pipeline folder "
                        "or hub id")
    sample.add_argument("--dtype", default="bf16", help="with --lora: weights dtype")
    sample.add_argument("--resolution", type=int, default=None, help="with --lora: pixels")
    sample.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    sample.add_argument("--num", type=int, default=4, help="images per prompt")
    sample.add_argument("--seed", type=int, default=0, help="sample j of a prompt uses SEED + j")
    sample.add_argument("--steps", type=positive_int, default=None, help="ODE steps (default: the run's "
                        "eval steps, or the pipeline's default)")
    sample.add_argument("--guidance", type=float, default=None, help="guidance scale (default: "
                        "the run's, or the pipeline's default)")
    sample.add_argument("--reward", default=None, help="score the images with this reward")
    sample.add_argument("--batch-size", type=int, default=8, help="images per forward")
    sample.add_argument("--device", default="auto")
    sample.add_argument("--out", default="samples", help="folder for the PNGs, grid.png and "
                        "samples.jsonl")
    sample.set_defaults(func=run_sample)


def _check_sample_args(args: argparse.Namespace) -> None:
    from ..errors import FlowdppoError

    problems = [(args.num < 1, f"--num {args.num}: need at least 1 image per prompt"),
                (args.steps is not None and args.steps < 1, f"--steps {args.steps}: need >= 1"),
                (args.guidance is not None and args.guidance < 1,
                 f"--guidance {args.guidance}: must be >= 1 (1 = no guidance)"),
                (args.batch_size < 1, f"--batch-size {args.batch_size}: must be >= 1"),
                (bool(args.lora) and not (args.model and args.pretrained),
                 "--lora needs --model (sd3, flux, flux2) and --pretrained (the base pipeline)")]
    for bad, message in problems:
        if bad:
            raise FlowdppoError(message)


def _sample_source(args: argparse.Namespace):
    """(model, default steps, default guidance, run config or None) for --run / --lora."""
    from .inference import load_lora_model, load_policy

    if args.run:
        loaded = load_policy(Path(args.run), _path(args.checkpoint), args.device, base=args.base)
        s = loaded.config.sampling
        return loaded.model, s.eval_num_steps, s.guidance_scale, loaded.config
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"resolution": args.resolution} if args.resolution else {}
    model = load_lora_model(args.model, args.pretrained, Path(args.lora), dtype=args.dtype,
                            device=device, **kwargs)
    return (model, getattr(model, "default_num_steps", 28),
            getattr(model, "default_guidance_scale", 1.0), None)


def _score(name: str, images, prompts: list[str], cfg, device) -> list[float]:
    """``name``'s scores; its kwargs are the run's when the run trained with that reward."""
    from ..rewards import build_reward

    items = cfg.rewards.items if cfg is not None else []
    kwargs = next((dict(i.kwargs) for i in items if i.name == name), {})
    kwargs.setdefault("device", str(device))
    values, _ = build_reward(name, **kwargs)(images, prompts, [{} for _ in prompts])
    return [float(v) for v in values]


def run_sample(args: argparse.Namespace) -> int:
    from .inference import sample_images, seeded_noise
    from .sample_files import SampleSheet, write_samples

    _check_sample_args(args)
    model, steps, guidance, cfg = _sample_source(args)
    steps, guidance = args.steps or steps, args.guidance or guidance
    prompts = [p for p in args.prompt for _ in range(args.num)]
    seeds = [args.seed + j for _ in args.prompt for j in range(args.num)]
    images = sample_images(model, prompts, seeded_noise(model, seeds), steps, guidance,
                           args.batch_size)
    rewards = ({args.reward: _score(args.reward, images, prompts, cfg, model.device)}
               if args.reward else {})
    sheet = SampleSheet(images, prompts, seeds, steps, guidance, rewards)
    files = write_samples(sheet, Path(args.out))
    print(f"wrote {len(files)} images, grid.png and samples.jsonl to {args.out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from . import setup
    from .evaluation import evaluate
    from .inference import load_policy

    loaded = load_policy(Path(args.run), _path(args.checkpoint), args.device, base=args.base)
    cfg, model = loaded.config, loaded.model
    setup_prompts = setup.load_prompts(cfg)
    result = evaluate(
        model, setup_prompts.eval[: cfg.eval.max_prompts],
        samples_per_prompt=cfg.eval.samples_per_prompt,
        sigmas=model.sigmas(cfg.sampling.eval_num_steps).cpu(), seed=cfg.seed,
        guidance_scale=cfg.sampling.guidance_scale, rewards=setup.build_rewards(cfg, model.device),
        monitors=setup.build_monitors(cfg, model.device), reference=loaded.reference,
        batch_size=cfg.sampling.sample_batch_size)
    row = {"checkpoint": str(loaded.checkpoint) if loaded.checkpoint else "base", **result.row}
    text = json.dumps(row, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None
