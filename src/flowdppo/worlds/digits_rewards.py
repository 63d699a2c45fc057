"""Rewards and out-of-domain monitors of the digits world. Images: `(B, 1, 8, 8)` in [0, 1].

Rewards (trained on):
- ``digit_label``: p(label | image) from a small CNN trained on the real digits (train split),
  cached beside the base model.
- ``digit_ink``: ``exp(-((ink - target) / width)^2 / 2)``, ``ink`` the mean pixel value. The
  data's ink is 0.305 +- 0.034 (5-95%: 0.25-0.36); the default target 0.40 asks for thicker
  strokes than any typical digit, which fights legibility: a second, conflicting objective.
- ``digit_label_ink``: p(label) * ink score, one in-domain reward with headroom.

Monitors (never trained on): ``digit_judge`` (an RBF-SVM on raw pixels: another classifier
family), ``digit_fd`` (Fréchet distance of PCA features to the real digits of the same
labels). The label comes from ``metadata["label"]``, else from the prompt's digit word.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..rewards.base import Monitor, Reward, register_monitor, register_reward
from ..rewards.monitors import feature_stats, frechet_distance, mixture_stats
from .digits import heldout_mask, load_digits_dataset, parse_digit_label
from .pretrain import ensure_cached, torch_threads

logger = logging.getLogger(__name__)

CLASSIFIER_RECIPE: dict[str, Any] = {"version": 1, "epochs": 25, "batch_size": 64, "lr": 2e-3,
                                     "seed": 0, "max_shift": 1}
DEFAULT_INK_TARGET = 0.40
DEFAULT_INK_WIDTH = 0.06


class DigitCNN(nn.Module):
    """``(B, 1, 8, 8)`` in [0, 1] -> logits `(B, 10)`."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images * 2.0 - 1.0)


def real_splits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Real digits in [0, 1]: train images, train labels, held-out images, held-out labels."""
    images, labels = load_digits_dataset()
    images = (images + 1.0) / 2.0
    test = heldout_mask(len(labels))
    return images[~test], labels[~test], images[test], labels[test]


def _random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    # Shift the batch by up to max_shift pixels (zero fill): robustness to off-centre samples.
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    out = torch.roll(images, (dy, dx), dims=(2, 3))
    if dy:
        out[:, :, slice(0, dy) if dy > 0 else slice(dy, None)] = 0.0
    if dx:
        out[:, :, :, slice(0, dx) if dx > 0 else slice(dx, None)] = 0.0
    return out


def train_digit_classifier(images: Tensor, labels: Tensor, *, epochs: int, batch_size: int,
                           lr: float, seed: int, max_shift: int = 1) -> DigitCNN:
    """Train a `DigitCNN` (deterministic given ``seed`` on the CPU, a few seconds).

    Args:
        images (`Tensor` of shape `(N, 1, 8, 8)`): in [0, 1]. labels (`Tensor` `(N,)`): 0-9.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for lo in range(0, len(labels), batch_size):
            idx = order[lo:lo + batch_size]
            batch = _random_shift(images[idx], max_shift, generator) if max_shift else images[idx]
            loss = nn.functional.cross_entropy(model(batch), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval().requires_grad_(False)


def ensure_digit_classifier(cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """Directory holding the reward classifier's ``classifier.safetensors`` (trained once)."""
    from safetensors.torch import save_file

    def build(tmp: Path) -> None:
        train_x, train_y, test_x, test_y = real_splits()
        recipe = {k: v for k, v in CLASSIFIER_RECIPE.items() if k != "version"}
        with torch_threads(1):  # ~2 s on one core; threads only add overhead at this size
            model = train_digit_classifier(train_x, train_y, **recipe)
        accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
        logger.info("digit classifier: held-out accuracy %.4f", accuracy)
        save_file(model.state_dict(), str(tmp / "classifier.safetensors"),
                  metadata={"heldout_accuracy": f"{accuracy:.6f}"})

    return ensure_cached("digits_classifier", CLASSIFIER_RECIPE, build, cache_dir=cache_dir,
                         force=force)


def load_digit_classifier(cache_dir: str | None = None, device: str = "cpu") -> DigitCNN:
    """The reward classifier on ``device`` (trained and cached on first use; a fresh module
    per call, so rewards on different devices or threads share no state)."""
    model = DigitCNN()
    model.load_state_dict(_classifier_state(cache_dir))
    return model.to(device).eval().requires_grad_(False)


@lru_cache(maxsize=4)
def _classifier_state(cache_dir: str | None) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ensure_digit_classifier(cache_dir) / "classifier.safetensors"))


def digit_labels(prompts: Sequence[str], metadata: Sequence[dict[str, Any]]) -> Tensor:
    """Labels `(B,)` long from ``metadata["label"]``, else from the prompt's digit word."""
    labels = []
    for i, prompt in enumerate(prompts):
        meta = metadata[i] if i < len(metadata) else {}
        label = meta.get("label", parse_digit_label(prompt))
        if label is None or not 0 <= int(label) <= 9:
            raise ValueError(f"prompt {prompt!r}: no digit label (metadata 'label' or one digit "
                             "word like 'seven'); the digits rewards need one")
        labels.append(int(label))
    return torch.tensor(labels, dtype=torch.long)


def _check_images(images: Tensor) -> Tensor:
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(f"digits rewards take images (B, 1, 8, 8); got {tuple(images.shape)}")
    return images.detach().float()


