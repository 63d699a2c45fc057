"""The training loop: rollout -> rewards -> advantages -> updates -> eval / checkpoint.

One loop for every method; the algorithm registry supplies the loss and its kind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from .. import STARTED_AT
from ..advantages import compute_advantages
from ..algorithms.diagnostics import ratio_vs_divergence
from ..config import ResolvedRun, to_dict
from ..dynamics import get_dynamics
from . import checkpoint, distributed, setup
from .checkpoint import write_text_atomic
from .evaluation import evaluate, save_grid
from .logging import RunLogger
from .policy import (
    ParamSnapshot,
    ReferencePolicy,
    apply_trainable,
    trainable_named_parameters,
    unwrap,
)
from .rollout import NoiseSource, Rollout, choose_window, sample_rollout
from .update import (
    Entries,
    accumulate_gradients,
    combine_metrics,
    entries_for,
    forward_batch,
    likelihood_batch,
)

logger = logging.getLogger(__name__)
# Tests set this to simulate a kill (exit 137, no cleanup) after that iteration.
_EXIT_AFTER_ITERATION = int(os.environ.get("FLOWDPPO_TEST_EXIT_AFTER_ITERATION", "0"))


@dataclass(frozen=True)
class Plan:
    """What iteration ``it`` samples, identical on every process."""

    prompts: list[str]  # global batch, group-major
    metadata: list[dict[str, Any]]
    group_ids: Tensor  # (B_global,)
    steps: list[int]  # trained step indices (or forward-process time indices)


class Trainer:
    def __init__(self, resolved: ResolvedRun, output_dir: Path, resume: bool = False) -> None:
        self.resolved = resolved
        cfg = self.cfg = resolved.config
        self.output_dir = output_dir
        self.accelerator = setup.make_accelerator(cfg)
        self.main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        if self.main:
            setup.prepare_output_dir(output_dir, resume)
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)  # idle threads spin: tiny models want 1
        torch.manual_seed(cfg.seed)
        self.prompts = setup.load_prompts(cfg)
        device = self.accelerator.device
        self.rewards = setup.build_rewards(cfg, device)
        self.monitors = setup.build_monitors(cfg, device)
        self.model = setup.load_model(cfg, device)
        apply_trainable(self.model, cfg.lora, cfg.seed)
        self.reference = ReferencePolicy(self.model, lora=cfg.lora.enabled)
        self.params = trainable_named_parameters(self.model.transformer)
        optimizer, self.scheduler = setup.make_optimizer(list(self.params.values()), resolved)
        transformer, self.optimizer = self.accelerator.prepare(self.model.transformer, optimizer)
        compiled = cfg.model.compile or (cfg.model.compile is None and device.type == "cuda")
        if compiled:
            transformer = torch.compile(transformer)
        self.replay_old_means = resolved.algorithm.kind == "likelihood" and (
            cfg.train.old_means == "replay" or (cfg.train.old_means == "auto" and (
                compiled or device.type == "cuda" or cfg.mixed_precision != "no")))
        self.model.transformer = transformer
        beta = getattr(resolved.hparams, "beta", 0.0)
        self.needs_reference_means = resolved.algorithm.kind == "likelihood" and beta > 0
        self.dynamics = get_dynamics(resolved.dynamics, **resolved.dynamics_params)
        self.sigmas = self.model.sigmas(cfg.sampling.num_steps).cpu()
        self.forward_kind = resolved.algorithm.kind == "forward"
        self.old_policy = ParamSnapshot(self.params) if self.forward_kind else None
        self.ema = ParamSnapshot(self.params) if cfg.train.ema_decay > 0 else None
        self.start_iteration = 0
        self.logger = RunLogger(output_dir, tensorboard=cfg.logging.tensorboard,
                                wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
                                config=to_dict(cfg), enabled=self.main)
        if resume:
            self._resume()
        elif self.main:
            write_text_atomic(output_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))

    # -- phases ---------------------------------------------------------------------------

    def plan(self, it: int) -> Plan:
        s, cfg = self.cfg.sampling, self.cfg
        generator = torch.Generator().manual_seed(cfg.seed * 7919 + it)
        train = self.prompts.train
        picks = torch.randint(0, len(train), (s.num_groups,), generator=generator).tolist()
        items = [train[i] for i in picks for _ in range(s.group_size)]
        group_ids = torch.arange(s.num_groups).repeat_interleave(s.group_size)
        r = self.resolved
        steps = choose_window(generator, r.trained_steps, r.window_first, r.window_stop)
        return Plan([i.prompt for i in items], [dict(i.metadata) for i in items], group_ids, steps)

    def local_slice(self) -> slice:
        per = self.resolved.samples_per_iteration // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def rollout(self, it: int, plan: Plan) -> tuple[Rollout, Any, list]:
        """Sample this process's slice in chunks; rewards of a chunk score while the next samples."""
        local = self.local_slice()
        prompts, metadata = plan.prompts[local], plan.metadata[local]
        cond = self.model.encode_prompts(prompts)
        noise = NoiseSource(self.cfg.seed, it, len(plan.prompts), local.start, local.stop)
        steps = [] if self.forward_kind else plan.steps
        parts, futures = [], []
        size = self.cfg.sampling.sample_batch_size
        policy = self.old_policy.swapped_in() if self.old_policy else contextlib.nullcontext()
        with policy, self.accelerator.autocast():
            for lo in range(0, len(prompts), size):
                hi = min(lo + size, len(prompts))
                part = sample_rollout(self.model, self.dynamics, cond.index(slice(lo, hi)),
                                      self.sigmas, noise.slice(lo, hi), steps,
                                      guidance_scale=self.cfg.sampling.guidance_scale)
                parts.append(part)
                images = self.model.decode(part.latents).float()
                futures.append(self.rewards.submit(images, prompts[lo:hi], metadata[lo:hi]))
        return Rollout.cat(parts), cond, futures

    def score(self, futures: list, plan: Plan) -> tuple[dict[str, Tensor], Tensor, int]:
        """Global rewards per name, the local advantages and the number of dropped images."""
        results = [f.result() for f in futures]
        local = {n: torch.cat([r[0][n] for r in results]) for n in results[0][0]}
        device = self.accelerator.device
        rewards = {n: self.accelerator.gather(v.to(device)).cpu() for n, v in local.items()}
        finite = torch.stack([torch.isfinite(v) for v in rewards.values()]).all(dim=0)
        dropped = int((~finite).sum())
        if dropped and self.cfg.rewards.nonfinite == "error":
            bad = [n for n, v in rewards.items() if not torch.isfinite(v).all()]
            raise ValueError(f"non-finite rewards from {bad} for {dropped} images; fix the reward "
                             "or set `rewards.nonfinite: drop` to drop such images (counted in metrics)")
        advantages = torch.zeros(len(plan.prompts))
        keep = finite.nonzero().squeeze(1)
        if len(keep):
            adv = self.cfg.advantages
            advantages[keep] = compute_advantages(
                {n: v[keep] for n, v in rewards.items()}, self.rewards.weights,
                plan.group_ids[keep], mode=adv.mode, std_scope=adv.std_scope, clip=adv.clip)
        advantages[~finite] = float("nan")  # marks dropped images; never reaches a loss
        return rewards, advantages[self.local_slice()], dropped

    def update(self, it: int, rollout: Rollout, cond, advantages: Tensor, plan: Plan) -> dict:
        """``num_updates`` passes over the rollout, ``minibatches_per_pass`` steps each.

        Processes may keep different numbers of samples (non-finite rewards dropped), yet all
        run the same optimizer steps and micro-batches (see :mod:`.distributed`). Each step's
        gradient is that of the mean loss over the minibatch's entries on all processes: a
        micro-batch's mean loss is weighted by its entries x world / global entries (the
        processes' gradients are averaged), and padding micro-batches weigh 0.
        """
        cfg, device = self.cfg, self.accelerator.device
        valid = torch.isfinite(advantages).nonzero().squeeze(1)
        counts = distributed.valid_per_process(self.accelerator, len(valid))
        if sum(counts) == 0:  # decided on every process alike: none steps
            logger.warning("iteration %d: every image was dropped (non-finite rewards); no update", it)
            return {}
        advantages = torch.nan_to_num(advantages, nan=0.0).to(device)
        forward_inputs = self._forward_inputs(it, rollout, plan) if self.forward_kind else None
        generator = torch.Generator().manual_seed(cfg.seed * 104_729 + it)
        num_steps, size = len(plan.steps), cfg.train.micro_batch_size
        shapes = distributed.plan_minibatches(counts, cfg.train.minibatches_per_pass, num_steps, size)
        metrics_all = []
        for _ in range(cfg.train.num_updates):
            order = valid[torch.randperm(len(valid), generator=generator)]
            for shape, minibatch in zip(shapes, order.tensor_split(len(shapes))):
                if shape.num_micro_batches == 0:
                    continue  # empty on every process
                chunks = [c for c in entries_for(minibatch, num_steps).split(size) if len(c)]
                metrics = self._accumulate(chunks, shape, rollout, cond, advantages, forward_inputs)
                metrics.update(self._optimizer_step())
                metrics_all.append(metrics)
        if self.old_policy is not None:
            self.old_policy.update_ema(cfg.train.old_policy_ema)
        if self.ema is not None:
            self.ema.update_ema(cfg.train.ema_decay)
        return self._reduce_metrics(metrics_all)

    def _accumulate(self, chunks: list, shape: distributed.MinibatchShape, rollout, cond,
                    advantages: Tensor, forward_inputs) -> dict[str, Tensor]:
        """One minibatch's gradients: this process's micro-batches, then zero-weighted padding
        up to ``shape.num_micro_batches`` (a forward and backward through the wrapper, so the
        collectives match); only the last one syncs."""
        padding = Entries(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        scale = self.world / shape.global_entries
        parts, blank = [], None
        for i in range(shape.num_micro_batches):
            real = i < len(chunks)
            chunk = chunks[i] if real else padding
            weight = len(chunk) * scale if real else 0.0
            last = i == shape.num_micro_batches - 1
            sync = contextlib.nullcontext() if last else distributed.no_sync(
                self.accelerator, self.model.transformer)
            with sync:
                metrics = accumulate_gradients(
                    self.resolved.algorithm, self.resolved.hparams,
                    lambda e: self._make_batch(e, rollout, cond, advantages, forward_inputs),
                    chunk, len(chunk), contextlib.nullcontext,
                    lambda loss, w=weight: self.accelerator.backward(loss * w), self._diagnose)
            if real:
                parts.append((len(chunk), metrics))
            else:
                blank = metrics
        return combine_metrics(parts) if parts else distributed.missing_metrics(blank)

    def _reduce_metrics(self, per_step: list[dict[str, Tensor]]) -> dict[str, float]:
        """The iteration's metrics: per optimizer step, every process's values combined
        (min/max for extremes, mean otherwise: processes hold equal numbers of entries),
        then the mean over steps. Metrics stay on the device until here, so the update
        loop never waits for the host; one gather and one read-back for everything."""
        keys = sorted(per_step[0])
        device = self.accelerator.device
        local = torch.stack([torch.stack([m[k].to(device).float().reshape(()) for k in keys])
                             for m in per_step])  # (steps, keys)
        table = self.accelerator.gather(local[None]) if self.world > 1 else local[None]
        table = table.cpu()  # (world, steps, keys)
        out = {}
        for j, key in enumerate(keys):
            column = table[:, :, j]
            per_step_value = (column.min(0).values if key.endswith("_min") else
                              column.max(0).values if key.endswith("_max") else column.nanmean(0))
            out[key] = float(per_step_value.nanmean())
        return out

    def _diagnose(self, batch) -> dict[str, Tensor]:
        clip = self.cfg.train.diagnostic_clip_range
        if self.forward_kind or clip <= 0:
            return {}
        reduce = getattr(self.resolved.hparams, "reduce", "mean")
        return ratio_vs_divergence(batch, clip_range=clip, reduce=reduce)

    def _forward_inputs(self, it: int, rollout: Rollout, plan: Plan) -> tuple[Tensor, Tensor]:
        """Training times (the window's grid points) and fixed noise for forward methods."""
        times = self.sigmas[plan.steps].float().to(self.accelerator.device)
        local = self.local_slice()
        noise = NoiseSource(self.cfg.seed, -2 - it, len(plan.prompts), local.start, local.stop)
        eps = torch.stack([noise.draw(j, self.model.latent_shape, self.accelerator.device)
                           for j in range(len(plan.steps))], dim=1)
        return times, eps

    def _make_batch(self, entries, rollout, cond, advantages, forward_inputs):
        gs = self.cfg.sampling.guidance_scale
        with self.accelerator.autocast():
            if forward_inputs is None:
                return likelihood_batch(self.model, self.dynamics, rollout, advantages, cond,
                                        entries, gs)
            times, eps = forward_inputs
            return forward_batch(self.model, rollout, advantages, cond, entries, times, eps,
                                 self.old_policy.swapped_in, gs)

    def _means_at_recorded_steps(self, rollout: Rollout, cond, num_steps: int,
                                 grad_mode: bool) -> Tensor:
        """The model's mean at every recorded (sample, step), in update-sized micro-batches."""
        samples = torch.arange(rollout.x_t.shape[0])
        zeros = torch.zeros(len(samples), device=rollout.x_t.device)
        out = torch.empty_like(rollout.mean_old)
        for chunk in entries_for(samples, num_steps).split(self.cfg.train.micro_batch_size):
            with torch.set_grad_enabled(grad_mode):
                mean = self._make_batch(chunk, rollout, cond, zeros, None).mean.detach()
            index = chunk.to(out.device)
            out[index.sample, index.step] = mean.to(out.dtype)
        return out

    def _replay_old_means(self, rollout: Rollout, cond, num_steps: int) -> None:
        """Overwrite the recorded old means with the update's own forward of the same weights:
        grad mode (torch.compile builds a separate graph for it) and the update's micro-batch
        size. In bf16 the rollout's forward rounds differently, so the first step's ratio is
        not 1 and its KL not 0 (a small KL threshold then masks entries before the policy has
        moved). Costs one forward per trained step."""
        with self.accelerator.no_sync(self.model.transformer):
            rollout.mean_old.copy_(self._means_at_recorded_steps(rollout, cond, num_steps, True))

    def _reference_means(self, rollout: Rollout, cond, num_steps: int) -> Rollout:
        """The reference policy's mean at every recorded step (for ``beta > 0``), batched over
        (sample, step) entries rather than one forward per sampling step in the rollout."""
        with self.reference():
            mean_ref = self._means_at_recorded_steps(rollout, cond, num_steps, False)
        return dataclasses.replace(rollout, mean_ref=mean_ref)

    def _optimizer_step(self) -> dict[str, Tensor]:
        grad_norm = distributed.clip_grad_norm(self.accelerator, self.model.transformer,
                                               list(self.params.values()), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": torch.as_tensor(grad_norm).detach().float(),
                "lr": torch.tensor(self.scheduler.get_last_lr()[0])}

    # -- the loop -------------------------------------------------------------------------

    def iteration(self, it: int) -> dict[str, Any]:
        plan = self.plan(it)
        start = time.perf_counter()
        rollout, cond, futures = self.rollout(it, plan)
        time_rollout = time.perf_counter() - start
        # Neither pass needs rewards: they run while the last chunk is scored.
        if self.replay_old_means:
            self._replay_old_means(rollout, cond, len(plan.steps))
        if self.needs_reference_means:
            rollout = self._reference_means(rollout, cond, len(plan.steps))
        time_replay = time.perf_counter() - start - time_rollout
        rewards, advantages, dropped = self.score(futures, plan)
        time_reward = time.perf_counter() - start - time_rollout - time_replay
        start_update = time.perf_counter()
        metrics = self.update(it, rollout, cond, advantages, plan)
        row: dict[str, Any] = {"step": it + 1}
        combined = sum(self.rewards.weights[n] * v for n, v in rewards.items())
        finite = torch.isfinite(combined)
        row["reward_mean"] = float(combined[finite].mean()) if finite.any() else float("nan")
        row["reward_std"] = float(combined[finite].std()) if finite.sum() > 1 else 0.0
        for name, values in rewards.items():
            row[f"reward_{name}"] = float(values[torch.isfinite(values)].mean())
        row["reward_num_nonfinite"] = dropped
        row.update(metrics)
        row["kl_unit"] = getattr(self.resolved.hparams, "reduce", "mean")
        row["images_generated"] = (it + 1) * self.resolved.samples_per_iteration
        row["num_processes"] = self.world
        row["time_rollout_s"] = time_rollout
        row["time_replay_s"] = time_replay
        row["time_reward_wait_s"] = time_reward
        row["time_update_s"] = time.perf_counter() - start_update
        return row

    def run(self) -> Path:
        cfg = self.cfg
        if cfg.eval.at_start and self.start_iteration == 0:
            self.run_eval(0)
        progress = self._progress()
        for it in range(self.start_iteration, cfg.train.num_iterations):
            if it == self.start_iteration:
                since = time.perf_counter() - STARTED_AT
                logger.info("first RL iteration starts %.1f s after start-up", since)
            row = self.iteration(it)
            if it == self.start_iteration:
                row["time_first_iteration_start_s"] = since
            self.logger.log("metrics.jsonl", row)
            step = it + 1
            last = step == cfg.train.num_iterations
            if last or (cfg.eval.every and step % cfg.eval.every == 0):
                self.run_eval(step)
            if last or step % cfg.checkpoint.every == 0:
                self.save(step)
            if step == _EXIT_AFTER_ITERATION:
                os._exit(137)  # test hook: a hard kill between checkpoints, no cleanup
            if progress is not None:
                progress.set_postfix(reward=f"{row['reward_mean']:.3f}",
                                     kl=f"{row.get('kl_old_new_mean', 0.0):.1e}")
                progress.update(1)
        if progress is not None:
            progress.close()
        self.logger.close()
        self.rewards.close()
        # Leave together and tear the process group down: a process exiting while the
        # others still talk to it can abort them.
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return self.output_dir

    def _progress(self):
        if not (self.main and self.cfg.logging.progress_bar):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.train.num_iterations, initial=self.start_iteration,
                    desc="flowdppo train", unit="it", dynamic_ncols=True,
                    disable=None)  # None: off when stderr is not a terminal (logs, CI)

    def run_eval(self, step: int) -> dict[str, Any] | None:
        """Evaluate; the main process scores and logs.

        Each process samples its share of the evaluation's chunks through the bare
        transformer (a forward through the DDP wrapper would broadcast buffers to processes
        running other work) and the images are gathered to the main process. Under FSDP no
        process holds the whole model: every process runs the whole evaluation through the
        wrapper, whose forwards gather the weights.
        """
        from accelerate.utils import gather_object

        sharded = distributed.shards_parameters(self.accelerator)
        cfg = self.cfg
        items = self.prompts.eval[: cfg.eval.max_prompts]
        context = self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()
        model = contextlib.nullcontext() if sharded else self._unwrapped()
        split = {} if sharded or self.world == 1 else dict(
            shard=self.rank, num_shards=self.world, gather=gather_object)
        with context, model, self.accelerator.autocast():
            result = evaluate(
                self.model, items, samples_per_prompt=cfg.eval.samples_per_prompt,
                sigmas=self.model.sigmas(cfg.sampling.eval_num_steps).cpu(), seed=cfg.seed,
                guidance_scale=cfg.sampling.guidance_scale, rewards=self.rewards,
                monitors=self.monitors, reference=self.reference,
                batch_size=cfg.sampling.sample_batch_size, **split)
        if not self.main or result is None:
            return None
        row = {"step": step, **result.row}
        self.logger.log("eval.jsonl", row)
        if cfg.eval.grid:
            path = save_grid(result, self.output_dir / "samples" / f"eval_step_{step:06d}.png",
                             cfg.rewards.items[0].name, samples_per_prompt=cfg.eval.samples_per_prompt)
            self.logger.add_image("eval/samples", path, step)
        self.logger.flush()
        return row

    @contextlib.contextmanager
    def _unwrapped(self):
        """The bare transformer for work each process runs on its own (evaluation): a DDP
        forward would broadcast buffers and wait for processes that are not running it."""
        wrapped = self.model.transformer
        self.model.transformer = unwrap(wrapped)
        try:
            yield
        finally:
            self.model.transformer = wrapped

    # -- checkpoints ----------------------------------------------------------------------

    def save(self, step: int) -> None:
        checkpoint.save(self._checkpoint_pieces(), step)

    def _resume(self) -> None:
        self.start_iteration = checkpoint.resume(self._checkpoint_pieces())

    def _checkpoint_pieces(self) -> checkpoint.RunPieces:
        return checkpoint.RunPieces(
            self.accelerator, self.model, self.optimizer, self.scheduler, self.params,
            {"old_policy.": self.old_policy, "ema.": self.ema}, self.cfg, self.output_dir)
