"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"): the variance-
exploding frame x = x0 + σ ε with the network preconditioned so that its input and target have unit variance.

Table 1 ("ours"): D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ)) with
    c_skip = σ_d² / (σ² + σ_d²),  c_out = σ σ_d / sqrt(σ² + σ_d²),  c_in = 1 / sqrt(σ² + σ_d²),  c_noise = ln(σ) / 4,
training noise levels ln σ ~ N(P_mean, P_std²) and the loss weight λ(σ) = (σ² + σ_d²)/(σ σ_d)² = 1/c_out², so that
λ(σ) ||D − x0||² = ||F − (x0 − c_skip x)/c_out||² (Sec. 5, Eq. 8): every σ's target has unit variance.
Sampling runs from σ_max down to σ_min (80 and 0.002 in the paper) on Karras et al.'s ρ = 7 spacing by default.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffusion.core.denoiser import Denoiser, Grid, grid_of, sigma_spacing
from diffusion.core.likelihood import mean_flat
from diffusion.core.objectives.base import LogNormalLevels, LossOutput, Model, Objective, ObjectiveConfig
from diffusion.errors import UserError
from diffusion.rules import between, checked, positive


@dataclass
class EDMObjectiveConfig(ObjectiveConfig):
    """objective=edm: Karras et al. 2022, Table 1's preconditioning, Sec. 5's training distribution."""

    _target_: str = "diffusion.core.objectives.edm.EDM"
    sigma_data: float = checked(0.5, positive())  # the data's std (0.5 for images in [-1, 1])
    p_mean: float = checked(-1.2, between(-20, 20))  # ln σ ~ N(p_mean, p_std²) in training
    p_std: float = checked(1.2, positive())
    sigma_min: float = checked(0.002, positive())  # sampling runs from sigma_max down to sigma_min
    sigma_max: float = checked(80.0, positive())


class EDM(LogNormalLevels, Objective):
    name = "edm"
    identity = ("sigma_data",)
    default_sampler = "heun"
    spacings = ("karras", "logsnr", "linspace")

    def __init__(self, sigma_data: float, p_mean: float, p_std: float, sigma_min: float, sigma_max: float):
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise UserError(f"objective.sigma_min={sigma_min} must be in (0, objective.sigma_max={sigma_max}); "
                            "try objective.sigma_min=0.002 objective.sigma_max=80")
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def settings(self) -> dict[str, Any]:
        return {"sigma_data": self.sigma_data, "p_mean": self.p_mean, "p_std": self.p_std,
                "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def precondition(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """c_skip, c_out, c_in, c_noise at σ (B,) (Karras et al. 2022, Table 1), each (B,)."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def network(self, model: Model, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """F(c_in x; c_noise) and the c_skip, c_out that make D of it, broadcast to x's shape."""
        c_skip, c_out, c_in, c_noise = self.precondition(sigma.to(torch.float64))
        shape = (-1, *([1] * (x.ndim - 1)))
        c_skip, c_out, c_in = (c.to(x.dtype).reshape(shape) for c in (c_skip, c_out, c_in))
        return model(c_in * x, c_noise.to(torch.float32)), c_skip, c_out

    # --- training ------------------------------------------------------------------------------------------
    def draw_levels(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """ln σ ~ N(P_mean, P_std²) (Sec. 5), unit weights."""
        sigma = (torch.randn(n, device=device) * self.p_std + self.p_mean).exp()
        return sigma, torch.ones(n, device=device)

    def loss(self, model: Model, x0: Tensor, levels: Tensor, eps: Tensor) -> LossOutput:
        """λ(σ)||D(x0 + σε; σ) − x0||², computed as ||F − (x0 − c_skip x)/c_out||² (Eq. 8 with λ = 1/c_out²)."""
        x = x0 + levels.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype) * eps
        out, c_skip, c_out = self.network(model, x, levels)
        mse = mean_flat((out - (x0 - c_skip * x) / c_out) ** 2)
        return LossOutput(mse, mse)

    def validation_levels(self, fractions: Sequence[float], batch: int, device) -> list[tuple[str, Tensor]]:
        """σ at the fractions of [ln σ_min, ln σ_max]."""
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        sigmas = sorted({math.exp(lo + f * (hi - lo)) for f in fractions})
        return [(f"sigma{s:.3g}", torch.full((batch,), s, device=device)) for s in sigmas]

    # --- sampling ------------------------------------------------------------------------------------------
    def denoiser(self, model: Model, clip: bool = True) -> "EDMDenoiser":
        return EDMDenoiser(self, model, clip)

    def grid(self, spacing: str | Sequence[int], num_levels: int | None, from_top: bool = False) -> Grid:
        if not isinstance(spacing, str) or spacing not in self.spacings:
            raise UserError(f"spacing {spacing!r} is not one of objective=edm's {list(self.spacings)}; "
                            "try sampler.spacing=karras")
        sigmas = sigma_spacing(spacing, num_levels, self.sigma_min, self.sigma_max)
        return grid_of(sigmas, [1.0] * len(sigmas), sigmas, prior_std=self.sigma_max)

    def denoise_at(self, model: Model, x: Tensor, sigma: Tensor) -> Tensor:
        out, c_skip, c_out = self.network(model, x, sigma)
        return c_skip * x + c_out * out

    def sigma_bounds(self) -> tuple[float, float]:
        return self.sigma_min, self.sigma_max

    def default_spacing(self, sampler_default: str) -> str:
        return "karras"  # Karras et al.'s ρ = 7 levels, whatever the sampler

    def describe(self) -> str:
        return (f"EDM preconditioning (σ_data {self.sigma_data:g}), ln σ ~ N({self.p_mean:g}, {self.p_std:g}²), "
                f"sampling σ in [{self.sigma_min:g}, {self.sigma_max:g}]")


class EDMDenoiser(Denoiser):
    """D(x; σ) = c_skip x + c_out F(c_in x; c_noise) (Table 1)."""

    def __init__(self, objective: EDM, model: Model, clip: bool):
        super().__init__(objective, clip)
        self.model = model

    def denoise(self, x: Tensor, sigma: float) -> Tensor:
        levels = torch.full((x.shape[0],), sigma, dtype=torch.float64, device=x.device)
        return self.objective.denoise_at(self.model, x, levels)
