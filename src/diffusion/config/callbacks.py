"""Schemas of the callbacks group: checkpoints, EMA, post-hoc EMA, sample grids, quality metrics, figures, checks."""

from dataclasses import dataclass, field

from diffusion.core.sampling import SamplerSpec
from diffusion.rules import at_least, between, checked, each, nonempty_text, one_of, optional, seed


@dataclass
class CheckpointConfig:
    _target_: str = "lightning.pytorch.callbacks.ModelCheckpoint"
    dirpath: str = "${paths.output_dir}/checkpoints"
    filename: str = checked("step{step:07d}", nonempty_text())
    auto_insert_metric_name: bool = False
    every_n_train_steps: int = checked(10_000, at_least(0))  # 0: only last.ckpt
    save_last: bool = True
    save_top_k: int = checked(-1, at_least(-1))
    enable_version_counter: bool = False  # a resumed run overwrites its own last.ckpt, not last-v1.ckpt


@dataclass
class EMAConfig:
    _target_: str = "diffusion.lightning.callbacks.EMA"
    decay: float = checked(0.9999, between(0, 1, high_open=True))
    warmup: bool = True  # decay_n = min(decay, (1 + n) / (10 + n)): useful averages early in a run


@dataclass
class PostHocEMAConfig:
    """Post-hoc EMA (Karras et al. 2024): two power-function EMAs snapshotted to <run>/posthoc_ema/, from which
    `evaluate.py ema.sigma_rel=...` rebuilds the EMA of any width in range after training. A snapshot holds both
    averages in float32: 8 bytes a parameter (8.9 MB for the digits net, 286 MB for the CIFAR-10 one)."""

    _target_: str = "diffusion.lightning.callbacks.PostHocEMA"
    sigma_rels: list[float] = field(default_factory=lambda: [0.05, 0.10])  # EDM2's two tracked widths
    every_n_steps: int | None = checked(None, optional(at_least(1)))  # None: trainer.max_steps / num_snapshots
    # snapshots a run keeps when every_n_steps is None (16: σ_rel in about [0.028, 0.23])
    num_snapshots: int = checked(16, between(1, 10_000))
    dirpath: str | None = None  # None: <run>/posthoc_ema


@dataclass
class LossByTConfig:
    """The per-epoch training loss binned over t (train_loss_by_t/*) as <run>/loss_by_t.csv, for report.py."""

    _target_: str = "diffusion.lightning.callbacks.LossByTLog"


@dataclass
class SampleGridConfig:
    _target_: str = "diffusion.lightning.callbacks.SampleGrid"
    every_n_steps: int = checked(10_000, at_least(0))  # 0: only the final grid
    num_samples: int = checked(64, at_least(1))
    seed: int = checked(0, seed())
    sampler: SamplerSpec = field(default_factory=lambda: SamplerSpec(name="ddim"))  # the periodic grids
    final_sampler: SamplerSpec = field(default_factory=SamplerSpec)  # final_ema.png: the paper's Algorithm 2


@dataclass
class FeatureExtractorConfig:
    # auto: digits for the digits data, else inception | digits: a small CNN trained on the digits train split
    # at first use and cached | inception: torchmetrics' InceptionV3 (FID's network), weights from a local file
    # | module: your own network (target)
    name: str = checked("auto", one_of("auto", "digits", "inception", "module"))
    weights_path: str | None = None  # inception: default <torch hub>/checkpoints/weights-inception-2015-12-05-*.pth
    cache_dir: str | None = None  # digits: default $XDG_CACHE_HOME/diffusion or ~/.cache/diffusion
    target: str | None = None  # module: package.module.Class, any nn.Module mapping uint8 images to features


@dataclass
class FDDINOv2Config:
    """FD-DINOv2 (Stein et al. 2023) beside FID: the same Fréchet distance in DINOv2 ViT-L/14's features (images
    resized to 224x224 as EDM2 and dgm-eval do), as fd_dinov2_<split> (logged val/fd_dinov2, val/fd_dinov2_test).
    Off by default: it needs the weights file dinov2_vitl14_pretrain.pth (1.2 GB) and a ViT-L pass per image."""

    enabled: bool = False
    weights_path: str | None = None  # default <torch hub>/checkpoints/dinov2_vitl14_pretrain.pth


