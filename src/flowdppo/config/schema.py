"""The run configuration: one typed dataclass per concern, documented here only.

Every field's comment gives its unit and scope. YAML recipes in ``configs/`` set these;
``key=value`` overrides on the command line go through the same strict loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ModelConfig:
    """The flow model adapter and its weights."""

    name: str = "toy"  # adapter registry name: toy, sd3, flux, flux2
    pretrained: str = "builtin:digits"  # local dir, hub id (offline cache), builtin:<world> or tiny-random
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # transformer/text-encoder weights
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra adapter arguments (resolution, ...)
    gradient_checkpointing: bool = False  # trade compute for activation memory
    compile: bool | None = None  # torch.compile the transformer; None = on for CUDA, off on CPU


@dataclass
class LoraConfig:
    """The LoRA adapter trained on the transformer."""

    enabled: bool = True  # False = full fine-tune of the transformer
    rank: int = 8  # LoRA r
    alpha: float = 16.0  # LoRA alpha (scale alpha / r)
    dropout: float = 0.0  # LoRA dropout; must be 0 for r == 1 at the first update
    target_modules: list[str] | None = None  # None = the adapter's default set


@dataclass
class PromptConfig:
    """Where training and evaluation prompts come from."""

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
    """Rollouts: the sampler, its trained steps and the batch of images per iteration."""

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
    """One reward (or monitor) by name, with its weight and factory arguments."""

    name: str = "digit_label"  # reward registry name
    weight: float = 1.0  # weight in the combined reward / advantage
    kwargs: dict[str, Any] = field(default_factory=dict)  # reward factory arguments


@dataclass
class RewardConfig:
    """The rewards a run optimises and how their failures are handled."""

    items: list[RewardItem] = field(default_factory=lambda: [RewardItem()])  # rewards (at least one)
    nonfinite: Literal["error", "drop"] = "error"  # a NaN/inf reward raises, or drops that image
    max_empty_iterations: int = 3  # stop after this many consecutive iterations with every image dropped
    async_workers: int = 1  # threads scoring rewards while the next rollout samples (0 = inline)


@dataclass
class AdvantageConfig:
    """Group-normalised advantages from the rewards."""

    mode: Literal["weighted_sum", "gdpo"] = "weighted_sum"  # how several rewards combine
    std_scope: Literal["global", "group"] = "global"  # std for normalisation
    clip: float = 5.0  # advantages clipped to [-clip, clip]


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 3e-4  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW [beta1, beta2]
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    schedule: Literal["constant", "cosine", "linear"] = "constant"  # lr after warm-up: flat, cosine or linear to 0
    warmup_iterations: int = 0  # iterations of linear lr warm-up from 0


@dataclass
class TrainConfig:
    """The RL loop: iterations, passes over each rollout and micro-batching."""

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
    """Held-out evaluation (ODE samples scored by the rewards and monitors)."""

    every: int = 10  # iterations between evaluations (0 = only at start and end)
    samples_per_prompt: int = 4  # images per held-out prompt
    max_prompts: int = 20  # held-out prompts used
    monitors: list[RewardItem] = field(default_factory=list)  # out-of-domain monitors
    grid: bool = True  # write an image grid PNG per evaluation
    at_start: bool = True  # evaluate the base before training


@dataclass
class CheckpointConfig:
    """Checkpoints for --resume."""

    every: int = 20  # iterations between checkpoints (a final one is always written)
    keep_last: int = 2  # older checkpoints are deleted


@dataclass
class LoggingConfig:
    """Where metrics go besides metrics.jsonl / eval.jsonl."""

    tensorboard: bool = True  # write TensorBoard events to <output_dir>/tensorboard
    wandb: bool = False  # log to Weights & Biases (needs wandb installed)
    wandb_project: str = "flowdppo"  # W&B project name
    progress_bar: bool = True  # a progress bar on the main process


@dataclass
class AlgorithmConfig:
    """The RL method and its hyperparameters."""

    name: str = "dppo"  # dppo, grpo, cps, guard, nft
    hparams: dict[str, Any] = field(default_factory=dict)  # method hyperparameters (checked)


@dataclass
class RunConfig:
    """A whole run: top-level settings plus one section per concern."""

    seed: int = 0  # seeds noise, prompt order and model init (same seed, same run)
    output_dir: str | None = None  # run directory; None = runs/<recipe>__seed<seed>__<time>
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    num_threads: int = 0  # torch CPU threads (0 = torch's default); 1 is fastest for the toy model
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # accelerate autocast of forwards
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
