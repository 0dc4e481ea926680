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
from diffusion.core.sampling.common import Recorder, SampleOutput, level_names
from diffusion.errors import UserError


def ddim_sample(denoiser: Denoiser, x_T: Tensor, *, num_steps: int | None = None,
                spacing: str | Sequence[int] = "linspace", eta: float = 0.0, generator: torch.Generator | None = None,
                record_steps: Iterable[int] | None = None) -> SampleOutput:
    """DDIM over num_steps levels of the denoiser's grid, Song et al. 2021 Eq. 12; η = 0 is deterministic."""
    if not 0.0 <= eta <= 1.0:
        raise UserError(f"sampler.eta must be in [0, 1], got {eta}; use 0 for deterministic DDIM, 1 for DDPM-like")
    grid = denoiser.grid(spacing, num_steps)
    a, b, lam, names = grid.alpha, grid.beta, grid.lam, level_names(denoiser, grid)
    recorder, noise, x = Recorder(record_steps), torch.empty_like(x_T), x_T
    for i in range(grid.num_levels):
        x0 = denoiser(x, grid.sigma[i])
        eps = (x - a[i] * x0) / b[i]
        recorder(names[i], x, x0)
        s = eta * b[i + 1] * math.sqrt(-math.expm1(-2 * (lam[i + 1] - lam[i]))) if eta > 0 and b[i + 1] > 0 else 0.0
        x = a[i + 1] * x0 + math.sqrt(max(b[i + 1] ** 2 - s**2, 0.0)) * eps  # Eq. 12: predicted x0, direction to x_t
        if s > 0:
            x = x + s * noise.normal_(generator=generator)  # Eq. 12: random noise
    return recorder.output(x)


def euler_sample(denoiser: Denoiser, x_T: Tensor, *, num_steps: int | None = None,
                 spacing: str | Sequence[int] = "linspace", generator: torch.Generator | None = None,
                 record_steps: Iterable[int] | None = None) -> SampleOutput:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 1 without its correction): DDIM, η = 0."""
    return ddim_sample(denoiser, x_T, num_steps=num_steps, spacing=spacing, eta=0.0, generator=generator,
                       record_steps=record_steps)
