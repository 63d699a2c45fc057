"""OCR reward: Levenshtein against a hand table, the score rule, target extraction, and
RapidOCR end to end on text rendered with PIL."""

from __future__ import annotations

import time

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from flowdppo.rewards import build_reward
from flowdppo.rewards.ocr import levenshtein, ocr_score, ocr_target

# (a, b, distance), worked by hand.
LEVENSHTEIN_TABLE = [
    ("", "", 0), ("abc", "", 3), ("", "abc", 3), ("abc", "abc", 0), ("ab", "ba", 2),
    ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("intention", "execution", 5),
    ("sunday", "saturday", 3), ("a", "b", 1), ("abcdef", "azced", 3),
]


@pytest.mark.parametrize(("a", "b", "distance"), LEVENSHTEIN_TABLE)
def test_levenshtein_hand_table(a, b, distance):
    assert levenshtein(a, b) == distance
    assert levenshtein(b, a) == distance


def test_score_rule():
    assert ocr_score("Hello  World", "hello world") == 1.0  # case and spaces normalised away
    assert ocr_score("xx HELLOWORLD yy", "hello world") == 1.0  # target found inside: 1
    assert ocr_score("xxhelloworldyy", "hello world", substring_match=False) == pytest.approx(0.6)
    assert ocr_score("hello", "hello world") == pytest.approx(0.5)  # 5 insertions / 10
    assert ocr_score("", "open") == 0.0
    assert ocr_score("a completely different sentence", "open") == 0.0  # distance capped at len
    with pytest.raises(ValueError, match="empty"):
        ocr_score("abc", "   ")


def test_target_from_metadata_or_quotes():
    assert ocr_target('a sign that says "Open 24 Hours" at night', None) == "Open 24 Hours"
    assert ocr_target("a neon sign “Flow DPPO”", {}) == "Flow DPPO"
    assert ocr_target('a sign "ignored"', {"text": "CAFE"}) == "CAFE"
    with pytest.raises(ValueError, match="double quotes"):
        ocr_target("a sign with no quoted text", {})


def _render(text: str, size: tuple[int, int] = (256, 96)) -> torch.Tensor:
    """`(3, H, W)` [0, 1] image of black ``text`` on white."""
    image = Image.new("RGB", size, "white")
    try:
        font = ImageFont.load_default(size=36)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        font = ImageFont.load_default()
    ImageDraw.Draw(image).text((12, 28), text, fill="black", font=font)
    return torch.from_numpy(__import__("numpy").asarray(image).copy()).permute(2, 0, 1) / 255


def test_ocr_end_to_end_on_rendered_text():
    pytest.importorskip("rapidocr_onnxruntime", reason="OCR engine: pip install 'flowdppo[ocr]'")
    images = torch.stack([_render("FLOW DPPO"), _render("FLOW DPP"), _render("")])
    prompts = ['a sign that says "flow dppo"'] * 3
    reward = build_reward("ocr")
    start = time.perf_counter()
    rewards, info = reward(images, prompts, [{}] * 3)
    seconds = time.perf_counter() - start
    assert rewards.shape == (3,) and rewards.dtype == torch.float32
    assert info["text"] == ["FLOW DPPO", "FLOW DPP", ""] and info["target"] == ["flow dppo"] * 3
    assert rewards.tolist() == pytest.approx([1.0, 1 - 1 / 8, 0.0])  # one deletion in 8 letters
    assert seconds < 30  # about 0.6 s per text image on one free core


def test_missing_engine_names_the_pip_line(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install 'flowdppo\[ocr\]'"):
        build_reward("ocr")
