"""The deterministic samplers on every objective's denoiser, against the exact probability-flow ODE of Gaussian data.

Data N(μ, s²I) has the exact denoiser D(x̃; σ) = μ + s²/(s² + σ²)(x̃ − μ) in the VE frame x̃ = x0 + σ ε. An objective
holds x = α x̃ (β = α σ), where it reads D(x; α, β) = μ + s² α (x − α μ)/(α² s² + β²), finite at flow's t = 1 (α = 0).
Each objective's test network below is written so that its denoiser returns exactly that D: DDPM's ε-network
ε = (x − α D)/β at step t, EDM's F = (D − c_skip x)/c_out with x rebuilt from the c_in-scaled input (Karras et al.
2022, Table 1, recomputed here), flow's velocity v = (x − D)/t. The PF-ODE keeps ξ = (x − α μ)/sqrt(α² s² + β²)
fixed, so a sampler that starts from x_T at the grid's first level and ends with x̂0 = D at its last level σ_min
should return μ + s² ξ/sqrt(s² + σ_min²) exactly; its error falls with the number of levels at the solver's order.
"""

import math

import numpy as np
import pytest
import torch

from diffusion.core.gaussian import GaussianDiffusion
from diffusion.core.sampling import (
    SAMPLERS,
    SamplerSpec,
    ddim_sample,
    deis_logrho_sample,
    deis_sample,
    dpmpp_2m_sample,
    euler_sample,
    heun_sample,
    ipndm_sample,
    unipc_sample,
)
from diffusion.core.schedules import space_timesteps
from diffusion.errors import UserError
from helpers import ddpm, edm, flow, paper_betas

T = 1000
BETAS = paper_betas(T)
AC = torch.from_numpy(np.cumprod(1 - BETAS.numpy()))  # ᾱ_t by numpy
MU, S = torch.tensor([0.3, -0.5, 0.1, 0.7], dtype=torch.float64).reshape(1, 1, 2, 2), 0.5
SIGMA_DATA = 0.5
END = 30  # DDPM's grids stop at step 30: below it integer steps are coarse in λ whatever the count (test_solvers)


def gaussian_x0(x, alpha, beta, mu=MU, s=S):
    """E[x0 | x] for x = α x0 + β ε, x0 ~ N(μ, s²I): the exact denoiser in the objective's own frame."""
    return mu + s**2 * alpha * (x - alpha * mu) / (alpha**2 * s**2 + beta**2)


def ddpm_network(mu=MU, s=S):
    """The ε-network whose x̂0 at step t (α = sqrt(ᾱ_t), β = sqrt(1 − ᾱ_t), ᾱ by numpy) is the exact one."""

    def net(x, t):
        assert t.dtype == torch.int64
        a = AC[t].reshape(-1, 1, 1, 1).to(x.dtype)
        alpha, beta = a.sqrt(), (1 - a).sqrt()
        return (x - alpha * gaussian_x0(x, alpha, beta, mu, s)) / beta

    return net


def edm_network(sigma_data=SIGMA_DATA, mu=MU, s=S):
    """F(c_in x; c_noise) with c_skip x + c_out F = the exact x̂0: σ = exp(4 c_noise), x = x_in sqrt(σ² + σ_d²)."""

    def net(x_in, c_noise):
        sigma = torch.exp(4 * c_noise.to(torch.float64)).reshape(-1, 1, 1, 1).to(x_in.dtype)
        x = x_in * (sigma**2 + sigma_data**2).sqrt()
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
        return (gaussian_x0(x, 1.0, sigma, mu, s) - c_skip * x) / c_out

    return net


def flow_network(mu=MU, s=S):
    """The velocity v(x, 1000 t) with x − t v = the exact x̂0 (α = 1 − t, β = t)."""

    def net(x, time):
        t = (time.to(torch.float64) / 1000).reshape(-1, 1, 1, 1).to(x.dtype)
        return (x - gaussian_x0(x, 1 - t, t, mu, s)) / t

    return net


def ddpm_objective():
    """DDPM with the paper's T = 1000 linear betas, its chain's coefficients in float64."""
    objective = ddpm(BETAS)
    objective.diffusion = GaussianDiffusion(BETAS, "eps", "fixed_large", dtype=torch.float64)
    return objective


