"""Schemas of the entry points' top-level configs: train, sample, figures, evaluate, export, prepare (and logger,
paths)."""

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from diffusion.config.callbacks import CallbacksConfig, FDDINOv2Config, FeatureExtractorConfig
from diffusion.config.groups import (
    DataConfig,
    OptimConfig,
    ScheduleConfig,
    TrainerConfig,
    TrainingConfig,
    UNetConfig,
    ValidationConfig,
)
from diffusion.config.rules import device, devices, label_choice
from diffusion.core.objectives.base import ObjectiveConfig
from diffusion.core.sampling import MAX_NOISE_BLOCK, NOISE_BLOCK, SAMPLERS, SamplerSpec
from diffusion.rules import Rule, at_least, between, checked, each, nonempty_text, numbers, one_of, optional, seed

# Keys that moved when objectives became a config group: a command line still spelling them gets the new key.
MOVED_KEYS = {"diffusion.parameterization": "objective.parameterization", "diffusion.variance": "objective.variance",
              "diffusion.cond_drop_prob": "training.cond_drop_prob", "loss.type": "objective.loss",
              "loss.vlb_weight": "objective.vlb_weight", "loss.min_snr_gamma": "objective.min_snr_gamma",
              "loss.timestep_sampler": "objective.timesteps", "loss.on_nonfinite": "training.on_nonfinite",
              "loss.nonfinite_check_every_n_steps": "training.nonfinite_check_every_n_steps",
              "model.compile": "training.compile"}


@dataclass
class WandbConfig:
    _target_: str = "diffusion.lightning.wandb_logger.WandbLogger"
    project: str = checked("diffusion", nonempty_text())
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
    name: str = checked("default", nonempty_text())
    seed: int = checked(0, seed())
    ckpt_path: str | None = None  # a checkpoint path, or "last": the newest last.ckpt of runs named `name`
    init_from: str | None = None  # fine-tune: start from the U-Net weights of a .ckpt or a diffusers folder
    schedule: ScheduleConfig | None = MISSING  # DDPM's betas; none for the other objectives
    objective: ObjectiveConfig = MISSING
    model: UNetConfig = MISSING
    data: DataConfig = MISSING
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    trainer: TrainerConfig = MISSING
    callbacks: CallbacksConfig = MISSING
    logger: WandbConfig | None = MISSING
    paths: PathsConfig = MISSING
    paper_card: dict[str, Any] = field(default_factory=dict)  # what the paper reports for this recipe (logged)
    optimized_metric: str | None = None  # a logged metric train.py returns (a sweeper's objective), e.g. val/fid


@dataclass
class PostHocEMAChoice:
    """A post-hoc EMA width to rebuild (Karras et al. 2024) instead of the checkpoint's own average: null = the
    checkpoint's weights (ema: the classic constant-decay EMA; raw); sigma_rel = the post-hoc EMA of that width, rebuilt
    from the run's snapshots."""

    sigma_rel: float | None = None
    snapshot_dir: str | None = None  # None: <run>/posthoc_ema beside the checkpoint's <run>/checkpoints/


@dataclass
class SampleConfig:
    ckpt: str = MISSING
    num_samples: int = checked(64, at_least(1))
    batch_size: int = checked(256, at_least(1))  # images per chunk: the images do not depend on it
    sampler: SamplerSpec = field(default_factory=SamplerSpec)  # null name: the objective's own sampler
    seed: int = checked(0, seed())
    # which of the images 0..num_samples-1 to draw (null: all): image i is the same in any draw that has it
    seeds: Any = checked(None, numbers())
    noise_block: int = checked(NOISE_BLOCK, between(1, MAX_NOISE_BLOCK))  # seed + i // noise_block; 1: EDM's
    weights: str = checked("ema", one_of("ema", "raw"))
    ema: PostHocEMAChoice = field(default_factory=PostHocEMAChoice)  # ema.sigma_rel=0.05: a post-hoc EMA
    device: str = checked("auto", device())
    output_dir: str = "${hydra:runtime.output_dir}"
    # class-conditional checkpoints: null/balanced, or [3,3,7] / [cat,dog] repeated in turn to fill num_samples
    labels: Any = checked(None, label_choice())


