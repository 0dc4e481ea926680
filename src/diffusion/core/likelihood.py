"""The variational bound L = L_T + Σ L_{t-1} + L_0 of Ho et al. 2020 Eq. 5, in nats and bits/dim.

L_0 uses the discretized Gaussian decoder of Eq. 13 over the 256 bins of 8-bit data scaled to [-1, 1].
The Gaussian CDF is the exact one (torch.special.ndtr / log_ndtr) rather than the paper code's tanh
approximation, so the 256 bin probabilities sum to 1 to float precision and far tails keep their digits.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion.core.gaussian import GaussianDiffusion

LOG2 = math.log(2.0)
BIN_HALF_WIDTH = 1.0 / 255.0  # data x in {-1, -1 + 2/255, ..., 1}: half of one bin


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch."""
    return x.flatten(1).mean(1)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def _half_erfc(z: Tensor) -> Tensor:
    """The standard normal survival function S(z) = erfc(z / √2) / 2."""
    return 0.5 * torch.special.erfc(z * 0.7071067811865476)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log p(x | mean, e^log_scale) of the discretized decoder, Ho et al. 2020 Eq. 13, elementwise in nats.

    The edge bins extend to ±infinity, so the 256 bin probabilities sum to one exactly.
    """
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + BIN_HALF_WIDTH)
    lower = inv_std * (x - mean - BIN_HALF_WIDTH)
    log_cdf_upper = torch.special.log_ndtr(upper)  # bin (-inf, x + 1/255] at x = -1
    log_sf_lower = torch.special.log_ndtr(-lower)  # bin [x - 1/255, +inf) at x = 1
    # Bin mass from whichever tail keeps its digits: Φ(u) - Φ(l) below the mean, S(l) - S(u) above it,
    # with Φ(z) = erfc(-z/√2)/2 and S(z) = erfc(z/√2)/2 (accurate where 1 + erf(z/√2) would cancel).
    above = lower > 0
    delta = torch.where(
        above,
        _half_erfc(lower) - _half_erfc(upper),
        _half_erfc(-upper) - _half_erfc(-lower),
    )
    log_mid = torch.log(delta.clamp(min=torch.finfo(delta.dtype).tiny))  # the paper clamps at 1e-12
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mid))


@dataclass
class VBTerms:
    """One term of the bound per image: L_{t-1} (t > 0) or L_0 (t = 0), in nats (summed) and bits/dim."""

    nats: Tensor  # (B,) summed over dimensions
    bpd: Tensor  # (B,) mean over dimensions / log 2
    x0_pred: Tensor


def vb_terms(diffusion: GaussianDiffusion, model_out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor,
             clip_denoised: bool = False) -> VBTerms:
    """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, and L_0 = -log p(x_0|x_1) at t = 0, Eq. 5."""
    true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(x0, x_t, t)
    p = diffusion.p_mean_variance(model_out, x_t, t, clip_denoised=clip_denoised)
    kl = normal_kl(true_mean, true_log_var, p.mean, p.log_variance)
    nll = -discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_variance)
    per_dim = torch.where((t == 0).reshape(-1, *([1] * (x0.ndim - 1))), nll, kl)  # (B, C, H, W)
    return VBTerms(nats=per_dim.flatten(1).sum(1), bpd=mean_flat(per_dim) / LOG2, x0_pred=p.x0_pred)


def prior_kl(diffusion: GaussianDiffusion, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per image (Ho et al. 2020 Eq. 5), summed over dimensions, in nats."""
    t = torch.full((x0.shape[0],), diffusion.num_timesteps - 1, device=x0.device, dtype=torch.long)
    mean, _, log_var = diffusion.q_mean_variance(x0, t)
    return normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(log_var)).flatten(1).sum(1)


def largest_prior_bpd(betas: Tensor) -> float:
    """The largest L_T of any data in [-1, 1] under these betas, in bits/dim: prior_kl (in float64) at x_0 = 1, where
    it peaks at -log(1 - ᾱ_T)/2 nats per dimension (KL = (ᾱ_T (x_0² - 1) - log(1 - ᾱ_T))/2 grows with x_0²)."""
    diffusion = GaussianDiffusion(torch.as_tensor(betas, dtype=torch.float64), "eps", "fixed_large", torch.float64)
    return nats_to_bpd(prior_kl(diffusion, torch.ones(1, 1, dtype=torch.float64)), 1).item()


def nats_to_bpd(nats: Tensor, num_dims: int) -> Tensor:
    """Convert nats per image to bits per dimension."""
    return nats / (num_dims * LOG2)


@dataclass
class BoundOutput:
    """The full bound per image: total bits/dim, L_T, and every term (B, T) in nats."""

    total_bpd: Tensor  # (B,)
    prior_bpd: Tensor  # (B,) L_T
    terms_nats: Tensor  # (B, T): column t is L_{t-1} for t > 0 (paper step t+1) and L_0 for t = 0
    x0_mse: Tensor  # (B, T) squared error of x̂0, for rate-distortion figures


@torch.no_grad()
def variational_bound(model: Callable[[Tensor, Tensor], Tensor], diffusion: GaussianDiffusion, x0: Tensor,
                      generator: torch.Generator | None = None) -> BoundOutput:
    """Every term of Eq. 5 for a batch, with T network evaluations (one per step), Ho et al. 2020 Sec. 4.3."""
    B, T = x0.shape[0], diffusion.num_timesteps
    terms = x0.new_zeros(B, T)
    mse = x0.new_zeros(B, T)
    for i in reversed(range(T)):
        t = torch.full((B,), i, device=x0.device, dtype=torch.long)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = diffusion.q_sample(x0, t, eps)
        out = vb_terms(diffusion, model(x_t, t), x0, x_t, t, clip_denoised=True)
        terms[:, i] = out.nats
        mse[:, i] = mean_flat((out.x0_pred - x0) ** 2)
    prior = prior_kl(diffusion, x0)
    num_dims = x0[0].numel()
    return BoundOutput(
        total_bpd=nats_to_bpd(terms.sum(1) + prior, num_dims),
        prior_bpd=nats_to_bpd(prior, num_dims),
        terms_nats=terms,
        x0_mse=mse,
    )
