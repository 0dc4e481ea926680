"""DDPM (Ho et al. 2020) as an objective: the discrete Gaussian chain of T steps, its parameterizations, variances
and losses (gaussian.py, ddpm_losses.py), and its denoiser, asked only at the T trained noise levels.

Its noise level is the step index t in [0, T-1] (the paper's step t+1), which is also the network's input. In the
denoiser contract step t is σ_t = sqrt((1 − ᾱ_t)/ᾱ_t), x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε (α = sqrt(ᾱ_t),
β = sqrt(1 − ᾱ_t)); a grid is a set of steps (schedules.space_timesteps, whose rounding rule maps a spacing's
targets onto steps), and x_T is drawn from N(0, I), the paper's p(x_T).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffusion.core.denoiser import Denoiser, Grid, grid_of
from diffusion.core.gaussian import PARAMETERIZATIONS, VARIANCES, GaussianDiffusion
from diffusion.core.likelihood import variational_bound
from diffusion.core.objectives.base import LossOutput, Model, Objective, ObjectiveConfig
from diffusion.core.objectives.ddpm_losses import LOSS_TYPES, TIMESTEPS, training_losses
from diffusion.core.schedules import SPACINGS, space_timesteps
from diffusion.errors import UserError
from diffusion.rules import at_least, checked, one_of, optional, positive


@dataclass
class DDPMObjectiveConfig(ObjectiveConfig):
    """objective=ddpm: Ho et al. 2020 and its successors' options; its betas are the schedule group's."""

    _target_: str = "diffusion.core.objectives.ddpm.DDPM"
    betas: Any = "${schedule}"  # the schedule group, built (a tensor of T betas) when the objective is
    parameterization: str = checked("eps", one_of(*PARAMETERIZATIONS))
    variance: str = checked("fixed_large", one_of(*VARIANCES))  # σ²=β | β̃ | learned
    loss: str = checked("simple", one_of(*LOSS_TYPES))  # Eq. 14 | the bound | simple + vlb_weight·vlb
    vlb_weight: float = checked(0.001, at_least(0, integer=False))
    min_snr_gamma: float | None = checked(None, optional(positive()))
    timesteps: str = checked("uniform", one_of(*TIMESTEPS))  # how training draws t


class DDPM(Objective):
    """Ho et al. 2020 with the options of its successors: ε/x0/v/μ̃ prediction, fixed or learned Σ, L_simple, the
    bound or the hybrid, min-SNR-γ, and t drawn uniformly or by importance (Nichol & Dhariwal 2021)."""

    name = "ddpm"
    identity = ("betas", "parameterization", "variance")
    default_sampler = "ddpm"
    markov_chain = True
    spacings = SPACINGS
    likelihoods = ("bound", "ode")

    def __init__(self, betas: Sequence[float] | Tensor, parameterization: str, variance: str, loss: str,
                 vlb_weight: float, min_snr_gamma: float | None, timesteps: str):
        super().__init__()
        for key, value, choices in (("loss", loss, LOSS_TYPES), ("timesteps", timesteps, tuple(TIMESTEPS))):
            if value not in choices:
                raise UserError(f"objective.{key} must be one of {list(choices)}, got {value!r}; try "
                                f"objective.{key}={choices[0]}")
        self.diffusion = GaussianDiffusion(torch.as_tensor(betas, dtype=torch.float64), parameterization, variance)
        self.loss_type, self.vlb_weight, self.min_snr_gamma = loss, vlb_weight, min_snr_gamma
        self.timesteps_name = timesteps
        self.num_levels = self.diffusion.num_timesteps
        self.timesteps = TIMESTEPS[timesteps](self.num_levels)
        self.learned_variance = self.diffusion.learned_variance
        # α, β and σ of every step in float64, from log ᾱ (the solvers' coefficients; σ_t is step t's name in grids)
        log_ac = torch.cumsum(torch.log1p(-self.diffusion.betas_float64), 0)
        self.level_alpha = (0.5 * log_ac).exp().tolist()
        self.level_beta = (-torch.expm1(log_ac)).sqrt().tolist()
        self.level_sigma = [b / a for a, b in zip(self.level_alpha, self.level_beta, strict=True)]
        self._step_of = {sigma: t for t, sigma in enumerate(self.level_sigma)}

    def settings(self) -> dict[str, Any]:
        d = self.diffusion
        return {"betas": d.betas_float64.tolist(), "parameterization": d.parameterization, "variance": d.variance,
                "loss": self.loss_type, "vlb_weight": self.vlb_weight, "min_snr_gamma": self.min_snr_gamma,
                "timesteps": self.timesteps_name}

    # --- training ------------------------------------------------------------------------------------------
    def draw_levels(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """t ~ Uniform{0..T-1} or importance-sampled, with the weights that keep the loss unbiased."""
        return self.timesteps.sample(n, device)

    def loss(self, model: Model, x0: Tensor, levels: Tensor, eps: Tensor) -> LossOutput:
        return training_losses(model, self.diffusion, x0, levels, eps, self.loss_type, self.vlb_weight,
                               self.min_snr_gamma)

    def validation_mse(self, model: Model, x0: Tensor, levels: Tensor, eps: Tensor) -> Tensor:
        """L_simple's squared error alone (the bound's terms are not needed for it)."""
        return training_losses(model, self.diffusion, x0, levels, eps, "simple", 0.0, None).mse

    def update_levels(self, levels: Tensor, vlb: Tensor) -> None:
        self.timesteps.update(levels, vlb)

    def level_state(self) -> dict:
        return self.timesteps.state_dict()

    def load_level_state(self, state: dict) -> None:
        self.timesteps.load_state_dict(state)

    def num_bins(self, requested: int) -> int:
        return min(requested, self.num_levels)

    def level_bins(self, levels: Tensor, bins: int) -> Tensor:
        return levels * bins // self.num_levels

    def bin_labels(self, bins: int) -> list[str]:
        T = self.num_levels
        return [f"t{k * T // bins:04d}-{(k + 1) * T // bins - 1:04d}" for k in range(bins)]

    def validation_levels(self, fractions: Sequence[float], batch: int, device) -> list[tuple[str, Tensor]]:
        steps = sorted({round(f * (self.num_levels - 1)) for f in fractions})
        return [(f"t{s:04d}", torch.full((batch,), s, device=device, dtype=torch.long)) for s in steps]

    # --- sampling ------------------------------------------------------------------------------------------
    def denoiser(self, model: Model, clip: bool = True) -> "DDPMDenoiser":
        return DDPMDenoiser(self, model, clip)

    def grid(self, spacing: str | Sequence[int], num_levels: int | None, from_top: bool = False) -> Grid:
        """The steps `space_timesteps` keeps for this spacing, largest first; from_top: they must include T-1."""
        T = self.num_levels
        kept = space_timesteps(T, spacing, num_levels, alphas_cumprod=self.diffusion.alphas_cumprod_float64)
        if from_top and kept[-1] != T - 1:
            raise UserError(f"a solver's steps must end at index T-1={T - 1} (x_T), got {kept}; append {T - 1}")
        steps = kept[::-1]
        return grid_of([self.level_sigma[t] for t in steps], [self.level_alpha[t] for t in steps],
                       [self.level_beta[t] for t in steps], prior_std=1.0)

    def trained_sigmas(self) -> Tensor:
        return torch.tensor(self.level_sigma, dtype=torch.float64)

    def sigma_bounds(self) -> tuple[float, float]:
        return self.level_sigma[0], self.level_sigma[-1]

    def denoise_at(self, model: Model, x: Tensor, sigma: Tensor) -> Tensor:
        """x̂0 at trained levels σ (B,): step t of each, x_t = sqrt(ᾱ_t) x, and the network's x̂0 there."""
        levels = self.trained_sigmas().to(sigma.device)
        t = torch.searchsorted(levels, sigma.to(torch.float64)).clamp(max=self.num_levels - 1)
        if not torch.allclose(levels[t], sigma.to(torch.float64), rtol=1e-9, atol=0.0):
            raise UserError(f"DDPM's denoiser is asked only at its T={self.num_levels} trained noise levels; snap σ "
                            "to trained_sigmas() first")
        shape = (-1, *([1] * (x.ndim - 1)))
        alpha = torch.tensor(self.level_alpha, dtype=torch.float64, device=x.device)[t].to(x.dtype).reshape(shape)
        x_t = alpha * x
        mean_out, _ = self.diffusion.split_output(model(x_t, t))
        return self.diffusion.predict_x0(mean_out, x_t, t)

    def step_of(self, sigma: float) -> int:
        """The trained step whose noise level is σ (a grid's own values; any other σ is an error)."""
        step = self._step_of.get(sigma)
        if step is None:
            raise UserError(f"DDPM's denoiser is asked only at its T={self.num_levels} trained noise levels, got "
                            f"σ={sigma:g}; take the grid from objective.grid(...)")
        return step

    def steps_of(self, grid: Grid) -> list[int]:
        """The steps of a grid's noise levels, largest first (the data point left out)."""
        return [self.step_of(s) for s in grid.sigma[:-1]]

    # --- likelihood, records ---------------------------------------------------------------------------------
    def bound_bits_per_dim(self, model: Model, x0: Tensor, generator: torch.Generator | None = None):
        """The full bound, Ho et al. 2020 Eq. 5 (T network passes per image): its BoundOutput."""
        return variational_bound(model, self.diffusion, x0, generator)

    def describe(self) -> str:
        d = self.diffusion
        return (f"T={d.num_timesteps} betas, {d.parameterization} prediction, {d.variance} variance, "
                f"{self.loss_type} loss")

    def protocol(self) -> dict[str, Any]:
        return {"num_timesteps": self.num_levels, "variance": self.diffusion.variance}


