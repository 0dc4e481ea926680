"""Fast solvers (DPM-Solver++(2M), its SDE, UniPC, Heun, iPNDM, DEIS) on DDPM's denoiser, and the logsnr / karras
spacings.

Oracles recompute ᾱ with numpy. Gaussian data N(μ, s²I) has the exact denoiser
E[x0 | x_t] = μ + sqrt(ᾱ) s²/(ᾱ s² + 1 - ᾱ) (x_t - sqrt(ᾱ) μ), and its probability-flow ODE keeps
ξ = (x_t - sqrt(ᾱ) μ)/sqrt(ᾱ s² + 1 - ᾱ) fixed, which gives every solver's exact endpoint in closed form.
"""

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.core.gaussian import GaussianDiffusion
from diffusion.core.objectives.ddpm import DDPMDenoiser
from diffusion.core.sampling import (
    SAMPLERS,
    ddim_sample,
    deis_logrho_sample,
    deis_sample,
    dpmpp_2m_sample,
    dpmpp_2m_sde_sample,
    heun_sample,
    ipndm_sample,
    unipc_sample,
)
from diffusion.core.schedules import (
    cosine_beta_schedule,
    quadratic_beta_schedule,
    space_timesteps,
)
from diffusion.errors import UserError
from helpers import PAPER_BETAS, ddpm, paper_betas

T = 1000
BETAS = paper_betas(T)
AC = torch.from_numpy(np.cumprod(1 - BETAS.numpy()))  # ᾱ, by numpy
X_STAR = torch.tensor([[-0.6, 0.2], [0.9, -1.0]], dtype=torch.float64).reshape(1, 1, 2, 2)
MU, S = torch.tensor([0.3, -0.5, 0.1, 0.7], dtype=torch.float64).reshape(1, 1, 2, 2), 0.5
DETERMINISTIC = ["dpmpp_2m", "unipc", "heun"]
# the samplers whose grids start at x_T
SOLVERS = ["dpmpp_2m", "dpmpp_2m_sde", "unipc", "heun", "ipndm", "deis", "deis_logrho"]


def denoiser(model, parameterization="eps", variance="fixed_large", dtype=torch.float64, clip=True) -> DDPMDenoiser:
    """DDPM's denoiser of `model` with the chain's coefficients in `dtype` (x̂0 clamped when `clip`)."""
    objective = ddpm(BETAS, parameterization=parameterization, variance=variance)
    objective.diffusion = GaussianDiffusion(BETAS, parameterization, variance, dtype=dtype)
    return objective.denoiser(model, clip=clip)


def solve(name, model, x, **kwargs):
    """SAMPLERS[name] on DDPM's denoiser of `model` (clip: keyword, default True)."""
    d = denoiser(model, **{k: kwargs.pop(k) for k in ("parameterization", "variance", "dtype", "clip") if k in kwargs})
    return SAMPLERS[name].fn(d, x, **kwargs)


def gaussian_denoiser(x_t, t, mu=MU, s=S):
    a = AC[t].reshape(-1, 1, 1, 1).to(x_t.dtype)
    return mu + a.sqrt() * s**2 / (a * s**2 + 1 - a) * (x_t - a.sqrt() * mu)


def eps_from_x0(x_t, t, x0):
    a = AC[t].reshape(-1, 1, 1, 1).to(x_t.dtype)
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def gaussian_oracle(mu=MU, s=S):
    return lambda x_t, t: eps_from_x0(x_t, t, gaussian_denoiser(x_t, t, mu, s))


def point_oracle(x_star=X_STAR):
    return lambda x_t, t: eps_from_x0(x_t, t, x_star.to(x_t.dtype))


def gaussian_endpoint(x_T, k):
    """The exact PF-ODE solution from x_T at T-1 to index k, then denoised there: μ + s² ξ/sqrt(s² + σ_k²)."""
    a_T = AC[-1]
    xi = (x_T - a_T.sqrt() * MU) / (a_T * S**2 + 1 - a_T).sqrt()
    sigma2 = (1 - AC[k]) / AC[k]
    return MU + S**2 * xi / math.sqrt(S**2 + sigma2)


