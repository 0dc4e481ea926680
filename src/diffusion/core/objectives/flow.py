"""Conditional flow matching on the straight path (Lipman et al. 2023; rectified flow, Liu et al. 2023): x_t =
(1 − t) x0 + t ε, and the network predicts the velocity v = dx_t/dt = ε − x0.

Training draws t uniformly or logit-normally (t = sigmoid(m + s n), n ~ N(0, 1): Esser et al. 2024's SD3 choice),
then shifts it, t' = shift t / (1 + (shift − 1) t) (SD3's shift; shift = 1 leaves t alone). The network's noise input
is 1000 t, diffusers' convention (FlowMatchEulerDiscreteScheduler gives a UNet the timestep 1000 t). In the denoiser
contract t is σ = t / (1 − t): x = (1 − t)(x0 + σ ε), α = 1 − t, β = t, and D(x; σ) = x − t v(x, t). Pure noise,
t = 1, is σ = ∞ (α = 0, β = 1), where the 'linspace' grid starts, as diffusers' FlowMatchEulerDiscreteScheduler does:
t uniform from 1 down to t_min, then shifted. The 'karras' and 'logsnr' grids run from σ_max down to σ(t_min).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffusion.core.denoiser import Denoiser, Grid, grid_of, sigma_spacing
from diffusion.core.likelihood import mean_flat
from diffusion.core.objectives.base import LossOutput, Model, Objective, ObjectiveConfig
from diffusion.errors import UserError
from diffusion.rules import between, checked, one_of, positive

TIME_SCALE = 1000.0  # the network sees 1000 t (diffusers' num_train_timesteps convention)
T_DISTRIBUTIONS = ("uniform", "logit_normal")


@dataclass
class FlowObjectiveConfig(ObjectiveConfig):
    """objective=flow: flow matching on the straight path with the velocity target."""

    _target_: str = "diffusion.core.objectives.flow.Flow"
    t_distribution: str = checked("logit_normal", one_of(*T_DISTRIBUTIONS))  # how training draws t
    logit_mean: float = checked(0.0, between(-20, 20))  # logit_normal: t = sigmoid(logit_mean + logit_std·n)
    logit_std: float = checked(1.0, positive())
    shift: float = checked(1.0, positive())  # SD3's t' = shift·t / (1 + (shift−1)·t), in training and sampling
    t_min: float = checked(0.001, between(0, 1, low_open=True, high_open=True))  # the smallest t a grid reaches
    sigma_max: float = checked(80.0, positive())  # the karras and logsnr grids start at σ = t/(1−t) = sigma_max


class Flow(Objective):
    name = "flow"
    default_sampler = "euler"
    spacings = ("linspace", "karras", "logsnr")

    def __init__(self, t_distribution: str, logit_mean: float, logit_std: float, shift: float, t_min: float,
                 sigma_max: float):
        super().__init__()
        if t_distribution not in T_DISTRIBUTIONS:
            raise UserError(f"objective.t_distribution must be one of {list(T_DISTRIBUTIONS)}, got "
                            f"{t_distribution!r}; try objective.t_distribution=logit_normal")
        if not 0 < t_min < sigma_max / (1 + sigma_max):
            raise UserError(f"objective.t_min={t_min} must be in (0, t(σ_max)={sigma_max / (1 + sigma_max):.4g}); "
                            "try objective.t_min=0.001")
        self.t_distribution, self.logit_mean, self.logit_std = t_distribution, logit_mean, logit_std
        self.shift, self.t_min, self.sigma_max = shift, t_min, sigma_max

    def settings(self) -> dict[str, Any]:
        return {"t_distribution": self.t_distribution, "logit_mean": self.logit_mean, "logit_std": self.logit_std,
                "shift": self.shift, "t_min": self.t_min, "sigma_max": self.sigma_max}

    def shifted(self, t: Tensor) -> Tensor:
        """SD3's time shift t' = s t / (1 + (s − 1) t); in σ it is σ' = s σ."""
        return self.shift * t / (1 + (self.shift - 1) * t)

    def velocity(self, model: Model, x: Tensor, t: Tensor) -> Tensor:
        """v(x, t) from the network, t (B,) in [0, 1]."""
        return model(x, (TIME_SCALE * t).to(torch.float32))

    # --- training ------------------------------------------------------------------------------------------
    def draw_levels(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """t ~ U(0, 1) or logit-normal (Esser et al. 2024, Sec. 3.1), shifted; unit weights."""
        if self.t_distribution == "uniform":
            t = torch.rand(n, device=device)
        else:
            t = torch.sigmoid(torch.randn(n, device=device) * self.logit_std + self.logit_mean)
        return self.shifted(t), torch.ones(n, device=device)

    def loss(self, model: Model, x0: Tensor, levels: Tensor, eps: Tensor) -> LossOutput:
        """||v(x_t, t) − (ε − x0)||², x_t = (1 − t) x0 + t ε (Lipman et al. 2023, Eq. 23 with σ_min = 0)."""
        t = levels.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        x_t = (1 - t) * x0 + t * eps
        mse = mean_flat((self.velocity(model, x_t, levels) - (eps - x0)) ** 2)
        return LossOutput(mse, mse)

    def log_snr_quantiles(self, q: Tensor) -> Tensor:
        """λ = 2 ln((1 − t)/t) of the training levels at quantiles q of their (shifted) distribution."""
        t = q if self.t_distribution == "uniform" else torch.sigmoid(self.logit_mean + self.logit_std *
                                                                     torch.special.ndtri(q))
        t = self.shifted(t)
        return 2 * (torch.log1p(-t) - torch.log(t))

    def level_bins(self, levels: Tensor, bins: int) -> Tensor:
        return (levels * bins).floor().clamp(0, bins - 1).long()

    def bin_labels(self, bins: int) -> list[str]:
        return [f"t{k / bins:.2f}-{(k + 1) / bins:.2f}" for k in range(bins)]

    def validation_levels(self, fractions: Sequence[float], batch: int, device) -> list[tuple[str, Tensor]]:
        return [(f"t{f:.2f}", torch.full((batch,), float(f), device=device)) for f in sorted(set(fractions))]

    # --- sampling ------------------------------------------------------------------------------------------
    def denoiser(self, model: Model, clip: bool = True) -> "FlowDenoiser":
        return FlowDenoiser(self, model, clip)

    def grid(self, spacing: str | Sequence[int], num_levels: int | None, from_top: bool = False) -> Grid:
        if not isinstance(spacing, str) or spacing not in self.spacings:
            raise UserError(f"spacing {spacing!r} is not one of objective=flow's {list(self.spacings)}; "
                            "try sampler.spacing=linspace")
        if spacing == "linspace":  # t from 1 (σ = ∞) down to t_min, shifted: diffusers' FlowMatchEuler grid
            t = self.shifted(torch.linspace(1.0, self.t_min, num_levels, dtype=torch.float64)).tolist()
            sigmas = [math.inf if ti == 1.0 else ti / (1 - ti) for ti in t]
        else:
            sigmas = sigma_spacing(spacing, num_levels, self.t_min / (1 - self.t_min), self.sigma_max)
            t = [s / (1 + s) for s in sigmas]
        return grid_of(sigmas, [1 - ti for ti in t], t, prior_std=t[0])

    def denoise_at(self, model: Model, x: Tensor, sigma: Tensor) -> Tensor:
        """x̂0 = x_t − t v(x_t, t) with x_t = (1 − t) x, t = σ/(1 + σ): the VE frame's x taken to the path's."""
        t = sigma.to(torch.float64) / (1 + sigma.to(torch.float64))
        t_x = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        x_t = (1 - t_x) * x
        return x_t - t_x * self.velocity(model, x_t, t)

    def sigma_bounds(self) -> tuple[float, float]:
        return self.t_min / (1 - self.t_min), self.sigma_max

    def describe(self) -> str:
        shift = f", shift {self.shift:g}" if self.shift != 1 else ""
        return f"flow matching (straight path, velocity target), t {self.t_distribution}{shift}"


class FlowDenoiser(Denoiser):
    """x̂0 = x − t v(x, t), t = σ / (1 + σ) (1 at σ = ∞)."""

    def __init__(self, objective: Flow, model: Model, clip: bool):
        super().__init__(objective, clip)
        self.model = model

    def denoise(self, x: Tensor, sigma: float) -> Tensor:
        t = 1.0 if math.isinf(sigma) else sigma / (1 + sigma)
        v = self.objective.velocity(self.model, x, torch.full((x.shape[0],), t, dtype=torch.float64,
                                                                 device=x.device))
        return x - t * v