def ink_level(images: Tensor) -> Tensor:
    """Mean pixel value per image, `(B,)` (the data's mean is 0.305)."""
    return images.flatten(1).mean(1)


def ink_score(images: Tensor, target: float, width: float) -> Tensor:
    """``exp(-((ink - target) / width)^2 / 2)`` per image, `(B,)` in (0, 1]."""
    return torch.exp(-0.5 * ((ink_level(images) - target) / width) ** 2)


def _label_probs(classifier: DigitCNN, images: Tensor, labels: Tensor, device: str) -> Tensor:
    with torch.no_grad():
        probs = classifier(images.to(device)).softmax(-1).cpu()
    return probs.gather(1, labels[:, None]).squeeze(1)


@register_reward("digit_label")
def digit_label_reward(device: str = "cpu", cache_dir: str | None = None) -> Reward:
    """p(label | image) from the cached CNN classifier."""
    classifier = load_digit_classifier(cache_dir, device)

    def reward(images: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]):
        labels = digit_labels(prompts, metadata)
        p_label = _label_probs(classifier, _check_images(images), labels, device)
        return p_label.float(), {"p_label": p_label}

    return reward


def _check_ink(target: float, width: float) -> None:
    if not 0.0 < target < 1.0 or width <= 0.0:
        raise ValueError(f"ink target={target}, width={width}: need 0 < target < 1, width > 0")


@register_reward("digit_ink")
def digit_ink_reward(device: str = "cpu", target: float = DEFAULT_INK_TARGET,
                     width: float = DEFAULT_INK_WIDTH) -> Reward:
    """Closeness of the mean ink to ``target`` (see the module docstring)."""
    _check_ink(target, width)

    def reward(images: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]):
        images = _check_images(images).cpu()
        return ink_score(images, target, width).float(), {"ink": ink_level(images)}

    return reward


@register_reward("digit_label_ink")
def digit_label_ink_reward(device: str = "cpu", target: float = DEFAULT_INK_TARGET,
                           width: float = DEFAULT_INK_WIDTH, cache_dir: str | None = None) -> Reward:
    """p(label) * ink score: legible digits with thicker strokes."""
    _check_ink(target, width)
    classifier = load_digit_classifier(cache_dir, device)

    def reward(images: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]):
        images = _check_images(images).cpu()
        p_label = _label_probs(classifier, images, digit_labels(prompts, metadata), device)
        score = ink_score(images, target, width)
        return (p_label * score).float(), {"p_label": p_label, "ink_score": score}

    return reward


@lru_cache(maxsize=1)
def _judge():
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import SVC

    train_x, train_y, _, _ = real_splits()
    # A different family from the reward CNN: an RBF-kernel SVM on raw pixels, Platt-scaled
    # with 5-fold (unshuffled, so deterministic) cross-validation.
    judge = CalibratedClassifierCV(SVC(C=10.0, gamma="scale"), method="sigmoid", cv=5,
                                   ensemble=False)
    return judge.fit(train_x.flatten(1).numpy(), train_y.numpy())


def judge_scores(images: Tensor, labels: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The judge's p(label) `(B,)` and correctness `(B,)` (bool) for images `(B, 1, 8, 8)`."""
    judge = _judge()
    probs = judge.predict_proba(_check_images(images).cpu().flatten(1).numpy())
    column = {int(c): i for i, c in enumerate(judge.classes_)}
    picked = probs[np.arange(len(labels)), [column[int(k)] for k in labels]]
    return picked, probs.argmax(1) == np.array([column[int(k)] for k in labels])


@register_monitor("digit_judge")
def digit_judge_monitor(device: str = "cpu") -> Monitor:
    """``{"judge_p_label", "judge_acc"}``: an independent judge's view of legibility."""
    _judge()  # fit now, not during the first evaluation

    def monitor(images: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]):
        p_label, correct = judge_scores(images, digit_labels(prompts, metadata))
        return {"judge_p_label": float(p_label.mean()), "judge_acc": float(correct.mean())}

    return monitor


@lru_cache(maxsize=2)
def _pca_reference(num_components: int):
    from sklearn.decomposition import PCA

    images, labels = load_digits_dataset()
    flat = ((images + 1.0) / 2.0).flatten(1).numpy().astype(np.float64)
    pca = PCA(n_components=num_components, svd_solver="full").fit(flat)
    feats = pca.transform(flat)
    stats = [feature_stats(feats[labels.numpy() == k]) for k in range(10)]
    return pca, np.stack([s[0] for s in stats]), np.stack([s[1] for s in stats])


@register_monitor("digit_fd")
def digit_fd_monitor(device: str = "cpu", num_components: int = 16) -> Monitor:
    """``{"digit_fd"}``: Fréchet distance between PCA features (fitted on all real digits; not
    the reward model) of the images and of the real digits mixed in the images' label
    proportions, so a label-balanced or skewed evaluation set is compared like for like."""
    pca, means, covs = _pca_reference(num_components)

    def monitor(images: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]):
        labels = digit_labels(prompts, metadata).numpy()
        feats = pca.transform(_check_images(images).cpu().flatten(1).numpy().astype(np.float64))
        mu, cov = feature_stats(feats)
        ref_mu, ref_cov = mixture_stats(means, covs, np.bincount(labels, minlength=10))
        return {"digit_fd": frechet_distance(mu, cov, ref_mu, ref_cov)}

    return monitor
