"""export(cfg): a checkpoint as a diffusers folder (UNet2DModel and the objective's scheduler) with its model card."""

from pathlib import Path

from omegaconf import DictConfig

from diffusion.config.validation import check_export
from diffusion.formats.diffusers import write_diffusers_folder
from diffusion.formats.diffusers_schedulers import PIPELINES, learned_variance_of, scheduler_of
from diffusion.formats.diffusers_unet import unet_config_from_kwargs
from diffusion.lightning.checkpoints import read_weights
from diffusion.run.jobs.console import quiet_console
from diffusion.run.reports.model_card import model_card


def export(cfg: DictConfig) -> Path:
    """Write cfg.out: model_index.json, unet/ (config.json, .safetensors), scheduler/ (DDPM: our float64 betas as
    trained_betas, prediction and variance types) and README.md, the model card."""
    quiet_console()
    check_export(cfg)
    hparams, state = read_weights(cfg.ckpt, cfg.weights)
    # What diffusers cannot hold is refused here, before the model card reads the run.
    scheduler_of(hparams["objective"])
    unet_config_from_kwargs(hparams["net"], learned_variance_of(hparams["objective"]))
    card = model_card(cfg.ckpt, cfg.out, cfg.weights, hparams, sum(v.numel() for v in state.values()))
    out = write_diffusers_folder(cfg.out, hparams["net"], state, hparams["objective"], card)
    pipeline = PIPELINES[scheduler_of(hparams["objective"])["_class_name"]]
    print(f"exported: {out} ({pipeline}.from_pretrained({str(out)!r}); model card {out / 'README.md'})")
    return out
