"""The toy adapter (tiny pixel-space SD3 transformer) and generic rectified-flow pretraining."""

from __future__ import annotations

import pytest
import torch

from flowdppo.models import build_model
from flowdppo.models.base import Conditioning
from flowdppo.models.toy import ToyFlowModel, model_timestep
from flowdppo.worlds.pretrain import ensure_cached, flow_matching_loss, pretrain_flow_model

VOCAB = ["a", "red", "blue", "square", "circle", "the"]
SMALL = {"num_layers": 2, "num_heads": 2, "head_dim": 16, "text_dim": 16, "max_length": 4}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls: threads only add spin-wait overhead (10x slower on a busy CPU).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _model(seed: int = 0, **kwargs) -> ToyFlowModel:
    return ToyFlowModel.create(VOCAB, seed=seed, **{**SMALL, **kwargs})


def test_shapes_dtypes_and_timestep_helper():
    model = _model()
    cond = model.encode_prompts(["a red square", "the blue circle", "a red square"])
    assert cond.tensors["prompt_embeds"].shape == (3, 4, 16)
    assert cond.tensors["pooled_prompt_embeds"].shape == (3, 16)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 0.5, 0.1])
    v = model.predict_velocity(x, t, cond)
    assert v.shape == (3, 1, 8, 8) and v.dtype == torch.float32
    # The transformer sees t * 1000 (SD3's timestep scale), through the one helper.
    direct = model.transformer(hidden_states=x, encoder_hidden_states=cond.tensors["prompt_embeds"],
                               pooled_projections=cond.tensors["pooled_prompt_embeds"],
                               timestep=t * 1000, return_dict=False)[0]
    torch.testing.assert_close(v, direct)
    assert torch.equal(model_timestep(torch.tensor([0.25])), torch.tensor([250.0]))
    assert model.latent_shape == (1, 8, 8) and model.image_channels == 1
    with torch.no_grad():
        model.transformer.to(torch.bfloat16)
    assert model.predict_velocity(x, t, cond).dtype == torch.float32


def test_rgb_16px_model_shapes():
    model = _model(sample_size=16, channels=3)
    cond = model.encode_prompts(["a blue circle"] * 2)
    assert model.predict_velocity(torch.randn(2, 3, 16, 16), torch.rand(2), cond).shape == (2, 3, 16, 16)


def test_encode_cache_and_pooling():
    model = _model()
    first = model.encode_prompts(["a red square", "the circle"])
    assert set(model._cache) == {"a red square", "the circle"}
    again = model.encode_prompts(["the circle", "a red square"])
    assert torch.equal(again.tensors["prompt_embeds"][0], first.tensors["prompt_embeds"][1])
    # Pooled = mean of the word embeddings of the words present (independent computation).
    words = model.text_encoder.words.weight
    ids = [model.vocab.index(w) for w in ("a", "red", "square")]
    torch.testing.assert_close(first.tensors["pooled_prompt_embeds"][0], words[ids].mean(0))
    assert not any(p.requires_grad for p in model.text_encoder.parameters())


def test_unknown_word_and_long_prompt_raise():
    model = _model()
    with pytest.raises(ValueError, match=r"'green'.*vocabulary of 6 words"):
        model.encode_prompts(["a green square"])
    with pytest.raises(ValueError, match="has 5 words"):
        model.encode_prompts(["a red square the circle"])


def test_decode_and_sigmas():
    model = _model()
    images = model.decode(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5))
    assert images.flatten().tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert torch.equal(model.sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    shifted = _model(shift=3.0).sigmas(4)
    s = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(shifted, 3 * s / (1 + 2 * s))
    assert shifted[2] > 0.5  # a shift > 1 spends more of the grid at high noise


def test_save_load_round_trip_and_registry(tmp_path):
    model = _model(seed=3)
    model.save_pretrained(tmp_path / "m")
    loaded = build_model("toy", pretrained=str(tmp_path / "m"))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.7, 0.2])
    prompts = ["a red square", "the blue circle"]
    expected = model.predict_velocity(x, t, model.encode_prompts(prompts))
    torch.testing.assert_close(loaded.predict_velocity(x, t, loaded.encode_prompts(prompts)), expected)
    assert loaded.vocab == model.vocab and loaded.max_length == 4
    with pytest.raises(ValueError, match=r"needs `model\.kwargs\.vocab`"):
        build_model("toy", pretrained="tiny-random")
    with pytest.raises(ValueError, match=r"no toy_config\.json"):
        build_model("toy", pretrained=str(tmp_path))


