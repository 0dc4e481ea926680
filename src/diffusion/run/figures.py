"""figures(cfg): the paper's figures of a checkpoint, from the real images of the data it was trained on."""

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion.data import to_model_range
from diffusion.errors import UserError
from diffusion.figures import FigureSpec, render_all
from diffusion.run.sampling import load_module


def figures(cfg: DictConfig) -> dict[str, Path]:
    """Every figure (Figs. 5-9, Table 3) as PNGs and rate_distortion.md/.json in the output directory."""
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    module = load_module(cfg.ckpt, device, cfg.weights)
    spec = FigureSpec(**{k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
                         if k in FigureSpec.__dataclass_fields__})
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    images = datamodule.reference_images(cfg.split, max(spec.num_images, spec.rd_images))  # uint8 (N, C, H, W)
    expected = (module.net.in_channels, module.net.image_size, module.net.image_size)
    if tuple(images.shape[1:]) != expected:
        raise UserError(f"data={datamodule.name} gives {tuple(images.shape[1:])} images but {cfg.ckpt} was trained "
                        f"on {expected}; choose the data the model was trained on, e.g. data=mnist")
    paths = render_all(module.net, module.diffusion, to_model_range(images).to(device), Path(cfg.output_dir), spec)
    for name, path in paths.items():
        print(f"{name}: {path}")
    if cfg.logger is not None:  # the same PNGs as W&B images, figures/<name>, like the training callback's
        logger = instantiate(cfg.logger)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        for name, path in paths.items():
            if path.suffix == ".png":
                logger.log_image(f"figures/{name}", [str(path)])
        import wandb

        wandb.finish()
    return paths
