"""Sample grids during training: raw and EMA weights side by side from the same x_T, and a final EMA grid."""

from pathlib import Path

import lightning as L

from diffusion.core.sampling import SamplerSpec, class_rows, draw, num_classes_of, sampler_spec
from diffusion.formats.png import image_grid, save_png, side_by_side
from diffusion.lightning.callbacks.ema import averaged_net


class SampleGrid(L.Callback):
    """Every N steps: a PNG of raw | EMA samples in <run>/samples/ and an image on every logger.

    At the end of training: `final_ema.png`, the EMA weights (the raw ones without EMA) with final_sampler.
    Every grid starts from the same x_T and noise (seed), so grids differ only by the weights. A
    class-conditional model's grid has one row per class (about num_samples / K images each), top to bottom
    in class order, drawn with the sampler's guidance scale.
    """

    def __init__(self, *, every_n_steps: int, num_samples: int, seed: int, sampler: SamplerSpec | dict,
                 final_sampler: SamplerSpec | dict):
        """A validated config's values (0 steps: only the final grid); a sampler as a SamplerSpec or its fields."""
        self.every_n_steps, self.num_samples, self.seed = every_n_steps, num_samples, seed
        self.sampler = sampler_spec(sampler)
        self.final_sampler = sampler_spec(final_sampler)
        self.last_path: Path | None = None
        self.final_path: Path | None = None

    def grid(self, net, pl_module: L.LightningModule, sampler: SamplerSpec):
        """One grid of num_samples images of `net` (a class-conditional net: one row per class), in [0, 1]."""
        labels, nrow = class_rows(self.num_samples, num_classes_of(net))
        n = self.num_samples if labels is None else len(labels)
        drawn = draw(net, pl_module.objective, sampler, n, shape=net.image_shape, seed=self.seed,
                     chunk_size=n, device=pl_module.device, labels=labels)
        return image_grid(drawn.images, nrow)

    def _save_and_log(self, trainer: L.Trainer, image, name: str, key: str, caption: str) -> Path:
        path = save_png(image, Path(trainer.default_root_dir) / "samples" / f"{name}.png")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key, [str(path)], step=trainer.global_step, caption=[caption])
        return path

    def render(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> Path:
        """raw | EMA grids with the periodic sampler, saved as samples/<tag>.png and logged; returns the path."""
        nets = {"raw": pl_module.net}
        if (averaged := averaged_net(trainer)) is not None:
            nets["ema"] = averaged
        image = side_by_side([self.grid(net, pl_module, self.sampler) for net in nets.values()])
        self.last_path = self._save_and_log(trainer, image, tag, "samples/grid", " | ".join(nets))
        return self.last_path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and trainer.is_global_zero:
            self.render(trainer, pl_module, f"step{step:07d}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            net = averaged_net(trainer) or pl_module.net
            image = self.grid(net, pl_module, self.final_sampler)
            self.final_path = self._save_and_log(trainer, image, "final_ema", "samples/final_ema", "ema")
