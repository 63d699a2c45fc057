"""Measurement: the timed stages over the trainer's own rollout and :class:`Updater`, the
recipe's floor arithmetic, FLOP counting, host-sync counting and one report row.

Nothing here re-implements a trainer rule: sampling is ``sample_rollout``, every optimizer
step is ``Updater.step`` (micro-batching, clipping, AdamW, schedule, ``STEP_HOOKS``), the
trainer stage is ``Updater.update`` with the settings a :class:`ResolvedRun` derived.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from flowdppo.config import ResolvedRun
from flowdppo.dynamics import get_dynamics
from flowdppo.trainer.batches import BatchSource, Entries, means_at_entries, write_means
from flowdppo.trainer.distributed import MinibatchShape, split_sizes
from flowdppo.trainer.rollout import NoiseSource, Rollout, sample_rollout
from flowdppo.trainer.update import Updater

# Issue 6, measured on an H100 (SD3.5-M, bf16, 512 px, 333 tokens, batch 16), ms/sample.
ISSUE_H100 = {"eager": {"forward_ms": 9.5, "update_ms": 25.8},
              "compiled": {"forward_ms": 5.3, "update_ms": 14.4}}


@dataclass(frozen=True)
class Recipe:
    """One iteration: K rollout forwards, R no-grad replays, U update passes x S trained steps."""

    num_steps: int = 10
    num_replays: int = 3
    num_updates: int = 2
    trained_steps: int = 3


def floor_ms(forward_ms: float, update_ms: float, recipe: Recipe,
             num_replays: float | None = None) -> float:
    """``(K + R) * forward + U * S * update``: the iteration if nothing else cost time.

    ``num_replays`` replaces R (e.g. the trainer's own replay forwards).
    """
    replays = recipe.num_replays if num_replays is None else num_replays
    forwards = recipe.num_steps + replays
    return forwards * forward_ms + recipe.num_updates * recipe.trained_steps * update_ms


def trainer_replay_forwards(resolved: ResolvedRun, batch: int, num_trained_steps: int) -> float:
    """The trainer's old-mean replay in batch-sized forwards: with ``replay_old_means`` the
    entries of the first pass's minibatches after the first (``Updater._replay_old_means``),
    ``S * (M - 1) / M`` when M divides the batch; none with one minibatch per pass."""
    if not resolved.replay_old_means:
        return 0.0
    first = split_sizes(batch, resolved.config.train.minibatches_per_pass)[0]
    return num_trained_steps * (batch - first) / batch


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> dict[str, Any]:
    """One warm-up call (compilation included), then ``repeats`` timed calls between syncs.

    Returns ``first_call_s``, ``ms`` (mean per call) and ``peak_gib`` (CUDA
    ``max_memory_allocated`` over the timed calls; ``None`` on CPU).
    """
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    ms = (time.perf_counter() - start) * 1e3 / repeats
    return {"first_call_s": first, "ms": ms,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class Stages:
    """The measured closures over one model, its :class:`Updater` and a stored rollout.

    ``trained_steps``: the S sampler steps the rollout records (the trainer's
    ``choose_sde_steps``); ``autocast``: the accelerator's autocast factory.
    """

    def __init__(self, model, updater: Updater, resolved: ResolvedRun, trained_steps: list[int],
                 recipe: Recipe, batch: int, autocast) -> None:
        self.model, self.updater, self.resolved = model, updater, resolved
        self.trained_steps, self.recipe, self.batch, self.autocast = trained_steps, recipe, batch, autocast
        self.cond = model.encode_prompts(["p"] * batch)
        self.sigmas = model.sigmas(recipe.num_steps).cpu()
        self.dynamics = get_dynamics(resolved.dynamics, **resolved.dynamics_params)
        self.advantages = torch.randn(batch, generator=torch.Generator().manual_seed(1))
        self.advantages = self.advantages.to(model.device)
        self.generator = torch.Generator().manual_seed(0)  # the updater's sample order
        self.stored = self.rollout()

    def use(self, resolved: ResolvedRun) -> None:
        """Measure under ``resolved`` (one per configuration: compiling changes the old-means rule)."""
        self.resolved = resolved
        self.updater.settings = replace(self.updater.settings,
                                        replay_old_means=resolved.replay_old_means)

    @property
    def micro_batch_size(self) -> int:
        return self.updater.settings.micro_batch_size

    def forward(self) -> None:
        x = torch.randn(self.batch, *self.model.latent_shape, device=self.model.device)
        t = torch.full((self.batch,), 0.7, device=self.model.device)
        with torch.no_grad(), self.autocast():
            self.model.predict_velocity(x, t, self.cond)

    def rollout(self) -> Rollout:
        """The trainer's sampling call for one chunk of ``batch`` prompts."""
        noise = NoiseSource(0, 0, self.batch, 0, self.batch)
        with self.autocast():
            return sample_rollout(self.model, self.dynamics, self.cond, self.sigmas, noise,
                                  self.trained_steps)

    def source(self, rollout: Rollout) -> BatchSource:
        return BatchSource(self.model, self.dynamics, rollout, self.cond, self.advantages, 1.0,
                           self.autocast)

    def entries_at(self, step: int) -> Entries:
        """Every sample at recorded step ``step`` (0-based index into the trained steps)."""
        return Entries(torch.arange(self.batch), torch.full((self.batch,), step))

    def _step(self, source: BatchSource, step: int, record_old: bool = False) -> None:
        shape = MinibatchShape(math.ceil(self.batch / self.micro_batch_size), self.batch)
        self.updater.step(source, self.entries_at(step), shape, record_old=record_old)

    def update(self) -> None:
        """One optimizer step (``Updater.step``) on all samples at one trained step."""
        self._step(self.source(self.stored), 0)

    def iteration(self) -> None:
        """The issue's recipe: rollout, ``R`` no-grad replays, ``U x S`` optimizer steps of one
        trained step each (the first defines its entries' old means, as in the trainer)."""
        r = self.recipe
        source = self.source(self.rollout())
        for j in range(r.num_replays):
            entries = self.entries_at(j % r.trained_steps)
            means = means_at_entries(source, entries, self.micro_batch_size, grad_mode=False)
            write_means(source.rollout.mean_old, entries, means)
        first = True
        for _ in range(r.num_updates):
            for step in torch.randperm(r.trained_steps, generator=self.generator).tolist():
                self._step(source, step, record_old=first)
                first = False

    def trainer(self) -> dict[str, float | None]:
        """What ``flowdppo train`` runs after sampling: ``Updater.update`` (U passes of
        ``minibatches_per_pass`` steps, each over S entries per sample in micro-batches, the
        old-mean replay where the resolved run asks for it); its reduced metrics."""
        source = self.source(self.rollout())
        return self.updater.update(source, self.recipe.trained_steps, self.generator)


def measure(stages: Stages, mode: str, checkpointing: bool, repeats: int,
            flops: dict[str, float] | None) -> dict[str, Any]:
    """One table row; times and FLOPs per sample, memory the peak of the whole batch."""
    device, recipe = stages.model.device, stages.recipe
    names = ["forward", "rollout", "update", "iteration", "trainer"]
    t = {name: timed(getattr(stages, name), repeats, device) for name in names}
    ms = {name: t[name]["ms"] / stages.batch for name in t}
    # The trainer's floor counts its replays as no-grad forwards (a grad-mode forward also
    # stores activations, so this is a lower bound).
    replays = trainer_replay_forwards(stages.resolved, stages.batch, recipe.trained_steps)
    floor = floor_ms(ms["forward"], ms["update"], recipe)
    issue = ISSUE_H100[mode]["forward_ms"], ISSUE_H100[mode]["update_ms"]
    issue_floor = floor_ms(*issue, recipe)
    # The floor's formula also counts an iteration's FLOPs from the primitives' FLOPs.
    f = flops or {"forward": math.nan, "update": math.nan}  # --no-flops: TF/s are NaN
    work = {**f, "iteration": floor_ms(f["forward"], f["update"], recipe),
            "trainer": floor_ms(f["forward"], f["update"], recipe, replays)}
    row: dict[str, Any] = {"mode": mode, "checkpointing": checkpointing,
                           "trainer_replays_old_means": stages.resolved.replay_old_means,
                           "trainer_replay_forwards": replays,
                           "first_call_s": sum(x["first_call_s"] for x in t.values())}
    row.update({f"{name}_ms": value for name, value in ms.items()})
    row.update(floor_ms=floor, ratio_to_floor=ms["iteration"] / floor, issue_floor_ms=issue_floor,
               ratio_to_issue_floor=ms["iteration"] / issue_floor)
    # The trainer against its own floor and against the issue's recipe floor.
    trainer_floor = floor_ms(ms["forward"], ms["update"], recipe, replays)
    row.update(trainer_floor_ms=trainer_floor, ratio_trainer_to_floor=ms["trainer"] / trainer_floor,
               ratio_trainer_to_issue_floor=ms["trainer"] / issue_floor)
    row.update({f"peak_gib_{name}": t[name]["peak_gib"] for name in t if name != "rollout"})
    row.update({f"tflops_{name}": work[name] / ms[name] * 1e-9 for name in work})
    return row


def count_host_syncs(stages: Stages) -> dict[str, Any]:
    """Host-device synchronisations during one trainer stage (CUDA only).

    ``torch.cuda.set_sync_debug_mode`` warns on every synchronising call; the warnings'
    source lines say where they come from.
    """
    import warnings

    stages.trainer()  # warm: first-call allocations are not the loop's
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            stages.trainer()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    sites: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            site = f"{w.filename}:{w.lineno}"
            sites[site] = sites.get(site, 0) + 1
    return {"count": sum(sites.values()), "sites": sites}
