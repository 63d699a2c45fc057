"""Regenerate the shipped base model of the shapes world, and measure it.

    python scripts/make_shapes_base.py                 # rebuild src/flowdppo/assets/shapes_base
    python scripts/make_shapes_base.py --eval-only     # re-measure the shipped weights
    python scripts/make_shapes_base.py --output DIR    # build elsewhere

Budget: `BASE_RECIPE` (600 steps of batch 64, a 2.3M-parameter toy SD3 transformer) took
201 CPU-seconds of training (205 for the whole build) on one thread, plus about 15 for the
measurement. The recipe pins one thread: float reductions depend on the thread count, and
one thread makes the build deterministic for a given torch build.

Writes ``recipe.json`` beside the weights: the recipe, its hash (`recipe_hash`), the training
statistics (CPU and wall seconds, losses) and the judge's per-clause scores of the model's
Euler-ODE samples (10 steps, 4 samples per scene, noise seed 1) on the train and the
held-out eval scenes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from flowdppo.models.toy import ToyFlowModel
from flowdppo.worlds.pretrain import recipe_hash, sample_ode
from flowdppo.worlds.shapes import (
    ASSET_DIR,
    BASE_RECIPE,
    CLAUSES,
    RECIPE_FILE,
    build_shapes_base,
    split_scenes,
)
from flowdppo.worlds.shapes_rewards import clause_correct, clause_scores, judge


def measure(directory: Path, num_steps: int = 10, samples_per_scene: int = 4,
            seed: int = 1) -> dict[str, dict[str, float]]:
    """Per split: mean soft score and hard accuracy per clause of the model's ODE samples."""
    model = ToyFlowModel.from_pretrained(directory)
    train, held = split_scenes()
    result = {}
    for name, scenes in (("train", train), ("eval", held)):
        scenes = [s for s in scenes for _ in range(samples_per_scene)]
        images = sample_ode(model, [s.caption for s in scenes], num_steps=num_steps, seed=seed)
        judgement = judge(images)
        scores, correct = clause_scores(judgement, scenes), clause_correct(judgement, scenes)
        row = {f"score_{c}": round(float(scores[c].mean()), 4) for c in CLAUSES}
        row.update({f"acc_{c}": round(float(correct[c].float().mean()), 4) for c in CLAUSES})
        row["score_mean"] = round(float(torch.stack([scores[c] for c in CLAUSES]).mean()), 4)
        row["acc_all"] = round(float(torch.stack([correct[c] for c in CLAUSES]).all(0)
                                     .float().mean()), 4)
        result[name] = row
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ASSET_DIR, help="model directory")
    parser.add_argument("--eval-only", action="store_true", help="measure, do not rebuild")
    args = parser.parse_args(argv)
    record_path = args.output / RECIPE_FILE
    if args.eval_only:
        record = json.loads(record_path.read_text())
    else:
        start = time.process_time()
        stats = build_shapes_base(args.output, BASE_RECIPE, progress=True)
        stats["build_cpu_s"] = time.process_time() - start
        record = {"recipe": BASE_RECIPE, "hash": recipe_hash(BASE_RECIPE), "train": stats}
    torch.set_num_threads(1)
    record["base_scores"] = measure(args.output)
    record_path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(json.dumps(record, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
