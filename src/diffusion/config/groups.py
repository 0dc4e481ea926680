"""Schemas of the training groups: schedule, network, diffusion, loss, optimizer, data, trainer."""

from dataclasses import dataclass, field
from typing import Any

from omegaconf import II, MISSING


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
    in_channels: int = II("data.channels")
    image_size: int = II("data.image_size")
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
    channels: int = MISSING  # what the images are: the network takes its shape from these two
    image_size: int = MISSING
    batch_size: int = 128  # per device: the global batch is batch_size × devices × num_nodes
    num_workers: int = 0
    seed: int = 0
    random_flip: bool = False


@dataclass
class DigitsDataConfig(DataConfig):
    """scikit-learn's bundled digits: nothing to find on disk or download."""

    _target_: str = "diffusion.data.DigitsDataModule"
    channels: int = 1
    image_size: int = 8
    val_size: int = 297


@dataclass
class FileDataConfig(DataConfig):
    root: str = "data"
    download: bool = False


@dataclass
class MNISTDataConfig(FileDataConfig):
    _target_: str = "diffusion.data.MNISTDataModule"
    channels: int = 1
    image_size: int = 32  # the 28×28 images padded with background


@dataclass
class CIFAR10DataConfig(FileDataConfig):
    _target_: str = "diffusion.data.CIFAR10DataModule"
    channels: int = 3
    image_size: int = 32
    random_flip: bool = True


@dataclass
class ImageFolderDataConfig(FileDataConfig):
    _target_: str = "diffusion.data.ImageFolderDataModule"
    root: str = MISSING
    image_size: int = 64
    channels: int = 3
    val_fraction: float = 0.05
    max_image_pixels: int | None = 89_478_485  # PIL's decompression-bomb limit; null: none


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
    limit_val_batches: Any = None  # None: all; an int counts batches, a float is a fraction (checked in validate)
    num_sanity_val_steps: int = 0
    deterministic: bool = False
    enable_progress_bar: bool = True  # one bar over the run's steps (with ETA), loss and val/bpd
