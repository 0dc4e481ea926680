"""Schemas of the training groups: schedule, network, training, optimizer, data, trainer; the objectives' are found
beside each objective (objective_schemas)."""

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any

from hydra.utils import get_object
from omegaconf import II, MISSING

from diffusion.config.rules import devices, strategy
from diffusion.core import objectives
from diffusion.core.objectives.base import ObjectiveConfig
from diffusion.data.folder import PIL_MAX_PIXELS
from diffusion.data.lsun import CATEGORIES as LSUN_CATEGORIES
from diffusion.rules import at_least, between, checked, each, nonempty_text, one_of, optional, positive, seed

MAX_TIMESTEPS = 100_000  # T beyond this is no schedule anyone trains (the bound alone costs T network passes)


# --- schedule -----------------------------------------------------------------------------------------
@dataclass
class ScheduleConfig:
    _target_: str = MISSING


@dataclass
class RangeScheduleConfig(ScheduleConfig):
    _target_: str = "diffusion.core.schedules.linear_beta_schedule"
    num_timesteps: int = checked(1000, between(1, MAX_TIMESTEPS))
    beta_start: float = checked(1e-4, between(0, 1, low_open=True, high_open=True))
    beta_end: float = checked(0.02, between(0, 1, low_open=True, high_open=True))


@dataclass
class LinearScaledScheduleConfig(RangeScheduleConfig):
    """beta_start and beta_end are those of T = 1000, scaled by 1000/T (so T > 1000·beta_end)."""

    _target_: str = "diffusion.core.schedules.linear_scaled_beta_schedule"


@dataclass
class SigmoidScheduleConfig(RangeScheduleConfig):
    _target_: str = "diffusion.core.schedules.sigmoid_beta_schedule"
    steepness: float = checked(6.0, positive())


@dataclass
class CosineScheduleConfig(ScheduleConfig):
    _target_: str = "diffusion.core.schedules.cosine_beta_schedule"
    num_timesteps: int = checked(1000, between(1, MAX_TIMESTEPS))
    s: float = checked(0.008, positive())
    max_beta: float = checked(0.999, between(0, 1, low_open=True, high_open=True))


@dataclass
class ExplicitScheduleConfig(ScheduleConfig):
    _target_: str = "diffusion.core.schedules.explicit_beta_schedule"
    betas: list[float] = checked(rule=each(between(0, 1, low_open=True, high_open=True)))
    num_timesteps: int | None = checked(None, optional(between(1, MAX_TIMESTEPS)))  # null: len(betas); else equal to it


# --- objectives: their schemas live beside them (core/objectives/<name>.py), found here -----------------------
def objective_schemas() -> dict[str, type[ObjectiveConfig]]:
    """{name: schema} of every objective: the ObjectiveConfig subclasses the modules of diffusion.core.objectives
    define, named by the Objective their `_target_` builds (edm -> base_objective_edm in the ConfigStore)."""
    found = {}
    for info in pkgutil.iter_modules(objectives.__path__):
        module = importlib.import_module(f"{objectives.__name__}.{info.name}")
        for schema in vars(module).values():
            if isinstance(schema, type) and issubclass(schema, ObjectiveConfig) and schema is not ObjectiveConfig \
                    and schema.__module__ == module.__name__:
                found[get_object(schema._target_).name] = schema
    return found


# --- network, training ----------------------------------------------------------------------------------
@dataclass
class UNetConfig:
    """The U-Net's arguments: its shape (conf/model/*.yaml, the one place it is written), its image size and
    channels from the data; the objective says whether the output also holds a variance."""

    in_channels: int = II("data.channels")
    image_size: int = II("data.image_size")
    ch: int = checked(rule=between(1, 8192))
    ch_mult: list[int] = checked(rule=each(between(1, 64)))
    num_res_blocks: int = checked(rule=between(1, 64))
    attn_resolutions: list[int] = checked(rule=each(at_least(1), nonempty=False))
    dropout: float = checked(rule=between(0, 1, high_open=True))
    num_groups: int = checked(32, between(1, 8192))
    resamp_with_conv: bool = True
    channels_last: bool = False  # NHWC inside the net: faster for large maps (GPU, CIFAR-size CPU), not for 8×8
    num_classes: int | None = checked(None, optional(between(1, 100_000)))  # null: unconditional; N: class-conditional


