"""Sample grids during training: raw and EMA weights side by side from the same x_T."""

from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from diffusion.gaussian import GaussianDiffusion
from diffusion.sampling import SAMPLERS


def generate(net, diffusion: GaussianDiffusion, x_T: Tensor, sampler: dict, generator: torch.Generator | None):
    """Run the configured sampler ({name, steps, spacing, eta, clip_denoised}) from x_T; returns x0 in [-1, 1]."""
    name = sampler["name"]
    kwargs = {"clip_denoised": sampler.get("clip_denoised", True), "generator": generator}
    if name != "ddpm":
        kwargs.update(num_steps=sampler.get("steps"), spacing=sampler.get("spacing", "linspace"))
    if name == "ddim":
        kwargs["eta"] = sampler.get("eta", 0.0)
    with torch.no_grad():
        return SAMPLERS[name](net, diffusion, x_T, **kwargs).x0.clamp(-1, 1)


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] model range -> [0, 1] for image files."""
    return ((x + 1) / 2).clamp(0, 1)


def image_grid(x: Tensor, min_size: int = 32) -> Tensor:
    """(N, C, H, W) in [-1, 1] -> one grid image in [0, 1]; small images enlarged (nearest) to be seen."""
    factor = -(-min_size // x.shape[-1])  # ceil: 8×8 digits are shown at 32×32, pixels kept sharp
    x = to_unit(x).float().cpu()
    if factor > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=factor, mode="nearest")
    return make_grid(x, nrow=max(1, round(len(x) ** 0.5)), padding=2)


class SampleGrid(L.Callback):
    """Every N steps and at the end: a PNG of raw | EMA samples in <run>/samples/ and an image on every logger."""

    def __init__(self, every_n_steps: int = 10_000, num_samples: int = 64, seed: int = 0,
                 sampler: dict | None = None, final_sampler: dict | None = None):
        self.every_n_steps, self.num_samples, self.seed = every_n_steps, num_samples, seed
        self.sampler = dict(sampler or {"name": "ddim", "steps": 50})
        self.final_sampler = dict(final_sampler or {"name": "ddpm"})
        self.last_path: Path | None = None

    def _x_T(self, pl_module: L.LightningModule) -> tuple[Tensor, torch.Generator]:
        """The same x_T (and sampling noise) every time: grids differ only by the weights."""
        gen = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        c, s = pl_module.net.in_channels, pl_module.net.image_size
        return torch.randn(self.num_samples, c, s, s, generator=gen, device=pl_module.device), gen

    def _nets(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        ema = next((cb for cb in trainer.callbacks if hasattr(cb, "averaged_module")), None)
        averaged = ema.averaged_module() if ema is not None else None
        nets = {"raw": pl_module.net}
        if averaged is not None:
            nets["ema"] = averaged.net
        return nets

    def render(self, trainer, pl_module, sampler: dict, tag: str) -> Path:
        """Sample with each set of weights from one x_T; save them side by side, log, return the path."""
        nets, grids = self._nets(trainer, pl_module), []
        was_training = pl_module.training
        pl_module.eval()
        for net in nets.values():
            x_T, gen = self._x_T(pl_module)
            x0 = generate(net.eval(), pl_module.diffusion, x_T, sampler, gen)
            grids.append(image_grid(x0))
        pl_module.train(was_training)
        path = Path(trainer.default_root_dir) / "samples" / f"{tag}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(make_grid(torch.stack(grids), nrow=len(grids), padding=4, pad_value=1.0), path)
        caption = " | ".join(nets)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image("samples/grid", [str(path)], step=trainer.global_step, caption=[caption])
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and trainer.is_global_zero:
            self.last_path = self.render(trainer, pl_module, self.sampler, f"step{step:07d}")