@dataclass
class ExportConfig:
    """export.py: a checkpoint as a diffusers DDPMPipeline folder (UNet2DModel, DDPMScheduler, model card)."""

    ckpt: str = MISSING
    out: str = MISSING  # a new or empty folder
    weights: str = "ema"  # ema | raw


@dataclass
class PrepareConfig:
    """prepare.py: a data set's train and val splits written once as LitData shards, for data=streaming."""

    data: DataConfig = MISSING  # any data group (data=cifar10 data.root=...); its splits are what is written
    paths: PathsConfig = MISSING
    out: str = checked(rule=nonempty_text())  # a new or empty folder, then data.input_dir=out
    chunk_mb: int = checked(64, between(1, 4096))  # LitData chunk size in MB (what a reader fetches at once)
    num_workers: int = checked(1, between(1, 1024))  # processes that write chunks (LitData's optimize)
    # what the data group's seed: ${seed} reads; the shards do not depend on it (splits are fixed by SPLIT_SEED,
    # the training run's data.seed shuffles them)
    seed: int = checked(0, seed())


@dataclass
class FiguresConfig:
    """figures.py: the paper's figures of a checkpoint (Figs. 5-9, Table 3); steps left null follow T."""

    name: str = checked("figures", nonempty_text())
    ckpt: str = MISSING
    logger: WandbConfig | None = None  # logger=wandb: the figures also go to an (offline) W&B run
    data: DataConfig = MISSING  # the data the model was trained on: its first images of `split` are drawn
    paths: PathsConfig = MISSING
    split: str = checked("val", one_of("train", "val"))
    num_images: int = checked(8, at_least(2))  # data images in the forward, reconstruction, interpolation figures
    num_samples: int = checked(64, at_least(1))  # the sample grid
    num_reconstructions: int = checked(6, at_least(1))  # completions per x_t (Fig. 7)
    num_lambdas: int = checked(9, at_least(2))  # interpolation weights evenly spaced in [0, 1] (Fig. 8)
    rd_images: int = checked(64, at_least(1))  # images of the rate-distortion curve (T network passes over them)
    forward_steps: list[int] | None = None  # default 0, T/10, T/4, T/2, 3T/4, T-1
    reverse_steps: list[int] | None = None  # default 0, T/10, ..., T-1
    reconstruction_steps: list[int] | None = None  # default as forward_steps
    interpolation_steps: list[int] | None = None  # default T/2
    sampler: SamplerSpec = field(default_factory=SamplerSpec)  # the sample grid (Figs. 6-8 are Algorithm 2)
    seed: int = checked(0, seed())
    weights: str = checked("ema", one_of("ema", "raw"))
    ema: PostHocEMAChoice = field(default_factory=PostHocEMAChoice)  # ema.sigma_rel=0.05: a post-hoc EMA
    device: str = checked("auto", device())
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class BpdConfig:
    """NLL in bits/dim on real held-out images: DDPM's full variational bound (T network passes per image), or the
    probability-flow ODE's (every objective: Heun on `ode_levels` levels, Hutchinson's trace, uniform dequantization).
    """

    enabled: bool = True
    split: str = checked("val", one_of("train", "val"))  # the data module's held-out split (the test set's role)
    num_images: int | None = checked(None, optional(at_least(1)))  # None: the whole split
    batch_size: int = checked(100, at_least(1))
    method: str | None = checked(None, optional(one_of("bound", "ode")))  # null: the objective's (DDPM: bound)
    ode_levels: int | None = checked(None, optional(between(2, 100_000)))  # null: what validation uses (100)


