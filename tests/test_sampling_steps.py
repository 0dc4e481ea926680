"""Every step of the samplers against a float64 recomputation written here with numpy, noise included.

The oracle tests (test_sampling.py) land on the data whatever σ_t is, and DDIM is checked there only at η = 0
and 1: here each step's noise scale is pinned down. The samplers draw their noise from the generator they are
given, one N(0, I) tensor shaped like x per noisy step, in step order; the recomputation draws the same.
"""

import numpy as np
import pytest
import torch

from diffusion.core.gaussian import GaussianDiffusion
from diffusion.core.objectives.ddpm import DDPMDenoiser
from diffusion.core.sampling import ddim_sample, ddpm_sample, respaced_sample
from diffusion.core.schedules import linear_beta_schedule, space_timesteps
from helpers import ddpm

T = 40
BETAS = linear_beta_schedule(T, 1e-3, 0.2).numpy()  # large steps: every σ_t matters
ALPHAS_CUMPROD = np.cumprod(1.0 - BETAS)
ALPHAS_CUMPROD_PREV = np.append(1.0, ALPHAS_CUMPROD[:-1])
X_STAR = torch.tensor([[-0.6, 0.2], [0.9, -1.0]], dtype=torch.float64).reshape(1, 1, 2, 2)


def denoiser(model, variance: str = "fixed_large", parameterization: str = "eps") -> DDPMDenoiser:
    """The DDPM objective's denoiser of `model` (x̂0 clipped), its chain's coefficients in float64."""
    betas = torch.from_numpy(BETAS)
    objective = ddpm(betas, parameterization=parameterization, variance=variance)
    objective.diffusion = GaussianDiffusion(betas, parameterization, variance, dtype=torch.float64)
    return objective.denoiser(model, clip=True)


def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Some deterministic ε-prediction, nonlinear in x and different at every t."""
    return torch.sin(3 * x + 0.1 * t.reshape(-1, 1, 1, 1)) + 0.2 * x


def var_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ε and a learned-range output v in (-1, 1) that varies with x and t."""
    return torch.cat([eps_model(x, t), torch.tanh(x - 0.05 * t.reshape(-1, 1, 1, 1))], 1)


