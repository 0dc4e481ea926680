"""DPM-Solver++(2M) and its SDE variant (Lu et al. 2022, Algorithm 2; k-diffusion's sample_dpmpp_2m_sde) on any
denoiser's grid, in data prediction: one network call per level.

x' = (β'/β) e^{−ηh} x + α' (1 − e^{−(1+η)h}) D + β' sqrt(1 − e^{−2ηh}) z, h = λ' − λ,
D = (1 + 1/2r) x̂0 − (1/2r) x̂0_prev, r = h_prev/h (first order at the first step; η = 0 is the ODE solver).
From σ = ∞ (flow's t = 1: λ = −∞, h = ∞) the step is its limit, x' = α' x̂0 + β' x (η = 0), and the next step is
first order again (r = ∞). The last step, to the data, is x = x̂0.
"""

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from diffusion.core.denoiser import Denoiser, Grid
from diffusion.core.sampling.common import Generator, Recorder, SampleOutput, Update, apply, fill_normal, level_names
from diffusion.errors import UserError


def _decay(eta: float, h: float) -> float:
    """e^{−ηh}, 1 at η = 0 even for h = ∞."""
    return 1.0 if eta == 0 else math.exp(-eta * h)


def dpmpp_2m_updates(g: Grid, eta: float) -> list[Update]:
    """The updates between the grid's levels (the last step, to the data, is x = x̂0)."""
    lam, updates = g.lam, []
    for i in range(g.num_levels - 1):
        h = lam[i + 1] - lam[i]
        c_x = g.beta[i + 1] / g.beta[i] * _decay(eta, h)
        c_d = -g.alpha[i + 1] * math.expm1(-(1 + eta) * h)
        c_z = g.beta[i + 1] * math.sqrt(-math.expm1(-2 * eta * h)) if eta > 0 else 0.0
        if i == 0:
            w = (c_d,)  # DPM-Solver++1 (= DDIM) for want of a previous x̂0
        else:
            half_inv_r = 0.5 * h / (lam[i] - lam[i - 1])  # 0 after a step from λ = −∞
            w = (c_d * (1 + half_inv_r), -c_d * half_inv_r)
        updates.append(Update(c_x, w, c_z=c_z))
    return updates


def _dpmpp_2m(denoiser: Denoiser, x: Tensor, g: Grid, eta: float, generator: Generator,
              recorder: Recorder) -> Tensor:
    """Run the multistep updates, one network call per level."""
    updates, names = dpmpp_2m_updates(g, eta), level_names(denoiser, g)
    noise, x0s = torch.empty_like(x), []
    for i, update in enumerate(updates):
        x0s = [denoiser(x, g.sigma[i]), *x0s[:1]]
        recorder(names[i], x, x0s[0])
        x = apply(update, x, x0s)
        if update.c_z > 0:
            x = x + update.c_z * fill_normal(noise, generator)
    x0 = denoiser(x, g.sigma[g.num_levels - 1])
    recorder(names[-1], x, x0)
    return x0


def dpmpp_2m_sample(denoiser: Denoiser, x_T: Tensor, *, num_steps: int | None = None,
                    spacing: str | Sequence[int] = "logsnr", generator: Generator = None,
                    record_steps: Iterable[int] | None = None) -> SampleOutput:
    """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2: num_steps network calls."""
    recorder = Recorder(record_steps)
    x0 = _dpmpp_2m(denoiser, x_T, denoiser.grid(spacing, num_steps, from_top=True), 0.0, generator, recorder)
    return recorder.output(x0)


def dpmpp_2m_sde_sample(denoiser: Denoiser, x_T: Tensor, *, num_steps: int | None = None,
                        spacing: str | Sequence[int] = "logsnr", eta: float = 1.0,
                        generator: Generator = None,
                        record_steps: Iterable[int] | None = None) -> SampleOutput:
    """SDE-DPM-Solver++(2M), Lu et al. 2022, with noise scale η (η = 1: diffusers' sde-dpmsolver++; η = 0: ODE)."""
    if not (math.isfinite(eta) and eta >= 0):
        raise UserError(f"sampler.eta must be >= 0 for dpmpp_2m_sde, got {eta}; use 1 for the SDE, 0 for the ODE")
    recorder = Recorder(record_steps)
    x0 = _dpmpp_2m(denoiser, x_T, denoiser.grid(spacing, num_steps, from_top=True), eta, generator, recorder)
    return recorder.output(x0)
