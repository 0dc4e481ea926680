"""Log the beta schedule once at the start of a run: β_t, ᾱ_t, log-SNR plots and L_T in bits/dim."""

import math
from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from diffusion.core.likelihood import nats_to_bpd, prior_kl  # noqa: E402


def schedule_figure(diffusion) -> plt.Figure:
    """Three panels over t: β_t, ᾱ_t and log SNR_t = log(ᾱ_t / (1 - ᾱ_t))."""
    t = range(1, diffusion.num_timesteps + 1)
    ac = diffusion.alphas_cumprod_float64
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(t, diffusion.betas_float64)
    axes[0].set_title("β_t")
    axes[1].plot(t, ac)
    axes[1].set_title("ᾱ_t")
    axes[2].plot(t, torch.log(ac) - torch.log1p(-ac))
    axes[2].set_title("log SNR_t")
    for ax in axes:
        ax.set_xlabel("t")
    fig.tight_layout()
    return fig


class ScheduleLogger(L.Callback):
    """At fit start: a PNG of the schedule in the run directory, the same image and L_T on every logger."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        diffusion = pl_module.diffusion
        batch = next(iter(trainer.datamodule.val_dataloader()))
        x0 = (batch if isinstance(batch, Tensor) else batch[0])[:64].to(pl_module.device)  # images, not labels
        prior_bpd = nats_to_bpd(prior_kl(diffusion, x0), x0[0].numel()).mean().item()
        ac_T = diffusion.alphas_cumprod_float64[-1].item()
        stats = {"schedule/prior_bpd_L_T": prior_bpd, "schedule/alpha_bar_T": ac_T,
                 "schedule/num_timesteps": float(diffusion.num_timesteps),
                 "schedule/log_snr_T": math.log(ac_T) - math.log1p(-ac_T)}
        if not trainer.is_global_zero:
            return
        fig = schedule_figure(diffusion)
        path = Path(trainer.default_root_dir) / "schedule.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        for logger in trainer.loggers:
            logger.log_metrics(stats, step=0)
            if hasattr(logger, "log_image"):
                logger.log_image("schedule/plots", [str(path)], step=0)
