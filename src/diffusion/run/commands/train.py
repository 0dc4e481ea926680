"""train(cfg): build the data, module, callbacks, logger and Trainer from a composed config, and fit."""

import json
import os
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion.config import validate
from diffusion.config.build import module_kwargs, net_kwargs, objective_of
from diffusion.core.objectives.base import Objective
from diffusion.data import describe_data, same_data
from diffusion.errors import UserError
from diffusion.files import write_file
from diffusion.lightning.callbacks import GracefulInterrupt, SampleGrid, SampleQualityCallback, StepProgressBar
from diffusion.lightning.checkpoint_io import AtomicCheckpointIO, BackgroundCheckpointIO, CheckpointCopies
from diffusion.lightning.checkpoints import ModelMismatch, check_checkpoint, init_weights
from diffusion.lightning.distributed import JobDDPStrategy
from diffusion.lightning.module import DiffusionModule
from diffusion.metrics.quality import describe, protocol_id
from diffusion.run.jobs import lock as run_lock
from diffusion.run.jobs import status as job_status
from diffusion.run.jobs.console import quiet_console
from diffusion.run.jobs.precheck import checked_here
from diffusion.run.jobs.preflight import build_trainer, check_logger, writable_dir
from diffusion.run.jobs.sweep import sweep_info


def build_module(cfg: DictConfig, objective: Objective | None = None,
                 class_names: list[str] | None = None) -> DiffusionModule:
    """The LightningModule of a train config (and, if class-conditional, the data's classes)."""
    return DiffusionModule(**module_kwargs(cfg, objective or objective_of(cfg), class_names))


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


def _init_from(cfg: DictConfig, objective: Objective) -> dict[str, torch.Tensor] | None:
    """The U-Net weights of cfg.init_from (fine-tuning: weights only, step 0, a fresh optimizer), checked against
    this run's network and objective before anything is built."""
    if cfg.init_from is None:
        return None
    state = init_weights(cfg.init_from, {"net": net_kwargs(cfg), "objective": objective.spec()})
    print(f"init_from: the U-Net starts from the weights of {cfg.init_from} (step 0, a new optimizer)")
    return state


def _data(cfg: DictConfig):
    """The data module, its files found and read (the download on local rank 0 only, as Lightning does); for a
    class-conditional model, its labels too, their count checked against model.num_classes."""
    datamodule = instantiate(cfg.data)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        datamodule.prepare_data()
    datamodule.setup("fit")
    num_classes = cfg.model.get("num_classes")
    if num_classes is not None:
        if datamodule.num_classes != num_classes:
            raise UserError(f"model.num_classes={num_classes}, but {datamodule.name} has {datamodule.num_classes} "
                            f"classes; set model.num_classes={datamodule.num_classes}")
        for split in ("train", "val"):
            datamodule.labels(split)  # read and checked before training starts
        datamodule.with_labels = True
    return datamodule


def write_classes(output_dir: Path, class_names: list[str]) -> Path:
    """classes.json in the run directory: the class names in index order (what sample.py's labels= may name)."""
    return write_file(output_dir / "classes.json", json.dumps(class_names, indent=1) + "\n")


WANDB_RUN_ID = "wandb_run_id"  # the run directory's file (and the checkpoint's key) naming its W&B run


def _wandb_run_id(resumed: dict | None, output_dir: Path) -> str | None:
    """The W&B run a run continues: the one its checkpoint names, else the one its run directory started (a
    requeued job that had not yet checkpointed), else none (a new W&B run)."""
    if resumed is not None and resumed.get(WANDB_RUN_ID):
        return resumed[WANDB_RUN_ID]
    path = output_dir / WANDB_RUN_ID
    return (path.read_text().strip() or None) if path.is_file() else None


def _logger(cfg: DictConfig, output_dir: Path, run_id: str | None):
    """The W&B logger (offline unless logger.offline=false), with the resolved config and the paper card; with
    `run_id`, it continues that W&B run (resume="allow", online and offline: `wandb sync` joins the files)."""
    if cfg.logger is None:
        return None
    sweep = sweep_info(cfg)
    logger = instantiate(cfg.logger, id=run_id, **sweep.get("wandb", {}))
    logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), **sweep.get("config", {})})
    if cfg.paper_card:
        logger.experiment.summary.update({f"paper/{k}": v for k, v in cfg.paper_card.items()})
    if run_lock.is_global_rank_zero():  # the other ranks' logger has no run
        if run_id is not None:
            print(f"W&B: continuing run {run_id}")
        path = output_dir / WANDB_RUN_ID
        tmp = path.with_name(f".{WANDB_RUN_ID}.tmp")
        tmp.write_text(f"{logger.version}\n")
        os.replace(tmp, path)
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
        write_file(path, OmegaConf.to_yaml(OmegaConf.create(job)))
    return JobDDPStrategy(path)


