"""Model rewards (PickScore, CLIPScore, aesthetic, HPSv2) on tiny random models built offline.

Real checkpoints are not available here: each reward is loaded by path from a tiny random
CLIP saved with ``save_pretrained`` (tokenizer built from a hand-written vocabulary) and
compared with the same model called directly through transformers on hand-normalised pixels.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from flowdppo.rewards import build_reward
from flowdppo.rewards.aesthetic import AestheticMLP
from flowdppo.rewards.hub import MissingModelError
from flowdppo.rewards.preprocess import ClipPreprocess

transformers = pytest.importorskip("transformers")

MEAN = (0.5, 0.4, 0.3)  # not OpenAI's: the reward must read them from the directory
STD = (0.2, 0.25, 0.3)
PROMPTS = ["a cat", "a dog on grass", "two red cubes!", "cat", "a long prompt " * 12]


def _tiny_tokenizer():
    """A CLIP byte-level BPE over printable ASCII with two merges; specials get the top ids."""
    chars = [chr(c) for c in range(33, 127)]  # byte-level BPE maps these bytes to themselves
    tokens = chars + [c + "</w>" for c in chars] + ["at</w>", "cat</w>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[("a", "t</w>"), ("c", "at</w>")])


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP (32 px, 16-d projection) with tokenizer and preprocessor config."""
    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=24,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    directory = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
        image_mean=list(MEAN), image_std=list(STD))
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def reference(clip_dir):
    """The same tiny CLIP and tokenizer, loaded directly through transformers."""
    model = transformers.CLIPModel.from_pretrained(clip_dir).eval()
    return model, transformers.AutoTokenizer.from_pretrained(clip_dir)


def _reference_embeds(reference, images, prompts):
    """Normalised image and text embeddings from ``CLIPModel.forward`` on hand-normalised pixels."""
    model, tokenizer = reference
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=24, return_tensors="pt")
    pixels = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    pixel_values=pixels)
    return out.image_embeds, out.text_embeds, model.logit_scale.exp().item(), out.logits_per_image


def _images(n: int = len(PROMPTS), size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_pickscore_equals_clip_logits_diagonal(clip_dir, reference):
    images = _images()
    rewards, info = build_reward("pickscore", model=str(clip_dir), processor=str(clip_dir))(
        images, PROMPTS, [{}] * len(PROMPTS))
    assert rewards.shape == (len(PROMPTS),) and rewards.dtype == torch.float32
    assert rewards.device.type == "cpu" and torch.isfinite(rewards).all() and info == {}
    *_, logits = _reference_embeds(reference, images, PROMPTS)  # exp(logit_scale) * cos
    torch.testing.assert_close(rewards, logits.diagonal(), rtol=1e-5, atol=1e-5)


def test_clipscore_is_scaled_cosine_and_batch_order_equivariant(clip_dir, reference):
    images = _images(seed=1)
    reward = build_reward("clipscore", model=str(clip_dir), scale=100.0, batch_size=2)
    rewards, _ = reward(images, PROMPTS, [])
    image_embeds, text_embeds, *_ = _reference_embeds(reference, images, PROMPTS)
    expected = 100.0 * (image_embeds * text_embeds).sum(-1)
    torch.testing.assert_close(rewards, expected, rtol=1e-5, atol=1e-4)
    perm = torch.tensor([3, 0, 4, 2, 1])
    permuted, _ = reward(images[perm], [PROMPTS[i] for i in perm], [])
    torch.testing.assert_close(permuted, rewards[perm], rtol=1e-5, atol=1e-4)
    assert not torch.allclose(rewards, rewards[perm])  # the check above can fail


def test_prompt_matters(clip_dir):
    reward = build_reward("clipscore", model=str(clip_dir))
    images = _images(2, seed=2)
    a, _ = reward(images, ["a cat", "a cat"], [])
    b, _ = reward(images, ["zzz qqq", "zzz qqq"], [])
    assert not torch.allclose(a, b)


def test_torch_preprocessing_matches_clip_image_processor(clip_dir):
    """Resize + crop geometry on a smooth non-square image vs transformers' (PIL) processor."""
    height, width = 60, 81  # resized to 32 x 43: odd crop margin, tests the (W - w) // 2 offset
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    image = np.stack([xx, yy, 0.5 + 0.4 * np.sin(6 * xx + 3 * yy)], -1)
    uint8 = (image * 255).round().astype(np.uint8)
    processor = transformers.CLIPImageProcessor.from_pretrained(clip_dir)
    expected = processor(images=[uint8], return_tensors="pt")["pixel_values"]
    ours = ClipPreprocess.from_dir(clip_dir)(torch.from_numpy(uint8).permute(2, 0, 1)[None] / 255)
    assert ours.shape == expected.shape == (1, 3, 32, 32)
    # One grey level after normalisation is 1/255/0.2 = 0.02; a one-pixel shift is about 0.1.
    assert (ours - expected).abs().max() < 0.05


def test_aesthetic_equals_direct_mlp(clip_dir, reference, tmp_path):
    torch.manual_seed(3)
    shapes = AestheticMLP(embed_dim=16).state_dict()
    state = {k: torch.randn_like(v) * 0.3 for k, v in shapes.items()}
    torch.save(state, tmp_path / "mlp.pth")
    images = _images(4, seed=4)
    rewards, _ = build_reward("aesthetic", weights=str(tmp_path / "mlp.pth"),
                              clip_model=str(clip_dir))(images, PROMPTS[:4], [])
    image_embeds, *_ = _reference_embeds(reference, images, PROMPTS[:4])  # L2-normalised
    h = image_embeds
    for index in (0, 2, 4, 6, 7):  # the linear layers; dropout is the identity in eval
        h = h @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    torch.testing.assert_close(rewards, h.squeeze(-1), rtol=1e-5, atol=1e-5)
    from safetensors.torch import save_file

    save_file(state, tmp_path / "mlp.safetensors")
    again, _ = build_reward("aesthetic", weights=str(tmp_path / "mlp.safetensors"),
                            clip_model=str(clip_dir))(images, PROMPTS[:4], [])
    torch.testing.assert_close(again, rewards)


def test_aesthetic_mlp_has_the_released_layout():
    shapes = {k: tuple(v.shape) for k, v in AestheticMLP().state_dict().items()}
    assert shapes == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }


