"""Trainable parameters of a model adapter: LoRA via peft or full fine-tuning, the reference
policy (LoRA disabled, or a frozen copy), parameter snapshots (old policy, EMA)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..config import LoraConfig
from ..models import FlowModel


def unwrap(module: nn.Module) -> nn.Module:
    """The module under DDP/compile wrappers."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if inner is None:
            return module
        module = inner


def apply_trainable(model: FlowModel, cfg: LoraConfig, seed: int) -> None:
    """Make the transformer trainable: inject LoRA (peft) or unfreeze everything."""
    transformer = model.transformer
    transformer.requires_grad_(False)
    if not cfg.enabled:
        transformer.requires_grad_(True)
        return
    from peft import LoraConfig as PeftLoraConfig

    targets = list(cfg.target_modules or model.lora_target_modules)
    if not targets:
        raise ValueError(f"{type(model).__name__} names no LoRA target modules; set "
                         "`lora.target_modules`")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA A init is random: make it the run's
        transformer.add_adapter(PeftLoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
            init_lora_weights="gaussian", target_modules=targets,
        ))
    # Adapter weights train in fp32 whatever the base dtype: bf16 loses small updates.
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def trainable_named_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in unwrap(module).named_parameters() if p.requires_grad}


class ReferencePolicy:
    """Context under which the adapter computes the reference policy (theta_ref).

    With LoRA the reference is the base model (adapter disabled); with full fine-tuning a
    frozen copy of the initial transformer is swapped in.
    """

    def __init__(self, model: FlowModel, lora: bool) -> None:
        self.model = model
        self.lora = lora
        self._frozen = None if lora else copy.deepcopy(unwrap(model.transformer)).requires_grad_(False)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self.lora:
            inner = unwrap(self.model.transformer)
            inner.disable_adapters()
            try:
                yield
            finally:
                inner.enable_adapters()
            return
        current = self.model.transformer
        self.model.transformer = self._frozen
        try:
            yield
        finally:
            self.model.transformer = current


class ParamSnapshot:
    """A detached copy of some parameters: the old (sampling) policy or an EMA for eval."""

    def __init__(self, params: dict[str, nn.Parameter], values: dict[str, Tensor] | None = None) -> None:
        """A copy of ``values`` (default: the parameters' current values) for ``params``."""
        self.params = params
        source = params if values is None else values
        self.values = {n: v.detach().clone() for n, v in source.items()}

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """``snapshot = decay * snapshot + (1 - decay) * current``."""
        for name, value in self.values.items():
            value.lerp_(self.params[name].detach(), 1.0 - decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the snapshot into the live parameters (no autograd graph may be
        pending on them: callers run this before the differentiable forward)."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.values[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(saved[name])

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.values)

    def load_state_dict(self, values: dict[str, Tensor]) -> None:
        for name, value in values.items():
            self.values[name].copy_(value)


class PolicyLag:
    """The policies of the last ``lag`` iterations, for training on stale rollouts
    (``train.policy_lag``): iteration ``it`` samples with the weights that started
    iteration ``it - lag`` (the initial weights while ``it < lag``).

    ``sampler``: the snapshot that samples when on-policy, for methods that do not sample
    with the live weights (the forward methods' EMA old policy); the history then records
    it, so the stale sampler is that snapshot as it was ``lag`` iterations before."""

    def __init__(self, params: dict[str, nn.Parameter], lag: int,
                 sampler: ParamSnapshot | None = None) -> None:
        self.params, self.lag, self.sampler = params, lag, sampler
        # Always lag + 1 entries (the initial weights fill the start): a checkpoint holds
        # them all and a resume restores the same list.
        self.history = [ParamSnapshot(params) for _ in range(lag + 1)] if lag > 0 else []

    @property
    def active(self) -> bool:
        return self.lag > 0

    def advance(self) -> None:
        """Remember the weights that start this iteration; keep the last ``lag + 1``."""
        if self.active:
            values = None if self.sampler is None else self.sampler.values
            self.history.append(ParamSnapshot(self.params, values))
            del self.history[0]

    def snapshots(self) -> dict[str, ParamSnapshot]:
        """The history by checkpoint key prefix (oldest first)."""
        return {f"lag{j}.": snap for j, snap in enumerate(self.history)}

    def factory(self):
        """A context factory swapping the sampling policy in, or ``None`` when on-policy."""
        return self.history[0].swapped_in if self.history else None

    def sampling_policy(self) -> contextlib.AbstractContextManager:
        return self.history[0].swapped_in() if self.history else contextlib.nullcontext()
