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
    if cfg.callbacks.posthoc_ema is not None:
        _check_posthoc_ema(cfg.callbacks.posthoc_ema)
    if cfg.optim.lr_scheduler is not None:
        _require(cfg.optim.lr_scheduler.total_iters >= 1, "optim.lr_scheduler.total_iters",
                 cfg.optim.lr_scheduler.total_iters, ">= 1", "use optim.lr_scheduler=null for no warm-up")



def _check_posthoc_ema(node: DictConfig) -> None:
    """callbacks.posthoc_ema: widths a power function has, distinct; a cadence >= 1."""
    from diffusion.posthoc_ema import SIGMA_REL_MAX

    key = "callbacks.posthoc_ema"
    sigma_rels = list(node.sigma_rels)
    _require(bool(sigma_rels) and len(set(sigma_rels)) == len(sigma_rels) and
             all(0 < s <= SIGMA_REL_MAX for s in sigma_rels), f"{key}.sigma_rels", sigma_rels,
             f"distinct widths in (0, {SIGMA_REL_MAX:.4f}]", f"try {key}.sigma_rels=[0.05,0.10]")
    _require(node.every_n_steps is None or node.every_n_steps >= 1, f"{key}.every_n_steps", node.every_n_steps,
             ">= 1 or null (null: trainer.max_steps / num_snapshots)", f"try {key}.every_n_steps=null")
    _require(node.num_snapshots >= 1, f"{key}.num_snapshots", node.num_snapshots, ">= 1",
             f"try {key}.num_snapshots=16")


def check_posthoc_sigma_rel(sigma_rel: float | None, key: str = "ema.sigma_rel") -> None:
    """A width to rebuild (evaluate.py ema.sigma_rel): null (the classic EMA) or in (0, 1/sqrt(12)]."""
    from diffusion.posthoc_ema import SIGMA_REL_MAX

    _require(sigma_rel is None or 0 < sigma_rel <= SIGMA_REL_MAX, key, sigma_rel,
             f"in (0, {SIGMA_REL_MAX:.4f}] (1/sqrt(12) is the plain average of the whole run) or null",
             f"try {key}=0.05")


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
    """The checks of an entry point's config: train.py's all, the others' sampler settings (and evaluate's
    post-hoc EMA width)."""
    if config_name == "train":
        validate(cfg)
    else:
        check_samplers(cfg)
    if config_name == "evaluate":
        check_posthoc_sigma_rel(cfg.ema.sigma_rel)