def x_T(seed=0, n=4, dtype=torch.float64):
    return torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def counting(model):
    """Wrap a model to record each call's timesteps."""
    calls = []

    def wrapped(x_t, t):
        calls.append(t.clone())
        return model(x_t, t)

    return wrapped, calls


# --- spacings ---------------------------------------------------------------------------------------
def _log_snr_np(betas):
    ac = np.cumprod(1 - betas.numpy())
    return np.log(ac / (1 - ac))


@pytest.mark.parametrize("betas", [BETAS, quadratic_beta_schedule(T, **PAPER_BETAS)], ids=["linear", "quadratic"])
@pytest.mark.parametrize("K", [2, 5, 10, 20])
def test_logsnr_and_karras_steps_are_the_nearest_lambda_to_their_targets(betas, K):
    """Targets recomputed in numpy: λ uniform, or σ by Karras Eq. 5 with ρ=7; each step the index of nearest λ."""
    lam = _log_snr_np(betas)
    sigma = np.exp(-0.5 * lam)
    ramp = np.linspace(0, 1, K)
    targets = {
        "logsnr": lam[-1] + ramp * (lam[0] - lam[-1]),
        "karras": -2 * np.log((sigma[-1] ** (1 / 7) + ramp * (sigma[0] ** (1 / 7) - sigma[-1] ** (1 / 7))) ** 7),
    }
    ac = torch.cumprod(1 - betas, 0)
    for spacing, target in targets.items():
        steps = space_timesteps(T, spacing, K, alphas_cumprod=ac)
        assert steps[0] == 0 and steps[-1] == T - 1 and len(steps) == K
        assert all(b > a for a, b in zip(steps, steps[1:], strict=False))
        nearest = sorted(int(np.abs(lam - y).argmin()) for y in target)
        assert steps == nearest  # no collisions at these K
        # so each rounded λ is within half a local integer gap of its target: near-uniform in λ (or Karras in σ)
        gaps = np.abs(np.diff(lam))
        for k, y in zip(steps, sorted(target, reverse=True), strict=True):
            local = max(gaps[max(k - 1, 0)], gaps[min(k, T - 2)])
            assert abs(lam[k] - y) <= 0.5 * local + 1e-12


def _nearest_then_distinct(lam, targets):
    """The rule, restated: nearest λ; a repeat moves up to the next free index; overruns pulled below T-1."""
    steps = []
    for k in sorted(int(np.abs(lam - y).argmin()) for y in targets):
        steps.append(max(k, steps[-1] + 1) if steps else k)
    for j in reversed(range(len(steps))):
        steps[j] = min(steps[j], (steps[j + 1] if j + 1 < len(steps) else len(lam)) - 1)
    return steps


@pytest.mark.parametrize("spacing", ["logsnr", "karras"])
@pytest.mark.parametrize("K", [1, 2, 10, 60, 200, 999, 1000])
def test_snr_spacings_keep_the_count_when_targets_collide(spacing, K):
    """Where integer steps are coarser in λ than the targets (t near 0 for the linear schedule; near T-1 for the
    cosine one, whose clipped last β makes λ jump by 7), repeats move to free indices and K steps remain."""
    for betas in [BETAS, cosine_beta_schedule(T, s=0.008, max_beta=0.999)]:
        ac, lam = torch.cumprod(1 - betas, 0), _log_snr_np(betas)
        steps = space_timesteps(T, spacing, K, alphas_cumprod=ac)
        assert len(steps) == K and steps[-1] == T - 1 and all(b > a for a, b in zip(steps, steps[1:], strict=False))
        assert all(isinstance(k, int) and 0 <= k < T for k in steps) and (K == 1 or steps[0] == 0)
        sigma = np.exp(-0.5 * lam)
        ramp = np.linspace(0, 1, K)
        if spacing == "logsnr":
            targets = lam[-1] + ramp * (lam[0] - lam[-1])
        else:
            targets = -2 * np.log((sigma[-1] ** (1 / 7) + ramp * (sigma[0] ** (1 / 7) - sigma[-1] ** (1 / 7))) ** 7)
        assert steps == _nearest_then_distinct(lam, targets)
    assert space_timesteps(T, spacing, T, alphas_cumprod=AC) == list(range(T))
    assert space_timesteps(T, spacing, 200, alphas_cumprod=AC)[:5] == [0, 1, 2, 3, 4]  # crowded low-noise end