@dataclass
class SampleQualityConfig:
    """FID/IS/KID/precision/recall of EMA samples every N steps and at the end (val/fid, val/is, ...), and of
    each extra sampler's (val/fid@dpmpp_2m-10, ...) against the same reference features."""

    _target_: str = "diffusion.lightning.callbacks.SampleQualityCallback"
    every_n_steps: int = checked(10_000, at_least(0))  # 0: only at the end (at_train_end) or never
    num_samples: int = checked(1000, at_least(4))  # generated images per evaluation, shared out over the ranks
    batch_size: int = checked(250, at_least(1))
    sampler: SamplerSpec = field(default_factory=lambda: SamplerSpec(name="ddim"))
    seed: int = checked(0, seed())
    feature_extractor: FeatureExtractorConfig = field(default_factory=FeatureExtractorConfig)
    fd_dinov2: FDDINOv2Config = field(default_factory=FDDINOv2Config)
    reference_splits: list[str] = checked(rule=each(one_of("train", "val")), factory=lambda: ["train", "val"])
    max_reference_images: int | None = checked(None, optional(at_least(4)))  # None: the whole split
    weights: str = checked("ema", one_of("ema", "raw"))
    at_train_end: bool = True
    # more samplers scored the same way, logged as val/fid@<name>-<steps>, ...: [{name: dpmpp_2m, steps: 10}]
    extra_samplers: list[SamplerSpec] = field(default_factory=list)


@dataclass
class PaperFiguresConfig:
    """The paper's figures (forward/reverse chains, reconstructions, interpolation, rate-distortion) during
    training, as PNGs in <run>/figures/ and W&B images. Off by default: at_train_end=true or every_n_steps=N."""

    _target_: str = "diffusion.lightning.callbacks.PaperFigures"
    every_n_steps: int = checked(0, at_least(0))
    at_train_end: bool = False
    split: str = checked("val", one_of("train", "val"))
    num_images: int = checked(8, at_least(2))
    num_samples: int = checked(64, at_least(1))
    rd_images: int = checked(64, at_least(1))  # images for the rate-distortion curve (T network passes each)
    seed: int = checked(0, seed())
    sampler: SamplerSpec = field(default_factory=SamplerSpec)  # the sample grid (Figs. 6-8 are Algorithm 2)


@dataclass
class LRMonitorConfig:
    _target_: str = "lightning.pytorch.callbacks.LearningRateMonitor"
    logging_interval: str = checked("step", one_of("step", "epoch"))


@dataclass
class ScheduleLogConfig:
    _target_: str = "diffusion.lightning.callbacks.ScheduleLogger"


@dataclass
class RNGStateConfig:
    """Every rank's torch/CUDA/numpy/Python RNG state in checkpoints: a resumed run continues bit for bit."""

    _target_: str = "diffusion.lightning.callbacks.RNGState"


@dataclass
class RanksInSyncConfig:
    """Under DDP: compare every rank's weight checksums every N steps and at the end (logs ddp/ranks_in_sync)."""

    _target_: str = "diffusion.lightning.callbacks.RanksInSync"
    every_n_steps: int = checked(1000, at_least(1))


@dataclass
class TrainingTimeConfig:
    """The training seconds (summed over resumes) and devices in every checkpoint (Lightning's Timer, no limit):
    the tuning cost the sampler table shows for a consistency-tuned model."""

    _target_: str = "diffusion.lightning.callbacks.TrainingTime"


@dataclass
class CallbacksConfig:
    """Each callback may be switched off with `callbacks.<name>=null`."""

    checkpoint: CheckpointConfig | None = field(default_factory=CheckpointConfig)
    ema: EMAConfig | None = field(default_factory=EMAConfig)
    posthoc_ema: PostHocEMAConfig | None = field(default_factory=PostHocEMAConfig)
    samples: SampleGridConfig | None = field(default_factory=SampleGridConfig)
    quality: SampleQualityConfig | None = field(default_factory=SampleQualityConfig)
    figures: PaperFiguresConfig | None = field(default_factory=PaperFiguresConfig)
    lr_monitor: LRMonitorConfig | None = field(default_factory=LRMonitorConfig)
    schedule_log: ScheduleLogConfig | None = field(default_factory=ScheduleLogConfig)
    loss_by_t: LossByTConfig | None = field(default_factory=LossByTConfig)
    rng_state: RNGStateConfig | None = field(default_factory=RNGStateConfig)
    ddp_check: RanksInSyncConfig | None = field(default_factory=RanksInSyncConfig)
    training_time: TrainingTimeConfig | None = field(default_factory=TrainingTimeConfig)
