"""train(cfg): build the data, module, callbacks, logger and Trainer from a composed config, and fit."""

import os
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

from diffusion.callbacks import GracefulInterrupt, SampleGrid, SampleQualityCallback, generate
from diffusion.callbacks.samples import image_grid
from diffusion.checkpointing import AtomicCheckpointIO, check_checkpoint
from diffusion.config import validate
from diffusion.data import DigitsDataModule
from diffusion.distributed import JobDDPStrategy
from diffusion.errors import UserError
from diffusion.metrics.quality import describe
from diffusion.module import DiffusionModule


def build_module(cfg: DictConfig, channels: int, image_size: int, betas: torch.Tensor) -> DiffusionModule:
    """The LightningModule, with the network's channels and size taken from the data."""
    net = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in ("_target_", "compile")}
    net.update(in_channels=channels, out_channels=channels, image_size=image_size)
    return DiffusionModule(
        net=net,
        betas=betas.tolist(),
        parameterization=cfg.diffusion.parameterization,
        variance=cfg.diffusion.variance,
        loss_type=cfg.loss.type,
        vlb_weight=cfg.loss.vlb_weight,
        min_snr_gamma=cfg.loss.min_snr_gamma,
        timestep_sampler=cfg.loss.timestep_sampler,
        val_timestep_fractions=tuple(cfg.validation.timestep_fractions),
        val_bpd_images=cfg.validation.bpd_images,
        on_nonfinite=cfg.loss.on_nonfinite,
        compile=cfg.model.compile,
        optimizer=instantiate(cfg.optim.optimizer),
        lr_scheduler=instantiate(cfg.optim.lr_scheduler) if cfg.optim.lr_scheduler is not None else None,
    )


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """A checkpoint path as given, or for "last" the newest last.ckpt among this run name's earlier runs.

    Without ckpt_path, a run directory that already holds checkpoints/last.ckpt (a requeued SLURM job:
    its directory is keyed on the job id) resumes from it.
    """
    if ckpt_path is None:
        own = output_dir / "checkpoints" / "last.ckpt"
        if own.is_file():
            print(f"resuming from {own} (this run directory already has a checkpoint)")
            return str(own)
        return None
    if ckpt_path == "last":
        found = sorted(output_dir.parent.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UserError(f"ckpt_path=last found no */checkpoints/last.ckpt under {output_dir.parent}; "
                            "give the checkpoint's path, e.g. ckpt_path=outputs/<name>/<time>/checkpoints/last.ckpt")
        return str(found[-1])
    if not Path(ckpt_path).is_file():
        raise UserError(f"ckpt_path {ckpt_path} does not exist; give the path of a .ckpt file, or ckpt_path=last "
                        "to resume the newest run of the same name")
    return ckpt_path


def _sweep_info(cfg: DictConfig) -> dict:
    """In a multirun job: a W&B group per sweep, the job's overrides as tags, and as config columns."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    hydra = HydraConfig.get()
    group = cfg.logger.group or f"{cfg.name}-{Path(hydra.sweep.dir).name}"
    overrides = dict(o.split("=", 1) for o in hydra.overrides.task if "=" in o)
    tags = [*cfg.logger.tags, *(f"{k}={v}"[:64] for k, v in overrides.items())]  # W&B caps a tag at 64 chars
    name = f"{cfg.name}/{hydra.job.num}_{hydra.job.override_dirname}"[:128]
    return {"wandb": {"group": group, "tags": tags, "name": name},
            "config": {"sweep": {"group": group, "job": hydra.job.num, "overrides": overrides}}}


def _logger(cfg: DictConfig):
    """The W&B logger (offline unless logger.offline=false), with the resolved config and the paper card."""
    if cfg.logger is None:
        return None
    sweep = _sweep_info(cfg)
    logger = instantiate(cfg.logger, **sweep.get("wandb", {}))
    logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), **sweep.get("config", {})})
    if cfg.paper_card:
        logger.experiment.summary.update({f"paper/{k}": v for k, v in cfg.paper_card.items()})
    return logger


def _finish_wandb(logger) -> None:
    """Close the W&B run so that the next job of a multirun starts its own (WandbLogger reuses an active run)."""
    if logger is not None:
        import wandb

        wandb.finish()
        os.environ.pop("WANDB_MODE", None)  # WandbLogger(offline=True) sets it for the whole process


def _strategy(cfg: DictConfig, output_dir: Path, ckpt_path: str | None):
    """trainer.strategy as given, except `ddp`: DDP whose extra ranks run this job alone (see distributed.py).

    The launching process writes the job's resolved config for them, with the checkpoint it resolved.
    """
    if cfg.trainer.strategy != "ddp":
        return cfg.trainer.strategy
    path = output_dir / ".hydra" / "ddp_job.yaml"
    if "LOCAL_RANK" not in os.environ:
        job = OmegaConf.to_container(cfg, resolve=True)
        job["ckpt_path"] = ckpt_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(job)))
        os.replace(tmp, path)
    return JobDDPStrategy(path)


def _log_batch_size(trainer: L.Trainer, cfg: DictConfig) -> None:
    """data.batch_size is per device: say what that makes per optimizer step, on screen and in the logger."""
    per_device, accumulate = cfg.data.batch_size, cfg.trainer.accumulate_grad_batches
    batch = {"per_device": per_device, "devices": trainer.world_size, "accumulate_grad_batches": accumulate,
             "global": per_device * trainer.world_size * accumulate}
    if trainer.world_size > 1 or accumulate > 1:
        rank_zero_info(f"batch: {per_device} per device × {trainer.world_size} devices × {accumulate} accumulated "
                       f"= {batch['global']} images per optimizer step")
    for logger in trainer.loggers:
        logger.log_hyperparams({"batch": batch})


def _callbacks(cfg: DictConfig, logger, datamodule) -> list[L.Callback]:
    """The configured callbacks. The LR monitor needs a logger (with logger=none it would stop the run), so it
    is left out then; the quality callback's extractor `auto` becomes digits for the digits, else inception."""
    callbacks = []
    for name, node in cfg.callbacks.items():
        if node is None or (name == "lr_monitor" and logger is None):
            continue
        if name == "quality" and node.feature_extractor.name == "auto":
            extractor = "digits" if isinstance(datamodule, DigitsDataModule) else "inception"
            node = OmegaConf.merge(node, {"feature_extractor": {"name": extractor}})
        callbacks.append(instantiate(node))
    return callbacks


def train(cfg: DictConfig, extra_callbacks: tuple = ()) -> dict[str, float]:
    """Train per the config; save checkpoints, sample grids and logs under the run directory."""
    validate(cfg)
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    betas = instantiate(cfg.schedule)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule.channels, datamodule.image_size, betas)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, output_dir)
    if ckpt_path is not None:
        check_checkpoint(ckpt_path, module.hparams)  # architecture, T, betas, parameterization, variance
    logger = _logger(cfg)
    callbacks = [GracefulInterrupt(), *_callbacks(cfg, logger, datamodule), *extra_callbacks]
    strategy = _strategy(cfg, output_dir, ckpt_path)
    try:
        # partial: the strategy may be an object, which the schema's `strategy: str` field cannot hold
        trainer = instantiate(cfg.trainer, _partial_=True)(
            strategy=strategy, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
            logger=logger if logger else False, default_root_dir=str(output_dir))
        _log_batch_size(trainer, cfg)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        grid = next((c for c in callbacks if isinstance(c, SampleGrid)), None)
        final = _final_grid(trainer, module, grid, output_dir) if grid is not None else None
    finally:
        _finish_wandb(logger)
        if isinstance(strategy, JobDDPStrategy):
            strategy.end_job()
    quality = next((c for c in callbacks if isinstance(c, SampleQualityCallback) and c.last_scores), None)
    if trainer.is_global_zero and final is not None:
        print(f"samples: {final}")
    if trainer.is_global_zero and quality is not None:  # the last line `make train` prints
        print(f"quality: {describe(quality.last_scores, quality.protocol)}")
    return metrics


def _final_grid(trainer: L.Trainer, module: DiffusionModule, grid: SampleGrid, output_dir: Path) -> Path | None:
    """After fit the module holds the EMA weights (EMA callback's on_train_end): sample them with the final sampler."""
    if not trainer.is_global_zero:
        return None
    module.eval()
    gen = torch.Generator(device=module.device).manual_seed(grid.seed)
    c, s = module.net.in_channels, module.net.image_size
    x_T = torch.randn(grid.num_samples, c, s, s, generator=gen, device=module.device)
    x0 = generate(module.net, module.diffusion, x_T, grid.final_sampler, gen)
    path = output_dir / "samples" / "final_ema.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image_grid(x0), path)
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image("samples/final_ema", [str(path)], step=trainer.global_step)
    return path


def objective(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value of cfg.optimized_metric among the run's final metrics (what `train.py` returns to a sweeper)."""
    if cfg.optimized_metric is None:
        return None
    if cfg.optimized_metric not in metrics:
        raise UserError(f"optimized_metric={cfg.optimized_metric} was not logged by this run (logged: "
                        f"{', '.join(sorted(metrics))}); pick one of those, e.g. optimized_metric=val/loss")
    return metrics[cfg.optimized_metric]
