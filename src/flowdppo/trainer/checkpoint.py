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


# -- full (unsharded) state under FSDP and DeepSpeed -------------------------------------
#
# Checkpoints always hold the single-process layout: full trainable tensors by name, and
# the torch optimizer's state dict keyed by the index of each parameter in ``params`` (the
# order the optimizer was built with). Under FSDP and DeepSpeed the gathers are
# collectives: every process calls these functions, the main process writes.


def _kind(accelerator) -> str:
    return str(accelerator.distributed_type).split(".")[-1]


def _root(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # under torch.compile


def _raw(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper


def _by_index(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A name-keyed optimizer state dict (torch.distributed.checkpoint's) keyed by index."""
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: v for n, v in state.get("state", {}).items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                             for g in state.get("param_groups", [])]}


def _by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                             for g in state["param_groups"]]}


def _full_options(accelerator):
    """Full state dicts, gathered to the main process's CPU. Not on a CPU device: FSDP1's
    offload of parameters that already live on the CPU crashes (segfault, torch 2.13)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=accelerator.device.type != "cpu")


def gather_state(accelerator, model, optimizer, params: dict[str, torch.nn.Parameter]
                 ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Full trainable parameters and optimizer state (complete on the main process)."""
    kind = _kind(accelerator)
    if kind == "FSDP":
        from torch.distributed.checkpoint.state_dict import get_state_dict

        # The whole model is gathered (one FSDP unit at a time): ignore_frozen_params fails
        # on the other ranks in torch 2.13 (KeyError).
        model_state, optim_state = get_state_dict(_root(model), _raw(optimizer),
                                                  options=_full_options(accelerator))
        names = list(params)
        return ({n: model_state[n] for n in names if n in model_state},
                _by_index(optim_state, names))
    if kind == "DEEPSPEED":
        return _gather_deepspeed(optimizer, params)
    return {n: p.detach() for n, p in params.items()}, optimizer.state_dict()


def gather_params(accelerator, model, params: dict[str, torch.nn.Parameter]) -> dict[str, Tensor]:
    """The current values of ``params``, full (complete on the main process)."""
    if _kind(accelerator) != "FSDP":
        return {n: p.detach().clone() for n, p in params.items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(_root(model), options=_full_options(accelerator))
    return {n: state[n] for n in params if n in state}


def load_state(accelerator, model, optimizer, params: dict[str, torch.nn.Parameter],
               trainable: dict[str, Tensor], optim_state: dict[str, Any]) -> None:
    """Load what :func:`gather_state` saved (every process, each with the whole file)."""
    kind = _kind(accelerator)
    if kind == "FSDP":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(_root(model), _raw(optimizer), model_state_dict=trainable,
                       optim_state_dict=_by_name(optim_state, list(params)),
                       options=StateDictOptions(full_state_dict=True, strict=False))
        return
    load_params(accelerator, model, params, trainable)
    if kind == "DEEPSPEED":
        _load_deepspeed_optimizer(optimizer, params, optim_state)
    else:
        optimizer.load_state_dict(optim_state)


@torch.no_grad()
def load_params(accelerator, model, params: dict[str, torch.nn.Parameter],
                values: dict[str, Tensor]) -> None:
    """Set ``params`` from full ``values`` (every process); under FSDP each keeps its shard."""
    if _kind(accelerator) == "FSDP":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(_root(model), values,
                             options=StateDictOptions(full_state_dict=True, strict=False))
        return
    for name, param in params.items():
        param.copy_(values[name])
    if _kind(accelerator) == "DEEPSPEED":
        from deepspeed.utils import safe_set_full_fp32_param

        for name, param in params.items():  # the fp32 master copy the optimizer steps
            safe_set_full_fp32_param(param, values[name].to(param.device, torch.float32))


def _zero_flat_states(optimizer) -> tuple[Any, list[dict[str, Any]]]:
    """DeepSpeed ZeRO's optimizer and the torch optimizer's state of each flat partition."""
    zero = _raw(optimizer)
    inner = zero.optimizer
    return zero, [inner.state[p] for group in inner.param_groups for p in group["params"]]


def _gather_deepspeed(optimizer, params) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero, flat_states = _zero_flat_states(optimizer)
    # Per-element states (exp_avg, ...) are partitioned; scalars (step) are the same for all.
    keys = [k for k, v in flat_states[0].items() if torch.is_tensor(v) and v.ndim > 0]
    scalars = {k: v for k, v in flat_states[0].items() if k not in keys}
    trainable, state = {}, {}
    for i, (name, param) in enumerate(params.items()):
        trainable[name] = safe_get_full_fp32_param(param).cpu()
        state[i] = {**scalars, **{k: safe_get_full_optimizer_state(param, k).cpu() for k in keys}}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in zero.param_groups]
    groups[0]["params"] = list(range(len(params)))  # one group: the trainer builds one
    return trainable, {"state": state, "param_groups": groups[:1]}


def _load_deepspeed_optimizer(optimizer, params, optim_state) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    zero, _ = _zero_flat_states(optimizer)
    saved = optim_state["state"]
    if saved:
        # The torch optimizer creates its state at the first step, and DeepSpeed links each
        # parameter's view of it after that; a fresh run must create and link it first.
        example = next(iter(saved.values()))
        for group in zero.optimizer.param_groups:
            for flat in group["params"]:
                zero.optimizer.state[flat] = {
                    k: torch.zeros_like(flat) if torch.is_tensor(v) and v.ndim > 0 else v
                    for k, v in example.items()}  # scalars (step) are equal for all
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    for i, param in enumerate(params.values()):
        for key, value in saved.get(i, {}).items():
            if torch.is_tensor(value) and value.ndim > 0:
                safe_set_full_optimizer_state(param, value.to(param.device, torch.float32), key)
    settings = {k: v for k, v in optim_state["param_groups"][0].items() if k != "params"}
    for group in zero.param_groups:  # the learning rate the scheduler had set
        group.update(settings)
