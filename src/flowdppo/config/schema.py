"""The run configuration: one typed dataclass per concern, documented here only.

Every field's comment gives its unit and scope. YAML recipes in ``configs/`` set these;
``key=value`` overrides on the command line go through the same strict loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ModelConfig:
    name: str = "toy"  # adapter registry name: toy, sd3, flux, flux2
    pretrained: str = "builtin:digits"  # local dir, hub id (offline cache), builtin:<world> or tiny-random
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # transformer/text-encoder weights
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra adapter arguments (resolution, ...)
    gradient_checkpointing: bool = False  # trade compute for activation memory
    compile: bool | None = None  # torch.compile the transformer; None = on for CUDA, off on CPU


@dataclass
class LoraConfig:
    enabled: bool = True  # False = full fine-tune of the transformer
    rank: int = 8  # LoRA r
    alpha: float = 16.0  # LoRA alpha (scale alpha / r)
    dropout: float = 0.0  # LoRA dropout; must be 0 for r == 1 at the first update
    target_modules: list[str] | None = None  # None = the adapter's default set


@dataclass
class PromptConfig:
    source: str = "digits"  # built-in world name or "files"
    train_file: str | None = None  # .txt or .jsonl when source = files
    eval_file: str | None = None  # .txt or .jsonl when source = files
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra prompt-source arguments


@dataclass
class SdeStepsConfig:
    """Which of the K sampler steps are stochastic and trained (the S "SDE steps")."""

    # window: `count` consecutive steps starting at a random index (MixGRPO / Flow-GRPO-Fast);
    # random: `count` distinct random indices (Flow-GRPO, the Flow-DPPO release), e.g. {0, 2, 4}.
    # Drawn per iteration from the run's seed, identical on every process and after a resume.
    mode: Literal["window", "random"] = "window"
    count: int | None = 3  # S: stochastic (trained) steps per rollout; None = every step
    range: list[float] = field(default_factory=lambda: [0.0, 0.5])  # [lo, hi) fraction of the K steps


@dataclass
class SamplingConfig:
    num_steps: int = 10  # sampler steps K of a rollout
    dynamics: Literal["flow_sde", "cps", "ode"] | None = None  # None = the algorithm's own
    noise_level: float = 0.7  # Flow-SDE a
    eta: float = 0.8  # CPS eta
    sde_steps: SdeStepsConfig = field(default_factory=SdeStepsConfig)  # the trained steps
    guidance_scale: float = 1.0  # CFG scale during rollouts (1 = off)
    group_size: int = 8  # G images per prompt
    num_groups: int = 8  # prompts per iteration (global, across processes)
    sample_batch_size: int = 64  # images per sampling forward, per process
    eval_num_steps: int = 10  # ODE steps for evaluation


@dataclass
class RewardItem:
    name: str = "digit_label"  # reward registry name
    weight: float = 1.0  # weight in the combined reward / advantage
    kwargs: dict[str, Any] = field(default_factory=dict)  # reward factory arguments


@dataclass
class RewardConfig:
    items: list[RewardItem] = field(default_factory=lambda: [RewardItem()])
    nonfinite: Literal["error", "drop"] = "error"  # a NaN/inf reward raises, or drops that image
    max_empty_iterations: int = 3  # stop after this many consecutive iterations with every image dropped
    async_workers: int = 1  # threads scoring rewards while the next rollout samples (0 = inline)


@dataclass
class AdvantageConfig:
    mode: Literal["weighted_sum", "gdpo"] = "weighted_sum"  # how several rewards combine
    std_scope: Literal["global", "group"] = "global"  # std for normalisation
    clip: float = 5.0  # advantages clipped to [-clip, clip]


@dataclass
class OptimConfig:
    lr: float = 3e-4  # AdamW learning rate
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_iterations: int = 0


@dataclass
class TrainConfig:
    num_iterations: int = 60  # rollouts
    num_updates: int = 1  # passes over each rollout (inner epochs)
    minibatches_per_pass: int = 1  # optimizer steps per pass
    micro_batch_size: int = 64  # (sample, step) entries per forward/backward, per process
    ema_decay: float = 0.0  # EMA of trainable weights used for evaluation (0 = off)
    old_policy_ema: float = 0.5  # forward-process methods: sampling policy = EMA of theta
    diagnostic_clip_range: float = 1e-4  # ratio clip compared with the exact KL (diag_*); 0 = off
    # Likelihood methods' old means. The first optimizer step's own forward always defines the
    # old means of its entries (r == 1, KL == 0 exactly at the first update). Entries of later
    # minibatches of the first pass (minibatches_per_pass > 1) use the rollout's means
    # (rollout) or the update's own forward before the first step (replay: bf16 and
    # torch.compile make the rollout's forward round differently); auto = replay on CUDA,
    # with mixed precision or with torch.compile, else rollout.
    old_means: Literal["auto", "rollout", "replay"] = "auto"
    # Train on rollouts sampled by the policy of `policy_lag` iterations before (what an
    # asynchronous trainer with bounded staleness does); old means and log-probs are that
    # policy's. 0 = on-policy.
    policy_lag: int = 0


@dataclass
class EvalConfig:
    every: int = 10  # iterations between evaluations (0 = only at start and end)
    samples_per_prompt: int = 4  # images per held-out prompt
    max_prompts: int = 20  # held-out prompts used
    monitors: list[RewardItem] = field(default_factory=list)  # out-of-domain monitors
    grid: bool = True  # write an image grid PNG per evaluation
    at_start: bool = True  # evaluate the base before training


@dataclass
class CheckpointConfig:
    every: int = 20  # iterations between checkpoints (a final one is always written)
    keep_last: int = 2  # older checkpoints are deleted


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "flowdppo"
    progress_bar: bool = True


@dataclass
class AlgorithmConfig:
    name: str = "dppo"  # dppo, grpo, cps, guard, nft
    hparams: dict[str, Any] = field(default_factory=dict)  # method hyperparameters (checked)


@dataclass
class RunConfig:
    seed: int = 0
    output_dir: str | None = None  # run directory; None = runs/<recipe>__seed<seed>__<time>
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    num_threads: int = 0  # torch CPU threads (0 = torch's default); 1 is fastest for the toy model
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
