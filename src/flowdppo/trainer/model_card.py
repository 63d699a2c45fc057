"""The model card (``README.md``) and training-curve PNG that ``flowdppo export`` writes.

Everything comes from the run directory: ``config.yaml`` (base model, method, reward,
settings), ``eval.jsonl`` (the last evaluation at or before the exported step) and
``metrics.jsonl`` (the curve). Hugging Face reads the YAML front matter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import RunConfig

METHOD_NAMES = {"dppo": "Flow-DPPO", "grpo": "Flow-GRPO", "cps": "Flow-CPS",
                "guard": "GRPO-Guard", "nft": "DiffusionNFT"}
CURVE_NAME = "training_curve.png"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_evaluation(run_dir: Path, step: int) -> dict[str, Any] | None:
    """The last ``eval.jsonl`` row at or before ``step`` (None without one)."""
    rows = [r for r in read_jsonl(run_dir / "eval.jsonl") if int(r.get("step", 0)) <= step]
    return rows[-1] if rows else None


def write_training_curve(run_dir: Path, path: Path) -> Path | None:
    """Training reward per iteration (and evaluation reward / KL to the reference) as a PNG."""
    train = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    if train:
        left.plot([r["step"] for r in train], [r["reward_mean"] for r in train], ".-",
                  label="rollouts")
    if evals:
        left.plot([r["step"] for r in evals], [r["reward_mean"] for r in evals], "o-",
                  label="evaluation")
        right.plot([r["step"] for r in evals], [r["kl_ref"] for r in evals], "o-")
    left.set(xlabel="iteration", ylabel="reward (weighted mean)")
    left.legend(fontsize=7)
    right.set(xlabel="iteration", ylabel="KL to reference", title=evals[0].get("kl_ref_unit", "")
              if evals else "")
    right.title.set_fontsize(7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _default_dynamics(cfg: RunConfig) -> str:
    from ..algorithms import get_algorithm

    return get_algorithm(cfg.algorithm.name).default_dynamics


def _settings(cfg: RunConfig) -> list[tuple[str, Any]]:
    s, o, t = cfg.sampling, cfg.optim, cfg.train
    rewards = ", ".join(f"{i.name} x {i.weight:g}" for i in cfg.rewards.items)
    lora = f"r {cfg.lora.rank}, alpha {cfg.lora.alpha:g}" if cfg.lora.enabled else "off (full)"
    return [
        ("method", f"{METHOD_NAMES.get(cfg.algorithm.name, cfg.algorithm.name)} "
                   f"(`{cfg.algorithm.name}`) {json.dumps(dict(cfg.algorithm.hparams))}"),
        ("reward", rewards), ("sampler", f"{s.dynamics or _default_dynamics(cfg)}, noise level "
                              f"{s.noise_level:g}, eta {s.eta:g}, {s.num_steps} steps"),
        ("trained steps", f"{s.sde_steps.count} ({s.sde_steps.mode}) in {s.sde_steps.range}"),
        ("guidance scale", f"{s.guidance_scale:g}"),
        ("images per iteration", f"{s.num_groups} prompts x {s.group_size}"),
        ("LoRA", lora), ("optimizer", f"AdamW lr {o.lr:g}, weight decay {o.weight_decay:g}"),
        ("iterations", f"{t.num_iterations} ({t.num_updates} pass(es), "
                       f"{t.minibatches_per_pass} minibatch(es) each)"),
        ("weights / autocast", f"{cfg.model.dtype} / {cfg.mixed_precision}"),
        ("model arguments", json.dumps(dict(cfg.model.kwargs))), ("seed", cfg.seed),
    ]


def _usage(cfg: RunConfig, pipeline: str | None, merged: bool) -> str:
    if pipeline is None:
        return ("A flowdppo toy model: `flowdppo sample --run <run>`, or `model.pretrained` of "
                "a new run." if merged else "A LoRA for flowdppo's toy model (SD3 layout).")
    s = cfg.sampling
    load = ('pipe = {p}.from_pretrained("<this folder>", dtype=torch.bfloat16)' if merged else
            'pipe = {p}.from_pretrained("{b}", dtype=torch.bfloat16)\n'
            'pipe.load_lora_weights("<this folder>")').format(p=pipeline, b=cfg.model.pretrained)
    return (f"```python\nimport torch\nfrom diffusers import {pipeline}\n\n{load}\n"
            f'image = pipe("a prompt", num_inference_steps={s.eval_num_steps}, '
            f"guidance_scale={s.guidance_scale:g},\n"
            '             generator=torch.Generator("cuda").manual_seed(0)).images[0]\n```\n'
            "`flowdppo sample` draws the same image from the same seed.")


def model_card(cfg: RunConfig, run_dir: Path, step: int, pipeline: str | None, merged: bool,
               curve: Path | None) -> str:
    """The card's Markdown (front matter, usage, settings, final evaluation, curve)."""
    kind = "merged weights" if merged else "LoRA"
    method = METHOD_NAMES.get(cfg.algorithm.name, cfg.algorithm.name)
    tags = ["flowdppo", cfg.algorithm.name, "text-to-image", "reinforcement-learning"]
    tags += [] if merged else ["lora"]
    front = ["---", "library_name: diffusers", f"base_model: {cfg.model.pretrained}",
             f"tags: [{', '.join(tags)}]", "---", ""]
    lines = [f"# {method} {kind} for {cfg.model.pretrained} ({cfg.model.name})", "",
             f"RL fine-tuned with flowdppo: checkpoint of iteration {step} of "
             f"{cfg.train.num_iterations}, run `{run_dir.name}`.", "", "## Use", "",
             _usage(cfg, pipeline, merged), "", "## Training settings", "",
             "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _settings(cfg)]
    lines += ["", "## Final evaluation", ""]
    evaluation = final_evaluation(run_dir, step)
    if evaluation is None:
        lines.append("No evaluation at or before this checkpoint (`eval.jsonl`).")
    else:
        lines += [f"Held-out prompts, iteration {evaluation['step']}:", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in evaluation.items()
                  if isinstance(v, (int, float)) and k != "step" and not k.startswith("time_")]
        if "kl_ref_unit" in evaluation:
            lines += ["", f"`kl_ref` unit: {evaluation['kl_ref_unit']}."]
    lines += ["", "## Training curve", ""]
    lines.append(f"![training curve]({curve.name})" if curve else "No `metrics.jsonl` in the run.")
    return "\n".join(front + lines) + "\n"
