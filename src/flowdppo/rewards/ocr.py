"""OCR reward: how well the text rendered in an image matches the text the prompt asks for.

As in flow_grpo's OCR task:

    target    = metadata["text"], else the text between the first pair of double quotes
                in the prompt (straight "..." or curly “...”)
    norm(s)   = s lower-cased with all whitespace removed
    d         = 0 if norm(target) occurs in norm(recognised),
                else Levenshtein(norm(recognised), norm(target))
    ocr_i     = 1 - min(d, len(norm(target))) / len(norm(target))        in [0, 1]

``recognised`` is every line the OCR engine finds, in its reading order, joined. The engine is
RapidOCR (``rapidocr-onnxruntime``, ships its ONNX models; about 0.6 s per image on one CPU
core), loaded on the first call.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .base import Reward, RewardOutput, register_reward
from .hub import LazyModel
from .preprocess import check_batch, to_uint8_hwc

PIP_LINE = "pip install 'flowdppo[ocr]'  (or: pip install rapidocr-onnxruntime)"
_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”')


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions; each costs 1) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(
                min(
                    previous[j] + 1,  # delete char_a
                    current[j - 1] + 1,  # insert char_b
                    previous[j - 1] + (char_a != char_b),
                )
            )  # substitute or keep
        previous = current
    return previous[-1]


def normalise_text(text: str) -> str:
    """Lower case, all whitespace removed: OCR spacing and case are not what is rewarded."""
    return "".join(text.split()).lower()


def ocr_target(prompt: str, metadata: dict[str, Any] | None) -> str:
    """The text an image should show: ``metadata["text"]``, else the first quoted span."""
    if metadata and metadata.get("text"):
        return str(metadata["text"])
    match = _QUOTED.search(prompt)
    if match is None:
        raise ValueError(
            f"ocr: no target text for prompt {prompt!r}: put the text in double quotes in the "
            f"prompt or give it as metadata['text']"
        )
    return match.group(1) or match.group(2)


def ocr_score(recognised: str, target: str, substring_match: bool = True) -> float:
    """``1 - min(d, len) / len`` over normalised strings (see the module docstring), in [0, 1]."""
    recognised, target = normalise_text(recognised), normalise_text(target)
    if not target:
        raise ValueError("ocr: the target text is empty after removing whitespace")
    if substring_match and target in recognised:
        return 1.0
    distance = min(levenshtein(recognised, target), len(target))
    return 1.0 - distance / len(target)


class OcrReward(LazyModel):
    """RapidOCR each image and score its text against the prompt's target text."""

    def __init__(self, *, min_confidence: float, substring_match: bool) -> None:
        super().__init__()
        if importlib.util.find_spec("rapidocr_onnxruntime") is None:
            raise ImportError(f"the ocr reward needs rapidocr-onnxruntime: {PIP_LINE}")
        self.min_confidence, self.substring_match = min_confidence, substring_match

    def _load(self) -> None:
        from rapidocr_onnxruntime import RapidOCR

        self.engine = RapidOCR()

    def recognise(self, image_hwc) -> str:
        """All text lines of one `(H, W, 3)` uint8 RGB image, joined in reading order."""
        # RapidOCR takes numpy arrays as OpenCV BGR.
        lines, _ = self.engine(image_hwc[:, :, ::-1].copy())
        return "".join(text for _, text, score in lines or [] if score >= self.min_confidence)

    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> RewardOutput:
        check_batch(images, prompts, metadata, reward="ocr")
        targets = [ocr_target(p, metadata[i] if metadata else None) for i, p in enumerate(prompts)]
        self.ensure_loaded()
        recognised = [self.recognise(array) for array in to_uint8_hwc(images)]
        scores = [
            ocr_score(text, target, self.substring_match)
            for text, target in zip(recognised, targets, strict=True)
        ]
        return torch.tensor(scores, dtype=torch.float32), {"text": recognised, "target": targets}


@register_reward("ocr")
def ocr(min_confidence: float = 0.0, substring_match: bool = True, device: str = "cpu") -> Reward:
    """OCR text accuracy in [0, 1] (RapidOCR on the CPU; ``device`` is accepted and unused).

    ``min_confidence``: drop recognised lines scored below it; ``substring_match``: a target
    found anywhere in the recognised text scores 1 (flow_grpo's rule).
    """
    return OcrReward(min_confidence=float(min_confidence), substring_match=bool(substring_match))
