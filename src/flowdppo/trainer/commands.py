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
    train.add_argument("--output-dir", default=None, help="run directory (default from the recipe)")
    train.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR")
    train.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, e.g. optim.lr=1e-4")
    train.add_argument("--help-config", action=HelpConfigAction,
                       help="list every config key with its documentation and exit")
    train.set_defaults(func=run_train)

    sample = subparsers.add_parser("sample", help="images from a trained run's checkpoint")
    sample.add_argument("--run", required=True, help="training output directory")
    sample.add_argument("--checkpoint", default=None, help="checkpoint dir (default: latest)")
    sample.add_argument("--base", action="store_true", help="sample the base (reference) model")
    sample.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    sample.add_argument("--num", type=int, default=4, help="images per prompt")
    sample.add_argument("--steps", type=positive_int, default=None, help="ODE steps (default: eval's)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default="auto")
    sample.add_argument("--output", default="samples.png", help="PNG grid to write")
    sample.set_defaults(func=run_sample)

    evaluate = subparsers.add_parser("eval", help="evaluate a run's checkpoint on held-out prompts")
    evaluate.add_argument("--run", required=True, help="training output directory")
    evaluate.add_argument("--checkpoint", default=None, help="checkpoint dir (default: latest)")
    evaluate.add_argument("--base", action="store_true", help="evaluate the base model")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--output", default=None, help="JSON file for the results")
    evaluate.set_defaults(func=run_eval)


def run_train(args: argparse.Namespace) -> int:
    from ..config import load_config, resolve
    from .loop import Trainer

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise ValueError(f"--resume {run_dir}: no run there (config.yaml missing)")
        cfg = load_config(str(run_dir / "config.yaml"), args.overrides)
        output_dir = run_dir
    else:
        cfg = load_config(str(recipe_path(args.config or DEFAULT_RECIPE)), args.overrides)
        output_dir = Path(args.output_dir or cfg.output_dir)
    cfg.output_dir = str(output_dir)
    resolved = resolve(cfg, world_size=_world_size())
    trainer = Trainer(resolved, output_dir, resume=bool(args.resume))
    trainer.run()
    if trainer.main:
        print(f"run written to {output_dir}")
    return 0


def _world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def run_sample(args: argparse.Namespace) -> int:
    import torch

    from ..prompts import PromptItem
    from .evaluation import EvalResult, sample_ode_with_kl, save_grid
    from .inference import load_policy
    from .rollout import NoiseSource

    loaded = load_policy(Path(args.run), _path(args.checkpoint), args.device, base=args.base)
    cfg, model = loaded.config, loaded.model
    items = [PromptItem(p) for p in args.prompt for _ in range(args.num)]
    prompts = [i.prompt for i in items]
    steps = args.steps or cfg.sampling.eval_num_steps
    noise = NoiseSource(args.seed, 0, len(prompts), 0, len(prompts))
    images, _ = sample_ode_with_kl(model, prompts, model.sigmas(steps).cpu(), noise,
                                   cfg.sampling.guidance_scale, None)
    result = EvalResult(images.float().cpu(), prompts, {"index": torch.arange(len(prompts)).float()}, {})
    save_grid(result, Path(args.output), "index", samples_per_prompt=args.num, max_cols=args.num,
              max_rows=len(args.prompt))
    print(f"wrote {args.output}")
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