class DDPMDenoiser(Denoiser):
    """x̂0 from the network's output at a trained step, under any parameterization (a learned variance's half is
    not part of x̂0); `model` and the chain stay at hand for the ancestral samplers."""

    def __init__(self, objective: DDPM, model: Model, clip: bool):
        super().__init__(objective, clip)
        self.model, self.diffusion = model, objective.diffusion
        self._steps: Tensor | None = None  # (T, B): row t is step t for a batch, made once per sampling run

    def denoise(self, x: Tensor, sigma: float) -> Tensor:
        mean_out, _ = self.diffusion.split_output(self.model(x, self._t(x, sigma)))
        return self.diffusion.predict_x0(mean_out, x, self._t(x, sigma))

    def eps(self, x: Tensor, sigma: float, x0: Tensor, alpha: float, beta: float) -> Tensor:
        """ε̂ from the chain's own coefficients, as the samplers computed it before objectives were a layer."""
        return self.diffusion.predict_eps_from_x0(x, self._t(x, sigma), x0)

    def alphas_cumprod_at(self, grid: Grid) -> Tensor:
        ac = self.diffusion.alphas_cumprod
        return ac[torch.as_tensor(self.objective.steps_of(grid), dtype=torch.long, device=ac.device)]

    def _t(self, x: Tensor, sigma: float) -> Tensor:
        """Step t of this σ for x's batch: a view of a table made once per sampling run, nothing made per step."""
        if self._steps is None or self._steps.shape[1] != x.shape[0] or self._steps.device != x.device:
            self._steps = torch.arange(self.objective.num_levels, device=x.device)[:, None].expand(-1, x.shape[0])
        return self._steps[self.objective.step_of(sigma)]

    def grid(self, spacing: str | Sequence[int], num_levels: int | None, from_top: bool = False) -> Grid:
        return self.objective.grid(spacing, num_levels, from_top)
