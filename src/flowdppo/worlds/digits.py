"""The "digits" world: text-to-image over sklearn's 8x8 handwritten digits (offline).

- Data: 1797 grey images, pixels 0..16 scaled to [-1, 1], labels 0-9.
- Prompts: a few templates ("a handwritten seven", "the digit seven", ...). RL trains on
  ``TRAIN_TEMPLATES``; evaluation uses the disjoint ``EVAL_TEMPLATES`` (held-out phrasing).
  The base model is pretrained on both, so every word is in its vocabulary.
- Base model: a toy flow model pretrained for ~40 s on one CPU core and cached under
  ``$FLOWDPPO_CACHE`` (default ``~/.cache/flowdppo``), keyed by a hash of ``BASE_RECIPE``.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models.toy import tokenize_words
from ..prompts import PromptItem, PromptSplits, register_prompts
from .pretrain import ensure_cached

logger = logging.getLogger(__name__)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {a} is the article ("a"/"an"), {name} the word, {num} the numeral.
TRAIN_TEMPLATES = ("a handwritten {name}", "the digit {name}", "a drawing of {a} {name}",
                   "the number {num}")
EVAL_TEMPLATES = ("{a} {name} written by hand", "a picture of the digit {name}",
                  "the numeral {num}")
# Bump "version" (or any field) to rebuild every user's cached base model.
BASE_RECIPE: dict[str, Any] = {
    "version": 1, "world": "digits",
    "model": {"sample_size": 8, "channels": 1, "num_layers": 4, "num_heads": 4, "head_dim": 32,
              "text_dim": 64, "max_length": 8, "shift": 1.0, "seed": 0},
    # ~40 s of one CPU core; one thread also keeps it fast on a busy machine (see pretrain).
    "train": {"num_steps": 600, "batch_size": 32, "lr": 3e-3, "seed": 0, "warmup_steps": 30,
              "time_sampling": "uniform", "num_threads": 1},
    "templates": [*TRAIN_TEMPLATES, *EVAL_TEMPLATES],
}
HELDOUT_EVERY = 5  # image i is held out (classifier/judge test set) when i % 5 == 0


def load_digits_dataset() -> tuple[Tensor, Tensor]:
    """Images `(1797, 1, 8, 8)` float32 in [-1, 1] and labels `(1797,)` long (0-9)."""
    images, labels = _load_digits_cached()
    return images.clone(), labels.clone()


@lru_cache(maxsize=1)
def _load_digits_cached() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()  # ships with scikit-learn: no download
    images = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
    return images, torch.as_tensor(data.target, dtype=torch.long)


def heldout_mask(num_images: int) -> Tensor:
    """Boolean `(num_images,)`: True for the held-out test images (every 5th)."""
    return torch.arange(num_images) % HELDOUT_EVERY == 0


def digit_prompt(label: int, template: str) -> str:
    """The prompt for ``label`` (0-9) under ``template``."""
    if not 0 <= label <= 9:
        raise ValueError(f"label={label}: digits are 0-9")
    name = DIGIT_NAMES[label]
    return template.format(name=name, num=label, a="an" if name[0] in "aeiou" else "a")


def parse_digit_label(prompt: str) -> int | None:
    """The digit a prompt names (word or numeral), or None when it names none or several."""
    found = {DIGIT_NAMES.index(w) if w in DIGIT_NAMES else int(w)
             for w in tokenize_words(prompt) if w in DIGIT_NAMES or (w.isdigit() and len(w) == 1)}
    return found.pop() if len(found) == 1 else None


def vocabulary(templates: tuple[str, ...] | list[str]) -> list[str]:
    """Sorted words of every prompt the templates make."""
    words = {w for t in templates for k in range(10) for w in tokenize_words(digit_prompt(k, t))}
    return sorted(words)


def _items(templates: tuple[str, ...]) -> list[PromptItem]:
    # Template-major order: any prefix of 10k items covers every label equally.
    return [PromptItem(digit_prompt(k, t), {"label": k, "template": t})
            for t in templates for k in range(10)]


@register_prompts("digits")
def build_digits_prompts(train_templates: list[str] | None = None,
                         eval_templates: list[str] | None = None) -> PromptSplits:
    """Train prompts (every label under each train template) and held-out eval prompts.

    Metadata of each item: ``{"label": int, "template": str}``. Custom templates must use
    only words of the base model's vocabulary (``{a}``, ``{name}``, ``{num}`` placeholders).
    """
    train = tuple(train_templates or TRAIN_TEMPLATES)
    evaluation = tuple(eval_templates or EVAL_TEMPLATES)
    overlap = set(train) & set(evaluation)
    if overlap:
        raise ValueError(f"prompts.kwargs: templates {sorted(overlap)} are in both train and "
                         "eval; evaluation templates must be held out")
    return PromptSplits(_items(train), _items(evaluation))


def pretraining_pairs(templates: list[str] | tuple[str, ...]) -> tuple[Tensor, list[str]]:
    """Every image once per template: images `(N * T, 1, 8, 8)` and their prompts."""
    images, labels = load_digits_dataset()
    prompts = [digit_prompt(int(k), t) for t in templates for k in labels]
    return images.repeat(len(templates), 1, 1, 1), prompts


def build_digits_base(directory: Path, recipe: dict[str, Any], progress: bool = True) -> dict:
    """Pretrain the digits base model of ``recipe`` and save it to ``directory``."""
    from ..models.toy import ToyFlowModel
    from .pretrain import pretrain_flow_model

    images, prompts = pretraining_pairs(recipe["templates"])
    model = ToyFlowModel.create(vocabulary(recipe["templates"]), **recipe["model"])
    stats = pretrain_flow_model(model, images, prompts, progress=progress, **recipe["train"])
    model.save_pretrained(directory)
    logger.info("digits base: %d steps in %.1f s wall (%.1f s CPU), loss %.3f -> %.3f",
                stats["num_steps"], stats["wall_s"], stats["cpu_s"], stats["loss_first"],
                stats["loss_last"])
    return stats


def ensure_digits_base(cache_dir: str | Path | None = None, force: bool = False,
                       progress: bool = True) -> Path:
    """Directory of the cached digits base model, pretraining it (~40 s) on a cache miss."""
    def build(tmp: Path) -> None:
        logger.info("pretraining the digits base model (once; cached in %s)", tmp.parent)
        build_digits_base(tmp, BASE_RECIPE, progress=progress)

    return ensure_cached("digits_base", BASE_RECIPE, build, cache_dir=cache_dir, force=force)
