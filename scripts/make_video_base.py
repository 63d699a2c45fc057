"""Regenerate the shipped base model of the video world, and measure it.

    python scripts/make_video_base.py                 # rebuild src/flowdppo/assets/video_base
    python scripts/make_video_base.py --eval-only     # re-measure the shipped weights
    python scripts/make_video_base.py --output DIR    # build elsewhere

`BASE_RECIPE` pins one thread (float reductions depend on the thread count), so the build is
deterministic for a given torch build. Writes ``build.json`` beside the weights: the recipe,
its hash (`recipe_hash`: `ensure_video_base` copies the weights into the cache only while it
matches), the training statistics and the judge's per-clause scores of the model's Euler-ODE
samples (10 steps, 4 samples per clip, noise seed 1) on the train and eval prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from flowdppo.models.toy_video import ToyVideoFlowModel
from flowdppo.worlds.pretrain import recipe_hash, sample_ode
from flowdppo.worlds.video import (
    ASSET_DIR,
    BASE_RECIPE,
    BUILD_FILE,
    CLAUSES,
    build_video_base,
    video_prompts,
)
from flowdppo.worlds.video_rewards import _evaluate


def measure(directory: Path, samples_per_clip: int = 4) -> dict[str, dict[str, float]]:
    """Per split: mean soft score and hard accuracy per clause of the model's ODE samples."""
    model = ToyVideoFlowModel.from_pretrained(directory)
    splits = video_prompts()
    result = {}
    for name, items in (("train", splits.train), ("eval", splits.eval)):
        items = [i for i in items for _ in range(samples_per_clip)]
        clips = sample_ode(model, [i.prompt for i in items], num_steps=10, seed=1)
        scores, correct = _evaluate(clips, [i.prompt for i in items], [i.metadata for i in items])
        row = {f"score_{c}": round(float(scores[c].mean()), 4) for c in CLAUSES}
        row.update({f"acc_{c}": round(float(correct[c].float().mean()), 4) for c in CLAUSES})
        row["score_mean"] = round(float(torch.stack([scores[c] for c in CLAUSES]).mean()), 4)
        result[name] = row
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=ASSET_DIR)
    parser.add_argument("--eval-only", action="store_true")
    args = parser.parse_args(argv)
    record_path = args.output / BUILD_FILE
    record = json.loads(record_path.read_text()) if args.eval_only else {}
    if not args.eval_only:
        stats = build_video_base(args.output, BASE_RECIPE, progress=True)
        record = {"recipe": BASE_RECIPE, "recipe_hash": recipe_hash(BASE_RECIPE),
                  "torch": torch.__version__, "stats": stats}
    record["measure"] = measure(args.output)
    record_path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(json.dumps(record["measure"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
