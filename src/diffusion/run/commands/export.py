"""export(cfg): a checkpoint as a diffusers DDPMPipeline folder that `DDPMPipeline.from_pretrained` loads and runs."""

from pathlib import Path

import torch
from omegaconf import DictConfig

from diffusion.config.validation import check_export
from diffusion.formats.diffusers import scheduler_config, write_diffusers_folder
from diffusion.formats.diffusers_unet import unet_config_from_kwargs
from diffusion.lightning.checkpoints import read_weights
from diffusion.run.jobs.console import quiet_console
from diffusion.run.reports.model_card import model_card


def export(cfg: DictConfig) -> Path:
    """Write cfg.out: model_index.json, unet/ (config.json, .safetensors), scheduler/ (our float64 betas as
    trained_betas, prediction and variance types) and README.md, the model card."""
    quiet_console()
    check_export(cfg)
    hparams, state = read_weights(cfg.ckpt, cfg.weights)
    betas = torch.tensor(hparams["betas"], dtype=torch.float64)
    learned = hparams["variance"] == "learned_range"
    # What diffusers cannot hold is refused here, before the model card reads the run.
    scheduler_config(betas, hparams["parameterization"], hparams["variance"])
    unet_config_from_kwargs(hparams["net"], learned)
    card = model_card(cfg.ckpt, cfg.out, cfg.weights, hparams, sum(v.numel() for v in state.values()))
    out = write_diffusers_folder(cfg.out, hparams["net"], state, betas, hparams["parameterization"],
                                 hparams["variance"], card)
    print(f"exported: {out} (DDPMPipeline.from_pretrained({str(out)!r}); model card {out / 'README.md'})")
    return out