TABLE_NFE = (5, 10, 20, 50, 100)  # the default sampler table's budgets of network evaluations
TABLE_SAMPLERS = tuple(name for name, kind in SAMPLERS.items() if kind.in_table)  # the registry says which


@dataclass
class SamplerTableConfig:
    """Quality per NFE and time per image of several samplers on the same checkpoint: samplers.md, samplers.png
    (FD against NFE). The default table: ancestral over all T, and NFE 5-100 of each fast sampler, the entries
    with more steps than T allows skipped; a table of your own must fit T (else an error before sampling)."""

    enabled: bool = False
    num_samples: int | None = checked(None, optional(at_least(4)))  # None: evaluate's num_samples
    samplers: list[SamplerSpec] = checked(rule=each(Rule(lambda _: True, "a sampler")), factory=lambda: [
        SamplerSpec(name="ddpm"), *(SamplerSpec(name=name, steps=k) for name in TABLE_SAMPLERS for k in TABLE_NFE)])
    # a consistency-tuned run of this model (train.py objective=consistency init_from=<ckpt>): its checkpoint's rows,
    # consistency sampling at tuned_steps network calls, join the table with the seconds its tuning took
    tuned_ckpt: str | None = None
    tuned_steps: list[int] = checked(rule=each(between(1, 10_000)), factory=lambda: [1, 2, 4])


@dataclass
class ShardsConfig:
    """Where evaluate.py keeps the generated images' features as it goes, one file per chunk, so that a killed or
    requeued evaluation resumes from them and the parts of a SLURM array merge into one score (null: nowhere)."""

    dir: str | None = None
    images: bool = False  # also keep the uint8 images in each shard


@dataclass
class EvaluateConfig:
    name: str = checked("evaluate", nonempty_text())
    ckpt: str = MISSING
    weights: str = checked("ema", one_of("ema", "raw"))
    ema: PostHocEMAChoice = field(default_factory=PostHocEMAChoice)  # ema.sigma_rel=0.05: a post-hoc EMA
    num_samples: int | None = checked(None, optional(at_least(4)))  # None: the data set's (CIFAR-10: 50,000)
    batch_size: int = checked(250, at_least(1))  # images per chunk: the images do not depend on it
    sampler: SamplerSpec = field(default_factory=SamplerSpec)  # the paper's: ancestral, all T steps
    seed: int = checked(0, seed())
    # which of the images 0..num_samples-1 to draw (null: all); a part (a SLURM array task's) needs shards.dir
    seeds: Any = checked(None, numbers())
    noise_block: int = checked(NOISE_BLOCK, between(1, MAX_NOISE_BLOCK))  # seed + i // noise_block; 1: EDM's
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    feature_extractor: FeatureExtractorConfig = field(default_factory=FeatureExtractorConfig)
    fd_dinov2: FDDINOv2Config = field(default_factory=FDDINOv2Config)  # enabled=true: FD-DINOv2 beside FID
    reference_splits: list[str] = checked(rule=each(one_of("train", "val")), factory=lambda: ["train", "val"])
    max_reference_images: int | None = checked(None, optional(at_least(4)))
    bpd: BpdConfig = field(default_factory=BpdConfig)
    sampler_table: SamplerTableConfig = field(default_factory=SamplerTableConfig)
    # class-conditional checkpoints: score the sampler at each guidance scale w (guidance.md/.json/.png)
    guidance_table: list[float] | None = checked(None, optional(each(between(0, 100))))
    accelerator: str = checked("auto", one_of("auto", "cpu", "gpu", "cuda"))
    devices: Any = checked("auto", devices())  # auto: every GPU of the machine (else 1 CPU process)
    progress_bar: bool = True
    data: DataConfig = MISSING
    logger: WandbConfig | None = MISSING
    paths: PathsConfig = MISSING
    output_dir: str = "${hydra:runtime.output_dir}"
