"""sample(cfg) and load_module: a trained module from a checkpoint alone, and images from it."""

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torchvision.utils import save_image

from diffusion.callbacks import generate
from diffusion.callbacks.samples import image_grid, to_unit
from diffusion.checkpointing import check_checkpoint
from diffusion.errors import UserError
from diffusion.module import DiffusionModule


def load_module(ckpt: str, map_location: str | torch.device = "cpu", weights: str = "ema") -> DiffusionModule:
    """A trained module from a checkpoint alone: EMA weights (the checkpoint's state_dict) or the raw ones."""
    if not Path(ckpt).is_file():
        raise UserError(f"ckpt {ckpt} does not exist; give the path of a .ckpt file from a training run")
    if weights not in ("ema", "raw"):
        raise UserError(f"weights must be 'ema' or 'raw', got {weights!r}; try weights=ema")
    state = check_checkpoint(ckpt)
    module = DiffusionModule.load_from_checkpoint(ckpt, map_location=map_location)
    if weights == "raw":
        if "current_model_state" not in state:
            raise UserError(f"{ckpt} holds no raw weights (trained without EMA); use weights=ema")
        module.load_state_dict(state["current_model_state"])
    return module.eval()


def sample(cfg: DictConfig) -> Path:
    """Sample a checkpoint: a PNG grid and an .npz of uint8 NHWC images in the output directory."""
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    module = load_module(cfg.ckpt, device, cfg.weights)
    sampler = {"name": cfg.sampler, "steps": cfg.steps, "spacing": cfg.spacing, "eta": cfg.eta,
               "clip_denoised": cfg.clip_denoised}
    if cfg.sampler not in ("ddpm", "ddim", "respaced"):
        raise UserError(f"sampler must be ddpm, ddim or respaced, got {cfg.sampler!r}; try sampler=ddim steps=50")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    c, s = module.net.in_channels, module.net.image_size
    chunks = []
    for start in range(0, cfg.num_samples, cfg.batch_size):
        n = min(cfg.batch_size, cfg.num_samples - start)
        x_T = torch.randn(n, c, s, s, generator=gen, device=device)
        chunks.append(generate(module.net, module.diffusion, x_T, sampler, gen).cpu())
    x0 = torch.cat(chunks)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    uint8 = (to_unit(x0) * 255).round().to(torch.uint8)  # (N, C, H, W)
    np.savez_compressed(out / "samples.npz", samples=uint8.permute(0, 2, 3, 1).numpy())
    grid_path = out / "samples.png"
    save_image(image_grid(x0[:256]), grid_path)
    print(f"samples: {grid_path} and {out / 'samples.npz'}")
    return grid_path
