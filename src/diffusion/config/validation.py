"""Checks of a composed config that its schema's types cannot express: ranges, choices, cross-group consistency.

They run when the command line is composed (`diffusion.cli.precheck`, before Hydra starts the job) and again
at the start of each job, so a mistake is one line before anything is built.
"""

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion.errors import UserError
from diffusion.sampling import SamplerSpec, as_sampler_spec

PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")


def _require(ok: bool, key: str, value: Any, rule: str, fix: str) -> None:
    if not ok:
        raise UserError(f"{key} must be {rule}, got {value!r}; {fix}")


def validate(cfg: DictConfig) -> None:
    """Check a train.py config: ranges and cross-group choices (types were checked at composition)."""
    from diffusion.gaussian import PARAMETERIZATIONS, VARIANCES
    from diffusion.losses import LOSS_TYPES

    check_samplers(cfg, num_timesteps(cfg))
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
    _require(lvb is None or (isinstance(lvb, int) and not isinstance(lvb, bool) and lvb >= 0)
             or (isinstance(lvb, float) and 0.0 <= lvb <= 1.0), "trainer.limit_val_batches", lvb,
             "a batch count (int >= 0) or a fraction in [0.0, 1.0]", "try trainer.limit_val_batches=1.0")
    if cfg.callbacks.ema is not None:
        _require(0 <= cfg.callbacks.ema.decay < 1, "callbacks.ema.decay", cfg.callbacks.ema.decay, "in [0, 1)",
                 "try callbacks.ema.decay=0.9999")
    if cfg.optim.lr_scheduler is not None:
        _require(cfg.optim.lr_scheduler.total_iters >= 1, "optim.lr_scheduler.total_iters",
                 cfg.optim.lr_scheduler.total_iters, ">= 1", "use optim.lr_scheduler=null for no warm-up")
    if cfg.init_from is not None:
        _check_init_from(cfg)


def _check_init_from(cfg: DictConfig) -> None:
    """init_from starts a new run from weights; ckpt_path resumes one: never both. The weights themselves are
    checked against the run's network and schedule when train() starts, before anything is built."""
    from diffusion.checkpointing import check_source

    if cfg.ckpt_path is not None:
        raise UserError(f"init_from={cfg.init_from} and ckpt_path={cfg.ckpt_path} are both set: ckpt_path resumes a "
                        "run (weights, optimizer, step count), init_from starts a new one from weights only; drop one")
    check_source(cfg.init_from, "init_from")


def check_export(cfg: DictConfig) -> None:
    """export.py: the weights are ema or raw, the output folder is new or empty, the checkpoint exists."""
    from pathlib import Path

    from diffusion.checkpointing import check_source

    _require(cfg.weights in ("ema", "raw"), "weights", cfg.weights, "'ema' or 'raw'", "try weights=ema")
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"out={cfg.out} already exists and is not an empty folder; choose a new folder, e.g. "
                        f"out={cfg.out.rstrip('/')}-2, or remove it")
    check_source(cfg.ckpt, "ckpt")




def num_timesteps(cfg: DictConfig) -> int | None:
    """T of a train config's schedule (the explicit schedule's is its length)."""
    schedule = cfg.get("schedule")
    if schedule is None:
        return None
    return schedule.num_timesteps if "num_timesteps" in schedule else len(schedule.betas)


def check_samplers(cfg: DictConfig, num_timesteps: int | None = None) -> list[SamplerSpec]:
    """Every node of the config whose schema is SamplerSpec, checked with its full key (and against T if known;
    a T below 1 is the schedule's own error, raised when it is built)."""
    specs = []
    if num_timesteps is not None and num_timesteps < 1:
        num_timesteps = None
    for key, node in _walk(cfg):
        if OmegaConf.get_type(node) is SamplerSpec:
            spec = as_sampler_spec(OmegaConf.to_container(node, resolve=True), key)
            if num_timesteps is not None:
                spec.check_steps(num_timesteps, key)
            specs.append(spec)
    return specs


def _walk(node: Any, prefix: str = ""):
    """(key, node) for every config node below `node` (lists indexed as key[i]), without resolving values."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            if OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
                continue
            child, full = node._get_node(key), f"{prefix}{key}"
            if isinstance(child, DictConfig | ListConfig) and not child._is_none():
                yield full, child
                yield from _walk(child, full + ".")
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            child = node._get_node(i)
            if isinstance(child, DictConfig | ListConfig) and not child._is_none():
                yield f"{prefix.rstrip('.')}[{i}]", child
                yield from _walk(child, f"{prefix.rstrip('.')}[{i}].")


def validate_entry(config_name: str, cfg: DictConfig) -> None:
    """The checks of an entry point's config: train.py's all, export.py's paths, the others' sampler settings."""
    if config_name == "train":
        validate(cfg)
    elif config_name == "export":
        check_export(cfg)
    else:
        check_samplers(cfg)
