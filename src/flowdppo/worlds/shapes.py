"""The "shapes" world: captioned 16x16 scenes of coloured shapes (a tiny GenEval).

A scene has four clauses, all named in its caption:

- colour: red, green, blue, yellow;
- shape: circle, square, triangle (apex up), cross (a plus sign);
- count: one or two objects (same colour and shape); more do not stay legible at 16x16;
- position: left, right, top, bottom: the side of the image the objects sit on. One object
  sits centred on that side; two sit side by side along it ("two red circles at the top":
  one top-left, one top-right).

Captions: ``"a red circle on the left"``, ``"two blue squares at the bottom"``. The four
positions are mutually exclusive: the objects' centroid lies clearly on one side.

Renders are drawn with 4x4 supersampling (anti-aliased edges) on a black background, with
jitter of size (one object: 6-7.5 px, two: 5-6.5 px), position (centre 3.25-4.5 px from the
middle towards the side, ±1 px along it for one object) and colour brightness (0.8-1.0), so a caption is a
distribution of images, not one image. Generation is deterministic given a seed.

Split: the eval prompts are the 32 scenes whose (colour, shape) pair is held out
(`HELD_OUT_PAIRS`, one pair per colour and per shape); the 96 others are for training. The
base model never sees a held-out pair: evaluation measures compositional generalisation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..prompts import PromptItem, PromptSplits, register_prompts

IMAGE_SIZE = 16
SUPERSAMPLE = 4
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("left", "right", "top", "bottom")
COUNTS = (1, 2)
CLAUSES = ("color", "shape", "position", "count")
# One held-out pair per colour and per shape (a permutation), so every colour and every
# shape is still trained, just never together.
HELD_OUT_PAIRS = frozenset(
    {("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square")}
)
CROSS_ARM = 0.4  # arm width of the cross, as a fraction of its size
_PREPOSITION = {"left": "on the", "right": "on the", "top": "at the", "bottom": "at the"}
_NUMBER = {1: "a", 2: "two"}


@dataclass(frozen=True)
class Scene:
    """The ground-truth clauses of one caption."""

    color: str
    shape: str
    position: str
    count: int

    def __post_init__(self) -> None:
        for name, value, valid in (("color", self.color, tuple(COLORS)), ("shape", self.shape, SHAPES),
                                   ("position", self.position, POSITIONS),
                                   ("count", self.count, COUNTS)):
            if value not in valid:
                raise ValueError(f"Scene.{name}={value!r}: expected one of {list(valid)}")

    @property
    def caption(self) -> str:
        noun = self.shape if self.count == 1 else _plural(self.shape)
        return f"{_NUMBER[self.count]} {self.color} {noun} {_PREPOSITION[self.position]} {self.position}"

    def metadata(self) -> dict[str, Any]:
        return {"color": self.color, "shape": self.shape, "position": self.position,
                "count": self.count}


def _plural(shape: str) -> str:
    return f"{shape}es" if shape.endswith("ss") else f"{shape}s"


_NOUNS = {**{s: (s, 1) for s in SHAPES}, **{_plural(s): (s, 2) for s in SHAPES}}
_CAPTION_RE = re.compile(r"^(a|two) (\w+) (\w+) (?:on|at) the (\w+)$")


def parse_caption(caption: str) -> Scene:
    """The scene a caption of this grammar describes; ValueError for any other text."""
    text = caption.strip().lower()
    match = _CAPTION_RE.match(text)
    if match is None or match.group(3) not in _NOUNS:
        raise ValueError(f"caption {caption!r} is not in the shapes grammar, e.g. "
                         "'a red circle on the left' or 'two blue crosses at the top'")
    _number, color, noun, position = match.groups()  # the number is checked by the round trip
    shape, count = _NOUNS[noun]
    scene = Scene(color, shape, position, count)
    if scene.caption != text:
        raise ValueError(f"caption {caption!r} is not in the shapes grammar (expected "
                         f"{scene.caption!r})")
    return scene


def scene_from_metadata(prompt: str, metadata: dict[str, Any] | None) -> Scene:
    """The scene from metadata when it names all four clauses, else parsed from the prompt."""
    if metadata and all(key in metadata for key in CLAUSES):
        return Scene(metadata["color"], metadata["shape"], metadata["position"],
                     int(metadata["count"]))
    return parse_caption(prompt)


def all_scenes() -> list[Scene]:
    """Every scene of the grammar (4 x 4 x 4 x 2 = 128), in a fixed order."""
    return [Scene(c, s, p, n) for c in COLORS for s in SHAPES for p in POSITIONS for n in COUNTS]


def split_scenes() -> tuple[list[Scene], list[Scene]]:
    """``(train, eval)``: eval holds the scenes of the held-out (colour, shape) pairs."""
    scenes = all_scenes()
    held = [s for s in scenes if (s.color, s.shape) in HELD_OUT_PAIRS]
    return [s for s in scenes if (s.color, s.shape) not in HELD_OUT_PAIRS], held


# --- rendering ---------------------------------------------------------------------------


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def layout(scene: Scene, generator: torch.Generator) -> list[tuple[float, float, float]]:
    """Objects as ``(cx, cy, size)`` in pixels (x right, y down, image from 0 to 16)."""
    half = IMAGE_SIZE / 2
    # Unit vector from the centre towards the named side, and the axis along that side.
    toward = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}[scene.position]
    along = (abs(toward[1]), abs(toward[0]))
    objects = []
    if scene.count == 1:
        size = _uniform(generator, 6.0, 7.5)
        # Distance of the centre from the middle: clearly on its side, >= 0.5 px from the edge.
        depth = _uniform(generator, 3.25, half - 0.5 - size / 2)
        offsets = [_uniform(generator, -1.0, 1.0)]
        sizes = [size]
    else:
        sizes = [_uniform(generator, 5.0, 6.5) for _ in range(2)]
        depth = half / 2 + _uniform(generator, -0.25, 0.25)
        # Centres at +-d along the side: a gap >= 1.5 px (so the objects never touch after
        # thresholding), and a margin >= 0.5 px from the image edge.
        big = max(sizes)
        d = _uniform(generator, (big + 1.5) / 2, half - 0.5 - big / 2)
        offsets = [-d, d]
    for size, offset in zip(sizes, offsets):
        cx = half + toward[0] * depth + along[0] * offset
        cy = half + toward[1] * depth + along[1] * offset
        objects.append((cx, cy, size))
    return objects


def shape_coverage(shape: str, cx: Tensor, cy: Tensor, size: Tensor, height: int = IMAGE_SIZE,
                   width: int = IMAGE_SIZE) -> Tensor:
    """Fraction of each pixel inside the shape, from 4x4 supersampling.

    Args:
        shape (`str`): one of `SHAPES`.
        cx, cy, size (`Tensor` of shape `(N,)`): centre (of the bounding box) and size in
            pixels; pixel ``(i, j)`` spans ``[j, j+1] x [i, i+1]``.
        height, width (`int`): the canvas.

    Returns:
        `Tensor` of shape `(N, height, width)`, float32 in [0, 1].
    """
    ys = (torch.arange(height * SUPERSAMPLE, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    xs = (torch.arange(width * SUPERSAMPLE, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    dx = xs.view(1, 1, -1) - cx.float().view(-1, 1, 1)  # (N, 1, W*S)
    dy = ys.view(1, -1, 1) - cy.float().view(-1, 1, 1)  # (N, H*S, 1)
    r = size.float().view(-1, 1, 1) / 2
    if shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif shape == "square":
        inside = (dx.abs() <= r) & (dy.abs() <= r)
    elif shape == "triangle":  # apex at the top, base at the bottom
        inside = (dy.abs() <= r) & (dx.abs() <= (dy + r) / 2)
    elif shape == "cross":
        arm = CROSS_ARM * r
        inside = ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))
    else:
        raise ValueError(f"shape={shape!r}: expected one of {list(SHAPES)}")
    cover = inside.float().view(-1, height, SUPERSAMPLE, width, SUPERSAMPLE)
    return cover.mean(dim=(2, 4))


def render_scene(scene: Scene, generator: torch.Generator) -> Tensor:
    """One jittered render of ``scene``: `(3, 16, 16)` float32 in [0, 1], black background."""
    image = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE)
    base = torch.tensor(COLORS[scene.color])
    for cx, cy, size in layout(scene, generator):
        brightness = _uniform(generator, 0.8, 1.0)
        cover = shape_coverage(scene.shape, torch.tensor([cx]), torch.tensor([cy]),
                               torch.tensor([size]))[0]
        image += base.view(3, 1, 1) * brightness * cover
    return image.clamp(0.0, 1.0)


def render_batch(scenes: list[Scene], seed: int) -> Tensor:
    """Renders of ``scenes`` (one each), `(N, 3, 16, 16)` in [0, 1]; same seed, same images."""
    generator = torch.Generator().manual_seed(seed)
    if not scenes:
        return torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    return torch.stack([render_scene(scene, generator) for scene in scenes])


def sample_dataset(num_images: int, seed: int, split: str = "train") -> tuple[Tensor, list[Scene]]:
    """``num_images`` renders of scenes drawn uniformly from a split.

    Returns:
        images `(num_images, 3, 16, 16)` in [0, 1] and their scenes (captions via ``.caption``).
    """
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split={split!r}: expected 'train', 'eval' or 'all'")
    train, held = split_scenes()
    pool = {"train": train, "eval": held, "all": train + held}[split]
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(pool), (num_images,), generator=generator).tolist()
    scenes = [pool[i] for i in picks]
    return render_batch(scenes, seed + 1), scenes


def to_model_space(images: Tensor) -> Tensor:
    """[0, 1] images to the model's [-1, 1] latents."""
    return images * 2.0 - 1.0


