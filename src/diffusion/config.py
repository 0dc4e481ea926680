"""Structured-config schemas (registered in Hydra's ConfigStore as base_<group>) and value checks.

OmegaConf checks every key and type against these dataclasses while Hydra composes; `validate` checks
ranges and cross-group consistency before anything is built. YAML files in conf/ choose and override.
"""

import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from diffusion.errors import UserError


# --- schedule -----------------------------------------------------------------------------------------
@dataclass
class ScheduleConfig:
    _target_: str = MISSING


@dataclass
class RangeScheduleConfig(ScheduleConfig):
    _target_: str = "diffusion.schedules.linear_beta_schedule"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02


@dataclass
class SigmoidScheduleConfig(RangeScheduleConfig):
    _target_: str = "diffusion.schedules.sigmoid_beta_schedule"
    steepness: float = 6.0


@dataclass
class CosineScheduleConfig(ScheduleConfig):
    _target_: str = "diffusion.schedules.cosine_beta_schedule"
    num_timesteps: int = 1000
    s: float = 0.008
    max_beta: float = 0.999


@dataclass
class ExplicitScheduleConfig(ScheduleConfig):
    _target_: str = "diffusion.schedules.explicit_beta_schedule"
    betas: list[float] = MISSING


# --- network, diffusion, loss, optimisation --------------------------------------------------------------
@dataclass
class UNetConfig:
    """The U-Net's shape; its image size and channels come from the data, its output from the variance."""

    _target_: str = "diffusion.nn.UNet"
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.1
    num_groups: int = 32
    resamp_with_conv: bool = True
    channels_last: bool = False  # NHWC inside the net: faster for large maps (GPU, CIFAR-size CPU), not for 8×8
    compile: bool = False  # torch.compile the net for training (first steps slower while it compiles)


@dataclass
class DiffusionConfig:
    parameterization: str = "eps"  # eps | x0 | v | mean
    variance: str = "fixed_large"  # fixed_large (σ²=β) | fixed_small (σ²=β̃) | learned_range


@dataclass
class LossConfig:
    type: str = "simple"  # simple (Eq. 14) | vlb (the bound) | hybrid (simple + vlb_weight·vlb)
    vlb_weight: float = 0.001
    min_snr_gamma: float | None = None
    timestep_sampler: str = "uniform"  # uniform | importance
    on_nonfinite: str = "stop"  # stop: end the run (last good checkpoint kept) | skip: skip the step, counted


@dataclass
class OptimizerConfig:
    _target_: str = "torch.optim.Adam"
    _partial_: bool = True
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class WarmupConfig:
    """Linear warm-up of the learning rate over warmup_steps (the paper: 5,000), then constant."""

    _target_: str = "torch.optim.lr_scheduler.LinearLR"
    _partial_: bool = True
    start_factor: float = 1e-8  # ≈ 0: lr·k/total_iters at step k, as the paper's code (LinearLR needs > 0)
    end_factor: float = 1.0
    total_iters: int = 5000


@dataclass
class OptimConfig:
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: WarmupConfig | None = field(default_factory=WarmupConfig)


@dataclass
class ValidationConfig:
    # L_simple is logged at t = round(f·(T-1)) for each fraction f
    timestep_fractions: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    bpd_images: int = 16  # images of the first val batch on which the full bound is computed (0: off)


# --- data --------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    _target_: str = MISSING
    batch_size: int = 128  # per device: the global batch is batch_size × devices × num_nodes
    num_workers: int = 0
    seed: int = 0
    random_flip: bool = False


@dataclass
class DigitsDataConfig(DataConfig):
    """scikit-learn's bundled digits: nothing to find on disk or download."""

    _target_: str = "diffusion.data.DigitsDataModule"
    val_size: int = 297


@dataclass
class FileDataConfig(DataConfig):
    root: str = "data"
    download: bool = False


@dataclass
class MNISTDataConfig(FileDataConfig):
    _target_: str = "diffusion.data.MNISTDataModule"
    image_size: int = 32


@dataclass
class CIFAR10DataConfig(FileDataConfig):
    _target_: str = "diffusion.data.CIFAR10DataModule"
    random_flip: bool = True


