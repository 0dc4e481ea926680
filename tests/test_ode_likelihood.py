"""Log-likelihood through the probability-flow ODE (core/ode_likelihood.py) on Gaussian data, every objective.

Data N(μ, s²I) has the exact denoiser (test_objective_samplers.py builds each objective's network for it), and its
noisy marginal at σ is N(μ, (s² + σ²)I). The ODE maps x at the smallest level σ_min of the objective's logsnr grid
deterministically to x̃_T = μ + sqrt((s² + σ_max²)/(s² + σ_min²))(x − μ) at the largest, σ_max, where the code
evaluates the objective's prior N(0, v_T I), v_T = (prior_std/α_T)², instead of the true marginal
N(μ, (s² + σ_max²)I). So the exact value it approximates is

    log N(x; μ, (s² + σ_min²)I) + log N(x̃_T; 0, v_T I) − log N(x̃_T; μ, (s² + σ_max²)I),

the last two terms the prior's correction, computed here exactly (up to 0.005 nats per image on DDPM, 0.010 on EDM
and flow for these μ, s, σ_max: more than twice the tolerance, so leaving it out would fail). What is left is Heun's
error: on 800 levels at most 2e-3 nats per image is allowed (d = 4; measured 7.7e-4 DDPM, 9.6e-4 EDM, 1.1e-3 flow,
falling 4x per doubling of the levels), almost all of it in x̃_T; the divergence integral alone, log p − prior =
(d/2) ln((s² + σ_max²)/(s² + σ_min²)), is within 3e-4 (DDPM, measured 2.0e-4: its levels are rounded to trained
steps) and 1e-7 (EDM, flow, measured 3e-9: their networks' float32 noise input).
"""

import math

import pytest
import torch

from diffusion.core.ode_likelihood import BIN_WIDTH, ode_bits_per_dim, ode_log_likelihood
from test_objective_samplers import OBJECTIVES, exact_denoiser

MU = torch.tensor([0.3, -0.5, 0.1, 0.7], dtype=torch.float64).reshape(1, 1, 2, 2)
S = 0.5
D = 4  # dimensions per image
LEVELS = 800
TOL_LOGP = 2e-3  # nats per image: Heun's error on 800 levels (module docstring)
TOL_DIVERGENCE = {"ddpm": 3e-4, "edm": 1e-7, "flow": 1e-7}


def log_normal(x, mean, var):
    """log N(x; mean, var·I) per image, in nats."""
    return -0.5 * (((x - mean) ** 2).flatten(1).sum(1) / var + D * math.log(2 * math.pi * var))


def marginal_draws(sigma, n=6, seed=0):
    """n images from the data's marginal at σ, N(μ, (s² + σ²)I), in the VE frame (float64)."""
    z = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return MU + math.sqrt(S**2 + sigma**2) * z


@pytest.fixture(scope="module")
def results():
    """For each objective and trace: (x, exact value, its divergence part, log p, prior, NFE, the grid)."""
    out = {}
    for name in OBJECTIVES:
        _, d = exact_denoiser(name, mu=MU, s=S)
        grid = d.grid("logsnr", LEVELS)
        sigma_min, sigma_max = grid.sigma[-2], grid.sigma[0]
        x = marginal_draws(sigma_min)
        x_T = MU + math.sqrt((S**2 + sigma_max**2) / (S**2 + sigma_min**2)) * (x - MU)
        v_T = (grid.prior_std / grid.alpha[0]) ** 2
        correction = log_normal(x_T, 0.0, v_T) - log_normal(x_T, MU, S**2 + sigma_max**2)
        exact = log_normal(x, MU, S**2 + sigma_min**2) + correction
        divergence = D / 2 * math.log((S**2 + sigma_max**2) / (S**2 + sigma_min**2))
        for trace in ("exact", "hutchinson"):
            logp, prior, nfe = ode_log_likelihood(d, x, LEVELS, trace, torch.Generator().manual_seed(1))
            out[name, trace] = dict(x=x, exact=exact, correction=correction, divergence=divergence, logp=logp,
                                    prior=prior, prior_exact=log_normal(x_T, 0.0, v_T), nfe=nfe)
    return out


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_log_likelihood_of_gaussian_data_is_the_exact_marginal(results, name, trace):
    r = results[name, trace]
    assert r["logp"].dtype == torch.float64 and r["logp"].shape == (6,)
    assert (r["logp"] - r["exact"]).abs().max() < TOL_LOGP, (r["logp"] - r["exact"])
    assert r["correction"].abs().max() > 2 * TOL_LOGP  # the prior's correction is needed to pass
    assert (r["prior"] - r["prior_exact"]).abs().max() < TOL_LOGP  # the ODE's end point is the exact map's
    assert (r["logp"] - r["prior"] - r["divergence"]).abs().max() < TOL_DIVERGENCE[name]
    assert r["nfe"] == 2 * (LEVELS - 1)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_hutchinson_is_exact_for_an_isotropic_linear_denoiser(results, name):
    """Rademacher probes v give vᵀ(cI)v = c d exactly: the estimate equals the exact trace's result."""
    exact, hutchinson = results[name, "exact"], results[name, "hutchinson"]
    torch.testing.assert_close(hutchinson["logp"], exact["logp"], rtol=0, atol=1e-10)