@register_prompts("shapes")
def shapes_prompts(**kwargs: Any) -> PromptSplits:
    """Prompt source "shapes": 96 training captions and 32 held-out-pair eval captions."""
    if kwargs:
        raise ValueError(f"prompt source 'shapes' takes no options; got {sorted(kwargs)}")
    train, held = split_scenes()
    items = [[PromptItem(s.caption, s.metadata()) for s in part] for part in (train, held)]
    return PromptSplits(items[0], items[1])


NOVEL_TRAIN_POSITIONS = ("left", "right")  # shapes_novel: RL prompts; top/bottom are evaluated


@register_prompts("shapes_novel")
def shapes_novel_prompts(**kwargs: Any) -> PromptSplits:
    """Prompt source "shapes_novel": RL on what the base never saw (a benchmark with headroom).

    Both splits hold only the held-out (colour, shape) pairs, which the base model never
    saw: training prompts put them on the left or right (16 captions), evaluation prompts
    at the top or bottom (16 captions, never trained on by the base or by RL), so a gain on
    evaluation is a gain on unseen pairs that carries over to unseen placements.
    """
    if kwargs:
        raise ValueError(f"prompt source 'shapes_novel' takes no options; got {sorted(kwargs)}")
    _, held = split_scenes()
    train = [s for s in held if s.position in NOVEL_TRAIN_POSITIONS]
    evaluation = [s for s in held if s.position not in NOVEL_TRAIN_POSITIONS]
    return PromptSplits(*([PromptItem(s.caption, s.metadata()) for s in part]
                          for part in (train, evaluation)))