@dataclass
class ImageFolderDataConfig(FileDataConfig):
    _target_: str = "diffusion.data.ImageFolderDataModule"
    root: str = MISSING
    image_size: int = 64
    channels: int = 3
    val_fraction: float = 0.05


# --- trainer, callbacks, logger, paths ------------------------------------------------------------------
@dataclass
class TrainerConfig:
    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    max_steps: int = 800_000
    max_epochs: int = -1
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 50
    val_check_interval: int = 5000  # in training steps
    check_val_every_n_epoch: int | None = None
    limit_val_batches: Any = 1.0  # an int counts batches, a float is a fraction (checked in validate)
    num_sanity_val_steps: int = 0
    deterministic: bool = False
    enable_progress_bar: bool = True  # Lightning's TQDM bar: loss, val/bpd and it/s


@dataclass
class CheckpointConfig:
    _target_: str = "lightning.pytorch.callbacks.ModelCheckpoint"
    dirpath: str = "${paths.output_dir}/checkpoints"
    filename: str = "step{step:07d}"
    auto_insert_metric_name: bool = False
    every_n_train_steps: int = 10_000
    save_last: bool = True
    save_top_k: int = -1
    enable_version_counter: bool = False  # a resumed run overwrites its own last.ckpt, not last-v1.ckpt


@dataclass
class EMAConfig:
    _target_: str = "diffusion.callbacks.EMA"
    decay: float = 0.9999
    warmup: bool = True  # decay_n = min(decay, (1 + n) / (10 + n)): useful averages early in a run


@dataclass
class SamplerConfig:
    name: str = "ddpm"  # ddpm (Algorithm 2) | ddim | respaced
    steps: int | None = None  # for ddim / respaced: number of steps K
    spacing: str = "linspace"  # linspace | leading | trailing
    eta: float = 0.0
    clip_denoised: bool = True


@dataclass
class SampleGridConfig:
    _target_: str = "diffusion.callbacks.SampleGrid"
    every_n_steps: int = 10_000
    num_samples: int = 64
    seed: int = 0
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(name="ddim", steps=50))
    final_sampler: SamplerConfig = field(default_factory=SamplerConfig)


@dataclass
class FeatureExtractorConfig:
    # auto: digits for the digits data, else inception | digits: a small CNN trained on the digits train split
    # at first use and cached | inception: torchmetrics' InceptionV3 (FID's network), weights from a local file
    name: str = "auto"
    weights_path: str | None = None  # inception: default <torch hub>/checkpoints/weights-inception-2015-12-05-*.pth
    cache_dir: str | None = None  # digits: default $XDG_CACHE_HOME/diffusion or ~/.cache/diffusion


@dataclass
class SampleQualityConfig:
    """FID/IS/KID/precision/recall of EMA samples every N steps and at the end (val/fid, val/is, ...)."""

    _target_: str = "diffusion.callbacks.SampleQualityCallback"
    every_n_steps: int = 10_000  # 0: only at the end (at_train_end) or never
    num_samples: int = 1000  # generated images per evaluation, shared out over the ranks
    batch_size: int = 250
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(name="ddim", steps=50))
    seed: int = 0
    feature_extractor: FeatureExtractorConfig = field(default_factory=FeatureExtractorConfig)
    reference_splits: list[str] = field(default_factory=lambda: ["train", "val"])  # val/fid, val/fid_test
    max_reference_images: int | None = None  # None: the whole split
    weights: str = "ema"  # ema | raw
    at_train_end: bool = True


@dataclass
class PaperFiguresConfig:
    """The paper's figures (forward/reverse chains, reconstructions, interpolation, rate-distortion) during
    training, as PNGs in <run>/figures/ and W&B images. Off by default: at_train_end=true or every_n_steps=N."""

    _target_: str = "diffusion.callbacks.PaperFigures"
    every_n_steps: int = 0
    at_train_end: bool = False
    split: str = "val"
    num_images: int = 8
    num_samples: int = 64
    rd_images: int = 64  # images for the rate-distortion curve (the full bound: T network passes each)
    seed: int = 0


