"""Schemas of the entry points' top-level configs: train, sample, figures, evaluate, export (and logger, paths)."""

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from diffusion.config.callbacks import CallbacksConfig, FeatureExtractorConfig
from diffusion.config.groups import (
    DataConfig,
    DiffusionConfig,
    LossConfig,
    OptimConfig,
    ScheduleConfig,
    TrainerConfig,
    UNetConfig,
    ValidationConfig,
)
from diffusion.sampling import SamplerSpec


@dataclass
class WandbConfig:
    _target_: str = "diffusion.wandb_logger.WandbLogger"
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
    init_from: str | None = None  # fine-tune: start from the U-Net weights of a .ckpt or a diffusers folder
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
    batch_size: int = 256  # images per chunk; chunk k is drawn from seed + k (diffusion.sampling.draw)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    seed: int = 0
    weights: str = "ema"  # ema | raw
    device: str = "auto"
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class ExportConfig:
    """export.py: a checkpoint as a diffusers DDPMPipeline folder (UNet2DModel, DDPMScheduler, model card)."""

    ckpt: str = MISSING
    out: str = MISSING  # a new or empty folder
    weights: str = "ema"  # ema | raw


@dataclass
class FiguresConfig:
    """figures.py: the paper's figures of a checkpoint (Figs. 5-9, Table 3); steps left null follow T."""

    name: str = "figures"
    ckpt: str = MISSING
    logger: WandbConfig | None = None  # logger=wandb: the figures also go to an (offline) W&B run
    data: DataConfig = MISSING  # the data the model was trained on: its first images of `split` are drawn
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
    sampler: SamplerSpec = field(default_factory=SamplerSpec)  # the sample grid (Figs. 6-8 are Algorithm 2)
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
    samplers: list[SamplerSpec] = field(default_factory=lambda: [
        SamplerSpec(name="ddpm"),
        *(SamplerSpec(name="ddim", steps=k) for k in (10, 20, 50, 100)),
        *(SamplerSpec(name="respaced", steps=k) for k in (50, 100, 250)),
    ])


@dataclass
class EvaluateConfig:
    name: str = "evaluate"
    ckpt: str = MISSING
    weights: str = "ema"  # ema | raw
    num_samples: int | None = None  # None: 50,000 for CIFAR-10 (the paper's protocol), 1,000 otherwise
    batch_size: int = 250
    sampler: SamplerSpec = field(default_factory=SamplerSpec)  # the paper's: ancestral, all T steps
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
