"""Evaluation split over processes: each shard samples its round-robin share of the chunks,
and the gathered result equals the unsplit evaluation."""

from __future__ import annotations

import pytest
import torch

from fast_runs import tiny_overrides
from flowdppo.config import load_config, resolve
from flowdppo.trainer import evaluation
from flowdppo.trainer.commands import RECIPES


def test_two_shards_gathered_equal_one_evaluation(tiny_base, tmp_path, monkeypatch):
    from flowdppo.trainer.loop import Trainer

    cfg = load_config(str(RECIPES / "toy_dppo.yaml"), [
        *tiny_overrides(tiny_base), "eval.max_prompts=5", "eval.samples_per_prompt=2",
        "sampling.sample_batch_size=4"])  # 10 samples: chunks of 4, 4, 2
    trainer = Trainer(resolve(cfg), tmp_path)
    sampled = []
    sample = evaluation.sample_ode_with_kl

    def counting(model, prompts, *args, **kwargs):
        sampled.append(len(prompts))
        return sample(model, prompts, *args, **kwargs)

    monkeypatch.setattr(evaluation, "sample_ode_with_kl", counting)
    kwargs = dict(samples_per_prompt=2, sigmas=trainer.model.sigmas(3).cpu(), seed=0,
                  guidance_scale=1.0, rewards=trainer.rewards, monitors=trainer.monitors,
                  reference=trainer.reference, batch_size=4)
    items = trainer.prompts.eval[:5]
    whole = evaluation.evaluate(trainer.model, items, **kwargs)
    assert sampled == [4, 4, 2]

    sampled.clear()
    other: list = []
    # Shard 1 runs first here; its gather hands its chunks on (a real gather exchanges them).
    assert evaluation.evaluate(trainer.model, items, shard=1, num_shards=2,
                               gather=lambda chunks: other.extend(chunks) or chunks, **kwargs) is None
    assert sampled == [4]  # the second chunk only
    split = evaluation.evaluate(trainer.model, items, shard=0, num_shards=2,
                                gather=lambda chunks: chunks + other, **kwargs)
    assert sampled == [4, 4, 2]
    torch.testing.assert_close(split.images, whole.images, rtol=0, atol=0)
    assert split.prompts == whole.prompts
    assert {k: v for k, v in split.row.items() if k != "time_eval_s"} == \
        {k: v for k, v in whole.row.items() if k != "time_eval_s"}

    with pytest.raises(ValueError, match="gather"):
        evaluation.evaluate(trainer.model, items, shard=0, num_shards=2, **kwargs)
