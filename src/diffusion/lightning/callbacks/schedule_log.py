"""Log the objective's noise levels once at the start of a run: a plot and the prior term L_T in bits/dim.

DDPM: β_t, ᾱ_t and log SNR_t over its T steps. The continuous objectives: the log SNR λ = −2 ln σ that training
draws, against its quantile (where the objective spends its training), and where its samplers start.
"""

import math
from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from diffusion.core.likelihood import nats_to_bpd, normal_kl, prior_kl  # noqa: E402
from diffusion.figures.saving import save_figure


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


def levels_figure(objective) -> plt.Figure:
    """log SNR of the training levels at 1,000 quantiles of their distribution (what training spends its steps on)."""
    q = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(q, objective.log_snr_quantiles(q))
    ax.set(xlabel="quantile of the training noise levels", ylabel="log SNR λ = −2 ln σ",
           title=f"objective={objective.name}: training noise levels")
    fig.tight_layout()
    return fig


def prior_term(objective, x0: Tensor) -> tuple[Tensor, float]:
    """(L_T per image in nats, λ where sampling starts): KL(q(x_T | x0) || p(x_T)) at the first level of the
    objective's default sampler's grid, in the VE frame: q = N(x0, σ_T²), p = N(0, (prior_std/α_T)²)."""
    grid = objective.grid(objective.default_spacing("karras"), 10)
    sigma, std = grid.sigma[0], grid.prior_std / grid.alpha[0] if grid.alpha[0] > 0 else math.inf
    if math.isinf(sigma):  # flow matching's t = 1: x_T is exactly the prior's
        return torch.zeros(x0.shape[0], device=x0.device), -math.inf
    log_var_q = torch.full_like(x0, 2 * math.log(sigma))
    kl = normal_kl(x0, log_var_q, torch.zeros_like(x0), torch.full_like(x0, 2 * math.log(std)))
    return kl.flatten(1).sum(1), -2 * math.log(sigma)


class ScheduleLogger(L.Callback):
    """At fit start: a PNG of the noise levels in the run directory, the same image and L_T on every logger."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        objective = pl_module.objective
        batch = next(iter(trainer.datamodule.val_dataloader()))
        x0 = (batch if isinstance(batch, Tensor) else batch[0])[:64].to(pl_module.device)  # images, not labels
        if objective.markov_chain:  # DDPM: the schedule itself
            diffusion = objective.diffusion
            prior_bpd = nats_to_bpd(prior_kl(diffusion, x0), x0[0].numel()).mean().item()
            ac_T = diffusion.alphas_cumprod_float64[-1].item()
            stats = {"schedule/prior_bpd_L_T": prior_bpd, "schedule/alpha_bar_T": ac_T,
                     "schedule/num_timesteps": float(diffusion.num_timesteps),
                     "schedule/log_snr_T": math.log(ac_T) - math.log1p(-ac_T)}
        else:
            kl, log_snr_T = prior_term(objective, x0)
            stats = {"schedule/prior_bpd_L_T": nats_to_bpd(kl, x0[0].numel()).mean().item(),
                     "schedule/log_snr_T": log_snr_T}
        if not trainer.is_global_zero:
            return
        fig = schedule_figure(objective.diffusion) if objective.markov_chain else levels_figure(objective)
        path = Path(trainer.default_root_dir) / "schedule.png"
        save_figure(fig, path, dpi=100)
        for logger in trainer.loggers:
            logger.log_metrics(stats, step=0)
            if hasattr(logger, "log_image"):
                logger.log_image("schedule/plots", [str(path)], step=0)
