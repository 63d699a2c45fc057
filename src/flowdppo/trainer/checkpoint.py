"""Atomic checkpoints that cannot run code when read, and a run's save / resume / LoRA export.

Layout of ``<output_dir>/checkpoints/``::

    step_000020/
        trainable.safetensors           # the trained parameters (LoRA or full), fp32
        snapshots.safetensors           # old-policy / EMA snapshots (if any)
        optimizer.json, optimizer.safetensors   # optimizer + LR scheduler state (safe_state)
        rng.json                        # python, numpy, torch (and CUDA) RNG states
        lora/pytorch_lora_weights.safetensors   # diffusers-loadable LoRA export
        state.json                      # step, algorithm, size + sha256 of every file above
    latest                              # name of the newest complete checkpoint

A checkpoint is written into ``.tmp-step_...`` and renamed into place; ``latest`` is
replaced atomically after that, so it always names a complete checkpoint. ``state.json``
is written last; loading checks every file against it, so a damaged file is named
before anything is applied, and a resume falls back to the previous checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from . import run_dir, sharded_state
from .logging import truncate_jsonl
from .run_dir import write_text_atomic
from .safe_state import (
    UnsafeFileError,
    check_rng_state,
    load_legacy,
    load_tree,
    rng_state,
    save_tree,
    set_rng_state,
)

__all__ = ["CheckpointError", "CheckpointState", "CheckpointWriteError", "RunPieces",
           "latest_checkpoint", "load_checkpoint", "resume", "rewind", "rng_state", "save",
           "save_checkpoint", "set_rng_state", "write_text_atomic"]

logger = logging.getLogger(__name__)
FORMAT = 2  # 1: optimizer.pt / rng.pt (pickles), read with weights_only=True only
_STEP_DIR = re.compile(r"step_\d+")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class CheckpointWriteError(OSError, ValueError):
    """Writing a checkpoint failed (e.g. a full disk); the previous checkpoint is intact."""


@dataclass(frozen=True)
class CheckpointState:
    step: int
    trainable: dict[str, Tensor]
    snapshots: dict[str, Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    extra: dict[str, Any]


def _fp32_cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}


def _write_files(tmp: Path, state: CheckpointState, export_lora: Callable | None) -> None:
    save_file(_fp32_cpu(state.trainable), str(tmp / "trainable.safetensors"))
    if state.snapshots:
        save_file(_fp32_cpu(state.snapshots), str(tmp / "snapshots.safetensors"))
    save_tree(state.optimizer, tmp / "optimizer.json", tmp / "optimizer.safetensors")
    (tmp / "rng.json").write_text(json.dumps(state.rng))
    if export_lora is not None:
        export_lora(tmp / "lora")
    files = {str(p.relative_to(tmp)): _digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    meta = {"step": state.step, "format": FORMAT, **state.extra, "files": files}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))


def _digest(path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        return {"bytes": path.stat().st_size,
                "sha256": hashlib.file_digest(handle, "sha256").hexdigest()}


def save_checkpoint(root: Path, state: CheckpointState, keep_last: int,
                    export_lora: Callable[[Path], None] | None = None) -> Path:
    """Write ``state`` atomically under ``root``; prune to ``keep_last`` checkpoints.

    ``export_lora(directory)`` (optional) writes the diffusers LoRA file into the checkpoint.
    A failed write (a full disk, ...) removes the partial copy and leaves ``latest`` and
    every earlier checkpoint untouched.
    """
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{state.step:06d}"
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write_files(tmp, state, export_lora)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        kept = f"{previous.name} is intact" if previous else "no earlier checkpoint exists"
        reason = "no space left on device" if err.errno == errno.ENOSPC else str(err)
        failure = CheckpointWriteError(f"writing checkpoint {root / name} failed ({reason}); "
                                       f"{kept}. Free space (or fix {root}) and continue with "
                                       f"`flowdppo train --resume {root.parent}`")
        failure.errno = err.errno
        raise failure from err
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(root / "latest", name)
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    for old in _step_dirs(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _step_dirs(root: Path) -> list[Path]:
    """``step_*`` checkpoint folders, oldest first."""
    found = [p for p in root.glob("step_*") if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name[len("step_"):]))


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` names; without a usable ``latest``, the newest complete one.

    A ``latest`` naming anything but a ``step_N`` folder of this run is refused.
    """
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not _STEP_DIR.fullmatch(name):
            raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint of this "
                                  "run (expected step_N); delete the file to use the newest "
                                  "checkpoint, or pass --resume-from step_N")
        if (root / name / "state.json").is_file():
            return root / name
        logger.warning("%s names %s, which is missing or incomplete; using the newest "
                       "complete checkpoint", pointer, name)
    complete = [p for p in _step_dirs(root) if (p / "state.json").is_file()]
    if complete and not pointer.is_file():
        logger.warning("%s is missing; using the newest complete checkpoint %s", pointer,
                       complete[-1].name)
    return complete[-1] if complete else None


