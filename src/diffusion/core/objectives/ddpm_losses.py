"""DDPM's training losses and timestep distributions: L_simple (Ho et al. 2020 Eq. 14), the bound, the hybrid,
min-SNR-γ; t uniform or importance-sampled.

Loss values are per image, shape (B,). The "vlb" loss is T·L_t in bits/dim, so its batch mean is an
unbiased estimate of the bound minus L_T; the hybrid is L_simple + λ·T·L_t (Nichol & Dhariwal 2021
Sec. 3.1, λ = 0.001) with the mean stop-gradiented inside the bound term.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from diffusion.core.gaussian import GaussianDiffusion
from diffusion.core.likelihood import mean_flat, vb_terms
from diffusion.core.objectives.base import LossOutput
from diffusion.errors import UserError

LOSS_TYPES = ("simple", "vlb", "hybrid")  # objective.loss


def min_snr_weight(diffusion: GaussianDiffusion, t: Tensor, gamma: float) -> Tensor:
    """Min-SNR-γ weight (Hang et al. 2023): min(SNR_t, γ) over the target's own scale, per image.

    The target's error is d(target)/d(x0) times the x0 error: sqrt(SNR) for eps, 1 for x0,
    sqrt(SNR + 1) for v, and the posterior mean's coef1 for μ̃; dividing by its square makes every
    parameterization optimise min(SNR, γ)·||x0 - x̂0||².
    """
    snr = diffusion.snr[t]
    scale_sq = {
        "eps": snr,
        "x0": torch.ones_like(snr),
        "v": snr + 1,
        "mean": diffusion.posterior_mean_coef1[t] ** 2,
    }[diffusion.parameterization]
    return snr.clamp(max=gamma) / scale_sq


def training_losses(
    model: Callable[[Tensor, Tensor], Tensor],
    diffusion: GaussianDiffusion,
    x0: Tensor,
    t: Tensor,
    eps: Tensor,
    loss_type: str,
    vlb_weight: float,
    min_snr_gamma: float | None,
) -> LossOutput:
    """x_t from x0 and eps by Eq. 4, the model's output on it, and the configured per-image loss:
    L_simple (Ho et al. 2020 Eq. 14), the bound's term (Eq. 5) or the hybrid (Nichol & Dhariwal 2021 Eq. 16)."""
    x_t = diffusion.q_sample(x0, t, eps)
    model_out = model(x_t, t)
    mean_out, var_out = diffusion.split_output(model_out)
    # L_simple, Eq. 14 (generalised to the configured parameterization's target)
    mse = mean_flat((diffusion.training_target(x0, x_t, t, eps) - mean_out) ** 2)
    weighted_mse = mse if min_snr_gamma is None else mse * min_snr_weight(diffusion, t, min_snr_gamma)
    if loss_type == "simple":
        return LossOutput(weighted_mse, mse, None)
    if loss_type not in LOSS_TYPES:  # reached only by a wrong name: no cost to the others
        raise UserError(f"objective.loss must be one of {list(LOSS_TYPES)}, got {loss_type!r}; "
                        "try objective.loss=simple")
    # The bound's term L_t; in the hybrid its gradient reaches only the variance (the mean is frozen).
    frozen = model_out if loss_type == "vlb" else _freeze_mean(mean_out, var_out)
    vlb = vb_terms(diffusion, frozen, x0, x_t, t, clip_denoised=False).bpd
    scaled_vlb = diffusion.num_timesteps * vlb
    if loss_type == "vlb":
        return LossOutput(scaled_vlb, mse, vlb)
    return LossOutput(weighted_mse + vlb_weight * scaled_vlb, mse, vlb)


def _freeze_mean(mean_out: Tensor, var_out: Tensor | None) -> Tensor:
    """Stop the gradient through the mean channels (improved DDPM's hybrid loss)."""
    if var_out is None:
        return mean_out.detach()
    return torch.cat([mean_out.detach(), var_out], dim=1)


class UniformTimesteps:
    """t ~ Uniform{0..T-1} with unit importance weights."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def sample(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None):
        t = torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)
        return t, torch.ones(batch_size, device=device)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Uniform sampling learns nothing from the losses."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ImportanceTimesteps:
    """Importance sampling of t by sqrt(E[L_t²]) over a history of VLB terms, Nichol & Dhariwal 2021 Eq. 18.

    Uniform until every t has `history` losses; then p_t ∝ sqrt(E[L_t²]), mixed with `uniform_prob` of the
    uniform distribution; the weights 1/(T p_t) keep the loss an unbiased estimate of the bound.
    """

    HISTORY, UNIFORM_PROB = 10, 0.001  # Nichol & Dhariwal 2021: 10 terms per t, 0.1% uniform

    def __init__(self, num_timesteps: int, history: int = HISTORY, uniform_prob: float = UNIFORM_PROB):
        self.num_timesteps = num_timesteps
        self.history_len = history
        self.uniform_prob = uniform_prob
        self.history = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)

    def probabilities(self) -> Tensor:
        """The current sampling distribution over t (float64, sums to 1)."""
        T = self.num_timesteps
        if (self.counts < self.history_len).any():
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        p = self.history.pow(2).mean(1).sqrt()
        p = p / p.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / T

    def sample(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None):
        p = self.probabilities()
        cpu_gen = generator if generator is None or generator.device.type == "cpu" else None
        t = torch.multinomial(p, batch_size, replacement=True, generator=cpu_gen)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.to(device=device, dtype=torch.float32)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-image VLB terms (all ranks' under DDP, gathered by the caller) into the history."""
        for ti, li in zip(t.tolist(), losses.detach().double().cpu().tolist(), strict=True):
            if self.counts[ti] == self.history_len:
                self.history[ti] = torch.roll(self.history[ti], -1)
                self.history[ti, -1] = li
            else:
                self.history[ti, self.counts[ti]] = li
                self.counts[ti] += 1

    def state_dict(self) -> dict:
        return {"history": self.history.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.history.copy_(state["history"])
        self.counts.copy_(state["counts"])


TIMESTEPS = {"uniform": UniformTimesteps, "importance": ImportanceTimesteps}  # objective.timesteps
