"""DDIM (Song et al. 2021) on any denoiser's grid; with η = 0 it is Euler's method on the probability-flow ODE
(Karras et al. 2022, Sec. 3), the first-order step every objective shares.

In the frame x = α x0 + β ε: x̂0 = D(x; σ), ε̂ = (x − α x̂0)/β, and the next level gets
x' = α' x̂0 + sqrt(β'² − s²) ε̂ + s z with s = η β' sqrt(1 − e^{−2h}), h = λ' − λ (Song et al. 2021, Eqs. 12 and 16,
written with λ = log(α/β): for DDPM's VP frame s is their σ_t(η)). From σ = ∞ (flow's t = 1, α = 0, β = 1) the step
is the limit: ε̂ = x. The last step, to the data, is x = x̂0.
"""

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from diffusion.core.denoiser import Denoiser
from diffusion.core.sampling.common import Generator, Recorder, SampleOutput, fill_normal, level_names
from diffusion.errors import UserError


def ddim_sample(denoiser: Denoiser, x_T: Tensor, *, num_steps: int | None = None,
                spacing: str | Sequence[int] = "linspace", eta: float = 0.0, generator: Generator = None,
                record_steps: Iterable[int] | None = None) -> SampleOutput:
    """DDIM over num_steps levels of the denoiser's grid, Song et al. 2021 Eq. 12; η = 0 is deterministic."""
    if not 0.0 <= eta <= 1.0:
        raise UserError(f"sampler.eta must be in [0, 1], got {eta}; use 0 for deterministic DDIM, 1 for DDPM-like")
    grid = denoiser.grid(spacing, num_steps)
    names, chain = level_names(denoiser, grid), denoiser.alphas_cumprod_at(grid)
    c_x0, c_eps, s = _coefficients(grid, eta) if chain is None else _chain_coefficients(chain, eta)
    recorder, noise, x = Recorder(record_steps), torch.empty_like(x_T), x_T
    for i in range(grid.num_levels):
        x0 = denoiser(x, grid.sigma[i])
        eps = denoiser.eps(x, grid.sigma[i], x0, grid.alpha[i], grid.beta[i])
        recorder(names[i], x, x0)
        x = c_x0[i] * x0 + c_eps[i] * eps  # Eq. 12: predicted x0, direction to x_t
        if eta > 0 and i < grid.num_levels - 1:
            x = x + s[i] * fill_normal(noise, generator)  # Eq. 12: random noise
    return recorder.output(x)


def _coefficients(grid, eta: float) -> tuple[list[float], list[float], list[float]]:
    """Per level i: x' = c_x0 x̂0 + c_eps ε̂ + s z with s = η β' sqrt(1 − e^{−2h}), in float64."""
    a, b, lam = grid.alpha, grid.beta, grid.lam
    s = [eta * b[i + 1] * math.sqrt(-math.expm1(-2 * (lam[i + 1] - lam[i]))) if eta > 0 and b[i + 1] > 0 else 0.0
         for i in range(grid.num_levels)]
    return list(a[1:]), [math.sqrt(max(b[i + 1] ** 2 - s[i] ** 2, 0.0)) for i in range(grid.num_levels)], s


def _chain_coefficients(ac: Tensor, eta: float) -> tuple[Tensor, Tensor, Tensor]:
    """The same step written in a trained chain's ᾱ, in the chain's own precision (Song et al. 2021 Eq. 16:
    σ_t(η)): the arithmetic DDPM's DDIM has always done, so its images, and the numbers printed from them, stay
    bit for bit what they were (bench/same_images.py). ac: ᾱ at the grid's levels, largest noise first."""
    ac_next = torch.cat([ac[1:], ac.new_ones(1)])  # ᾱ at the level each step lands on; the data's is 1
    s = eta * ((1 - ac_next) / (1 - ac) * (1 - ac / ac_next)).sqrt()
    return ac_next.sqrt(), (1 - ac_next - s**2).clamp(min=0).sqrt(), s


def euler_sample(denoiser: Denoiser, x_T: Tensor, *, num_steps: int | None = None,
                 spacing: str | Sequence[int] = "linspace", generator: Generator = None,
                 record_steps: Iterable[int] | None = None) -> SampleOutput:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 1 without its correction): DDIM, η = 0."""
    return ddim_sample(denoiser, x_T, num_steps=num_steps, spacing=spacing, eta=0.0, generator=generator,
                       record_steps=record_steps)
