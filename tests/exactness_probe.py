"""Run as a script: the first update's ratio and KL on the toy trainer, printed as JSON.

``python exactness_probe.py BASE_DIR OUT_DIR THREADS [KEY=VALUE ...]``; the BLAS kernel is
chosen by the environment (``MKL_ENABLE_INSTRUCTIONS``) before torch loads, so each
instruction set needs its own process. Also reports how far the rollout's recorded means
were from the update's own forward (what the first step would have seen without the
construction that makes it exact).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main() -> None:
    base, out, threads, *extra = sys.argv[1:]
    torch.set_num_threads(int(threads))
    sys.path.insert(0, str(Path(__file__).parent))
    from fast_runs import tiny_overrides
    from flowdppo.config import load_config, resolve
    from flowdppo.trainer.commands import RECIPES
    from flowdppo.trainer.loop import Trainer

    overrides = [*tiny_overrides(Path(base), iterations=1), "eval.at_start=false",
                 "train.num_updates=1", "train.minibatches_per_pass=1",
                 f"num_threads={threads}", *extra]
    trainer = Trainer(resolve(load_config(str(RECIPES / "toy_dppo.yaml"), overrides)), Path(out))
    plan = trainer.plan(0)
    rollout, cond, futures = trainer.rollout(0, plan)
    recorded = rollout.mean_old.clone()
    _, advantages, _ = trainer.score(futures, plan)
    source = trainer.batch_source(0, rollout, cond, advantages, plan)
    metrics = trainer.updater.update(source, len(plan.trained_steps), torch.Generator().manual_seed(0))
    metrics["rollout_vs_update_max_abs"] = float((recorded - rollout.mean_old).abs().max())
    metrics["num_threads"] = torch.get_num_threads()
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