@dataclass
class TrainingConfig:
    """How the LightningModule trains, whatever the objective."""

    # share of labels replaced by "no label" (classifier-free guidance); used when model.num_classes is set
    cond_drop_prob: float = checked(0.1, between(0, 1))
    compile: bool = False  # torch.compile the net for training (first steps slower while it compiles)
    on_nonfinite: str = checked("stop", one_of("stop", "skip"))  # stop: end (last good checkpoint kept) | skip: counted
    # stop: the loss is read on the host (a sync) every N steps and before each checkpoint; 1: every step.
    # skip reads every step's loss whatever this says (it must know before the optimizer step)
    nonfinite_check_every_n_steps: int = checked(100, at_least(1))
    loss_bins: int = checked(10, between(1, 1000))  # train_loss_by_t/*: the loss in this many ranges of noise level
    # checkpoints written by a background thread: a step waits for a copy of the tensors, not for the disk; the
    # run's last checkpoint is on disk before train.py ends or a signal's stop says it was saved. false: in the step
    async_checkpoints: bool = True
    # DDPM: the most its prior term L_T = KL(q(x_T|x_0) || N(0, I)) may be, in bits/dim, for data at ±1 (the worst
    # case); a schedule that ends further from noise is refused before training (null: no limit)
    max_prior_bpd: float | None = checked(1e-3, optional(positive()))


@dataclass
class OptimizerConfig:
    _target_: str = "torch.optim.Adam"
    _partial_: bool = True
    lr: float = checked(2e-4, positive())
    betas: list[float] = checked(rule=each(between(0, 1, high_open=True), size=2), factory=lambda: [0.9, 0.999])
    eps: float = checked(1e-8, positive())
    weight_decay: float = checked(0.0, at_least(0, integer=False))
    # the update over all tensors at once: foreach (a few multi-tensor ops) or fused (one kernel per group);
    # null lets torch choose (foreach on CUDA, one tensor at a time on CPU); not both true
    foreach: bool | None = None
    fused: bool | None = None


@dataclass
class WarmupConfig:
    """Linear warm-up of the learning rate over warmup_steps (the paper: 5,000), then constant."""

    _target_: str = "torch.optim.lr_scheduler.LinearLR"
    _partial_: bool = True
    start_factor: float = checked(1e-8, between(0, 1, low_open=True))  # ≈ 0: lr·k/total_iters, as the paper's code
    end_factor: float = checked(1.0, between(0, 1))
    total_iters: int = checked(5000, at_least(1))


@dataclass
class OptimConfig:
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: WarmupConfig | None = field(default_factory=WarmupConfig)