@dataclass
class LRMonitorConfig:
    _target_: str = "lightning.pytorch.callbacks.LearningRateMonitor"
    logging_interval: str = "step"


@dataclass
class ScheduleLogConfig:
    _target_: str = "diffusion.callbacks.ScheduleLogger"


@dataclass
class RNGStateConfig:
    """Every rank's torch/CUDA/numpy/Python RNG state in checkpoints: a resumed run continues bit for bit."""

    _target_: str = "diffusion.callbacks.RNGState"


@dataclass
class RanksInSyncConfig:
    """Under DDP: compare every rank's weight checksums every N steps and at the end (logs ddp/ranks_in_sync)."""

    _target_: str = "diffusion.callbacks.RanksInSync"
    every_n_steps: int = 1000


@dataclass
class CallbacksConfig:
    """Each callback may be switched off with `callbacks.<name>=null`."""

    checkpoint: CheckpointConfig | None = field(default_factory=CheckpointConfig)
    ema: EMAConfig | None = field(default_factory=EMAConfig)
    samples: SampleGridConfig | None = field(default_factory=SampleGridConfig)
    quality: SampleQualityConfig | None = field(default_factory=SampleQualityConfig)
    figures: PaperFiguresConfig | None = field(default_factory=PaperFiguresConfig)
    lr_monitor: LRMonitorConfig | None = field(default_factory=LRMonitorConfig)
    schedule_log: ScheduleLogConfig | None = field(default_factory=ScheduleLogConfig)
    rng_state: RNGStateConfig | None = field(default_factory=RNGStateConfig)
    ddp_check: RanksInSyncConfig | None = field(default_factory=RanksInSyncConfig)


@dataclass
class WandbConfig:
    _target_: str = "lightning.pytorch.loggers.WandbLogger"
    project: str = "diffusion"
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    offline: bool = True  # files under the run directory; `wandb sync <dir>` uploads them later
    save_dir: str = "${paths.output_dir}"
    log_model: bool = False


@dataclass
class PathsConfig:
    data_dir: str = "data"
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class TrainConfig:
    name: str = "default"
    seed: int = 0
    ckpt_path: str | None = None  # a checkpoint path, or "last": the newest last.ckpt of runs named `name`
    schedule: ScheduleConfig = MISSING
    model: UNetConfig = MISSING
    data: DataConfig = MISSING
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    trainer: TrainerConfig = MISSING
    callbacks: CallbacksConfig = MISSING
    logger: WandbConfig | None = MISSING
    paths: PathsConfig = MISSING
    paper_card: dict[str, Any] = field(default_factory=dict)  # what the paper reports for this recipe (logged)
    optimized_metric: str | None = None  # a logged metric train.py returns (a sweeper's objective), e.g. val/fid


@dataclass
class SampleConfig:
    ckpt: str = MISSING
    num_samples: int = 64
    batch_size: int = 256
    sampler: str = "ddpm"
    steps: int | None = None
    spacing: str = "linspace"
    eta: float = 0.0
    clip_denoised: bool = True
    seed: int = 0
    weights: str = "ema"  # ema | raw
    device: str = "auto"
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class FiguresConfig:
    """figures.py: the paper's figures of a checkpoint (Figs. 5-9, Table 3); steps left null follow T."""

    ckpt: str = MISSING
    data: DataConfig = MISSING  # the data the model was trained on: its first images of `split` are drawn
    model: UNetConfig | None = None  # unused (the checkpoint holds the net); set by data options' overrides
    paths: PathsConfig = MISSING
    split: str = "val"
    num_images: int = 8  # data images in the forward, reconstruction, interpolation figures; chains in Fig. 6
    num_samples: int = 64  # the sample grid
    num_reconstructions: int = 6  # completions per x_t (Fig. 7)
    num_lambdas: int = 9  # interpolation weights evenly spaced in [0, 1] (Fig. 8)
    rd_images: int = 64  # images of the rate-distortion curve (T network passes over them)
    forward_steps: list[int] | None = None  # default 0, T/10, T/4, T/2, 3T/4, T-1
    reverse_steps: list[int] | None = None  # default 0, T/10, ..., T-1
    reconstruction_steps: list[int] | None = None  # default as forward_steps
    interpolation_steps: list[int] | None = None  # default T/2
    seed: int = 0
    weights: str = "ema"  # ema | raw
    device: str = "auto"
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class BpdConfig:
    """NLL in bits/dim: the full variational bound (T network passes per image) on real held-out images."""

    enabled: bool = True
    split: str = "val"  # the data module's held-out split (the test set's role)
    num_images: int | None = None  # None: the whole split
    batch_size: int = 100


