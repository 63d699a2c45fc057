"""``flowdppo`` for the multi-process tests (run as a script, also under torchrun), with test
hooks chosen by environment variables:

- ``FLOWDPPO_TEST_NAN_PROMPTS``: a JSON list of prompts; registers the reward
  ``test_nan_prompts``, NaN for those prompts and the mean pixel otherwise.
- ``FLOWDPPO_TEST_FORCE_FSDP=1``: accelerate's FSDP on the CPU over gloo. accelerate itself
  enables FSDP only on GPUs, so the accelerator is built as a plain gloo one and switched to
  FSDP (plugin from the usual ``FSDP_*`` variables) before the trainer prepares the model.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def _register_nan_reward(prompts: set[str]) -> None:
    from flowdppo.rewards import register_reward

    @register_reward("test_nan_prompts")
    def _nan_prompts(device: str = "cpu"):
        def reward(images, batch_prompts, metadata):
            values = images.flatten(1).float().mean(1).cpu()
            bad = torch.tensor([p in prompts for p in batch_prompts])
            return torch.where(bad, torch.full_like(values, float("nan")), values), {}

        return reward


def _force_fsdp() -> None:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import (
        DistributedType,
        FullyShardedDataParallelPlugin,
        InitProcessGroupKwargs,
    )

    from flowdppo.trainer import setup

    def make_accelerator(cfg):
        accelerator = Accelerator(cpu=False, mixed_precision=cfg.mixed_precision,
                                  kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
        # Both states: accelerate's gather and reduce read PartialState's.
        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        return accelerator

    setup.make_accelerator = make_accelerator


if __name__ == "__main__":
    if "FLOWDPPO_TEST_NAN_PROMPTS" in os.environ:
        _register_nan_reward(set(json.loads(os.environ["FLOWDPPO_TEST_NAN_PROMPTS"])))
    if os.environ.get("FLOWDPPO_TEST_FORCE_FSDP") == "1":
        _force_fsdp()
    from flowdppo.cli import main

    sys.exit(main(sys.argv[1:]))
