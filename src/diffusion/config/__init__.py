"""Structured-config schemas (registered in Hydra's ConfigStore as base_<group>) and value checks.

OmegaConf checks every key and type against these dataclasses while Hydra composes; `validate` checks
ranges and cross-group consistency before anything is built. YAML files in conf/ choose and override.
"""

import os
from datetime import datetime
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from diffusion.config.callbacks import (
    CallbacksConfig,
    CheckpointConfig,
    EMAConfig,
    FeatureExtractorConfig,
    LRMonitorConfig,
    PaperFiguresConfig,
    RanksInSyncConfig,
    RNGStateConfig,
    SampleGridConfig,
    SampleQualityConfig,
    SamplerConfig,
    ScheduleLogConfig,
)
from diffusion.config.entry import (
    BpdConfig,
    EvaluateConfig,
    FiguresConfig,
    PathsConfig,
    SampleConfig,
    SamplerTableConfig,
    TrainConfig,
    WandbConfig,
)
from diffusion.config.groups import (
    CIFAR10DataConfig,
    CosineScheduleConfig,
    DataConfig,
    DiffusionConfig,
    DigitsDataConfig,
    ExplicitScheduleConfig,
    FileDataConfig,
    ImageFolderDataConfig,
    LossConfig,
    MNISTDataConfig,
    OptimConfig,
    OptimizerConfig,
    RangeScheduleConfig,
    ScheduleConfig,
    SigmoidScheduleConfig,
    TrainerConfig,
    UNetConfig,
    ValidationConfig,
    WarmupConfig,
)
from diffusion.errors import UserError


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


__all__ = [
    "PRECISIONS", "register_configs", "run_id", "validate", "BpdConfig", "CIFAR10DataConfig", "CallbacksConfig",
    "CheckpointConfig", "CosineScheduleConfig", "DataConfig", "DiffusionConfig", "DigitsDataConfig",
    "EMAConfig", "EvaluateConfig", "ExplicitScheduleConfig", "FeatureExtractorConfig", "FiguresConfig",
    "FileDataConfig", "ImageFolderDataConfig", "LRMonitorConfig", "LossConfig", "MNISTDataConfig",
    "OptimConfig", "OptimizerConfig", "PaperFiguresConfig", "PathsConfig", "RNGStateConfig",
    "RangeScheduleConfig", "RanksInSyncConfig", "SampleConfig", "SampleGridConfig", "SampleQualityConfig",
    "SamplerConfig", "SamplerTableConfig", "ScheduleConfig", "ScheduleLogConfig", "SigmoidScheduleConfig",
    "TrainConfig", "TrainerConfig", "UNetConfig", "ValidationConfig", "WandbConfig", "WarmupConfig",
]
