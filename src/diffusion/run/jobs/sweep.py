"""A job's place in its sweep (-m): the W&B group the sweep's runs share, the job's overrides as tags."""

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig


def sweep_group(name: str, group: str | None, sweep_dir) -> str:
    """The W&B group of a sweep's runs (and of its report): logger.group, else <name>-<sweep folder's name>."""
    return group or f"{name}-{Path(sweep_dir).name}"


def sweep_info(cfg: DictConfig) -> dict:
    """In a multirun job: a W&B group per sweep, the job's overrides as tags, and as config columns."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    hydra = HydraConfig.get()
    group = sweep_group(cfg.name, cfg.logger.group, hydra.sweep.dir)
    overrides = dict(o.split("=", 1) for o in hydra.overrides.task if "=" in o)
    tags = [*cfg.logger.tags, *(f"{k}={v}"[:64] for k, v in overrides.items())]  # W&B caps a tag at 64 chars
    name = f"{cfg.name}/{hydra.job.num}_{hydra.job.override_dirname}"[:128]
    return {"wandb": {"group": group, "tags": tags, "name": name},
            "config": {"sweep": {"group": group, "job": hydra.job.num, "overrides": overrides}}}