OBJECTIVES = {"ddpm": (ddpm_objective, ddpm_network), "edm": (lambda: edm(sigma_data=SIGMA_DATA), edm_network),
              "flow": (flow, flow_network)}


def exact_denoiser(name, mu=MU, s=S):
    """The objective `name` and the (unclipped) denoiser of its test network for the data N(μ, s²I)."""
    make_objective, make_network = OBJECTIVES[name]
    objective = make_objective()
    return objective, objective.denoiser(make_network(mu=mu, s=s), clip=False)


def exact_endpoint(grid, x_T):
    """x̂0 = D at the grid's last level σ_min of the exact ODE solution from x_T at its first level:
    μ + s² ξ/sqrt(s² + σ_min²)."""
    a, b = grid.alpha[0], grid.beta[0]
    xi = (x_T - a * MU) / math.sqrt(a**2 * S**2 + b**2)
    return MU + S**2 * xi / math.sqrt(S**2 + grid.sigma[-2] ** 2)


def x_T_for(grid, n=16, seed=0):
    """x_T ~ N(0, prior_std² I) at the grid's first level (float64)."""
    z = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return grid.prior_std * z


RUN = {  # (denoiser, x_T, spacing, levels) -> samples; heun makes 2N − 1 calls on N levels
    "euler": lambda d, x, spacing, n: euler_sample(d, x, num_steps=n, spacing=spacing).x0,
    "heun": lambda d, x, spacing, n: heun_sample(d, x, num_steps=2 * n - 1, spacing=spacing).x0,
    "dpmpp_2m": lambda d, x, spacing, n: dpmpp_2m_sample(d, x, num_steps=n, spacing=spacing).x0,
    "unipc": lambda d, x, spacing, n: unipc_sample(d, x, num_steps=n, spacing=spacing, order=3).x0,
    "ipndm": lambda d, x, spacing, n: ipndm_sample(d, x, num_steps=n, spacing=spacing, order=4).x0,
    "deis": lambda d, x, spacing, n: deis_sample(d, x, num_steps=n, spacing=spacing, order=3).x0,
    "deis_logrho": lambda d, x, spacing, n: deis_logrho_sample(d, x, num_steps=n, spacing=spacing, order=3).x0,
}


def ddpm_steps(spacing, n):
    """n of DDPM's trained steps from T − 1 down to END, by the spacing's rule on the truncated schedule."""
    return [k + END for k in space_timesteps(T - END, spacing, n, alphas_cumprod=AC[END:])]


def sample_error(objective_name, sampler, spacing, n):
    """RMS error of the sampler's output against the exact endpoint, on n levels of the spacing (float64)."""
    _, d = exact_denoiser(objective_name)
    if objective_name == "ddpm":
        spacing = ddpm_steps(spacing, n)
    grid = d.grid(spacing, n, from_top=True)
    x_T = x_T_for(grid)
    x0 = RUN[sampler](d, x_T, spacing, n)
    assert x0.dtype == torch.float64 and torch.isfinite(x0).all()
    return (x0 - exact_endpoint(grid, x_T)).pow(2).mean().sqrt().item()


def slope(counts, errors):
    """The order: minus the slope of log error against log levels (least squares)."""
    return -np.polyfit(np.log(counts), np.log(errors), 1)[0]


