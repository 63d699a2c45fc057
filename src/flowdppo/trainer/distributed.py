"""Keeping processes in step: equal collective calls whatever each process dropped, and the
gradient-sync / clipping calls that differ between DDP, FSDP and DeepSpeed.

Every forward through a DDP wrapper broadcasts buffers, every FSDP forward all-gathers
parameters and every ZeRO-2 backward reduces gradients, so all processes must run the same
number of micro-batches, not only the same number of optimizer steps. Images dropped for
non-finite rewards leave processes with different numbers of entries; :func:`plan_minibatches`
gives every process the same schedule, padding short ones with zero-weighted micro-batches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class MinibatchShape:
    """One minibatch as seen from every process.

    ``num_micro_batches``: micro-batches each process runs (the most any process needs);
    ``global_entries``: (sample, step) entries of the minibatch over all processes.
    """

    num_micro_batches: int
    global_entries: int


def split_sizes(num_samples: int, num_parts: int) -> list[int]:
    """Part sizes of ``torch.tensor_split`` over ``num_samples`` into ``num_parts``."""
    base, extra = divmod(num_samples, num_parts)
    return [base + (1 if j < extra else 0) for j in range(num_parts)]


def plan_minibatches(
    valid_per_process: list[int], num_minibatches: int, num_steps: int, micro_batch_size: int
) -> list[MinibatchShape]:
    """The shape of each of ``num_minibatches`` minibatches of one pass.

    Process ``r`` splits its ``valid_per_process[r]`` samples with ``tensor_split`` (always
    ``num_minibatches`` parts, some possibly empty), each sample giving ``num_steps`` entries.
    A minibatch with no entries anywhere has ``num_micro_batches`` 0: every process skips it.
    """
    sizes = [split_sizes(n, num_minibatches) for n in valid_per_process]  # (world, minibatches)
    shapes = []
    for j in range(num_minibatches):
        entries = [s[j] * num_steps for s in sizes]
        shapes.append(MinibatchShape(max(math.ceil(e / micro_batch_size) for e in entries),
                                     sum(entries)))
    return shapes


def valid_per_process(accelerator, num_valid: int) -> list[int]:
    """Every process's number of kept samples (one small gather; all processes call it)."""
    if accelerator.num_processes == 1:
        return [num_valid]
    local = torch.tensor([num_valid], device=accelerator.device)
    return [int(n) for n in accelerator.gather(local).cpu()]


def missing_metrics(metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    """Metrics of a process that had no real entries in a minibatch: NaN (skipped by the
    cross-process nanmean), +inf / -inf for ``*_min`` / ``*_max`` (lose to any real value)."""
    def blank(key: str, value: Tensor) -> Tensor:
        fill = math.inf if key.endswith("_min") else -math.inf if key.endswith("_max") else math.nan
        return torch.full_like(value.float(), fill)

    return {k: blank(k, v) for k, v in metrics.items()}


def _is(accelerator, kind: str) -> bool:
    return str(accelerator.distributed_type).split(".")[-1] == kind


def shards_parameters(accelerator) -> bool:
    """Whether each process holds only a shard of the weights (FSDP): then no process can
    run the model alone, and work such as evaluation must run on all of them."""
    return accelerator.num_processes > 1 and _is(accelerator, "FSDP")


@contextlib.contextmanager
def no_sync(accelerator, model: nn.Module) -> Iterator[None]:
    """Accumulate gradients without syncing them.

    DDP / FSDP1: the wrapper's ``no_sync``. DeepSpeed: accelerate's ``backward`` marks a
    gradient-accumulation boundary, and steps the engine, whenever ``sync_gradients`` is true;
    a non-final micro-batch must clear it or the engine steps once per micro-batch.
    """
    deepspeed = _is(accelerator, "DEEPSPEED")
    previous = accelerator.sync_gradients
    if deepspeed:
        accelerator.sync_gradients = False
    try:
        with accelerator.no_sync(model):
            yield
    finally:
        if deepspeed:
            accelerator.sync_gradients = previous


def clip_grad_norm(accelerator, model: nn.Module, params: list[nn.Parameter], max_norm: float) -> Tensor:
    """The global gradient norm before clipping; clips to ``max_norm`` when it is > 0.

    DeepSpeed clipped inside its own step (``gradient_clipping``, set from the run's
    ``optim.grad_clip``) and reports the norm it saw. FSDP holds gradient shards: only the
    root wrapper's ``clip_grad_norm_`` (all processes, all parameters) sees the global norm.
    """
    if _is(accelerator, "DEEPSPEED"):
        norm = accelerator.clip_grad_norm_(params, max_norm)
        return torch.as_tensor(math.nan if norm is None else norm, dtype=torch.float32)
    if _is(accelerator, "FSDP"):
        root = getattr(model, "_orig_mod", model)  # under torch.compile
        return accelerator.clip_grad_norm_(list(root.parameters()),
                                           max_norm if max_norm > 0 else math.inf)
    if max_norm > 0:
        return accelerator.clip_grad_norm_(params, max_norm)
    grads = [p.grad.norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())
