"""Full (unsharded) trainable state under FSDP and DeepSpeed, and loading it back.

Checkpoints always hold the single-process layout: full trainable tensors by name, and
the torch optimizer's state dict keyed by the index of each parameter in ``params`` (the
order the optimizer was built with). Under FSDP and DeepSpeed the gathers are
collectives: every process calls these functions, the main process writes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


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