# --- base model ---------------------------------------------------------------------------

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "shapes_base"
RECIPE_FILE = "recipe.json"
# The shipped base model's recipe; `scripts/make_shapes_base.py` rebuilds it and records
# this dict and its hash in `ASSET_DIR / RECIPE_FILE`. Change it only together with the
# weights (the tests compare the hashes).
BASE_RECIPE: dict[str, Any] = {
    "version": 1, "world": "shapes",
    "model": {"sample_size": 16, "channels": 3, "num_layers": 4, "num_heads": 4, "head_dim": 32,
              "text_dim": 64, "max_length": 8, "shift": 1.0, "seed": 0},
    "data": {"num_images": 8192, "seed": 0, "split": "train"},
    "train": {"num_steps": 600, "batch_size": 64, "lr": 1e-3, "seed": 0, "warmup_steps": 50,
              "time_sampling": "uniform"},
    "storage_dtype": "fp16",
    "num_threads": 1,
}


def vocabulary() -> list[str]:
    """Every word of the grammar, sorted (the toy model's vocabulary, without ``<pad>``)."""
    from ..models.toy import tokenize_words

    return sorted({word for scene in all_scenes() for word in tokenize_words(scene.caption)})


def build_shapes_base(directory: str | Path, recipe: dict[str, Any] | None = None,
                      progress: bool = True) -> dict[str, float]:
    """Pretrain the base model of ``recipe`` (default `BASE_RECIPE`) and save it to ``directory``.

    Deterministic on the CPU for a given torch build: the recipe fixes the seeds and the
    thread count (float reductions depend on it). The weights are stored in
    ``recipe["storage_dtype"]`` (fp16 keeps the shipped files under 10 MB).

    Returns:
        the training statistics of `pretrain_flow_model` (``cpu_s``, ``wall_s``, losses).
    """
    from ..models.toy import ToyFlowModel
    from .pretrain import pretrain_flow_model

    recipe = BASE_RECIPE if recipe is None else recipe
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[recipe["storage_dtype"]]
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe["num_threads"])
    try:
        model = ToyFlowModel.create(vocabulary(), **recipe["model"])
        images, scenes = sample_dataset(**recipe["data"])
        stats = pretrain_flow_model(model, to_model_space(images), [s.caption for s in scenes],
                                    progress=progress, **recipe["train"])
    finally:
        torch.set_num_threads(threads)
    model.transformer.to(dtype)
    model.text_encoder.to(dtype)
    model.save_pretrained(directory)
    return stats


def ensure_shapes_base(cache_dir: str | Path | None = None, force: bool = False) -> str:
    """Directory of the shipped shapes base model (a `ToyFlowModel` directory).

    The weights ship with the package, so nothing is cached: ``cache_dir`` is accepted for
    the interface every world's base shares (`flowdppo pretrain`) and unused. ``force``
    refuses: ``python scripts/make_shapes_base.py`` regenerates the shipped weights (about
    4 CPU-minutes, see that script).
    """
    if force:
        raise ValueError("the shapes base model ships with flowdppo and is not rebuilt by "
                         "`--force`; regenerate it with `python scripts/make_shapes_base.py`")
    needed = ("toy_config.json", "text_encoder.safetensors", "transformer/config.json", RECIPE_FILE)
    missing = [name for name in needed if not (ASSET_DIR / name).is_file()]
    if missing:
        raise ValueError(f"shapes base model incomplete at {ASSET_DIR}: missing {missing}; "
                         "regenerate it with `python scripts/make_shapes_base.py`")
    return str(ASSET_DIR)