def _announce(trainer: L.Trainer, cfg: DictConfig, module: DiffusionModule, output_dir: Path) -> None:
    """Where the run writes, the model in one line, and the batch: data.batch_size is per device, so say what
    that makes per optimizer step (on screen, and in the logger as batch/*)."""
    per_device, accumulate = cfg.data.batch_size, cfg.trainer.accumulate_grad_batches
    batch = {"per_device": per_device, "devices": trainer.world_size, "accumulate_grad_batches": accumulate,
             "global": per_device * trainer.world_size * accumulate}
    schedule = "" if cfg.schedule is None else \
        cfg.schedule._target_.rsplit(".", 1)[-1].removesuffix("_beta_schedule") + " schedule, "
    if trainer.is_global_zero:
        print(f"run: {output_dir} (checkpoints/, samples/, wandb/)")
        print(f"model: U-Net of {sum(p.numel() for p in module.net.parameters()):,} parameters; "
              f"objective={module.objective.name}: {schedule}{module.objective.describe()}")
        print(f"batch: {per_device} per device × {trainer.world_size} devices × {accumulate} accumulated "
              f"= {batch['global']} images per optimizer step; {cfg.trainer.max_steps:,} steps", flush=True)
    for logger in trainer.loggers:
        logger.log_hyperparams({"batch": batch})


def _callbacks(cfg: DictConfig, logger, datamodule) -> list[L.Callback]:
    """The configured callbacks, built from plain values. The LR monitor needs a logger (with logger=none it
    would stop the run), so it is left out then; the quality extractor `auto` is the data module's choice."""
    callbacks = []
    for name, node in cfg.callbacks.items():
        if node is None or (name == "lr_monitor" and logger is None):
            continue
        if name == "quality" and node.feature_extractor.name == "auto":
            node = OmegaConf.merge(node, {"feature_extractor": {"name": datamodule.quality_extractor}})
        callbacks.append(instantiate(node, _convert_="all"))
    return callbacks


def check_resumable(ckpt_path: str, module: DiffusionModule, data: dict, output_dir: Path, own: bool) -> dict:
    """The checkpoint to resume, which must be of this model and this data (`data`: the data module's
    identity). The run directory's own last.ckpt (`own`: resumed without ckpt_path) is not left behind by
    leaving out ckpt_path: another run directory is the fix."""
    checkpoints = Path(ckpt_path).parent
    if not own:
        ckpt = check_checkpoint(ckpt_path, module.hparams)  # architecture, objective and what gives its weights meaning
    else:
        try:
            ckpt = check_checkpoint(ckpt_path, module.hparams, start_over=f"remove {checkpoints} to start afresh there")
        except ModelMismatch as err:
            raise UserError(f"run directory {output_dir} holds a checkpoint of another model (trained with "
                            f"{err.difference}): use another hydra.run.dir, or remove {checkpoints} (that model's "
                            "checkpoints) to train this one there") from err
    _check_same_data(ckpt_path, ckpt.get("data"), data, output_dir, own)
    return ckpt


def _check_same_data(ckpt_path: str, trained_on: dict | None, data: dict, output_dir: Path, own: bool) -> None:
    """A resume continues a run on the data it was trained on; new data starts a new run from the weights."""
    if trained_on is None:
        print(f"{ckpt_path} does not record its data (written before checkpoints did): resuming without checking "
              "that this is the data it was trained on")
        return
    if same_data(trained_on, data):
        return
    where = f"run directory {output_dir} holds a checkpoint" if own else f"checkpoint {ckpt_path} was"
    fix = f"use another hydra.run.dir with init_from={ckpt_path}" if own else \
        f"drop ckpt_path and set init_from={ckpt_path}"
    raise UserError(f"{where} trained on {describe_data(trained_on)}, but this run's data is {describe_data(data)}; "
                    f"a resume continues a run on its own data: {fix} to start from its weights on this data "
                    "(step 0, a new optimizer), or resume with that run's data settings")