def test_old_spacings_ignore_alphas_cumprod_and_snr_spacings_need_it():
    for spacing in ["linspace", "leading", "trailing"]:
        assert space_timesteps(T, spacing, 10, alphas_cumprod=AC) == space_timesteps(T, spacing, 10)
    cases = [
        (dict(spacing="logsnr", num_steps=10), "needs the schedule's ᾱ"),
        (dict(spacing="karras", num_steps=10, alphas_cumprod=AC[:-1]), "must be 1000 decreasing values"),
        (dict(spacing="logsnr", num_steps=0, alphas_cumprod=AC), "in [1, 1000], got 0"),
        (dict(spacing="karras", num_steps=1001, alphas_cumprod=AC), "in [1, 1000], got 1001"),
        (dict(spacing="logsnrr", num_steps=10, alphas_cumprod=AC), "unknown timestep spacing"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(UserError) as err:
            space_timesteps(T, **kwargs)
        assert fragment in str(err.value) and "\n" not in str(err.value)


# --- every solver: oracles, calls, parameterizations -------------------------------------------------
@pytest.mark.parametrize("spacing", ["logsnr", "karras", "linspace", "trailing"])
@pytest.mark.parametrize("name", SOLVERS)
def test_point_oracle_lands_on_the_data_along_the_exact_path(name, spacing):
    """For a one-point data set every update is exact: x at each step k is sqrt(ᾱ_k) x* + sqrt(1-ᾱ_k) ε₀.

    That needs the solver's ᾱ to be the ᾱ of the integer index the network was called with.
    """
    xT, model = x_T(), point_oracle()
    wrapped, calls = counting(model)
    kw = dict(eta=0.0) if name == "dpmpp_2m_sde" else {}
    out = solve(name, wrapped, xT, num_steps=9, spacing=spacing, record_steps=range(T), **kw)
    torch.testing.assert_close(out.x0, X_STAR.expand(4, -1, -1, -1), rtol=0, atol=1e-10)
    assert len(calls) == SAMPLERS[name].nfe(9)
    assert all(c.dtype == torch.int64 and c.shape == (4,) and 0 <= c.min() and c.max() < T for c in calls)
    assert calls[0].tolist() == [T - 1] * 4
    steps = out.trajectory.steps
    assert steps == sorted(steps, reverse=True) and steps[0] == T - 1
    eps0 = (xT - AC[-1].sqrt() * X_STAR) / (1 - AC[-1]).sqrt()
    for x, k in zip(out.trajectory.x_t, steps, strict=True):
        torch.testing.assert_close(x, AC[k].sqrt() * X_STAR + (1 - AC[k]).sqrt() * eps0, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", SOLVERS)
def test_point_oracle_float32_and_sde_noise(name):
    """The float32 twin, and the SDE with noise: it, too, lands on the single data point."""
    out = solve(name, point_oracle(), x_T(dtype=torch.float32), dtype=torch.float32, num_steps=12,
                generator=torch.Generator().manual_seed(3))
    assert out.x0.dtype == torch.float32
    torch.testing.assert_close(out.x0, X_STAR.float().expand(4, -1, -1, -1), rtol=0, atol=2e-4)


@pytest.mark.parametrize("name", SOLVERS)
def test_parameterizations_that_are_exact_conversions_give_the_same_samples(name):
    """x0-, v- and μ̃-models converted exactly from an ε-model (and one with a learned-variance half) agree."""
    eps_d = GaussianDiffusion(BETAS, "eps", "fixed_large", dtype=torch.float64)
    eps_model = lambda x, t: torch.sin(3 * x) * 0.3 + 0.2 * x + 1e-4 * t.reshape(-1, 1, 1, 1)  # noqa: E731

    def x0_of(x, t):
        return eps_d.predict_x0_from_eps(x, t, eps_model(x, t))

    models = {
        ("x0", "fixed_large"): x0_of,
        ("v", "fixed_large"): lambda x, t: eps_d.v_from_x0_eps(x0_of(x, t), eps_model(x, t), t),
        ("mean", "fixed_large"): lambda x, t: eps_d.q_posterior_mean_variance(x0_of(x, t), x, t)[0],
        ("eps", "learned_range"): lambda x, t: torch.cat([eps_model(x, t), -x], 1),
    }
    run = lambda m, p="eps", v="fixed_large": solve(name, m, x_T(), parameterization=p,  # noqa: E731
                                                    variance=v, clip=False, num_steps=10,
                                                    generator=torch.Generator().manual_seed(1)).x0
    reference = run(eps_model)
    for (p, v), model in models.items():
        torch.testing.assert_close(run(model, p, v), reference, rtol=1e-9, atol=1e-9)


def test_clip_denoised_clamps_every_prediction():
    """Data outside [-1, 1]: with clipping each x̂0 is clamped, so the oracle lands on clamp(x*)."""
    x_star = torch.tensor([[1.5, -0.2], [-3.0, 0.4]], dtype=torch.float64).reshape(1, 1, 2, 2)
    for name in SOLVERS:
        out = solve(name, point_oracle(x_star), x_T(), clip=True, num_steps=8, record_steps=range(T))
        torch.testing.assert_close(out.x0, x_star.clamp(-1, 1).expand(4, -1, -1, -1), rtol=0, atol=1e-10)
        assert out.trajectory.x0_pred.abs().max() <= 1, name


# --- convergence on Gaussian data ----------------------------------------------------------------------
END = 30  # grids end at index 30, where neighbouring integer steps are close in λ (see the test below)


def _grid(spacing, n):
    """A logsnr / karras grid from T-1 down to index END, by space_timesteps on the truncated schedule."""
    return [k + END for k in space_timesteps(T - END, spacing, n, alphas_cumprod=AC[END:])]


def _slope(nfes, errors):
    return -np.polyfit(np.log(nfes), np.log(errors), 1)[0]


@pytest.mark.parametrize(
    "name, low, high",
    [("ddim", 0.9, 1.1), ("dpmpp_2m", 1.7, 2.4), ("heun", 1.7, 2.4), ("unipc1", 1.7, 2.4), ("unipc2", 2.6, 4.5),
     ("unipc3", 2.6, 4.5), ("ipndm1", 0.9, 1.1), ("ipndm2", 1.7, 2.4), ("ipndm3", 2.0, 3.5), ("ipndm4", 2.0, 3.5),
     ("deis1", 0.9, 1.1), ("deis2", 1.7, 2.4), ("deis3", 2.5, 3.3), ("deis_logrho1", 0.9, 1.1),
     ("deis_logrho2", 1.7, 2.4), ("deis_logrho3", 2.5, 3.3)],
)
def test_error_falls_with_the_solver_order(name, low, high):
    """Slope of log error against log NFE with the exact Gaussian oracle: DDIM 1, DPM-Solver++(2M) and Heun 2,
    UniPC-p p+1 (UniC raises UniP-p by one order), DEIS-p p (its Lagrange weights follow the steps), iPNDM-p p up
    to 2 and 2-3 beyond (fixed Adams-Bashforth weights on uneven steps, and its warm-up's low orders).

    The grid stops at index 30 and the target is the exact ODE solution there, denoised: all the way down to
    index 0 the integer steps are 0.35 apart in λ/2 whatever the NFE, which puts a floor under every error.
    """
    xT, d = x_T(n=16), denoiser(gaussian_oracle(), clip=False)
    nfes = [24, 32, 48, 64, 96]
    errors = []
    for nfe in nfes:
        if name == "ddim":
            x0 = ddim_sample(d, xT, spacing=_grid("logsnr", nfe)).x0
        elif name == "heun":
            x0 = heun_sample(d, xT, spacing=_grid("karras", (nfe + 1) // 2)).x0
        elif name == "dpmpp_2m":
            x0 = dpmpp_2m_sample(d, xT, spacing=_grid("logsnr", nfe)).x0
        elif name.startswith(("ipndm", "deis")):
            fn = {"ipndm": ipndm_sample, "deis": deis_sample, "deis_logrho": deis_logrho_sample}[name[:-1]]
            x0 = fn(d, xT, spacing=_grid("karras", nfe), order=int(name[-1])).x0
        else:
            x0 = unipc_sample(d, xT, spacing=_grid("logsnr", nfe), order=int(name[-1])).x0
        errors.append((x0 - gaussian_endpoint(xT, END)).pow(2).mean().sqrt().item())
    assert low <= _slope(nfes, errors) <= high, errors


@pytest.mark.parametrize("name, nfe, tol", [("dpmpp_2m", 50, 5e-3), ("unipc", 30, 1e-3), ("heun", 99, 2e-2),
                                            ("ipndm", 30, 2e-2), ("deis", 30, 5e-2),
                                            ("deis_logrho", 30, 5e-2)])
def test_full_grid_reaches_the_exact_endpoint(name, nfe, tol):
    """Down to σ=0 on the default grids, the result is near μ + s (x_T - sqrt(ᾱ)μ)/sqrt(ᾱs² + 1 - ᾱ)."""
    xT = x_T(n=16)
    exact = MU + S * (xT - AC[-1].sqrt() * MU) / (AC[-1] * S**2 + 1 - AC[-1]).sqrt()
    assert (gaussian_endpoint(xT, 0) - exact).abs().max() < 5e-4  # the last step from index 0: O(σ_0²)
    x0 = solve(name, gaussian_oracle(), xT, clip=False, num_steps=nfe).x0
    ddim = ddim_sample(denoiser(gaussian_oracle(), clip=False), xT, num_steps=nfe).x0
    assert (x0 - exact).abs().max() < tol < (ddim - exact).abs().max()


# --- against diffusers -----------------------------------------------------------------------------------
def _diffusers_model(x_t, t):
    """A non-linear ε-model with sensible x̂0: the Gaussian oracle plus a t-dependent wiggle."""
    return gaussian_oracle()(x_t, t) + 0.05 * torch.sin(3 * x_t) * (1 + t.reshape(-1, 1, 1, 1) / T)


def _run_diffusers(scheduler, xT, noises=None):
    x = xT.clone()
    for i, t in enumerate(scheduler.timesteps):
        kw = {} if noises is None else {"variance_noise": noises[i]}
        x = scheduler.step(_diffusers_model(x, t.expand(x.shape[0])), t, x, **kw).prev_sample
    return x


def _with_exact_alphas_cumprod(scheduler):
    """Diffusers builds ᾱ by a float32 cumprod (errors ~1e-5 at T-1); give it the float64 ᾱ it would round."""
    scheduler.alphas_cumprod = AC.clone()
    return scheduler


@pytest.mark.slow  # importing diffusers takes seconds; the comparisons themselves take milliseconds
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' np.array(tensor)
@pytest.mark.parametrize("spacing", ["logsnr", "karras", "linspace", "trailing"])
@pytest.mark.parametrize("N", [6, 12, 25])
def test_dpmpp_2m_and_its_sde_match_diffusers(spacing, N):
    from diffusers import DPMSolverMultistepScheduler

    xT = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = space_timesteps(T, spacing, N, alphas_cumprod=AC)
    common = dict(num_train_timesteps=T, trained_betas=BETAS.numpy(), solver_order=2, solver_type="midpoint",
                  lower_order_final=True, final_sigmas_type="zero", prediction_type="epsilon")
    ode = _with_exact_alphas_cumprod(DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **common))
    ode.set_timesteps(timesteps=steps[::-1])
    ours = dpmpp_2m_sample(denoiser(_diffusers_model, clip=False), xT, spacing=steps).x0
    torch.testing.assert_close(ours, _run_diffusers(ode, xT), rtol=1e-5, atol=1e-5)
    # SDE, η = 1: our noise is drawn from the generator in step order, so replay it into diffusers
    sde = _with_exact_alphas_cumprod(DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", **common))
    sde.set_timesteps(timesteps=steps[::-1])
    g = torch.Generator().manual_seed(3)
    noises = [torch.randn(xT.shape, generator=g, dtype=torch.float64) for _ in range(N - 1)] + [xT * 0]
    ours = dpmpp_2m_sde_sample(denoiser(_diffusers_model, clip=False), xT, spacing=steps, eta=1.0,
                               generator=torch.Generator().manual_seed(3)).x0
    torch.testing.assert_close(ours, _run_diffusers(sde, xT, noises), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("spacing", ["trailing", "logsnr"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("N", [5, 12, 25])
def test_unipc_matches_diffusers(spacing, order, N):
    """UniPCMultistepScheduler(bh2, predict_x0): its own trailing spacing, or our logsnr steps set on it."""
    from diffusers import UniPCMultistepScheduler

    xT = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = space_timesteps(T, spacing, N, alphas_cumprod=AC)
    ref = _with_exact_alphas_cumprod(UniPCMultistepScheduler(
        num_train_timesteps=T, trained_betas=BETAS.numpy(), solver_order=order, solver_type="bh2", predict_x0=True,
        lower_order_final=True, final_sigmas_type="zero", timestep_spacing="trailing", prediction_type="epsilon"))
    ref.set_timesteps(N)
    if spacing == "trailing":
        assert ref.timesteps.tolist() == steps[::-1]
    else:  # UniPC's set_timesteps takes no explicit steps: set them and their σ = sqrt((1-ᾱ)/ᾱ), then 0
        ref.timesteps = torch.tensor(steps[::-1])
        sigmas = ((1 - AC[steps[::-1]]) / AC[steps[::-1]]).sqrt()
        ref.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).float()
    ours = unipc_sample(denoiser(_diffusers_model, clip=False), xT, spacing=steps, order=order).x0
    torch.testing.assert_close(ours, _run_diffusers(ref, xT), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize(("order", "N"), [(1, 6), (2, 6), (2, 12), (3, 15), (3, 25)])
def test_deis_logrho_matches_diffusers(order, N):
    """DEISMultistepScheduler (logrho) on our logsnr steps, up to the last level: diffusers then steps to σ at t = 0
    (it cannot reach σ = 0, where its log ρ ends), ours returns x̂0 there as every solver here. (N < 15 keeps
    order 3 out: diffusers lowers the order of its last two steps below 15 steps.)"""
    from diffusers import DEISMultistepScheduler

    xT = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = space_timesteps(T, "logsnr", N, alphas_cumprod=AC)
    ref = _with_exact_alphas_cumprod(DEISMultistepScheduler(
        num_train_timesteps=T, trained_betas=BETAS.numpy(), solver_order=order, algorithm_type="deis",
        solver_type="logrho", lower_order_final=True, prediction_type="epsilon"))
    ref.set_timesteps(N)
    ref.timesteps = torch.tensor(steps[::-1])
    sigmas = ((1 - AC[steps[::-1]]) / AC[steps[::-1]]).sqrt()
    ref.sigmas = torch.cat([sigmas, sigmas[-1:]])
    x = xT.clone()
    for t in ref.timesteps[:-1]:  # every step but the last
        x = ref.step(_diffusers_model(x, t.expand(x.shape[0])), t, x).prev_sample
    ours = deis_logrho_sample(denoiser(_diffusers_model, clip=False), xT, spacing=steps, order=order,
                              record_steps=[steps[0]])
    torch.testing.assert_close(ours.trajectory.x_t[0], x, rtol=1e-5, atol=1e-5)


# --- the SDE's randomness ----------------------------------------------------------------------------------
def test_sde_seeded_and_eta0_is_the_ode():
    d, xT = denoiser(gaussian_oracle()), x_T()
    run = lambda eta, seed: dpmpp_2m_sde_sample(d, xT, num_steps=10, eta=eta,  # noqa: E731
                                                generator=torch.Generator().manual_seed(seed)).x0
    assert torch.equal(run(1.0, 5), run(1.0, 5))
    assert not torch.allclose(run(1.0, 5), run(1.0, 6))
    assert torch.equal(run(0.0, 5), dpmpp_2m_sample(d, xT, num_steps=10).x0)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_sde_samples_have_the_data_mean_and_variance(eta):
    """20,000 draws per dimension of N(μ, s²): mean and variance within 4 standard errors (100 steps)."""
    mu, s, n = torch.tensor([0.4, -0.3], dtype=torch.float64).reshape(1, 2, 1, 1), 0.5, 20_000
    g = torch.Generator().manual_seed(0)
    xT = torch.randn(n, 2, 1, 1, generator=g, dtype=torch.float64)
    x0 = dpmpp_2m_sde_sample(denoiser(gaussian_oracle(mu, s), clip=False), xT, num_steps=100, eta=eta,
                             generator=g).x0
    mean, var = x0.mean(0).flatten(), x0.var(0).flatten()
    assert ((mean - mu.flatten()).abs() < 4 * s / math.sqrt(n)).all(), mean
    assert ((var - s**2).abs() < 4 * s**2 * math.sqrt(2 / (n - 1))).all(), var


# --- the table and the errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("budget", [1, 2, 5, 8])
def test_spec_counts_the_network_calls(name, budget):
    wrapped, calls = counting(gaussian_oracle())
    solve(name, wrapped, x_T(), num_steps=budget, generator=torch.Generator().manual_seed(0))
    spec = SAMPLERS[name]
    assert len(calls) == spec.nfe(budget) <= budget and budget >= spec.fewest_steps
    assert set(spec.spacings) == {"linspace", "trailing", "logsnr", "karras"}


def test_solver_errors_are_one_line():
    d, xT = denoiser(gaussian_oracle()), x_T()
    cases = [  # the functions' own messages (SamplerSpec.check_for words them for the config, test_sampler_spec.py)
        (lambda: dpmpp_2m_sample(d, xT, num_steps=10, spacing="leading"), "must end at index T-1=999 (x_T), got "
                                                                           "[0, 100, 200"),
        (lambda: unipc_sample(d, xT, spacing=[0, 500, 998]), "must end at index T-1=999"),
        (lambda: dpmpp_2m_sample(d, xT, num_steps=0), "in [1, 1000], got 0"),
        (lambda: heun_sample(d, xT, num_steps=2001), "in [1, 1000], got 1001"),  # 2001 calls: 1001 levels
        (lambda: unipc_sample(d, xT, num_steps=4, order=3), "order 3 needs at least 5 steps, got 4"),
        (lambda: unipc_sample(d, xT, num_steps=20, order=4), "must be 1, 2 or 3"),
        (lambda: dpmpp_2m_sde_sample(d, xT, num_steps=10, eta=-0.1), "eta must be >= 0"),
        (lambda: dpmpp_2m_sample(d, xT, num_steps=10, spacing="logsnrr"), "unknown timestep spacing"),
        (lambda: ipndm_sample(d, xT, num_steps=3, order=4), "ipndm order 4 needs at least 4 steps, got 3"),
        (lambda: deis_sample(d, xT, num_steps=20, order=4), "deis order must be one of [1, 2, 3], got 4"),
    ]
    for call, fragment in cases:
        with pytest.raises(UserError) as err:
            call()
        assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_unipc_default_order_adapts_to_the_steps():
    """Order 3 where the steps allow; fewer steps lower it instead of failing (order p needs 2p-1 steps)."""
    d, xT = denoiser(gaussian_oracle()), x_T()
    for n, order in [(1, 1), (3, 2), (4, 2), (5, 3), (20, 3)]:
        torch.testing.assert_close(unipc_sample(d, xT, num_steps=n).x0,
                                   unipc_sample(d, xT, num_steps=n, order=order).x0, rtol=0, atol=0)
    assert not torch.allclose(unipc_sample(d, xT, num_steps=9, order=2).x0, unipc_sample(d, xT, num_steps=9).x0)


@pytest.mark.parametrize("module", ["ddim", "dpmpp", "unipc", "heun", "multistep", "common"])
def test_solvers_import_only_torch_and_the_math(module):
    """diffusers is a test-only reference: the library's solvers import torch, the stdlib, the denoiser contract
    and the samplers' shared module, nothing of any one objective (no DDPM chain, schedule or network)."""
    path = Path(__file__).resolve().parents[1] / f"src/diffusion/core/sampling/{module}.py"
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {n.split(".")[0] for n in names} <= {"math", "collections", "dataclasses", "torch", "diffusion"}, names
    assert {n for n in names if n.startswith("diffusion.")} <= {
        "diffusion.errors", "diffusion.core.denoiser", "diffusion.core.sampling.common"}, names