@dataclass
class SamplerTableConfig:
    """Time and quality of several samplers on the same checkpoint: samplers.md and samplers.png."""

    enabled: bool = False
    num_samples: int | None = None  # None: evaluate's num_samples
    samplers: list[SamplerConfig] = field(default_factory=lambda: [
        SamplerConfig(name="ddpm"),
        *(SamplerConfig(name="ddim", steps=k) for k in (10, 20, 50, 100)),
        *(SamplerConfig(name="respaced", steps=k) for k in (50, 100, 250)),
    ])


@dataclass
class EvaluateConfig:
    name: str = "evaluate"
    ckpt: str = MISSING
    weights: str = "ema"  # ema | raw
    num_samples: int | None = None  # None: 50,000 for CIFAR-10 (the paper's protocol), 1,000 otherwise
    batch_size: int = 250
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # the paper's: ancestral, all T steps
    seed: int = 0
    feature_extractor: FeatureExtractorConfig = field(default_factory=FeatureExtractorConfig)
    reference_splits: list[str] = field(default_factory=lambda: ["train", "val"])  # FID vs train (paper) and test
    max_reference_images: int | None = None
    bpd: BpdConfig = field(default_factory=BpdConfig)
    sampler_table: SamplerTableConfig = field(default_factory=SamplerTableConfig)
    accelerator: str = "auto"
    devices: Any = "auto"  # auto: every GPU of the machine (else 1 CPU process)
    progress_bar: bool = True
    data: DataConfig = MISSING
    logger: WandbConfig | None = MISSING
    paths: PathsConfig = MISSING
    output_dir: str = "${hydra:runtime.output_dir}"


def run_id() -> str:
    """The run directory's name: the SLURM job (array task) id, stable across requeues, else the time."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"slurm-{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def register_configs() -> None:
    """Put every schema in Hydra's ConfigStore, as base_<group> or base_<group>_<option>; add ${run_id:}."""
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", run_id, use_cache=True)
    cs = ConfigStore.instance()
    cs.store(name="base_train", node=TrainConfig)
    cs.store(name="base_sample", node=SampleConfig)
    cs.store(name="base_evaluate", node=EvaluateConfig)
    cs.store(name="base_figures", node=FiguresConfig)
    for group, name, node in [
        ("schedule", "base_schedule_range", RangeScheduleConfig),
        ("schedule", "base_schedule_sigmoid", SigmoidScheduleConfig),
        ("schedule", "base_schedule_cosine", CosineScheduleConfig),
        ("schedule", "base_schedule_explicit", ExplicitScheduleConfig),
        ("model", "base_model", UNetConfig),
        ("data", "base_data_digits", DigitsDataConfig),
        ("data", "base_data_mnist", MNISTDataConfig),
        ("data", "base_data_cifar10", CIFAR10DataConfig),
        ("data", "base_data_image_folder", ImageFolderDataConfig),
        ("trainer", "base_trainer", TrainerConfig),
        ("callbacks", "base_callbacks", CallbacksConfig),
        ("logger", "base_logger", WandbConfig),
        ("paths", "base_paths", PathsConfig),
    ]:
        cs.store(group=group, name=name, node=node)


PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")


def _require(ok: bool, key: str, value: Any, rule: str, fix: str) -> None:
    if not ok:
        raise UserError(f"{key} must be {rule}, got {value!r}; {fix}")


