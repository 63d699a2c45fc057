"""``flowdppo export``: a run's trained weights as a LoRA folder or as merged weights.

``--format lora`` writes ``pytorch_lora_weights.safetensors`` (the diffusers LoRA file the
checkpoint holds, loadable by ``pipe.load_lora_weights``), ``README.md`` (a model card)
and ``training_curve.png``. ``--format merged`` folds the LoRA into the transformer
(``fuse_lora`` in float32, then the adapter layers removed) and writes the whole pipeline
with ``save_pretrained``: ``<Pipeline>.from_pretrained(out)`` loads it with no adapter.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import torch

from ..errors import RunDirectoryError

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# nn.Module's own casts: diffusers' ModelMixin.to(dtype) warns about fp32-kept modules.
_CASTS = {"fp32": "float", "bf16": "bfloat16", "fp16": "half"}


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export", help="a run's weights as a LoRA (with a model card) or a merged pipeline")
    export.add_argument("--run", required=True, help="training output directory")
    export.add_argument("--step", type=int, default=None, help="checkpoint of this iteration "
                        "(default: the latest)")
    export.add_argument("--format", choices=("lora", "merged"), default="lora",
                        help="lora: LoRA file + model card; merged: a full diffusers folder")
    export.add_argument("--out", required=True, help="output folder (new or empty)")
    export.add_argument("--dtype", choices=sorted(_CASTS), default=None,
                        help="merged: weights dtype to save (default: the run's model.dtype)")
    export.add_argument("--device", default="cpu", help="merged: where to merge (cpu is enough)")
    export.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from .inference import find_checkpoint, read_run_config

    run_dir, out = Path(args.run), Path(args.out)
    cfg = read_run_config(run_dir)
    checkpoint = find_checkpoint(run_dir, step=args.step)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirectoryError(f"--out {out}: exists and is not an empty folder; choose a new "
                                "one (nothing is overwritten)")
    if args.format == "lora":
        export_lora(run_dir, checkpoint, out)
    else:
        export_merged(run_dir, checkpoint, out, dtype=args.dtype or cfg.model.dtype,
                      device=args.device)
    print(f"wrote {args.format} export of {checkpoint.name} to {out}")
    return 0


def _step(checkpoint: Path) -> int:
    import json

    return int(json.loads((checkpoint / "state.json").read_text())["step"])


def _pipeline_name(model_name: str) -> str | None:
    from ..models import MODELS, load_builtin_models

    load_builtin_models()
    return getattr(MODELS.get(model_name), "pipeline_class_name", None) or None


def write_card(run_dir: Path, checkpoint: Path, out: Path, merged: bool) -> Path:
    from .inference import read_run_config
    from .model_card import CURVE_NAME, model_card, write_training_curve

    cfg = read_run_config(run_dir)
    curve = write_training_curve(run_dir, out / CURVE_NAME)
    text = model_card(cfg, run_dir, _step(checkpoint), _pipeline_name(cfg.model.name), merged,
                      curve)
    (out / "README.md").write_text(text)
    return out / "README.md"


def export_lora(run_dir: Path, checkpoint: Path, out: Path) -> Path:
    """``out/pytorch_lora_weights.safetensors`` plus the model card; returns the weights path.

    The checkpoint's own diffusers export is copied; a checkpoint without one (written
    before exports existed) is re-exported from its trainable weights.
    """
    from .inference import read_run_config

    cfg = read_run_config(run_dir)
    if not cfg.lora.enabled:
        raise RunDirectoryError(f"--run {run_dir} fine-tuned every weight (lora.enabled=false); "
                                "there is no LoRA to export: use --format merged")
    out.mkdir(parents=True, exist_ok=True)
    saved = checkpoint / "lora" / LORA_WEIGHT_NAME
    if saved.is_file():
        shutil.copy2(saved, out / LORA_WEIGHT_NAME)
    else:
        from peft.utils import get_peft_model_state_dict

        from .inference import load_policy

        model = load_policy(run_dir, checkpoint, device="cpu").model
        model.export_lora(get_peft_model_state_dict(model.transformer), out)
    write_card(run_dir, checkpoint, out, merged=False)
    return out / LORA_WEIGHT_NAME


def merge_lora(transformer: torch.nn.Module) -> None:
    """Fold the LoRA into the base weights in float32 and remove the adapter layers.

    The base weights are upcast first so ``W + (alpha / r) B A`` is computed and rounded
    once, in the dtype the folder is saved in (a bf16 merge would round twice).
    """
    transformer.float()
    transformer.fuse_lora()
    transformer.unload_lora()
    left = [n for n, _ in transformer.named_parameters() if "lora_" in n]
    if left:
        raise RuntimeError(f"merge left LoRA parameters behind: {left[:3]}")


def export_merged(run_dir: Path, checkpoint: Path, out: Path, *, dtype: str,
                  device: str = "cpu") -> Path:
    """The run's model with its LoRA merged (or fully fine-tuned weights) saved to ``out``.

    Diffusers families write a pipeline folder (``<Pipeline>.from_pretrained(out)``), the
    toy model its own folder (``model.pretrained`` of a toy run).
    """
    from .inference import load_policy

    loaded = load_policy(run_dir, checkpoint, device=device)
    model = loaded.model
    if loaded.config.lora.enabled:
        merge_lora(model.transformer)
    getattr(model.transformer, _CASTS[dtype])()
    model.transformer.requires_grad_(False)
    from ..models.pipeline_checks import loading_progress

    with loading_progress(loaded.config.logging.progress_bar):
        model.save_pretrained(out)
    write_card(run_dir, checkpoint, out, merged=True)
    return out