def load_checkpoint(path: Path, trainable_only: bool = False) -> CheckpointState:
    """Read a checkpoint (nothing in it can run code); a damaged file raises CheckpointError
    naming it. ``trainable_only``: only the weights (``sample`` / ``eval``)."""
    try:
        meta = json.loads((path / "state.json").read_text())
        step = int(meta.pop("step"))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path / 'state.json'}: unreadable ({err})") from err
    files, fmt = meta.pop("files", None), meta.pop("format", 1)
    names = ["trainable.safetensors"] if trainable_only else list(files or [])
    for name in names if files else []:
        _verify(path / name, files.get(name))
    snapshots = path / "snapshots.safetensors"
    trainable = _read(path / "trainable.safetensors", lambda p: load_file(str(p)))
    if trainable_only:
        return CheckpointState(step, trainable, {}, {}, {}, meta)
    return CheckpointState(
        step=step, trainable=trainable,
        snapshots=_read(snapshots, lambda p: load_file(str(p))) if snapshots.is_file() else {},
        optimizer=_load_optimizer(path, fmt), rng=_load_rng(path, fmt), extra=meta)


def _verify(path: Path, expected: dict[str, Any] | None) -> None:
    if expected is None:
        raise CheckpointError(f"{path}: not listed in state.json; the checkpoint is incomplete")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (state.json lists it); the checkpoint is damaged")
    if path.stat().st_size != expected["bytes"] or _digest(path)["sha256"] != expected["sha256"]:
        raise CheckpointError(f"{path}: damaged (its size or sha256 differs from state.json)")


def _read(path: Path, reader: Callable[[Path], Any]) -> Any:
    try:
        return reader(path)
    except UnsafeFileError as err:
        raise CheckpointError(str(err)) from err
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from err
    except Exception as err:  # safetensors, json and torch each raise their own types
        text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        if not text.startswith(str(path)):
            text = f"{path}: unreadable ({type(err).__name__}: {text})"
        raise CheckpointError(text) from err


def _load_optimizer(path: Path, fmt: int) -> dict[str, Any]:
    if fmt >= 2:
        return _read(path / "optimizer.json",
                     lambda p: load_tree(p, path / "optimizer.safetensors"))
    logger.warning("%s: checkpoint of the earlier format (optimizer.pt); reading it with "
                   "torch.load(weights_only=True)", path)
    return _read(path / "optimizer.pt", lambda p: load_legacy(p, rng=False))


def _load_rng(path: Path, fmt: int) -> dict[str, Any]:
    if fmt >= 2:
        return _read(path / "rng.json",
                     lambda p: check_rng_state(json.loads(p.read_text()), str(p)))
    return _read(path / "rng.pt", lambda p: load_legacy(p, rng=True))


def checkpoint_named(root: Path, choice: str) -> Path:
    """``--resume-from``: ``step_N``, ``N`` or the path of a checkpoint folder of this run."""
    text = choice.strip().rstrip("/")
    given = Path(text)
    name = f"step_{int(text):06d}" if text.isdigit() else given.name
    if _STEP_DIR.fullmatch(name):
        name = f"step_{int(name[len('step_'):]):06d}"
    inside = given.parent == Path(".") or given.resolve().parent == root.resolve()
    path = root / name
    if not _STEP_DIR.fullmatch(name) or not inside or not path.is_dir():
        have = ", ".join(p.name for p in _step_dirs(root)) or "none"
        raise CheckpointError(f"--resume-from {choice}: not a checkpoint of this run "
                              f"(checkpoints in {root}: {have})")
    return path


def rewind(root: Path, choice: str) -> int:
    """``--resume-from``: check the chosen checkpoint loads (a damaged file is an error, no
    fallback), set the newer ones aside and point ``latest`` at it; returns its step."""
    state = load_checkpoint(checkpoint_named(root, choice))
    set_aside_newer(root, state.step)
    return state.step


def load_for_resume(root: Path) -> CheckpointState | None:
    """The checkpoint ``latest`` names, falling back to the previous complete checkpoint
    (with a warning) when one is damaged; ``None`` when the run wrote no checkpoint."""
    first = latest_checkpoint(root)
    if first is None:
        if _step_dirs(root):
            raise CheckpointError(f"{root}: no complete checkpoint (every step_* lacks "
                                  "state.json); pass --overwrite to start the run again")
        return None
    older = [p for p in reversed(_step_dirs(root)) if int(p.name[5:]) < int(first.name[5:])]
    failures = []
    for path in [first, *older]:
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            failures.append(str(err))
            logger.warning("%s; trying the previous checkpoint", err)
            continue
        if failures:
            logger.warning("resuming from %s instead of %s (damaged)", path.name, first.name)
        return state
    raise CheckpointError("no usable checkpoint: " + "; ".join(failures))


