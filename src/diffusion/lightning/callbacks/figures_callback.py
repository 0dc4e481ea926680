"""The paper's figures (Ho et al. 2020 Figs. 5-9, Table 3) of the averaged weights, during and after training."""

from pathlib import Path

import lightning as L

from diffusion.core.images import to_model_range
from diffusion.core.sampling import SamplerSpec, sampler_spec
from diffusion.errors import UserError
from diffusion.figures.paper_figures import FigureSpec, render_all
from diffusion.lightning.callbacks.ema import averaged_net


class PaperFigures(L.Callback):
    """Every N steps (0: never) and at the end: every figure as PNGs in <run>/figures/ (periodic ones in
    figures/step<N>/), rate_distortion.md/.json beside them, and each PNG on every logger as figures/<name>.

    The EMA weights are drawn when an EMA callback runs (its average, during training and at the end alike),
    else the raw ones. Data images are the first ones of the datamodule's `split` (reference_images).
    """

    def __init__(self, *, every_n_steps: int, at_train_end: bool, split: str, num_images: int, num_samples: int,
                 rd_images: int, seed: int, sampler: SamplerSpec | dict, num_reconstructions: int = 6,
                 num_lambdas: int = 9, forward_steps: list[int] | None = None, reverse_steps: list[int] | None = None,
                 reconstruction_steps: list[int] | None = None, interpolation_steps: list[int] | None = None):
        """A validated config's values (callbacks.figures: 0 steps, only at the end); the figures' other knobs,
        which the callback's schema leaves out, keep their defaults here."""
        self.every_n_steps, self.at_train_end, self.split = every_n_steps, at_train_end, split
        self.spec = FigureSpec(num_images, num_samples, num_reconstructions, num_lambdas, rd_images, seed,
                               forward_steps, reverse_steps, reconstruction_steps, interpolation_steps,
                               sampler_spec(sampler))
        self.last_paths: dict[str, Path] = {}

    def preflight(self, datamodule) -> None:
        """Before anything runs: the data module can give the images the figures draw."""
        if not hasattr(datamodule, "reference_images"):
            raise UserError("PaperFigures needs a datamodule with reference_images (diffusion.data's); "
                            "pass datamodule= to trainer.fit, or drop the figures callback")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.preflight(trainer.datamodule)

    def render(self, trainer: L.Trainer, pl_module: L.LightningModule, out_dir: Path) -> dict[str, Path]:
        """Draw every figure into out_dir, log the PNGs, return {name: path}."""
        n = max(self.spec.num_images, self.spec.rd_images)
        x0 = to_model_range(trainer.datamodule.reference_images(self.split, n)).to(pl_module.device)
        net = averaged_net(trainer) or pl_module.net
        paths = render_all(net, pl_module.objective, x0, out_dir, self.spec)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                for name, path in paths.items():
                    if path.suffix == ".png":
                        logger.log_image(f"figures/{name}", [str(path)], step=trainer.global_step)
        self.last_paths = paths
        return paths

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and trainer.is_global_zero:
            self.render(trainer, pl_module, Path(trainer.default_root_dir) / "figures" / f"step{step:07d}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_train_end and trainer.is_global_zero:
            self.render(trainer, pl_module, Path(trainer.default_root_dir) / "figures")