def validate(cfg: DictConfig) -> None:
    """Check ranges and cross-group choices before anything is built (types were checked at composition)."""
    from diffusion.gaussian import PARAMETERIZATIONS, VARIANCES
    from diffusion.losses import LOSS_TYPES

    _require(cfg.diffusion.parameterization in PARAMETERIZATIONS, "diffusion.parameterization",
             cfg.diffusion.parameterization, f"one of {list(PARAMETERIZATIONS)}", "try diffusion.parameterization=eps")
    _require(cfg.diffusion.variance in VARIANCES, "diffusion.variance", cfg.diffusion.variance,
             f"one of {list(VARIANCES)}", "try diffusion.variance=fixed_large")
    _require(cfg.loss.type in LOSS_TYPES, "loss.type", cfg.loss.type, f"one of {list(LOSS_TYPES)}",
             "try loss.type=simple")
    _require(cfg.loss.timestep_sampler in ("uniform", "importance"), "loss.timestep_sampler",
             cfg.loss.timestep_sampler, "'uniform' or 'importance'", "try loss.timestep_sampler=uniform")
    _require(cfg.loss.timestep_sampler == "uniform" or cfg.loss.type != "simple", "loss.timestep_sampler",
             cfg.loss.timestep_sampler, "'uniform' with loss.type=simple (importance weights come from the bound)",
             "use loss.type=vlb or hybrid")
    _require(cfg.loss.on_nonfinite in ("stop", "skip"), "loss.on_nonfinite", cfg.loss.on_nonfinite,
             "'stop' or 'skip'", "try loss.on_nonfinite=stop")
    _require(cfg.loss.min_snr_gamma is None or cfg.loss.min_snr_gamma > 0, "loss.min_snr_gamma",
             cfg.loss.min_snr_gamma, "> 0 or null", "try loss.min_snr_gamma=5")
    _require(cfg.optim.optimizer.lr > 0, "optim.optimizer.lr", cfg.optim.optimizer.lr, "> 0",
             "try optim.optimizer.lr=2e-4")
    _require(cfg.data.batch_size >= 1, "data.batch_size", cfg.data.batch_size, ">= 1", "try data.batch_size=128")
    _require(0 <= cfg.model.dropout < 1, "model.dropout", cfg.model.dropout, "in [0, 1)", "try model.dropout=0.1")
    _require(cfg.trainer.max_steps >= 1, "trainer.max_steps", cfg.trainer.max_steps, ">= 1",
             "try trainer.max_steps=1000")
    _require(str(cfg.trainer.precision) in PRECISIONS, "trainer.precision", cfg.trainer.precision,
             f"one of {list(PRECISIONS)}", "try trainer.precision=bf16-mixed")
    if str(cfg.trainer.precision) == "16-mixed" and cfg.trainer.accelerator == "cpu":
        raise UserError("trainer.precision=16-mixed needs a CUDA GPU (fp16 autocast with gradient scaling), got "
                        "trainer.accelerator=cpu; use trainer.precision=bf16-mixed on CPU")
    _require(cfg.trainer.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches",
             cfg.trainer.accumulate_grad_batches, ">= 1", "try trainer.accumulate_grad_batches=1")
    if cfg.trainer.accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"trainer.accelerator={cfg.trainer.accelerator} but no CUDA GPU is visible; "
                            "use trainer=cpu, or trainer=default to take what the machine has")
    lvb = cfg.trainer.limit_val_batches
    _require((isinstance(lvb, int) and not isinstance(lvb, bool) and lvb >= 0)
             or (isinstance(lvb, float) and 0.0 <= lvb <= 1.0), "trainer.limit_val_batches", lvb,
             "a batch count (int >= 0) or a fraction in [0.0, 1.0]", "try trainer.limit_val_batches=1.0")
    if cfg.callbacks.ema is not None:
        _require(0 <= cfg.callbacks.ema.decay < 1, "callbacks.ema.decay", cfg.callbacks.ema.decay, "in [0, 1)",
                 "try callbacks.ema.decay=0.9999")
    if cfg.optim.lr_scheduler is not None:
        _require(cfg.optim.lr_scheduler.total_iters >= 1, "optim.lr_scheduler.total_iters",
                 cfg.optim.lr_scheduler.total_iters, ">= 1", "use optim.lr_scheduler=null for no warm-up")