# Level counts where the error is in its asymptotic regime: the slopes between neighbouring counts are within 0.1 of
# the fitted one (measured), but for DDPM's UniPC, whose integer steps jitter the grid (3.6 then 3.2), and flow's
# UniPC on logsnr (3.6 then 3.9, still rising towards 4). Spacings: each objective's default for the sampler (EDM:
# karras for all; flow: linspace from t = 1 for euler, karras for heun, logsnr for the multistep solvers, and
# linspace for dpmpp_2m too); DDPM's grids end at step 30 (above). The fitted slope measured is in each comment.
CASES = [  # objective, sampler, spacing, level counts, lowest and highest slope accepted (measured)
    ("ddpm", "euler", "logsnr", (32, 64, 128), 0.9, 1.1),  # 1.00
    ("ddpm", "heun", "karras", (32, 64, 128), 1.8, 2.4),  # 2.07
    ("ddpm", "dpmpp_2m", "logsnr", (32, 64, 128), 1.8, 2.4),  # 1.90
    ("ddpm", "unipc", "logsnr", (32, 64, 128), 2.5, 4.5),  # 3.41
    ("edm", "euler", "karras", (32, 64, 128), 0.9, 1.1),  # 0.99
    ("edm", "heun", "karras", (32, 64, 128), 1.8, 2.4),  # 2.07
    ("edm", "dpmpp_2m", "karras", (32, 64, 128), 1.8, 2.4),  # 2.12
    ("edm", "unipc", "karras", (32, 64, 128), 3.5, 4.5),  # 4.06
    ("flow", "euler", "linspace", (32, 64, 128), 0.9, 1.1),  # 1.00
    ("flow", "heun", "karras", (32, 64, 128), 1.8, 2.4),  # 2.07
    ("flow", "dpmpp_2m", "logsnr", (32, 64, 128), 1.8, 2.4),  # 2.00
    ("flow", "dpmpp_2m", "linspace", (32, 64, 128), 1.8, 2.4),  # 2.20
    ("flow", "unipc", "logsnr", (64, 128, 256), 3.5, 4.5),  # 3.74
    ("ddpm", "deis", "logsnr", (32, 64, 128), 2.5, 3.2),  # 2.83
    ("edm", "ipndm", "karras", (32, 64, 128), 1.8, 2.6),  # 2.13: fixed weights on uneven steps
    ("edm", "deis", "karras", (32, 64, 128), 2.5, 3.2),  # 2.78
    ("flow", "ipndm", "karras", (32, 64, 128), 1.8, 2.6),  # 2.13
    ("flow", "deis", "karras", (32, 64, 128), 2.5, 3.2),  # 2.78
    ("ddpm", "deis_logrho", "logsnr", (32, 64, 128), 2.5, 3.2),
    ("edm", "deis_logrho", "karras", (32, 64, 128), 2.5, 3.2),  # 2.74 (logsnr: 3.9, 3.6 at 128-512, still falling)
    ("flow", "deis_logrho", "karras", (32, 64, 128), 2.5, 3.2),  # 2.73
]


