"""The training loop: plan -> rollout -> rewards -> advantages -> update -> eval / checkpoint.

One loop for every method; the algorithm registry supplies the loss and its kind. Each
phase has one home: sampling in :mod:`.rollout`, the optimizer step in :mod:`.update`,
evaluation in :mod:`.evaluation`, checkpoints in :mod:`.checkpoint`; this module only
sequences them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from .. import STARTED_AT
from ..config import ResolvedRun, to_dict
from ..dynamics import get_dynamics
from ..errors import RewardsExhaustedError
from . import checkpoint, setup
from .batches import BatchSource, entries_for, means_at_entries, write_means
from .checkpoint import write_text_atomic
from .evaluation import EvalContext, evaluate_run, save_grid
from .interrupt import stop_on_signals
from .logging import RunLogger
from .policy import (
    ParamSnapshot,
    PolicyLag,
    ReferencePolicy,
    apply_trainable,
    trainable_named_parameters,
)
from .rollout import NoiseSource, Plan, Rollout, make_plan, sample_rollout
from .scoring import reward_row, score_rollout
from .update import Updater, UpdateSettings

logger = logging.getLogger(__name__)
# Tests set this to simulate a kill (exit 137, no cleanup) after that iteration.
_EXIT_AFTER_ITERATION = int(os.environ.get("FLOWDPPO_TEST_EXIT_AFTER_ITERATION", "0"))


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
        self.model.transformer = torch.compile(transformer) if resolved.compile else transformer
        self.updater = Updater(self.accelerator, self.model, self.optimizer, self.scheduler,
                               self.params, resolved.algorithm, resolved.hparams,
                               UpdateSettings.from_resolved(resolved))
        self.dynamics = get_dynamics(resolved.dynamics, **resolved.dynamics_params)
        self.sigmas = self.model.sigmas(cfg.sampling.num_steps).cpu()
        self.forward_kind = resolved.algorithm.kind == "forward"
        self.old_policy = ParamSnapshot(self.params) if self.forward_kind else None
        self.ema = ParamSnapshot(self.params) if cfg.train.ema_decay > 0 else None
        self.lag = PolicyLag(self.params, cfg.train.policy_lag, sampler=self.old_policy)
        self.eval_context = EvalContext(
            self.accelerator, self.model, self.prompts.eval[: cfg.eval.max_prompts], self.rewards,
            self.monitors, self.reference,
            self.ema.swapped_in if self.ema is not None else contextlib.nullcontext)
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
        return make_plan(self.cfg, self.resolved.sde_steps, self.prompts.train, it)

    def local_slice(self) -> slice:
        per = self.resolved.samples_per_iteration // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def sampling_policy(self) -> contextlib.AbstractContextManager:
        """The weights that sample: with ``policy_lag`` the sampler of that many iterations
        before, else the EMA old policy (forward methods) or the live weights."""
        if self.lag.active:
            return self.lag.sampling_policy()
        if self.old_policy is not None:
            return self.old_policy.swapped_in()
        return contextlib.nullcontext()

    def rollout(self, it: int, plan: Plan) -> tuple[Rollout, Any, list]:
        """Sample this process's slice in chunks; rewards of a chunk score while the next samples."""
        local = self.local_slice()
        prompts, metadata = plan.prompts[local], plan.metadata[local]
        cond = self.model.encode_prompts(prompts)
        noise = NoiseSource(self.cfg.seed, it, len(plan.prompts), local.start, local.stop)
        steps = [] if self.forward_kind else plan.trained_steps
        parts, futures = [], []
        size = self.cfg.sampling.sample_batch_size
        with self.sampling_policy(), self.accelerator.autocast():
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
        rewards, advantages, dropped = score_rollout(self.accelerator, futures, plan, self.cfg,
                                                     self.rewards.weights)
        return rewards, advantages[self.local_slice()], dropped

    def batch_source(self, it: int, rollout: Rollout, cond, advantages: Tensor,
                     plan: Plan) -> BatchSource:
        forward_inputs = self._forward_inputs(it, plan) if self.forward_kind else None
        # Forward methods need no likelihood of the sampler: under a lag only their samples
        # are stale, the loss's anchor stays the current old policy.
        old = self.old_policy.swapped_in if self.old_policy is not None else self.lag.factory()
        return BatchSource(self.model, self.dynamics, rollout, cond,
                           advantages.to(self.accelerator.device),
                           self.cfg.sampling.guidance_scale, self.accelerator.autocast,
                           forward_inputs, old)

    def _forward_inputs(self, it: int, plan: Plan) -> tuple[Tensor, Tensor]:
        """Training times (the trained steps' grid points) and fixed noise for forward methods."""
        times = self.sigmas[plan.trained_steps].float().to(self.accelerator.device)
        local = self.local_slice()
        noise = NoiseSource(self.cfg.seed, -2 - it, len(plan.prompts), local.start, local.stop)
        eps = torch.stack([noise.draw(j, self.model.latent_shape, self.accelerator.device)
                           for j in range(len(plan.trained_steps))], dim=1)
        return times, eps

    def _reference_means(self, source: BatchSource) -> Rollout:
        """The rollout with the reference policy's mean at every recorded step (``beta > 0``),
        batched over (sample, step) entries rather than a forward per sampling step."""
        rollout = source.rollout
        entries = entries_for(torch.arange(rollout.x_t.shape[0]), rollout.x_t.shape[1])
        with self.reference():
            means = means_at_entries(source, entries, self.cfg.train.micro_batch_size,
                                     grad_mode=False)
        mean_ref = torch.empty_like(rollout.mean_old)
        write_means(mean_ref, entries, means)
        return dataclasses.replace(rollout, mean_ref=mean_ref)

    # -- the loop -------------------------------------------------------------------------

    def iteration(self, it: int) -> dict[str, Any]:
        self.lag.advance()
        plan = self.plan(it)
        start = time.perf_counter()
        rollout, cond, futures = self.rollout(it, plan)
        time_rollout = time.perf_counter() - start
        # The reference pass needs no rewards: it runs while the last chunk is scored.
        if self.resolved.needs_reference_means:
            rollout = self._reference_means(self.batch_source(
                it, rollout, cond, torch.zeros(rollout.x_t.shape[0]), plan))
        time_replay = time.perf_counter() - start - time_rollout
        rewards, advantages, dropped = self.score(futures, plan)
        time_reward = time.perf_counter() - start - time_rollout - time_replay
        start_update = time.perf_counter()
        source = self.batch_source(it, rollout, cond, advantages, plan)
        generator = torch.Generator().manual_seed(self.cfg.seed * 104_729 + it)
        # A lagged rollout's means are the older policy's: the live forward must not replace them.
        metrics = self.updater.update(source, len(plan.trained_steps), generator,
                                      record_old=not self.lag.active)
        self._after_update()
        row: dict[str, Any] = {"step": it + 1, **reward_row(rewards, self.rewards.weights, dropped)}
        row.update(metrics)
        row["kl_unit"] = self.resolved.kl_reduce
        row["images_generated"] = (it + 1) * self.resolved.samples_per_iteration
        row["num_processes"] = self.world
        row["time_rollout_s"] = time_rollout
        row["time_replay_s"] = time_replay
        row["time_reward_wait_s"] = time_reward
        row["time_update_s"] = time.perf_counter() - start_update
        return row

    def _after_update(self) -> None:
        train = self.cfg.train
        if self.old_policy is not None:
            self.old_policy.update_ema(train.old_policy_ema)
        if self.ema is not None:
            self.ema.update_ema(train.ema_decay)

    def run(self) -> Path:
        cfg = self.cfg
        if cfg.eval.at_start and self.start_iteration == 0:
            self.run_eval(0)
        progress = self._progress()
        empty = 0  # consecutive iterations with every image dropped
        # Ctrl-C / SIGTERM: the reward service stops waiting at once; the loop leaves at the
        # end of the iteration, after a checkpoint of it (a second signal stops at once).
        with stop_on_signals(self.rewards.cancel) as stop:
            for it in range(self.start_iteration, cfg.train.num_iterations):
                row = self._logged_iteration(it)
                empty = empty + 1 if row["reward_num_nonfinite"] == self.resolved.samples_per_iteration else 0
                step = it + 1
                last = step == cfg.train.num_iterations
                if last or (cfg.eval.every and step % cfg.eval.every == 0):
                    self.run_eval(step)
                if last or step % cfg.checkpoint.every == 0 or stop.requested:
                    self.save(step)
                if step == _EXIT_AFTER_ITERATION:
                    os._exit(137)  # test hook: a hard kill between checkpoints, no cleanup
                if progress is not None:
                    progress.set_postfix(reward=f"{row['reward_mean']:.3f}",
                                         kl=f"{row.get('kl_old_new_mean') or 0.0:.1e}")
                    progress.update(1)
                stop.check()
                self._check_not_exhausted(empty)
        if progress is not None:
            progress.close()
        self.logger.close()
        self.rewards.close()
        # Leave together and tear the process group down: a process exiting while the
        # others still talk to it can abort them.
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return self.output_dir

    def _logged_iteration(self, it: int) -> dict[str, Any]:
        first = it == self.start_iteration
        if first:
            since = time.perf_counter() - STARTED_AT
            logger.info("first RL iteration starts %.1f s after start-up", since)
        row = self.iteration(it)
        if first:
            row["time_first_iteration_start_s"] = since
        self.logger.log("metrics.jsonl", row)
        return row

    def _check_not_exhausted(self, empty: int) -> None:
        limit = self.cfg.rewards.max_empty_iterations
        if empty >= limit:
            raise RewardsExhaustedError(
                f"every image of the last {empty} iterations had a non-finite reward "
                f"(`rewards.nonfinite: drop`); no update was made. Fix the reward; "
                f"`rewards.max_empty_iterations`={limit} sets how many such iterations stop a run")

    def _progress(self):
        if not (self.main and self.cfg.logging.progress_bar):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.train.num_iterations, initial=self.start_iteration,
                    desc="flowdppo train", unit="it", dynamic_ncols=True,
                    disable=None)  # None: off when stderr is not a terminal (logs, CI)

    def run_eval(self, step: int) -> dict[str, Any] | None:
        """Evaluate (every process samples its share); the main process scores and logs."""
        result = evaluate_run(self.eval_context, self.cfg, step)
        if not self.main or result is None:
            return None
        row = {"step": step, **result.row}
        self.logger.log("eval.jsonl", row)
        if self.cfg.eval.grid:
            path = save_grid(result, self.output_dir / "samples" / f"eval_step_{step:06d}.png",
                             self.cfg.rewards.items[0].name,
                             samples_per_prompt=self.cfg.eval.samples_per_prompt)
            self.logger.add_image("eval/samples", path, step)
        self.logger.flush()
        return row

    # -- checkpoints ----------------------------------------------------------------------

    def save(self, step: int) -> None:
        checkpoint.save(self._checkpoint_pieces(), step)

    def _resume(self) -> None:
        self.start_iteration = checkpoint.resume(self._checkpoint_pieces())

    def _checkpoint_pieces(self) -> checkpoint.RunPieces:
        return checkpoint.RunPieces(
            self.accelerator, self.model, self.optimizer, self.scheduler, self.params,
            {"old_policy.": self.old_policy, "ema.": self.ema, **self.lag.snapshots()},
            self.cfg, self.output_dir)
