"""The denoiser contract every sampler is written against (Karras et al. 2022, Sec. 2 and Table 1; k-diffusion).

A denoiser D(x; σ) returns x̂0, the model's estimate of the data, from x at noise level σ. σ is the noise level of
the variance-exploding frame x̃ = x0 + σ ε, where the probability-flow ODE reads dx̃/dσ = (x̃ − D)/σ (Karras et al.
2022, Eq. 3 with s = 1). Each objective keeps its own frame, x = α x̃ = α x0 + β ε with β = α σ:

    objective   α                        β                        σ
    DDPM (VP)   sqrt(ᾱ_t)                sqrt(1 − ᾱ_t)            sqrt((1 − ᾱ_t)/ᾱ_t), at its T trained steps
    EDM (VE)    1                        σ                        any σ in (0, ∞)
    flow        1 − t                    t                        t / (1 − t)

Samplers hold x in that frame and ask D there: flow matching's pure noise, t = 1, is σ = ∞, where the VE frame has
no finite point but this frame has one (α = 0, β = 1). (The VE frame alone, as in EDM's code, would leave t = 1
out.) λ = log(α/β) = −log σ is the log signal-to-noise ratio that the multistep solvers step in.

A Grid is what a sampler visits: noise levels from the largest down to the data (σ = 0, α = 1, β = 0, λ = +∞) last,
with the std of the x it starts from. A discrete denoiser (DDPM's) is asked only at its trained levels: its grids
are made of them.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion.errors import UserError

KARRAS_RHO = 7.0  # Karras et al. 2022 Eq. 5


@dataclass(frozen=True)
class Grid:
    """The noise levels a sampler visits, largest first, the data (σ = 0) last; coefficients in float64."""

    sigma: tuple[float, ...]  # VE noise levels, decreasing; σ[0] may be ∞ (flow's t = 1); σ[-1] = 0
    alpha: tuple[float, ...]  # x = α x0 + β ε at each level; α[-1] = 1
    beta: tuple[float, ...]  # β = α σ; β[-1] = 0
    prior_std: float  # x at sigma[0] is drawn from N(0, prior_std² I)

    @property
    def lam(self) -> tuple[float, ...]:
        """λ = log(α/β) = −log σ: −∞ at σ = ∞, +∞ at the data."""
        return tuple(-math.log(s) if 0 < s < math.inf else (math.inf if s == 0 else -math.inf) for s in self.sigma)

    @property
    def num_levels(self) -> int:
        """The noise levels before the data: where a sampler may call the denoiser."""
        return len(self.sigma) - 1


def grid_of(sigmas: Sequence[float], alphas: Sequence[float], betas: Sequence[float], prior_std: float) -> Grid:
    """A grid through these levels (largest first) with the data point appended."""
    return Grid((*map(float, sigmas), 0.0), (*map(float, alphas), 1.0), (*map(float, betas), 0.0), float(prior_std))


def sigma_spacing(spacing: str, num_levels: int, sigma_min: float, sigma_max: float) -> list[float]:
    """num_levels σs from sigma_max down to sigma_min: uniform in σ^(1/ρ) ('karras', Karras et al. 2022 Eq. 5),
    uniform in log σ ('logsnr': uniform in λ), or uniform in σ ('linspace')."""
    ramp = torch.linspace(0, 1, num_levels, dtype=torch.float64)  # 0 at sigma_max, 1 at sigma_min
    if spacing == "karras":
        inv_rho = 1 / KARRAS_RHO
        sigmas = (sigma_max**inv_rho + ramp * (sigma_min**inv_rho - sigma_max**inv_rho)) ** KARRAS_RHO
    elif spacing == "logsnr":
        sigmas = torch.exp(math.log(sigma_max) + ramp * (math.log(sigma_min) - math.log(sigma_max)))
    elif spacing == "linspace":
        sigmas = sigma_max + ramp * (sigma_min - sigma_max)
    else:
        raise UserError(f"unknown spacing {spacing!r} of noise levels; choose karras, logsnr or linspace")
    return sigmas.tolist()


class Denoiser:
    """D(x; σ) -> x̂0, clamped to [-1, 1] when `clip` (the sampler's clip_denoised), and the grids it may be asked on.

    Subclasses give `denoise(x, sigma)` and take their grids from their objective (`objective.grid`)."""

    def __init__(self, objective, clip: bool):
        self.objective, self.clip = objective, clip

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        x0 = self.denoise(x, sigma)
        return x0.clamp(-1.0, 1.0) if self.clip else x0

    def denoise(self, x: Tensor, sigma: float) -> Tensor:
        raise NotImplementedError

    def eps(self, x: Tensor, sigma: float, x0: Tensor, alpha: float, beta: float) -> Tensor:
        """ε̂ = (x − α x̂0)/β, the noise that x̂0 implies at this level (β > 0)."""
        return (x - alpha * x0) / beta

    def alphas_cumprod_at(self, grid: Grid) -> Tensor | None:
        """ᾱ at the grid's levels (largest noise first) as a trained discrete chain stores them, in its own
        precision, for samplers that keep that chain's arithmetic; None for a denoiser without one."""
        return None

    def grid(self, spacing: str | Sequence[int], num_levels: int | None, from_top: bool = False) -> Grid:
        """The objective's grid (from_top: it must start at the objective's largest noise level, as the solvers
        need; a continuous objective's grids always do)."""
        return self.objective.grid(spacing, num_levels, from_top)