def train(cfg: DictConfig, extra_callbacks: tuple = ()) -> dict[str, float]:
    """Train per the config; save checkpoints, sample grids and logs under the run directory, which the run
    holds locked throughout (run_lock.py: one training run per run directory). The config is validated once: by
    the entry point's precheck where it ran in this process, else here."""
    if not checked_here():
        validate(cfg)
    quiet_console()
    output_dir = writable_dir(cfg.paths.output_dir, "hydra.run.dir")
    with run_lock.hold(output_dir):
        return _fit(cfg, output_dir, extra_callbacks)


def _fit(cfg: DictConfig, output_dir: Path, extra_callbacks: tuple) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    objective = objective_of(cfg)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, output_dir)
    init = _init_from(cfg, objective) if ckpt_path is None else None  # a requeued fine-tuning run resumes instead
    datamodule = _data(cfg)
    class_names = datamodule.class_names if datamodule.with_labels else None
    module = build_module(cfg, objective, class_names)
    if class_names is not None and os.environ.get("LOCAL_RANK", "0") == "0":
        write_classes(output_dir, class_names)
    if init is not None:
        module.net.load_state_dict(init)
    resumed = None if ckpt_path is None else \
        check_resumable(ckpt_path, module, datamodule.identity, output_dir, own=cfg.ckpt_path is None)
    if cfg.callbacks.checkpoint is not None:
        writable_dir(cfg.callbacks.checkpoint.dirpath, "callbacks.checkpoint.dirpath")
    check_logger(cfg.logger)
    checkpoint_io = _checkpoint_io(cfg)
    copies = [CheckpointCopies(checkpoint_io)] if isinstance(checkpoint_io, BackgroundCheckpointIO) else []
    callbacks = [*copies, GracefulInterrupt(), *_callbacks(cfg, cfg.logger, datamodule), *extra_callbacks]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(StepProgressBar())
    for callback in callbacks:  # their feature extractors and data checks, before the logger starts a run
        if hasattr(callback, "preflight"):
            callback.preflight(datamodule)
    logger = _logger(cfg, output_dir, _wandb_run_id(resumed, output_dir))
    strategy = _strategy(cfg, output_dir, ckpt_path)
    trainer = None
    try:
        # partial: the strategy may be an object, which the schema's `strategy: str` field cannot hold
        trainer = build_trainer(instantiate(cfg.trainer, _partial_=True),
                                strategy=strategy, callbacks=callbacks, plugins=[checkpoint_io],
                                logger=logger if logger else False, default_root_dir=str(output_dir),
                                enable_model_summary=False)
        _announce(trainer, cfg, module, output_dir)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    finally:
        if trainer is not None:  # for status.json, also when the run failed: how far it got
            job_status.record(step=trainer.global_step, metrics={k: float(v) for k, v in
                                                                  trainer.callback_metrics.items() if v.numel() == 1})
        _finish_wandb(logger)
        if isinstance(strategy, JobDDPStrategy):
            strategy.end_job()
    grid = next((c for c in callbacks if isinstance(c, SampleGrid) and c.final_path is not None), None)
    quality = next((c for c in callbacks if isinstance(c, SampleQualityCallback) and c.last_scores), None)
    if trainer.is_global_zero and grid is not None:
        print(f"samples: {grid.final_path}")
    if quality is not None:
        extra = {tag: {"quality": {k.removesuffix(f"@{tag}"): v for k, v in quality.extra_scores.items()
                                   if k.endswith(f"@{tag}")}, "quality_protocol": protocol}
                 for tag, protocol in quality.extra_protocols.items()}
        job_status.record(quality=quality.last_scores, quality_protocol=quality.protocol,
                          quality_protocol_id=protocol_id(quality.protocol), weights=quality.protocol["weights"],
                          quality_extra=extra)
    if trainer.is_global_zero and quality is not None:  # the last line `make train` prints
        print(f"quality: {describe(quality.last_scores, quality.protocol)}")
    return metrics


def _checkpoint_io(cfg: DictConfig) -> AtomicCheckpointIO | BackgroundCheckpointIO:
    """Atomic checkpoint writes, in a background thread unless training.async_checkpoints=false."""
    return BackgroundCheckpointIO() if cfg.training.async_checkpoints else AtomicCheckpointIO()


def objective(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value of cfg.optimized_metric among the run's final metrics (what `train.py` returns to a sweeper)."""
    if cfg.optimized_metric is None:
        return None
    if cfg.optimized_metric not in metrics:
        raise UserError(f"optimized_metric={cfg.optimized_metric} was not logged by this run (logged: "
                        f"{', '.join(sorted(metrics))}); pick one of those, e.g. optimized_metric=val/loss")
    return metrics[cfg.optimized_metric]
