"""figures(cfg): the paper's figures of a checkpoint, from the real images of the data it was trained on."""

import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion.core.images import to_model_range
from diffusion.core.sampling import SamplerSpec, check_guidance
from diffusion.errors import UserError
from diffusion.figures.paper_figures import FigureSpec, render_all
from diffusion.lightning.checkpoints import load_weights
from diffusion.run.jobs.console import quiet_console
from diffusion.run.jobs.preflight import check_device, check_logger, writable_dir
from diffusion.run.jobs.stopping import stop_on_signals, written_since


def check_data_fits(datamodule, module, ckpt: str) -> None:
    """The data's images must have the shape the checkpoint's network was trained on."""
    images = datamodule.reference_images("val", 1)
    if tuple(images.shape[1:]) != module.net.image_shape:
        raise UserError(f"data={datamodule.name} gives {tuple(images.shape[1:])} images but {ckpt} was trained "
                        f"on {module.net.image_shape}; choose the data the model was trained on, e.g. data=mnist")


def figures(cfg: DictConfig) -> dict[str, Path]:
    """Every figure (Figs. 5-9, Table 3) as PNGs and rate_distortion.md/.json in the output directory.

    SIGTERM or Ctrl-C stops it at once, naming the figures already saved (see run/stopping.py)."""
    quiet_console()
    out, began = writable_dir(cfg.output_dir, "output_dir"), time.time()

    def what_is_written() -> str:
        written = [p.name for p in written_since(out, began)]
        return f"figures saved so far in {out}: {', '.join(written)}" if written else \
            f"no figure was saved yet ({out})"

    with stop_on_signals(what_is_written):
        return _figures(cfg)


def _figures(cfg: DictConfig) -> dict[str, Path]:
    device = check_device(cfg.device)
    out = Path(cfg.output_dir)
    check_logger(cfg.logger)
    module, _, _ = load_weights(cfg.ckpt, cfg.weights, cfg.ema.sigma_rel, cfg.ema.snapshot_dir, device)
    if not module.objective.markov_chain:
        raise UserError(f"figures.py draws Ho et al.'s figures of DDPM's Markov chain (forward and reverse chains, "
                        f"reconstructions, progressive coding), which {cfg.ckpt}'s objective={module.objective.name} "
                        "has not; sample it with sample.py, or score it with evaluate.py")
    plain = OmegaConf.to_container(cfg, resolve=True)
    spec = FigureSpec(**{k: v for k, v in plain.items() if k in FigureSpec.__dataclass_fields__ and k != "sampler"},
                      sampler=SamplerSpec(**plain["sampler"]).check_for(module.objective))
    check_guidance(spec.sampler.guidance_scale, module.num_classes, cond_drop_prob=module.cond_drop_prob)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    check_data_fits(datamodule, module, cfg.ckpt)
    images = datamodule.reference_images(cfg.split, max(spec.num_images, spec.rd_images))  # uint8 (N, C, H, W)
    paths = render_all(module.net, module.objective, to_model_range(images).to(device), out, spec)
    for name, path in paths.items():
        print(f"{name}: {path}")
    if cfg.logger is not None:  # the same PNGs as W&B images, figures/<name>, like the training callback's
        logger = instantiate(cfg.logger)
        logger.log_hyperparams(plain)
        for name, path in paths.items():
            if path.suffix == ".png":
                logger.log_image(f"figures/{name}", [str(path)])
        import wandb

        wandb.finish()
    return paths