@pytest.mark.parametrize("objective_name, sampler, spacing, counts, low, high", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_error_falls_with_the_solver_order_on_every_objective(objective_name, sampler, spacing, counts, low, high):
    """Euler 1, Heun and DPM-Solver++(2M) 2, UniPC-3 with its corrector 4 (about 3 on DDPM's rounded steps)."""
    errors = [sample_error(objective_name, sampler, spacing, n) for n in counts]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert low <= slope(counts, errors) <= high, (slope(counts, errors), errors)


@pytest.mark.parametrize("objective_name", list(OBJECTIVES))
def test_the_samplers_agree_with_the_exact_endpoint_to_their_accuracy(objective_name):
    """At 64 levels every deterministic sampler lands near the exact answer, the higher orders nearer."""
    spacing = {"ddpm": "logsnr", "edm": "karras", "flow": "karras"}[objective_name]
    errors = {name: sample_error(objective_name, name, spacing, 64) for name in RUN}
    assert errors["unipc"] < 1e-3 and max(errors["heun"], errors["dpmpp_2m"]) < 1e-2 and errors["euler"] < 5e-2
    assert errors["unipc"] < min(errors["heun"], errors["dpmpp_2m"]) < errors["euler"], errors


@pytest.mark.parametrize("objective_name", list(OBJECTIVES))
def test_euler_is_ddim_with_eta_0(objective_name):
    _, d = exact_denoiser(objective_name)
    spacing = ddpm_steps("logsnr", 10) if objective_name == "ddpm" else "karras"
    x_T = x_T_for(d.grid(spacing, 10))
    assert torch.equal(euler_sample(d, x_T, num_steps=10, spacing=spacing).x0,
                       ddim_sample(d, x_T, num_steps=10, spacing=spacing, eta=0.0).x0)


@pytest.mark.parametrize("sampler, tol", [("euler", 3e-2), ("dpmpp_2m", 6e-3)])  # measured: 0.023, 0.0043
def test_flow_linspace_from_t1_works_with_euler_and_dpmpp_2m(sampler, tol):
    """flow's linspace grid starts at t = 1 (σ = ∞, α = 0, β = 1): the first-order steps take its limit."""
    objective, d = exact_denoiser("flow")
    grid = d.grid("linspace", 100, from_top=True)
    assert grid.sigma[0] == math.inf and (grid.alpha[0], grid.beta[0], grid.prior_std) == (0.0, 1.0, 1.0)
    x_T = x_T_for(grid)
    x0 = RUN[sampler](d, x_T, "linspace", 100)
    assert torch.isfinite(x0).all()
    assert (x0 - exact_endpoint(grid, x_T)).abs().max() < tol
    # the spec allows them there: the objective's own sampler is euler on linspace
    assert SamplerSpec(sampler, spacing="linspace").check_for(objective).spacing == "linspace"


@pytest.mark.parametrize("sampler", ["heun", "unipc", "ipndm", "deis", "deis_logrho"])
def test_heun_and_unipc_refuse_flows_linspace_grid_in_one_line(sampler):
    objective, d = exact_denoiser("flow")
    x_T = x_T_for(d.grid("linspace", 10))
    for call in (lambda: RUN[sampler](d, x_T, "linspace", 10),
                 lambda: SamplerSpec(sampler, steps=10, spacing="linspace").check_for(objective)):
        with pytest.raises(UserError) as err:
            call()
        message = str(err.value)
        assert f"sampler.name={sampler} cannot start at σ = ∞" in message and "\n" not in message, message
    # from σ_max (karras, logsnr) they run
    assert torch.isfinite(RUN[sampler](d, x_T_for(d.grid("karras", 10)), "karras", 10)).all()


@pytest.mark.parametrize("objective_name", ["edm", "flow"])
@pytest.mark.parametrize("sampler", [name for name, kind in SAMPLERS.items() if kind.markov_chain])
def test_ancestral_samplers_are_refused_for_continuous_objectives(objective_name, sampler):
    objective = OBJECTIVES[objective_name][0]()
    assert not objective.markov_chain and ddpm_objective().markov_chain
    with pytest.raises(UserError) as err:
        SamplerSpec(sampler).check_for(objective)
    message = str(err.value)
    assert f"sampler.name={sampler} walks DDPM's Markov chain" in message and "\n" not in message, message
    assert f"objective={objective_name} has none" in message
    assert SamplerSpec(sampler).check_for(ddpm_objective()).name == sampler  # DDPM has the chain


# the network's noise input is float32 (EDM's c_noise, flow's 1000 t), which the test networks invert: σ is known to
# float32's precision there, and their x̂0 to about 1e-8; DDPM's integer steps are exact
PREMISE_ATOL = {"ddpm": 1e-12, "edm": 2e-8, "flow": 2e-7}


@pytest.mark.parametrize("objective_name", list(OBJECTIVES))
def test_the_test_networks_give_the_exact_denoiser(objective_name):
    """The premise: each objective's denoiser of its test network is D in its frame, at every level of its grids."""
    _, d = exact_denoiser(objective_name)
    z = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for spacing in d.objective.spacings:
        grid = d.grid(spacing, 12)
        for sigma, alpha, beta in zip(grid.sigma[:-1], grid.alpha[:-1], grid.beta[:-1], strict=True):
            x = alpha * MU + math.sqrt(alpha**2 * S**2 + beta**2) * z  # x as the data's marginal at σ draws it
            atol = PREMISE_ATOL[objective_name]
            torch.testing.assert_close(d(x, sigma), gaussian_x0(x, alpha, beta), rtol=0, atol=atol)
            if math.isfinite(sigma):  # the VE frame's D at x̃ = x/α
                expected = MU + S**2 / (S**2 + sigma**2) * (x / alpha - MU)
                torch.testing.assert_close(d(x, sigma), expected, rtol=0, atol=atol)
