"""Log-likelihood and bits/dim through the probability-flow ODE, for any denoiser (Song et al. 2021, "Score-Based
Generative Modeling through SDEs", Sec. 4.3 and App. D.2): the instantaneous change of variables (Chen et al. 2018)
with Hutchinson's trace estimator, and uniform dequantization of 8-bit data.

In the VE frame x̃ = x/α, with τ = ln σ, the ODE is dx̃/dτ = f = x̃ − D(x̃; σ), and along a path log p changes by
−div f dτ = −(d − tr ∂D/∂x̃) dτ. Integrating from the data at the grid's smallest level up to its largest,
    log p_0(x̃_0) = log N(x̃_T; 0, v_T I) + ∫ (d − tr ∂D/∂x̃) dτ,
v_T = (prior_std/α_T)² being the variance of the objective's x_T ~ N(0, prior_std² I) in the VE frame. Heun's method
runs on the objective's 'logsnr' grid (uniform in τ; DDPM's steps rounded from it), 2 network calls per level.
8-bit data on the 256-level grid in [-1, 1] (bins 2/255 wide) are dequantized x + u·2/255, u ~ U(−½, ½)^d, so
bits/dim <= E_u[−log p_0]/(d ln 2) + log2(255/2) (Theis et al. 2016; Song et al. 2021 App. D.2).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion.core.denoiser import Denoiser

BIN_WIDTH = 2.0 / 255.0  # one level of 8-bit data in the model range [-1, 1]
TRACES = ("hutchinson", "exact")


@dataclass
class ODELikelihood:
    """Per image: −log p_0 in nats, its bits/dim (dequantized 8-bit data), the prior term's share, and the cost."""

    nll_nats: Tensor  # (B,)
    bpd: Tensor  # (B,)
    prior_bpd: Tensor  # (B,) −log N(x̃_T; 0, v_T I) / (d ln 2): what the prior alone contributes
    nfe: int  # network evaluations per image (each with one backward pass per trace probe)


def _trace(out: Tensor, x: Tensor, probes: Tensor | None) -> Tensor:
    """tr ∂out/∂x per image (B,): v^T J v for Rademacher v (Hutchinson 1989), or exactly, one basis vector at a time."""
    if probes is not None:
        (grad,) = torch.autograd.grad((out * probes).sum(), x)
        return (grad * probes).flatten(1).sum(1)
    flat_out, total = out.flatten(1), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for j in range(flat_out.shape[1]):
        (grad,) = torch.autograd.grad(flat_out[:, j].sum(), x, retain_graph=True)
        total = total + grad.flatten(1)[:, j]
    return total


def _drift(denoiser: Denoiser, x: Tensor, sigma: float, alpha: float, probes: Tensor | None) -> tuple[Tensor, Tensor]:
    """f = x̃ − D(α x̃; σ) and div f = d − tr ∂D/∂x̃ at x̃ (B, ...)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = denoiser(alpha * x, sigma)
        trace = _trace(out, x, probes)
    return (x - out).detach(), x[0].numel() - trace.detach()


@torch.no_grad()
def ode_log_likelihood(denoiser: Denoiser, x: Tensor, num_levels: int = 100, trace: str = "hutchinson",
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, int]:
    """(log p_0(x) in nats (B,), the prior's log density at the end (B,), NFE) for x in the VE frame at the smallest
    level of the denoiser's logsnr grid. The denoiser must not clip (its x̂0 enters the divergence)."""
    grid = denoiser.grid("logsnr", num_levels)
    levels = list(range(grid.num_levels))[::-1]  # from the smallest σ up
    if any(math.isinf(grid.sigma[i]) for i in levels):
        raise ValueError("the likelihood ODE needs finite noise levels")
    probes = None
    if trace == "hutchinson":
        probes = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
    delta_logp = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for i, j in zip(levels, levels[1:], strict=False):  # Heun from level i (smaller σ) to j (larger)
        dt = math.log(grid.sigma[j]) - math.log(grid.sigma[i])
        f, div = _drift(denoiser, x, grid.sigma[i], grid.alpha[i], probes)
        f_next, div_next = _drift(denoiser, x + dt * f, grid.sigma[j], grid.alpha[j], probes)
        x = x + 0.5 * dt * (f + f_next)
        delta_logp += 0.5 * dt * (div + div_next).double()
    var_T = (grid.prior_std / grid.alpha[levels[-1]]) ** 2
    d = x[0].numel()
    prior = -0.5 * (x.double().flatten(1).pow(2).sum(1) / var_T + d * math.log(2 * math.pi * var_T))
    return prior + delta_logp, prior, 2 * (len(levels) - 1)


def ode_bits_per_dim(denoiser: Denoiser, x0: Tensor, num_levels: int = 100, trace: str = "hutchinson",
                     generator: torch.Generator | None = None) -> ODELikelihood:
    """Bits/dim of 8-bit data x0 (on the 256-level grid in [-1, 1]) through the ODE, uniformly dequantized."""
    u = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) - 0.5
    logp, prior, nfe = ode_log_likelihood(denoiser, x0 + u * BIN_WIDTH, num_levels, trace, generator)
    d = x0[0].numel()
    per_dim = d * math.log(2)
    return ODELikelihood(-logp, -logp / per_dim + math.log2(1 / BIN_WIDTH), -prior / per_dim, nfe)
