"""Structured-config schemas (registered in Hydra's ConfigStore as base_<group>) and value checks.

OmegaConf checks every key and type against these dataclasses while Hydra composes; `validate` checks
ranges and cross-group consistency before anything is built. YAML files in conf/ choose and override.
"""

import hashlib
import os
from datetime import datetime

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from diffusion.config.callbacks import (
    CallbacksConfig,
    CheckpointConfig,
    EMAConfig,
    FeatureExtractorConfig,
    LossByTConfig,
    LRMonitorConfig,
    PaperFiguresConfig,
    PostHocEMAConfig,
    RanksInSyncConfig,
    RNGStateConfig,
    SampleGridConfig,
    SampleQualityConfig,
    ScheduleLogConfig,
)
from diffusion.config.entry import (
    MOVED_KEYS,
    BpdConfig,
    EvaluateConfig,
    ExportConfig,
    FiguresConfig,
    PathsConfig,
    PrepareConfig,
    SampleConfig,
    SamplerTableConfig,
    TrainConfig,
    WandbConfig,
)
from diffusion.config.groups import (
    PRECISIONS,
    CIFAR10DataConfig,
    CosineScheduleConfig,
    DataConfig,
    DigitsDataConfig,
    ExplicitScheduleConfig,
    FileDataConfig,
    ImageFolderDataConfig,
    LinearScaledScheduleConfig,
    LSUNDataConfig,
    MNISTDataConfig,
    OptimConfig,
    OptimizerConfig,
    RangeScheduleConfig,
    ScheduleConfig,
    SigmoidScheduleConfig,
    StreamingDataConfig,
    TrainerConfig,
    TrainingConfig,
    UNetConfig,
    ValidationConfig,
    WarmupConfig,
    objective_schemas,
)
from diffusion.config.validation import check_samplers, logged_metrics, validate, validate_entry


def run_id() -> str:
    """The run directory's name: the SLURM job (array task) id, stable across requeues, else the time."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"slurm-{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


MAX_DIRNAME = 120  # characters of a job folder's name: file systems allow 255 bytes


def short_dirname(name: str) -> str:
    """A multirun job's folder name from its overrides (Hydra's override_dirname): as is up to 120 characters,
    else its first 111 and a hash of the whole, so a sweep over many overrides does not fail with "File name
    too long" (the overrides themselves stay in the job's .hydra/overrides.yaml). A path's "/" (init_from=...)
    becomes "_": one folder per job, not a tree of the path's parts."""
    name = str(name).replace("/", "_")
    if len(name) <= MAX_DIRNAME:
        return name
    return f"{name[:MAX_DIRNAME - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def register_configs() -> None:
    """Put every schema in Hydra's ConfigStore, as base_<group> or base_<group>_<option>; add ${run_id:} and
    ${short_dirname:...}."""
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", run_id, use_cache=True)
    if not OmegaConf.has_resolver("short_dirname"):
        OmegaConf.register_new_resolver("short_dirname", short_dirname)
    cs = ConfigStore.instance()
    cs.store(name="base_train", node=TrainConfig)
    cs.store(name="base_sample", node=SampleConfig)
    cs.store(name="base_evaluate", node=EvaluateConfig)
    cs.store(name="base_figures", node=FiguresConfig)
    cs.store(name="base_export", node=ExportConfig)
    cs.store(name="base_prepare", node=PrepareConfig)
    for group, name, node in [
        ("schedule", "base_schedule_range", RangeScheduleConfig),
        ("schedule", "base_schedule_linear_scaled", LinearScaledScheduleConfig),
        ("schedule", "base_schedule_sigmoid", SigmoidScheduleConfig),
        ("schedule", "base_schedule_cosine", CosineScheduleConfig),
        ("schedule", "base_schedule_explicit", ExplicitScheduleConfig),
        ("model", "base_model", UNetConfig),
        ("data", "base_data_digits", DigitsDataConfig),
        ("data", "base_data_mnist", MNISTDataConfig),
        ("data", "base_data_cifar10", CIFAR10DataConfig),
        ("data", "base_data_image_folder", ImageFolderDataConfig),
        ("data", "base_data_lsun", LSUNDataConfig),
        ("data", "base_data_streaming", StreamingDataConfig),
        ("trainer", "base_trainer", TrainerConfig),
        ("callbacks", "base_callbacks", CallbacksConfig),
        ("logger", "base_logger", WandbConfig),
        ("paths", "base_paths", PathsConfig),
        *(("objective", f"base_objective_{name}", schema) for name, schema in objective_schemas().items()),
    ]:
        cs.store(group=group, name=name, node=node)


__all__ = [
    "MOVED_KEYS", "PRECISIONS", "BpdConfig", "CIFAR10DataConfig", "CallbacksConfig", "CheckpointConfig",
    "CosineScheduleConfig",
    "DataConfig", "DigitsDataConfig", "EMAConfig", "EvaluateConfig",
    "ExplicitScheduleConfig",
    "ExportConfig", "FeatureExtractorConfig", "FiguresConfig", "FileDataConfig",
    "ImageFolderDataConfig", "LinearScaledScheduleConfig", "LRMonitorConfig", "LSUNDataConfig", "LossByTConfig",
    "MNISTDataConfig",
    "OptimConfig",
    "OptimizerConfig",
    "PaperFiguresConfig", "PathsConfig", "PostHocEMAConfig",
    "PrepareConfig",
    "RNGStateConfig", "RangeScheduleConfig", "RanksInSyncConfig", "SampleConfig", "SampleGridConfig",
    "SampleQualityConfig", "SamplerTableConfig", "ScheduleConfig", "ScheduleLogConfig", "SigmoidScheduleConfig",
    "StreamingDataConfig", "TrainConfig", "TrainerConfig", "TrainingConfig", "UNetConfig", "ValidationConfig",
    "WandbConfig", "WarmupConfig",
    "check_samplers", "logged_metrics", "objective_schemas", "register_configs", "run_id", "validate", "validate_entry",
]