@dataclass
class ValidationConfig:
    # the training error is logged as val/loss_<level> at each fraction f of the objective's noise levels
    # (DDPM: t = round(f·(T-1)); EDM: σ = σ_min (σ_max/σ_min)^f; flow: t = f)
    timestep_fractions: list[float] = checked(rule=each(between(0, 1)), factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    # images of the first val batch whose bits/dim are computed, val/bpd (0: off): DDPM's full bound (T network
    # passes), the others' probability-flow ODE (Heun on 100 levels, Hutchinson's trace)
    bpd_images: int = checked(16, at_least(0))


# --- data --------------------------------------------------------------------------------------------------
def in_memory_on_device() -> Any:
    """data.on_device of a data set held in memory: true puts the train split on the training device once and draws
    batches and flips there (no DataLoader, no workers; the same batches bit for bit), false uses the DataLoader,
    null (the default) puts it there when it fits (data/loader.py `split_on_device`)."""
    return field(default=None)


@dataclass
class DataConfig:
    _target_: str = MISSING
    channels: int = checked(rule=between(1, 64))  # what the images are: the network takes its shape from these two
    image_size: int = checked(rule=between(1, 4096))
    # per device: the global batch is batch_size × devices × num_nodes
    batch_size: int = checked(128, between(1, 65_536))
    num_workers: int = checked(0, between(0, 1024))
    seed: int = checked(0, seed())
    random_flip: bool = False


@dataclass
class DigitsDataConfig(DataConfig):
    """scikit-learn's bundled digits: nothing to find on disk or download."""

    _target_: str = "diffusion.data.DigitsDataModule"
    channels: int = 1
    image_size: int = 8
    val_size: int = checked(297, between(1, 1796))
    on_device: bool | None = in_memory_on_device()


@dataclass
class FileDataConfig(DataConfig):
    root: str = checked("data", nonempty_text())
    download: bool = False


@dataclass
class MNISTDataConfig(FileDataConfig):
    _target_: str = "diffusion.data.MNISTDataModule"
    channels: int = 1
    image_size: int = checked(32, between(28, 4096))  # the 28×28 images padded with background
    on_device: bool | None = in_memory_on_device()


@dataclass
class CIFAR10DataConfig(FileDataConfig):
    _target_: str = "diffusion.data.CIFAR10DataModule"
    channels: int = 3
    image_size: int = 32
    random_flip: bool = True
    on_device: bool | None = in_memory_on_device()


@dataclass
class ImageFolderDataConfig(FileDataConfig):
    _target_: str = "diffusion.data.ImageFolderDataModule"
    root: str = checked(rule=nonempty_text())
    image_size: int = checked(64, between(1, 4096))
    channels: int = checked(3, one_of(1, 3))
    val_fraction: float = checked(0.05, between(0, 1, low_open=True, high_open=True))
    # PIL's decompression-bomb limit; null: none
    max_image_pixels: int | None = checked(PIL_MAX_PIXELS, optional(at_least(1)))


@dataclass
class LSUNDataConfig(DataConfig):
    """An LSUN scene category as released: root/<category>_train_lmdb and root/<category>_val_lmdb (data/lsun.py)."""

    _target_: str = "diffusion.data.LSUNDataModule"
    root: str = checked(rule=nonempty_text())
    category: str = checked(rule=one_of(*LSUN_CATEGORIES))
    image_size: int = checked(256, between(1, 4096))
    channels: int = checked(3, one_of(1, 3))
    # PIL's decompression-bomb limit; null: none
    max_image_pixels: int | None = checked(PIL_MAX_PIXELS, optional(at_least(1)))


@dataclass
class StreamingDataConfig(DataConfig):
    """Shards prepare.py wrote (LitData chunks), streamed from a folder or object storage (data/streaming.py).
    channels and image_size must be the shards' (checked before training; the error says which they are)."""

    _target_: str = "diffusion.data.StreamingDataModule"
    input_dir: str = checked(rule=nonempty_text())  # a folder, or s3://bucket/prefix (LitData reads it)
    channels: int = checked(3, between(1, 64))
    image_size: int = checked(32, between(1, 4096))


PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")


# --- trainer, callbacks, logger, paths ------------------------------------------------------------------
@dataclass
class TrainerConfig:
    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = checked("auto", one_of("auto", "cpu", "gpu", "cuda", "mps"))
    devices: Any = checked(1, devices())
    strategy: str = checked("auto", strategy())
    num_nodes: int = checked(1, between(1, 100_000))
    precision: str = checked("32-true", one_of(*PRECISIONS))
    max_steps: int = checked(800_000, at_least(1))
    max_epochs: int = checked(-1, at_least(-1))
    gradient_clip_val: float | None = checked(1.0, optional(at_least(0, integer=False)))
    accumulate_grad_batches: int = checked(1, between(1, 100_000))
    log_every_n_steps: int = checked(50, at_least(1))
    val_check_interval: int = checked(5000, at_least(1))  # in training steps
    check_val_every_n_epoch: int | None = checked(None, optional(at_least(1)))
    limit_val_batches: Any = None  # None: all; an int counts batches, a float is a fraction (checked in validate)
    num_sanity_val_steps: int = checked(0, at_least(-1))
    deterministic: bool = False
    enable_progress_bar: bool = True  # one bar over the run's steps (with ETA), loss and val/bpd
