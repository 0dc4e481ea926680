"""The variational bound: Gaussian KLs, the discretized decoder, L_T, and the oracle's zero terms."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from diffusion.core.gaussian import GaussianDiffusion
from diffusion.core.likelihood import (
    discretized_gaussian_log_likelihood,
    normal_kl,
    prior_kl,
    variational_bound,
    vb_terms,
)
from helpers import paper_betas

BINS = torch.linspace(-1, 1, 256, dtype=torch.float64)  # the 256 values of 8-bit data in [-1, 1]


def test_normal_kl_closed_form(gen):
    m1, m2, lv1, lv2 = torch.randn(4, 100, generator=gen, dtype=torch.float64)
    s1, s2 = np.exp(0.5 * lv1.numpy()), np.exp(0.5 * lv2.numpy())
    expected = np.log(s2 / s1) + (s1**2 + (m1.numpy() - m2.numpy()) ** 2) / (2 * s2**2) - 0.5
    np.testing.assert_allclose(normal_kl(m1, lv1, m2, lv2).numpy(), expected, rtol=1e-12, atol=1e-14)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-15


@pytest.mark.parametrize("mean, log_scale", [(0.0, -3.0), (0.3, -6.0), (-0.99, -1.0), (0.999, -9.0), (5.0, 0.5)])
def test_decoder_bins_sum_to_one(mean, log_scale):
    log_p = discretized_gaussian_log_likelihood(
        BINS, torch.full_like(BINS, mean), torch.full_like(BINS, log_scale)
    )
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-10)


def test_decoder_matches_scipy_bin_masses():
    mean, scale = 0.1, 0.05
    log_p = discretized_gaussian_log_likelihood(
        BINS, torch.full_like(BINS, mean), torch.full_like(BINS, math.log(scale))
    ).numpy()
    x = BINS.numpy()
    upper = np.where(x > 0.999, np.inf, x + 1 / 255)
    lower = np.where(x < -0.999, -np.inf, x - 1 / 255)
    # each bin's mass from the tail where it does not cancel (scipy's cdf and sf, independent of torch)
    expected = np.where(lower > mean, norm.sf(lower, mean, scale) - norm.sf(upper, mean, scale),
                        norm.cdf(upper, mean, scale) - norm.cdf(lower, mean, scale))
    big = expected > 1e-10
    np.testing.assert_allclose(np.exp(log_p[big]), expected[big], rtol=1e-9)


def test_prior_kl_closed_form():
    d = GaussianDiffusion(paper_betas(1000), "eps", "fixed_large", dtype=torch.float64)
    x0 = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 1, 2, 2)
    a = np.prod(1 - paper_betas(1000).numpy())
    per_dim = 0.5 * (-np.log(1 - a) + (1 - a) + a * x0.numpy() ** 2 - 1)
    np.testing.assert_allclose(prior_kl(d, x0).numpy(), per_dim.reshape(3, -1).sum(1), rtol=1e-10)
    # The paper keeps L_T near 1e-5 bits/dim for its schedule.
    bpd = prior_kl(d, x0).numpy() / (4 * math.log(2))
    assert (bpd < 1e-4).all()


def test_oracle_model_has_zero_kl_terms(gen):
    """A model that outputs the true x0 with σ² = β̃ matches q(x_{t-1}|x_t,x0) exactly: L_{t-1} = 0."""
    d = GaussianDiffusion(paper_betas(100), parameterization="x0", variance="fixed_small",
                          dtype=torch.float64)
    x0 = BINS[torch.randint(0, 256, (8, 1, 4, 4), generator=gen)]
    t = torch.arange(1, 100, 12)[:8]
    x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=gen, dtype=torch.float64))
    terms = vb_terms(d, x0, x0, x_t, t)
    assert terms.nats.abs().max().item() < 1e-10
    # At t = 0 the term is the decoder's NLL, which is positive for a non-degenerate decoder.
    t0 = torch.zeros(8, dtype=torch.long)
    assert (vb_terms(d, x0, x0, d.q_sample(x0, t0, torch.randn_like(x0)), t0).nats > 0).all()


def test_variational_bound_assembles_terms(gen):
    d = GaussianDiffusion(paper_betas(20), parameterization="x0", variance="fixed_small",
                          dtype=torch.float64)
    x0 = BINS[torch.randint(0, 256, (3, 1, 2, 2), generator=gen)]
    out = variational_bound(lambda x_t, t: x0, d, x0, generator=gen)
    assert out.terms_nats.shape == (3, 20) and out.x0_mse.shape == (3, 20)
    assert out.terms_nats[:, 1:].abs().max() < 1e-10  # the oracle's KL terms
    dims = 4
    expected = (out.terms_nats.sum(1) + prior_kl(d, x0)) / (dims * math.log(2))
    torch.testing.assert_close(out.total_bpd, expected, rtol=1e-12, atol=0)