def test_the_error_is_heuns():
    """Halving the levels' spacing in ln σ quarters the error (second order): on EDM, 100 and 200 levels."""
    _, d = exact_denoiser("edm", mu=MU, s=S)
    errors = []
    for levels in (100, 200):
        grid = d.grid("logsnr", levels)
        sigma_min, sigma_max = grid.sigma[-2], grid.sigma[0]
        x = marginal_draws(sigma_min)
        x_T = MU + math.sqrt((S**2 + sigma_max**2) / (S**2 + sigma_min**2)) * (x - MU)
        v_T = (grid.prior_std / grid.alpha[0]) ** 2  # σ_max²
        exact = (log_normal(x, MU, S**2 + sigma_min**2) + log_normal(x_T, 0.0, v_T)
                 - log_normal(x_T, MU, S**2 + sigma_max**2))
        logp, _, _ = ode_log_likelihood(d, x, levels, "hutchinson", torch.Generator().manual_seed(0))
        errors.append((logp - exact).abs().max().item())
    assert 3.5 < errors[0] / errors[1] < 4.5, errors


def eight_bit(n=5, seed=3):
    """Images on the 256-level grid in [-1, 1]."""
    levels = torch.randint(0, 256, (n, 1, 2, 2), generator=torch.Generator().manual_seed(seed))
    return (levels.to(torch.float64) / 127.5 - 1).clamp(-1, 1)


def test_bits_per_dim_dequantizes_with_the_generator_and_adds_log2_127_5():
    """bits/dim = −log p(x + u·2/255)/(d ln 2) + log2(127.5), u ~ U(−½, ½)^d from the generator given."""
    _, d = exact_denoiser("edm", mu=MU, s=S)
    x0, levels = eight_bit(), 40
    assert BIN_WIDTH == 2 / 255 and math.log2(1 / BIN_WIDTH) == pytest.approx(math.log2(127.5), rel=1e-15)
    out = ode_bits_per_dim(d, x0, levels, "exact", torch.Generator().manual_seed(11))
    u = torch.rand(x0.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64) - 0.5
    logp, prior, nfe = ode_log_likelihood(d, x0 + u * 2 / 255, levels, "exact")
    torch.testing.assert_close(out.nll_nats, -logp, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.bpd, -logp / (D * math.log(2)) + math.log2(127.5), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.prior_bpd, -prior / (D * math.log(2)), rtol=0, atol=1e-12)
    assert out.nfe == nfe == 2 * (levels - 1)
    # the dequantization noise is the generator's: the same seed gives the same bits, another seed other bits
    again = ode_bits_per_dim(d, x0, levels, "exact", torch.Generator().manual_seed(11))
    other = ode_bits_per_dim(d, x0, levels, "exact", torch.Generator().manual_seed(12))
    assert torch.equal(again.bpd, out.bpd) and (other.bpd - out.bpd).abs().min() > 1e-6
    # and not the data alone: without noise (u = 0) the value differs
    bare, _, _ = ode_log_likelihood(d, x0, levels, "exact")
    assert not torch.allclose(bare, logp, rtol=0, atol=1e-6)
