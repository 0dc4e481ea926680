"""What a train config makes, built in one place: the U-Net's arguments, the objective, the module's arguments.

Validation builds them too (the network on the meta device), so a config that validates builds."""

from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion.core.objectives.base import Objective, build_objective, weights_spec
from diffusion.errors import UserError
from diffusion.lightning.checkpoints import read_weights


def net_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The U-Net's arguments: conf/model's shape, channels and size from the data (model.in_channels is
    ${data.channels}); the output has the input's channels (doubled inside the U-Net for a learned variance)."""
    net = OmegaConf.to_container(cfg.model, resolve=True)
    return {**net, "out_channels": net["in_channels"]}


def objective_of(cfg: DictConfig) -> Objective:
    """The objective of a train config (DDPM's betas built from the schedule group its config points at). An
    objective that tunes a trained model (consistency: `tunes` names the key) and is not told which objective that
    model has takes it from the checkpoint the run starts from: init_from, or the one ckpt_path resumes."""
    tunes = getattr(get_class(cfg.objective._target_), "tunes", None)
    if tunes is None:
        return instantiate(cfg.objective)
    spec = OmegaConf.to_container(cfg.objective, resolve=True)
    return build_objective({**spec, tunes: spec[tunes] if spec[tunes] is not None else tuned_objective(cfg)})


def tuned_objective(cfg: DictConfig) -> dict[str, Any]:
    """The objective spec of the model a tuning run starts from (init_from, or the checkpoint it resumes)."""
    name = cfg.objective._target_.rsplit(".", 1)[-1].lower()
    source, key = (cfg.init_from, "init_from") if cfg.get("init_from") is not None else (cfg.get("ckpt_path"),
                                                                                           "ckpt_path")
    if source is None or source == "last":
        raise UserError(f"objective={name} tunes a trained diffusion model: set init_from=<its checkpoint or "
                        "diffusers folder> (a run resumed with ckpt_path= gives the path of its .ckpt)")
    hparams, _ = read_weights(source, "ema", key=key)
    return weights_spec(hparams["objective"])


def module_kwargs(cfg: DictConfig, objective: Objective, class_names: list[str] | None = None) -> dict[str, Any]:
    """DiffusionModule's arguments: plain values (a checkpoint rebuilds the module from them) and the optimizer's
    and LR scheduler's factories."""
    labels = {}
    if cfg.model.get("num_classes") is not None:
        labels = {"cond_drop_prob": cfg.training.cond_drop_prob, "class_names": class_names}
    training, optim = cfg.training, cfg.optim
    return dict(
        net=net_kwargs(cfg), objective=objective.spec(),
        val_timestep_fractions=tuple(cfg.validation.timestep_fractions), val_bpd_images=cfg.validation.bpd_images,
        loss_bins=training.loss_bins, on_nonfinite=training.on_nonfinite,
        nonfinite_check_every_n_steps=training.nonfinite_check_every_n_steps, compile=training.compile,
        optimizer=instantiate(optim.optimizer),
        lr_scheduler=instantiate(optim.lr_scheduler) if optim.lr_scheduler is not None else None, **labels)
