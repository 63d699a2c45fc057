"""Atomic checkpoints: a kill mid-write leaves the previous checkpoint intact.

Layout of ``<output_dir>/checkpoints/``::

    step_000020/
        trainable.safetensors           # the trained parameters (LoRA or full), fp32
        snapshots.safetensors           # old-policy / EMA snapshots (if any)
        optimizer.pt                    # optimizer + LR scheduler state
        rng.pt                          # python, numpy, torch (and CUDA) RNG states
        state.json                      # step, config hash
        lora/pytorch_lora_weights.safetensors   # diffusers-loadable LoRA export
    latest                              # name of the newest complete checkpoint

A checkpoint is written into ``.tmp-step_...`` and renamed into place; ``latest`` is
replaced atomically after that, so it always names a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor


@dataclass(frozen=True)
class CheckpointState:
    step: int
    trainable: dict[str, Tensor]
    snapshots: dict[str, Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    extra: dict[str, Any]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    root: Path, state: CheckpointState, keep_last: int,
    export_lora: Any | None = None,
) -> Path:
    """Write ``state`` atomically under ``root``; prune to ``keep_last`` checkpoints.

    ``export_lora(directory)`` (optional) writes the diffusers LoRA file into the checkpoint.
    """
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{state.step:06d}"
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().float().cpu().contiguous() for k, v in state.trainable.items()},
              str(tmp / "trainable.safetensors"))
    if state.snapshots:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in state.snapshots.items()},
                  str(tmp / "snapshots.safetensors"))
    torch.save(state.optimizer, tmp / "optimizer.pt")
    torch.save(state.rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": state.step, **state.extra}, indent=2))
    if export_lora is not None:
        export_lora(tmp / "lora")
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(root / "latest", name)
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: Path) -> CheckpointState:
    meta = json.loads((path / "state.json").read_text())
    snapshots_file = path / "snapshots.safetensors"
    return CheckpointState(
        step=int(meta.pop("step")),
        trainable=load_file(str(path / "trainable.safetensors")),
        snapshots=load_file(str(snapshots_file)) if snapshots_file.is_file() else {},
        optimizer=torch.load(path / "optimizer.pt", weights_only=False),
        rng=torch.load(path / "rng.pt", weights_only=False),
        extra=meta,
    )