def test_missing_models_name_the_argument_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(MissingModelError, match=r"hf download no-such-org/no-such-model"):
        build_reward("pickscore", model="no-such-org/no-such-model", processor=str(tmp_path))
    with pytest.raises(ValueError, match=r"processor=.*missing/dir"):
        build_reward("clipscore", model=str(tmp_path), processor=str(tmp_path / "missing/dir"))
    with pytest.raises(MissingModelError, match=r"weights is required.*improved-aesthetic"):
        build_reward("aesthetic", clip_model=str(tmp_path))
    with pytest.raises(MissingModelError, match="no such file"):
        build_reward("aesthetic", weights=str(tmp_path / "nope.pth"), clip_model=str(tmp_path))


def test_bad_input_is_a_clear_error(clip_dir):
    reward = build_reward("clipscore", model=str(clip_dir))
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(_images(2), ["one"], [])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        reward(torch.rand(3, 32, 32), ["one"], [])


def test_hpsv2_without_open_clip_names_the_pip_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip now fails
    (tmp_path / "hps.pt").write_bytes(b"")
    with pytest.raises(ImportError, match="pip install open_clip_torch"):
        build_reward("hpsv2", checkpoint=str(tmp_path / "hps.pt"))


class _FakeOpenClip(nn.Module):
    """Stands in for an open_clip CLIP: the attributes and methods the reward uses."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = nn.Linear(3 * 8 * 8, 6)
        self.visual.image_size = 8
        self.visual.image_mean, self.visual.image_std = MEAN, STD
        self.token_embedding = nn.Embedding(50, 6)

    def encode_image(self, pixels):
        return self.visual(pixels.flatten(1))

    def encode_text(self, tokens):
        return self.token_embedding(tokens).mean(1)


def test_hpsv2_glue_with_a_fake_open_clip(tmp_path, monkeypatch):
    """Checks the reward's use of the open_clip API it assumes, not open_clip itself."""
    calls = {}

    def create_model(name, pretrained=None, device="cpu"):
        calls["create"] = (name, pretrained)
        return _FakeOpenClip()

    def get_tokenizer(name):
        return lambda texts: torch.tensor([[len(t) % 50, ord(t[0]) % 50, 3] for t in texts])

    fake = types.ModuleType("open_clip")
    fake.create_model, fake.get_tokenizer = create_model, get_tokenizer
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    torch.manual_seed(5)
    source = _FakeOpenClip()
    torch.save({"state_dict": source.state_dict()}, tmp_path / "hps.pt")
    images, prompts = _images(3, size=8, seed=6), ["a cat", "dog", "the sky"]
    rewards, _ = build_reward("hpsv2", checkpoint=str(tmp_path / "hps.pt"))(images, prompts, [])
    assert calls["create"] == ("ViT-H-14", None)  # architecture only: nothing downloaded
    pixels = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image_embeds = nn.functional.normalize(source.encode_image(pixels), dim=-1)
        tokens = get_tokenizer("")(prompts)
        text_embeds = nn.functional.normalize(source.encode_text(tokens), dim=-1)
    torch.testing.assert_close(rewards, (image_embeds * text_embeds).sum(-1))