def test_lora_export_loads_in_diffusers_and_reproduces_output(tmp_path):
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    model = _model(seed=1)
    model.save_pretrained(tmp_path / "base")
    # alpha != r: the scale alpha/r must travel with the file.
    model.transformer.add_adapter(LoraConfig(r=4, lora_alpha=12, init_lora_weights="gaussian",
                                             target_modules=list(model.lora_target_modules)))
    with torch.no_grad():
        for name, param in model.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.9, 0.3])
    cond = model.encode_prompts(["a red square", "the circle"])
    expected = model.predict_velocity(x, t, cond)
    path = model.export_lora(get_peft_model_state_dict(model.transformer), tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors"
    keys = list(load_file(str(path)))
    assert keys and all(k.startswith("transformer.") for k in keys)
    fresh = SD3Transformer2DModel.from_pretrained(tmp_path / "base" / "transformer")
    base_out = ToyFlowModel(fresh, model.text_encoder, model.vocab, 4).predict_velocity(x, t, cond)
    assert not torch.allclose(base_out, expected, atol=1e-4)  # the LoRA changes the output
    fresh.load_lora_adapter(str(tmp_path / "lora"), prefix="transformer", weight_name=path.name)
    got = ToyFlowModel(fresh, model.text_encoder, model.vocab, 4).predict_velocity(x, t, cond)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _toy_data(n: int = 32) -> tuple[torch.Tensor, list[str]]:
    # Two classes of images tied to their prompts: a left bar and a right bar.
    images = -torch.ones(n, 1, 8, 8)
    images[: n // 2, :, :, :3] = 1.0
    images[n // 2 :, :, :, 5:] = 1.0
    return images, ["a red square"] * (n // 2) + ["a blue circle"] * (n // 2)


def _held_out_loss(model: ToyFlowModel, images, prompts) -> float:
    gen = torch.Generator().manual_seed(123)
    t, eps = torch.rand(len(prompts), generator=gen), torch.randn(images.shape, generator=gen)
    with torch.no_grad():
        return float(flow_matching_loss(model, images, model.tokenize(prompts), t, eps))


def test_pretraining_reduces_loss_and_is_deterministic():
    images, prompts = _toy_data()
    runs = []
    for seed in (0, 0, 1):
        model = _model()
        before = _held_out_loss(model, images, prompts)
        stats = pretrain_flow_model(model, images, prompts, num_steps=20, batch_size=16, lr=3e-3,
                                    seed=seed, warmup_steps=5, progress=False)
        runs.append((model, stats))
        assert _held_out_loss(model, images, prompts) < 0.8 * before
    assert stats["loss_last"] < stats["loss_first"] and stats["cpu_s"] > 0
    (a, _), (b, _), (c, _) = runs
    for (name, pa), pb in zip(a.transformer.state_dict().items(), b.transformer.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.transformer.parameters(), c.transformer.parameters()))
    # The text encoder trained too, and is frozen again afterwards.
    assert not torch.equal(a.text_encoder.words.weight, _model().text_encoder.words.weight)
    assert not any(p.requires_grad for p in a.text_encoder.parameters())


def test_pretraining_rejects_bad_data():
    model = _model()
    images, prompts = _toy_data(4)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        pretrain_flow_model(model, images * 2, prompts, num_steps=1, batch_size=2, lr=1e-3, seed=0)
    with pytest.raises(ValueError, match="one each"):
        pretrain_flow_model(model, images, prompts[:3], num_steps=1, batch_size=2, lr=1e-3, seed=0)


def test_ensure_cached_builds_once_and_atomically(tmp_path):
    calls = []

    def build(directory):
        calls.append(directory)
        (directory / "weights").write_text("ok")

    first = ensure_cached("thing", {"a": 1}, build, cache_dir=tmp_path)
    assert ensure_cached("thing", {"a": 1}, build, cache_dir=tmp_path) == first and len(calls) == 1
    other = ensure_cached("thing", {"a": 2}, build, cache_dir=tmp_path)  # recipe change: rebuild
    assert other != first and len(calls) == 2 and (other / "recipe.json").is_file()
    ensure_cached("thing", {"a": 1}, build, cache_dir=tmp_path, force=True)
    assert len(calls) == 3 and (first / "weights").read_text() == "ok"

    def broken(directory):
        (directory / "half").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        ensure_cached("thing", {"a": 3}, broken, cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])


def test_conditioning_rows_follow_prompts():
    model = _model()
    cond = model.encode_prompts(["the circle", "a red square"])
    assert isinstance(cond, Conditioning) and len(cond) == 2
