"""Consistency tuning of a trained diffusion model (Geng et al. 2024, "Consistency Models Made Easy", ECT), whatever
objective trained it: the model's own denoiser D(x; σ) is the consistency function f(x, σ) = D(x; σ), and tuning
teaches it to map every point of a probability-flow trajectory to the same x̂0, so that one or two network calls
give an image (core/sampling/consistency.py).

Why ECT and not consistency distillation (Song et al. 2023): ECT needs neither a teacher's ODE solver nor a frozen
copy of the network: both ends of its consistency pair share one noise draw, x_t = x0 + t ε and x_r = x0 + r ε, the
teacher-free discretisation, and the target is the network itself at r without gradients. It starts from the
diffusion model (at its first stage most pairs have r = 0, where the target is x0: the diffusion loss) and shrinks
Δt = t − r stage by stage toward the consistency condition, which is why it needs little training.

The loss (ECT's training loop on top of iCT's choices, Song & Dhariwal 2023):
    t ~ LogNormal(P_mean, P_std²),  r = max(0, t (1 − q^−(s+1) (1 + k·sigmoid(−b t)))),  s = ⌊step / stage_steps⌋
    L = (sqrt(||f(x_t, t) − sg(f(x_r, r))||² + c²) − c) / (t − r),  f(x_r, 0) = x0 (the boundary),
with one dropout mask for both calls (the random state restored between them). Every objective's denoiser meets
the boundary f(x, 0) = x as σ → 0 (EDM's c_skip → 1, c_out → 0; flow's t → 0; DDPM's ε-form), so nothing is added.
A discrete objective (DDPM) is asked only at its trained levels: t is the trained level nearest the draw and r the
highest trained level at or below the mapping's r and below t (0 below the lowest), Δσ then a whole number of steps.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffusion.core.denoiser import Denoiser, Grid
from diffusion.core.likelihood import mean_flat
from diffusion.core.objectives.base import (
    LogNormalLevels,
    LossOutput,
    Model,
    Objective,
    ObjectiveConfig,
    build_objective,
)
from diffusion.rules import at_least, between, checked, positive


@dataclass
class ConsistencyObjectiveConfig(ObjectiveConfig):
    """objective=consistency: ECT (Geng et al. 2024) of a trained model; its CIFAR-10 settings are the defaults."""

    _target_: str = "diffusion.core.objectives.consistency.Consistency"
    base: Any = None  # the tuned model's objective (a spec); null: that of init_from's checkpoint (or the resumed one)
    p_mean: float = checked(-1.1, between(-20, 20))  # ln t ~ N(p_mean, p_std²)
    p_std: float = checked(2.0, positive())
    q: float = checked(2.0, between(1, 1e6, low_open=True))  # Δt shrinks by q each stage
    k: float = checked(8.0, at_least(0, integer=False))  # Δt's extra share at small t: 1 + k·sigmoid(−b t)
    b: float = checked(1.0, positive())
    c: float = checked(0.0, at_least(0, integer=False))  # pseudo-Huber's c (0: the L2 norm, iCT's p = 0.5 weighting)
    stage_steps: int = checked(1000, at_least(1))  # optimizer steps per stage


class Consistency(LogNormalLevels, Objective):
    name = "consistency"
    default_sampler = "consistency"
    tunes = "base"  # the key of the spec whose network this tunes (weights_spec): init_from and resume compare that

    def __init__(self, base: dict[str, Any], p_mean: float, p_std: float, q: float, k: float, b: float, c: float,
                 stage_steps: int):
        super().__init__()
        self.base: Objective = build_objective(base)
        self.p_mean, self.p_std, self.q, self.k, self.b, self.c = p_mean, p_std, q, k, b, c
        self.stage_steps, self.stage = stage_steps, 0
        self.num_levels, self.learned_variance = self.base.num_levels, self.base.learned_variance
        self.spacings = self.base.spacings

    def settings(self) -> dict[str, Any]:
        return {"base": self.base.spec(), "p_mean": self.p_mean, "p_std": self.p_std, "q": self.q, "k": self.k,
                "b": self.b, "c": self.c, "stage_steps": self.stage_steps}

    # --- training ------------------------------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        self.stage = step // self.stage_steps

    def snapped(self, sigma: Tensor) -> Tensor:
        """σ (float64) within the tuned model's levels: clamped to its bounds, and for a discrete model the trained
        level nearest each."""
        lo, hi = self.base.sigma_bounds()
        sigma = sigma.to(torch.float64).clamp(lo, hi)
        levels = self.base.trained_sigmas()
        if levels is None:
            return sigma
        levels = levels.to(sigma.device)
        above = torch.searchsorted(levels, sigma).clamp(max=len(levels) - 1)
        below = (above - 1).clamp(min=0)
        nearer_below = (sigma - levels[below]).abs() < (levels[above] - sigma).abs()
        return levels[torch.where(nearer_below, below, above)]

    def r_of(self, t: Tensor) -> Tensor:
        """ECT's mapping r(t) at the current stage (float64), on the trained levels for a discrete model."""
        t = t.to(torch.float64)
        ratio = 1 - self.q ** -(self.stage + 1) * (1 + self.k * torch.sigmoid(-self.b * t))
        r = (t * ratio).clamp(min=0)
        levels = self.base.trained_sigmas()
        if levels is None:
            return r
        levels = levels.to(t.device)
        index = torch.minimum(torch.searchsorted(levels, r, right=True) - 1, torch.searchsorted(levels, t) - 1)
        return torch.where(index >= 0, levels[index.clamp(min=0)], torch.zeros_like(r))

    def draw_levels(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """t ~ LogNormal(P_mean, P_std²) within the tuned model's levels (float64), unit weights."""
        t = (torch.randn(n, device=device) * self.p_std + self.p_mean).exp()
        return self.snapped(t), torch.ones(n, device=device)

    def loss(self, model: Model, x0: Tensor, levels: Tensor, eps: Tensor) -> LossOutput:
        t = levels.to(torch.float64)
        r = self.r_of(t)
        shape = (-1, *([1] * (x0.ndim - 1)))
        x_t = x0 + t.to(x0.dtype).reshape(shape) * eps
        x_r = x0 + r.to(x0.dtype).reshape(shape) * eps
        state = _random_state(x0.device)
        f_t = self.base.denoise_at(model, x_t, t)
        with torch.no_grad():
            noisy = r > 0
            target = x0
            if bool(noisy.any()):
                _set_random_state(x0.device, state)  # the same dropout mask as f(x_t, t)
                asked = torch.where(noisy, r, torch.full_like(r, self.base.sigma_bounds()[0]))
                target = torch.where(noisy.reshape(shape), self.base.denoise_at(model, x_r, asked), x0)
        diff = f_t - target
        distance = ((diff**2).flatten(1).sum(1) + self.c**2).sqrt() - self.c
        return LossOutput(distance / (t - r).to(distance.dtype), mean_flat(diff.detach() ** 2))

    def validation_levels(self, fractions: Sequence[float], batch: int, device) -> list[tuple[str, Tensor]]:
        """σ at the fractions of [ln σ_min, ln σ_max] of the tuned model's levels (its trained ones for DDPM)."""
        lo, hi = (math.log(s) for s in self.base.sigma_bounds())
        wanted = torch.tensor(sorted({math.exp(lo + f * (hi - lo)) for f in fractions}), dtype=torch.float64)
        sigmas = sorted(set(self.snapped(wanted).tolist()))
        return [(f"sigma{s:.3g}", torch.full((batch,), s, dtype=torch.float64, device=device)) for s in sigmas]

    # --- sampling: the tuned model's denoiser and grids ---------------------------------------------------------
    def denoiser(self, model: Model, clip: bool = True) -> Denoiser:
        return self.base.denoiser(model, clip)

    def denoise_at(self, model: Model, x: Tensor, sigma: Tensor) -> Tensor:
        return self.base.denoise_at(model, x, sigma)

    def sigma_bounds(self) -> tuple[float, float]:
        return self.base.sigma_bounds()

    def trained_sigmas(self) -> Tensor | None:
        return self.base.trained_sigmas()

    def grid(self, spacing: str | Sequence[int], num_levels: int | None, from_top: bool = False) -> Grid:
        return self.base.grid(spacing, num_levels, from_top)

    def default_spacing(self, sampler_default: str) -> str:
        return self.base.default_spacing(sampler_default)

    def describe(self) -> str:
        return (f"consistency tuning (ECT: ln t ~ N({self.p_mean:g}, {self.p_std:g}²), Δt shrinking ×1/{self.q:g} "
                f"every {self.stage_steps} steps) of objective={self.base.name}: {self.base.describe()}")

    def protocol(self) -> dict[str, Any]:
        return {"objective": {k: v for k, v in self.spec().items() if k != "base"}, "base": self.base.protocol()}


def _random_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_random_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