def set_aside_newer(root: Path, step: int) -> None:
    """Rename checkpoints newer than ``step`` (a damaged or abandoned future) out of the way,
    so the resumed run's own checkpoints are the only ``step_*`` ones; nothing is deleted."""
    for path in _step_dirs(root):
        if int(path.name[len("step_"):]) > step:
            target = root / f"abandoned-{path.name}"
            shutil.rmtree(target, ignore_errors=True)
            os.replace(path, target)
            logger.warning("moved %s to %s (newer than the resumed step %d)", path, target, step)
    if step > 0:
        write_text_atomic(root / "latest", f"step_{step:06d}")


# -- a run's checkpoints --------------------------------------------------------------------


@dataclass(frozen=True)
class RunPieces:
    """What a run's checkpoint saves and restores (the trainer's parts)."""

    accelerator: Any
    model: Any  # the FlowModel; ``model.transformer`` is the (wrapped) trained module
    optimizer: Any
    scheduler: Any
    params: dict[str, torch.nn.Parameter]
    snapshots: dict[str, Any]  # key prefix -> ParamSnapshot or None (old policy, EMA)
    config: Any  # RunConfig
    output_dir: Path


def save(run: RunPieces, step: int) -> None:
    """Every process gathers (FSDP and DeepSpeed hold shards), the main one writes."""
    acc, model = run.accelerator, run.model.transformer
    acc.wait_for_everyone()
    trainable, optimizer = sharded_state.gather_state(acc, model, run.optimizer, run.params)
    snapshots = {}
    for prefix, snap in run.snapshots.items():
        if snap is not None:
            with snap.swapped_in():  # sharded like the parameters: gather it the same way
                values = sharded_state.gather_params(acc, model, run.params)
            snapshots.update({prefix + k: v for k, v in values.items()})
    if not acc.is_main_process:
        return
    state = CheckpointState(
        step=step, trainable=trainable, snapshots=snapshots,
        optimizer={"optimizer": optimizer, "scheduler": run.scheduler.state_dict()},
        rng=rng_state(), extra={"algorithm": run.config.algorithm.name})
    export = (lambda d: export_lora(run, d, trainable)) if run.config.lora.enabled else None
    save_checkpoint(run.output_dir / "checkpoints", state, run.config.checkpoint.keep_last, export)


def export_lora(run: RunPieces, directory: Path, trainable: dict[str, Tensor]) -> None:
    from peft.utils import get_peft_model_state_dict

    from .policy import unwrap

    if str(run.accelerator.distributed_type).endswith("FSDP"):
        # peft finds the LoRA layers by module name, which FSDP's wrappers change; the
        # gathered trainable parameters are exactly the adapter's ("default") weights.
        lora = {k.replace(".default.", "."): v for k, v in trainable.items()}
    else:
        lora = get_peft_model_state_dict(unwrap(run.model.transformer))
    try:
        run.model.export_lora(lora, directory)
    except NotImplementedError as err:
        logger.warning("LoRA export skipped: %s", err)


def resume(run: RunPieces) -> int:
    """Restore the newest usable checkpoint (every process); returns the step to continue
    from (0 for a run that stopped before its first checkpoint)."""
    from ..config import read_yaml, to_dict

    out = run.output_dir
    changes = run_dir.check_resume_changes(out, read_yaml(out / "config.yaml"), to_dict(run.config))
    state = load_for_resume(out / "checkpoints")
    if state is None:
        logger.warning("%s: no checkpoint was written (the run stopped before its first); "
                       "starting it again from step 0", out)
    else:
        _check_algorithm(out, state, run.config.algorithm.name)
        _apply(run, state)
    step = state.step if state else 0
    if run.accelerator.is_main_process:
        set_aside_newer(out / "checkpoints", step)
        for name in ("metrics.jsonl", "eval.jsonl"):  # a restart from 0 keeps no row
            truncate_jsonl(out / name, step if step else -1)
        import yaml

        run_dir.record_resume_changes(out, step, changes,
                                      yaml.safe_dump(to_dict(run.config), sort_keys=False))
    logger.info("resumed %s at iteration %d", out, step)
    return step


def _check_algorithm(out: Path, state: CheckpointState, name: str) -> None:
    saved = state.extra.get("algorithm")
    if saved and saved != name:  # config.yaml edited by hand: its changes are not checked
        raise CheckpointError(f"--resume {out}: step {state.step} was trained with algorithm "
                              f"{saved!r}, the config says {name!r}; restore config.yaml or "
                              "start a new run")


def _apply(run: RunPieces, state: CheckpointState) -> None:
    acc, model = run.accelerator, run.model.transformer
    for prefix, snap in run.snapshots.items():
        if snap is not None:  # through the parameters: under FSDP each process keeps its shard
            sharded_state.load_params(acc, model, run.params, {
                k[len(prefix):]: v for k, v in state.snapshots.items() if k.startswith(prefix)})
            snap.load_state_dict({n: p.detach() for n, p in run.params.items()})
    sharded_state.load_state(acc, model, run.optimizer, run.params, state.trainable,
                             state.optimizer["optimizer"])
    run.scheduler.load_state_dict(state.optimizer["scheduler"])
    set_rng_state(state.rng)