def x_start(seed: int = 0, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def x0_and_eps(x: torch.Tensor, eps: torch.Tensor, a: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂0 from ε (Eq. 4 inverted), clipped to [-1, 1], and the ε that the clipped x̂0 implies."""
    x0 = ((x - np.sqrt(1 - a) * eps) / np.sqrt(a)).clamp(-1, 1)
    return x0, (x - np.sqrt(a) * x0) / np.sqrt(1 - a)


def ddim_by_hand(x: torch.Tensor, kept: list[int], eta: float, seed: int) -> list[torch.Tensor]:
    """Song et al. 2021 Eq. 12 with σ_t(η) of Eq. 16; x entering each kept step, last to first, then x_0."""
    gen, seen = torch.Generator().manual_seed(seed), []
    for i in reversed(range(len(kept))):
        seen.append(x)
        a, a_prev = ALPHAS_CUMPROD[kept[i]], ALPHAS_CUMPROD[kept[i - 1]] if i > 0 else 1.0
        x0, eps = x0_and_eps(x, eps_model(x, torch.full((x.shape[0],), kept[i])), a)
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)  # Eq. 16
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps
        if i > 0:
            x = x + sigma * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return [*seen, x]


@pytest.mark.parametrize("eta", [0.3, 0.75])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_ddim_between_0_and_1_follows_eq_16(eta, spacing):
    kept = space_timesteps(T, spacing, 9)
    out = ddim_sample(denoiser(eps_model), x_start(), spacing=kept, eta=eta,
                      generator=torch.Generator().manual_seed(5), record_steps=kept)
    want = ddim_by_hand(x_start(), kept, eta, seed=5)
    for got, expected, t in zip(out.trajectory.x_t, want, out.trajectory.steps, strict=False):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=f"x entering step {t}")
    torch.testing.assert_close(out.x0, want[-1], rtol=0, atol=1e-12)


def ancestral_sigma2(variance: str, t: int, v: torch.Tensor) -> torch.Tensor | float:
    """σ_t² of p(x_{t-1} | x_t): β_t, β̃_t (Ho et al. 2020 Sec. 3.2), or Nichol & Dhariwal 2021 Eq. 15."""
    posterior = BETAS[t] * (1 - ALPHAS_CUMPROD_PREV[t]) / (1 - ALPHAS_CUMPROD[t])  # β̃_t, Eq. 7
    if variance == "fixed_large":
        return BETAS[t]
    if variance == "fixed_small":
        return posterior
    frac = (v + 1) / 2
    return torch.exp(frac * np.log(BETAS[t]) + (1 - frac) * np.log(posterior))


def ddpm_by_hand(x: torch.Tensor, variance: str, seed: int) -> list[torch.Tensor]:
    """Ho et al. 2020 Algorithm 2, the mean by Eq. 7 from the clipped x̂0; x entering each step, then x_0."""
    gen, seen = torch.Generator().manual_seed(seed), []
    for t in reversed(range(T)):
        seen.append(x)
        out = var_model(x, torch.full((x.shape[0],), t))
        eps, v = out[:, :1], out[:, 1:]
        a, a_prev = ALPHAS_CUMPROD[t], ALPHAS_CUMPROD_PREV[t]
        x0, _ = x0_and_eps(x, eps, a)
        mean = (BETAS[t] * np.sqrt(a_prev) * x0 + (1 - a_prev) * np.sqrt(1 - BETAS[t]) * x) / (1 - a)  # Eq. 7
        x = mean
        if t > 0:
            x = x + ancestral_sigma2(variance, t, v) ** 0.5 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return [*seen, x]


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small", "learned_range"])
def test_ancestral_noise_scale_at_every_step(variance):
    model = var_model if variance == "learned_range" else eps_model  # eps_model is var_model's first channel
    out = ddpm_sample(denoiser(model, variance), x_start(), generator=torch.Generator().manual_seed(3),
                      record_steps=range(T))
    want = ddpm_by_hand(x_start(), variance, seed=3)
    assert out.trajectory.steps == list(range(T - 1, -1, -1))
    for got, expected, t in zip(out.trajectory.x_t, want, out.trajectory.steps, strict=False):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=f"x entering step {t}")
    torch.testing.assert_close(out.x0, want[-1], rtol=0, atol=1e-12)


# --- the μ̃ parameterization: an oracle that outputs the true posterior mean ------------------------------
def mean_oracle(x_star: torch.Tensor):
    """μ̃_t(x_t, x*) of Eq. 7 for the one-point data set {x*}: what a perfect μ̃-predictor outputs."""

    def model(x_t, t):
        index = t.numpy()
        a, a_prev, beta = ALPHAS_CUMPROD[index], ALPHAS_CUMPROD_PREV[index], BETAS[index]
        coef_x0 = torch.from_numpy(beta * np.sqrt(a_prev) / (1 - a)).reshape(-1, 1, 1, 1)
        coef_xt = torch.from_numpy((1 - a_prev) * np.sqrt(1 - beta) / (1 - a)).reshape(-1, 1, 1, 1)
        return coef_x0 * x_star + coef_xt * x_t

    return model


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_ancestral_with_a_mean_oracle_lands_on_the_data(variance):
    out = ddpm_sample(denoiser(mean_oracle(X_STAR), variance, "mean"), x_start(n=4),
                      generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.x0, X_STAR.expand(4, -1, -1, -1), rtol=0, atol=1e-10)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_ddim_and_respaced_with_a_mean_oracle_land_on_the_data(spacing):
    """The μ̃ of the original chain is turned into x̂0 before a respaced or DDIM step uses it (trailing
    spacing ends at step 9, where μ̃ itself is not x*: used as the mean there, it would land elsewhere)."""
    d = denoiser(mean_oracle(X_STAR), "fixed_small", "mean")
    for eta in (0.0, 0.5, 1.0):
        out = ddim_sample(d, x_start(n=4), num_steps=4, spacing=spacing, eta=eta,
                          generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(out.x0, X_STAR.expand(4, -1, -1, -1), rtol=0, atol=1e-10, msg=f"η={eta}")
    out = respaced_sample(d, x_start(n=4), num_steps=4, spacing=spacing,
                          generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out.x0, X_STAR.expand(4, -1, -1, -1), rtol=0, atol=1e-10)


def test_respaced_mean_oracle_keeps_the_forward_marginals():
    """Started from q(x_k | x*) at the first kept step, every later kept step k has q(x_k | x*) exactly."""
    x_star = torch.full((1, 1, 1, 1), 0.5, dtype=torch.float64)
    kept, n = space_timesteps(T, "trailing", 5), 40_000
    gen = torch.Generator().manual_seed(0)
    a = ALPHAS_CUMPROD
    x_T = np.sqrt(a[kept[-1]]) * 0.5 + np.sqrt(1 - a[kept[-1]]) * torch.randn(n, 1, 1, 1, generator=gen,
                                                                            dtype=torch.float64)
    out = respaced_sample(denoiser(mean_oracle(x_star), "fixed_small", "mean"), x_T, spacing=kept, generator=gen,
                          record_steps=kept)
    for x, k in zip(out.trajectory.x_t, out.trajectory.steps, strict=True):
        mean, var = np.sqrt(a[k]) * 0.5, 1 - a[k]
        assert abs(x.mean().item() - mean) < 5 * np.sqrt(var / n), k
        assert abs(x.var().item() - var) < 5 * var * np.sqrt(2 / n), k


# --- the μ̃ parameterization with a model that is no oracle: every step recomputed --------------------------
def mean_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Some deterministic μ̃-prediction, nonlinear in x; its implied x̂0 leaves [-1, 1] at large t."""
    return 0.9 * x + 0.3 * torch.sin(2 * x + 0.1 * t.reshape(-1, 1, 1, 1))


def x0_from_mean(x: torch.Tensor, mean: torch.Tensor, a: float, a_prev: float, beta: float) -> torch.Tensor:
    """x̂0 by inverting Eq. 7 on the original chain, μ̃ = c1 x0 + c2 x_t, clipped to [-1, 1]."""
    c1, c2 = beta * np.sqrt(a_prev) / (1 - a), (1 - a_prev) * np.sqrt(1 - beta) / (1 - a)
    return ((mean - c2 * x) / c1).clamp(-1, 1)


def mean_at(x: torch.Tensor, t: int) -> torch.Tensor:
    return mean_model(x, torch.full((x.shape[0],), t))


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_ancestral_with_a_mean_model_steps_by_its_mean(variance):
    """Algorithm 2 with μ_θ = the network's output itself (unclipped), σ_t² = β_t or β̃_t; x̂0 reported clipped."""
    out = ddpm_sample(denoiser(mean_model, variance, "mean"), x_start(), generator=torch.Generator().manual_seed(4),
                      record_steps=range(T))
    gen, x, clipped = torch.Generator().manual_seed(4), x_start(), 0
    for i, t in enumerate(reversed(range(T))):
        torch.testing.assert_close(out.trajectory.x_t[i], x, rtol=0, atol=1e-12, msg=f"x entering step {t}")
        a, a_prev = ALPHAS_CUMPROD[t], ALPHAS_CUMPROD_PREV[t]
        mean = mean_at(x, t)
        x0 = x0_from_mean(x, mean, a, a_prev, BETAS[t])
        clipped += int((x0.abs() == 1).any())
        torch.testing.assert_close(out.trajectory.x0_pred[i], x0, rtol=0, atol=1e-9, msg=f"x̂0 at step {t}")
        x = mean
        if t > 0:
            x = x + ancestral_sigma2(variance, t, None) ** 0.5 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    torch.testing.assert_close(out.x0, x, rtol=0, atol=1e-12)
    assert clipped > 0  # the clipped x̂0 differs from the mean's: a mean rebuilt from it would be caught


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_with_a_mean_model_follows_eq_12(eta):
    """Song et al. 2021 Eq. 12 from x̂0 = Eq. 7 inverted on the original chain at each kept step, and its ε."""
    kept = space_timesteps(T, "trailing", 7)
    out = ddim_sample(denoiser(mean_model, "fixed_small", "mean"), x_start(), spacing=kept, eta=eta,
                      generator=torch.Generator().manual_seed(6), record_steps=kept)
    gen, x = torch.Generator().manual_seed(6), x_start()
    for i in reversed(range(len(kept))):
        k = kept[i]
        torch.testing.assert_close(out.trajectory.x_t[len(kept) - 1 - i], x, rtol=0, atol=1e-12, msg=f"step {k}")
        a, a_prev = ALPHAS_CUMPROD[k], ALPHAS_CUMPROD[kept[i - 1]] if i > 0 else 1.0
        x0 = x0_from_mean(x, mean_at(x, k), a, ALPHAS_CUMPROD_PREV[k], BETAS[k])
        eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)  # Eq. 16
        x = np.sqrt(a_prev) * x0 + np.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if eta > 0 and i > 0:
            x = x + sigma * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    torch.testing.assert_close(out.x0, x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_respaced_with_a_mean_model_uses_the_respaced_posterior(variance):
    """x̂0 from μ̃ on the original chain, then Eq. 7's mean and σ² on the respaced chain, whose
    β'_i = 1 - ᾱ_{k_i} / ᾱ_{k_{i-1}} (Nichol & Dhariwal 2021 Sec. 4)."""
    kept = space_timesteps(T, "linspace", 6)
    out = respaced_sample(denoiser(mean_model, variance, "mean"), x_start(), spacing=kept,
                          generator=torch.Generator().manual_seed(8), record_steps=kept)
    gen, x = torch.Generator().manual_seed(8), x_start()
    for i in reversed(range(len(kept))):
        k = kept[i]
        torch.testing.assert_close(out.trajectory.x_t[len(kept) - 1 - i], x, rtol=0, atol=1e-12, msg=f"step {k}")
        x0 = x0_from_mean(x, mean_at(x, k), ALPHAS_CUMPROD[k], ALPHAS_CUMPROD_PREV[k], BETAS[k])
        a, a_prev = ALPHAS_CUMPROD[k], ALPHAS_CUMPROD[kept[i - 1]] if i > 0 else 1.0
        beta = 1 - a / a_prev
        x = (beta * np.sqrt(a_prev) * x0 + (1 - a_prev) * np.sqrt(1 - beta) * x) / (1 - a)  # Eq. 7, respaced
        if i > 0:
            sigma2 = beta if variance == "fixed_large" else beta * (1 - a_prev) / (1 - a)
            x = x + np.sqrt(sigma2) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    torch.testing.assert_close(out.x0, x, rtol=0, atol=1e-12)
