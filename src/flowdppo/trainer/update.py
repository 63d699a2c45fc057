"""The optimizer step: passes over a rollout, minibatches, micro-batches, padding, clipping.

:class:`Updater` is the one place gradients are made. Per iteration it runs
``num_updates`` passes over the kept samples, ``minibatches_per_pass`` optimizer steps
each; a step accumulates the gradient of the mean loss over its (sample, step) entries in
micro-batches of ``micro_batch_size``. Processes may keep different numbers of samples
(non-finite rewards dropped), yet all run the same steps and micro-batches (see
:mod:`.distributed`): a micro-batch's mean loss is weighted by its entries x world /
global entries (DDP averages the processes' gradients) and padding micro-batches weigh 0.

Old means (SPEC §4, "where mu_old comes from"): the first optimizer step's own forward
defines them (``record_old``), so at the first update ``r == 1`` and ``KL == 0`` exactly
on any device, dtype, compile mode and BLAS. Entries of later minibatches of the first
pass are scored after the weights moved; their old means are the rollout's, or (``replay``)
recomputed before the first step by the update's own forward in grad mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..algorithms import AlgorithmSpec
from ..algorithms.diagnostics import ratio_vs_divergence
from . import distributed
from .batches import BatchSource, Entries, entries_for, means_at_entries, write_means
from .metrics import StepMetrics, combine_parts, reduce_steps

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateSettings:
    """What shapes the updates (from the resolved run; see ``config/schema.py``)."""

    num_updates: int  # passes over each rollout
    minibatches_per_pass: int  # optimizer steps per pass
    micro_batch_size: int  # (sample, step) entries per forward/backward, per process
    grad_clip: float  # max global grad norm (0 = off)
    replay_old_means: bool  # recompute later minibatches' old means with the update's forward
    diagnostic_clip_range: float  # ratio clip compared with the exact KL; 0 = off
    kl_reduce: str  # "mean" or "sum": the unit of every log-ratio and KL

    @classmethod
    def from_resolved(cls, resolved) -> UpdateSettings:
        """The settings of a :class:`~flowdppo.config.ResolvedRun`."""
        cfg = resolved.config
        return cls(cfg.train.num_updates, cfg.train.minibatches_per_pass,
                   cfg.train.micro_batch_size, cfg.optim.grad_clip, resolved.replay_old_means,
                   cfg.train.diagnostic_clip_range, resolved.kl_reduce)


# Test and benchmark hook: called with the updater after every optimizer step.
STEP_HOOKS: list[Callable[[Updater], None]] = []


class Updater:
    """Owns the optimizer, its schedule and the trainable parameters' gradients."""

    def __init__(self, accelerator, model, optimizer, scheduler, params: dict[str, nn.Parameter],
                 algorithm: AlgorithmSpec, hparams, settings: UpdateSettings) -> None:
        self.accelerator, self.model = accelerator, model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.params, self.algorithm, self.hparams = params, algorithm, hparams
        self.settings = settings
        self.world = accelerator.num_processes
        self.num_steps_taken = 0

    def update(self, source: BatchSource, num_trained_steps: int,
               generator: torch.Generator, *, record_old: bool = True) -> dict[str, float | None]:
        """All passes over ``source``'s rollout; the iteration's reduced metrics ({} if none).

        ``record_old=False`` keeps the rollout's old means even at the first step (a rollout
        sampled by an older policy, whose means the current weights do not reproduce).
        """
        s = self.settings
        adv = source.advantages
        valid = torch.isfinite(adv).nonzero().squeeze(1).cpu()
        counts = distributed.valid_per_process(self.accelerator, len(valid))
        if sum(counts) == 0:  # decided on every process alike: none steps
            logger.warning("every image was dropped (non-finite rewards); no update")
            return {}
        source = _with_advantages(source, torch.nan_to_num(adv, nan=0.0))
        shapes = distributed.plan_minibatches(counts, s.minibatches_per_pass, num_trained_steps,
                                              s.micro_batch_size)
        per_step: list[StepMetrics] = []
        first = True
        for p in range(s.num_updates):
            order = valid[torch.randperm(len(valid), generator=generator)]
            minibatches = [entries_for(m, num_trained_steps)
                           for m in order.tensor_split(len(shapes))]
            if p == 0 and source.likelihood and s.replay_old_means:
                if record_old:  # the first step records its own; replay the rest
                    self._replay_old_means(source, minibatches[1:], shapes[1:])
                else:  # a lagged rollout: every old mean is the sampling policy's
                    with source.old_policy() if source.old_policy else contextlib.nullcontext():
                        self._replay_old_means(source, minibatches, shapes)
            for shape, entries in zip(shapes, minibatches):
                if shape.num_micro_batches == 0:
                    continue  # empty on every process
                record = first and record_old and source.likelihood
                per_step.append(self.step(source, entries, shape, record_old=record))
                first = False
        return reduce_steps(per_step, self.accelerator.gather if self.world > 1 else None)

    def step(self, source: BatchSource, entries: Entries, shape: distributed.MinibatchShape,
             *, record_old: bool = False) -> StepMetrics:
        """One optimizer step over this process's ``entries`` of a minibatch."""
        metrics = self._accumulate(source, entries, shape, record_old)
        grad_norm = distributed.clip_grad_norm(self.accelerator, self.model.transformer,
                                               list(self.params.values()), self.settings.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_steps_taken += 1
        for hook in STEP_HOOKS:
            hook(self)
        norm = torch.as_tensor(grad_norm).detach().double()  # stays on its device: no sync
        one = torch.ones((), dtype=torch.float64, device=norm.device)  # equal on every process
        metrics["grad_norm"] = (norm, one)
        metrics["lr"] = (one * self.scheduler.get_last_lr()[0], one)
        return metrics

    def _accumulate(self, source: BatchSource, entries: Entries,
                    shape: distributed.MinibatchShape, record_old: bool) -> StepMetrics:
        """This process's micro-batches, then zero-weighted padding up to
        ``shape.num_micro_batches`` (a forward and backward through the wrapper, so the
        collectives match); only the last one syncs."""
        chunks = [c for c in entries.split(self.settings.micro_batch_size) if len(c)]
        padding = Entries(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        scale = self.world / shape.global_entries
        parts: list[tuple[float, dict[str, Tensor]]] = []
        for i in range(shape.num_micro_batches):
            real = i < len(chunks)
            chunk = chunks[i] if real else padding
            last = i == shape.num_micro_batches - 1
            sync = contextlib.nullcontext() if last else distributed.no_sync(
                self.accelerator, self.model.transformer)
            with sync:
                batch = source(chunk, record_old=record_old and real)
                loss, metrics = self.algorithm(batch, self.hparams)
                metrics = {"loss": loss.detach(), **metrics, **self._diagnose(source, batch)}
                self.accelerator.backward(loss * (len(chunk) * scale if real else 0.0))
            parts.append((float(len(chunk)) if real else 0.0, metrics))
        return combine_parts(parts)

    def _diagnose(self, source: BatchSource, batch) -> dict[str, Tensor]:
        clip = self.settings.diagnostic_clip_range
        if not source.likelihood or clip <= 0:
            return {}
        return ratio_vs_divergence(batch, clip_range=clip, reduce=self.settings.kl_reduce)

    def _replay_old_means(self, source: BatchSource, minibatches: list[Entries],
                          shapes: list[distributed.MinibatchShape]) -> None:
        """Old means of the entries scored after the first step, by the update's own forward
        (grad mode: torch.compile builds a separate graph for it; the update's micro-batch
        size). In bf16 the rollout's forward rounds differently, so a small KL threshold
        would mask entries the policy never moved. One forward per such entry; processes
        with fewer entries pad to the same number of forwards (each is a collective)."""
        num_forwards = sum(shape.num_micro_batches for shape in shapes)
        if num_forwards == 0:
            return
        entries = Entries(torch.cat([m.sample for m in minibatches]),
                          torch.cat([m.step for m in minibatches]))
        size = self.settings.micro_batch_size
        padding = Entries(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        with self.accelerator.no_sync(self.model.transformer):
            means = means_at_entries(source, entries, size, grad_mode=True)
            for _ in range(num_forwards - -(-len(entries) // size)):
                means_at_entries(source, padding, size, grad_mode=True)
        write_means(source.rollout.mean_old, entries, means)


def _with_advantages(source: BatchSource, advantages: Tensor) -> BatchSource:
    return dataclasses.replace(source, advantages=advantages)
