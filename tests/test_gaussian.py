"""Forward process, posterior and parameterizations against formulas recomputed in numpy (float64)."""

import numpy as np
import pytest
import torch

from diffusion.core.gaussian import GaussianDiffusion
from diffusion.core.schedules import cosine_beta_schedule
from diffusion.errors import UserError
from helpers import paper_betas

T = 1000


def cosine_schedule(num_timesteps):
    return cosine_beta_schedule(num_timesteps, s=0.008, max_beta=0.999)


def reference_arrays(betas: np.ndarray):
    """ᾱ_t and ᾱ_{t-1} by an explicit loop, independent of the code under test."""
    ac, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        ac.append(prod)
    ac = np.array(ac)
    return ac, np.concatenate([[1.0], ac[:-1]])


@pytest.fixture
def diffusion64():
    return GaussianDiffusion(paper_betas(T), "eps", "fixed_large", dtype=torch.float64)


def test_q_sample_moments(gen):
    d = GaussianDiffusion(paper_betas(T), "eps", "fixed_large", dtype=torch.float64)
    ac, _ = reference_arrays(paper_betas(T).numpy())
    for step in (0, 100, 500, 999):
        x0 = torch.full((200_000,), 0.7, dtype=torch.float64)
        t = torch.full((200_000,), step, dtype=torch.long)
        x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=gen, dtype=torch.float64))
        mean, var = np.sqrt(ac[step]) * 0.7, 1.0 - ac[step]
        se_mean = np.sqrt(var / x0.numel())
        se_var = var * np.sqrt(2.0 / x0.numel())
        assert abs(x_t.mean().item() - mean) < 4 * se_mean
        assert abs(x_t.var().item() - var) < 4 * se_var


def test_posterior_matches_gaussian_product(diffusion64, gen):
    betas = paper_betas(T).numpy()
    ac, ac_prev = reference_arrays(betas)
    x0 = torch.randn(6, 3, dtype=torch.float64, generator=gen)
    x_t = torch.randn(6, 3, dtype=torch.float64, generator=gen)
    t = torch.tensor([1, 2, 10, 500, 998, 999])
    mean, var, log_var = diffusion64.q_posterior_mean_variance(x0, x_t, t)
    for row, step in enumerate(t.tolist()):
        # q(x_t | x_{t-1}) q(x_{t-1} | x_0) as a Gaussian in x_{t-1}: precisions add, means weight.
        alpha = 1.0 - betas[step]
        precision = alpha / betas[step] + 1.0 / (1.0 - ac_prev[step])
        expected_mean = (np.sqrt(alpha) * x_t[row].numpy() / betas[step]
                         + np.sqrt(ac_prev[step]) * x0[row].numpy() / (1.0 - ac_prev[step])) / precision
        np.testing.assert_allclose(mean[row].numpy(), expected_mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(var[row].numpy(), 1.0 / precision, rtol=1e-10)
        np.testing.assert_allclose(log_var[row].numpy(), np.log(1.0 / precision), rtol=1e-10)


def test_posterior_at_first_step_is_x0_with_clipped_log_variance(diffusion64):
    x0, x_t = torch.ones(2, 4, dtype=torch.float64), torch.full((2, 4), 5.0, dtype=torch.float64)
    mean, var, log_var = diffusion64.q_posterior_mean_variance(x0, x_t, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(mean, x0, rtol=0, atol=1e-15)
    assert (var == 0).all()
    # The paper's code clips log β̃ at the first step to log β̃ of the second.
    assert log_var[0, 0].item() == pytest.approx(np.log(diffusion64.posterior_variance[1].item()), rel=1e-14)


def test_beta_tilde_identity(diffusion64):
    betas = paper_betas(T).numpy()
    ac, ac_prev = reference_arrays(betas)
    np.testing.assert_allclose(diffusion64.posterior_variance.numpy(), (1 - ac_prev) / (1 - ac) * betas,
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("schedule", [paper_betas, cosine_schedule])
def test_conversions_round_trip(schedule, gen):
    d = GaussianDiffusion(schedule(T), "eps", "fixed_large", dtype=torch.float64)
    t = torch.arange(0, T - 1, 7)  # skip the cosine's clipped last step (ᾱ ≈ 0 there)
    x0 = torch.rand(len(t), 3, 4, 4, dtype=torch.float64, generator=gen) * 2 - 1
    eps = torch.randn(x0.shape, dtype=torch.float64, generator=gen)
    x_t = d.q_sample(x0, t, eps)
    torch.testing.assert_close(d.predict_x0_from_eps(x_t, t, eps), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(d.predict_eps_from_x0(x_t, t, x0), eps, rtol=0, atol=1e-12)
    v = d.v_from_x0_eps(x0, eps, t)
    torch.testing.assert_close(d.predict_x0_from_v(x_t, t, v), x0, rtol=0, atol=1e-12)
    # μ̃ = coef1·x0 + coef2·x_t with coef1 ~ 1e-4 at large t: recovering x0 from μ̃ divides μ̃'s own
    # rounding by coef1, so the round trip is exact to 1e-12 in μ̃'s scale, i.e. coef1·(x̂0 - x0).
    mean = d.q_posterior_mean_variance(x0, x_t, t)[0]
    coef1 = d.posterior_mean_coef1[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(coef1 * d.predict_x0_from_mean(x_t, t, mean), coef1 * x0, rtol=0, atol=1e-12)
    # Every parameterization's training target maps back to x0 through predict_x0.
    for p in ("eps", "x0", "v"):
        dp = GaussianDiffusion(schedule(T), parameterization=p, variance="fixed_large", dtype=torch.float64)
        target = dp.training_target(x0, x_t, t, eps)
        torch.testing.assert_close(dp.predict_x0(target, x_t, t), x0, rtol=0, atol=1e-12)


def test_v_definition(diffusion64, gen):
    x0 = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 3, 99, 500, 999])
    ac, _ = reference_arrays(paper_betas(T).numpy())
    expected = np.sqrt(ac[t.numpy()])[:, None] * eps.numpy() - np.sqrt(1 - ac[t.numpy()])[:, None] * x0.numpy()
    np.testing.assert_allclose(diffusion64.v_from_x0_eps(x0, eps, t).numpy(), expected, rtol=1e-12, atol=1e-14)


def test_eq11_mean_equals_eq7_mean_with_predicted_x0(diffusion64, gen):
    betas = paper_betas(T).numpy()
    ac, _ = reference_arrays(betas)
    t = torch.tensor([0, 1, 50, 999])
    x_t = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    eps = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    p = diffusion64.p_mean_variance(eps, x_t, t, clip_denoised=False)
    b, a = betas[t.numpy()][:, None], ac[t.numpy()][:, None]
    eq11 = (x_t.numpy() - b / np.sqrt(1 - a) * eps.numpy()) / np.sqrt(1 - b)
    np.testing.assert_allclose(p.mean.numpy(), eq11, rtol=1e-10, atol=1e-12)


def test_fixed_and_learned_variances(gen):
    betas = paper_betas(T)
    x = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 1, 999])
    large = GaussianDiffusion(betas, "eps", variance="fixed_large", dtype=torch.float64)
    small = GaussianDiffusion(betas, "eps", variance="fixed_small", dtype=torch.float64)
    learned = GaussianDiffusion(betas, "eps", variance="learned_range", dtype=torch.float64)
    beta_tilde = small.posterior_variance.numpy()
    lv = large.p_mean_variance(x, x, t).variance[:, 0, 0, 0].numpy()
    np.testing.assert_allclose(lv, [beta_tilde[1], betas[1], betas[999]], rtol=1e-12)  # σ²=β, β̃ at the first step
    sv = small.p_mean_variance(x, x, t).variance[:, 0, 0, 0].numpy()
    np.testing.assert_allclose(sv, [beta_tilde[1], beta_tilde[1], beta_tilde[999]], rtol=1e-12)
    for v_out, expected in ((1.0, np.log(betas[t].numpy())), (-1.0, np.log(sv))):
        out = torch.cat([x, torch.full_like(x, v_out)], dim=1)  # learned variance doubles the channels
        got = learned.p_mean_variance(out, x, t).log_variance[:, 0, 0, 0].numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    out = torch.cat([x, torch.zeros_like(x)], dim=1)  # halfway, Nichol & Dhariwal Eq. 15 with v = 0.5
    got = learned.p_mean_variance(out, x, t).log_variance[:, 0, 0, 0].numpy()
    np.testing.assert_allclose(got, 0.5 * np.log(betas[t].numpy()) + 0.5 * np.log(sv), rtol=1e-12)


def test_float32_buffers_are_float64_rounded_once():
    betas = paper_betas(T)
    d32 = GaussianDiffusion(betas, "eps", "fixed_large")  # float32 by default
    d64 = GaussianDiffusion(betas, "eps", "fixed_large", dtype=torch.float64)
    ac64, _ = reference_arrays(betas.numpy())
    # The float32 buffer equals the float64 value rounded once, not a float32 cumprod (which drifts).
    assert torch.equal(d32.alphas_cumprod, torch.from_numpy(ac64).float())
    float32_cumprod = torch.cumprod(1 - betas.float(), 0)
    assert not torch.equal(d32.alphas_cumprod, float32_cumprod)
    for name, buf in d64.named_buffers():
        assert torch.equal(getattr(d32, name), buf.float()), name


def test_buffers_are_not_parameters_nor_saved():
    d = GaussianDiffusion(paper_betas(10), "eps", "fixed_large")
    assert list(d.parameters()) == [] and d.state_dict() == {}


def test_bad_choices_and_timesteps(diffusion64):
    with pytest.raises(UserError, match="parameterization must be one of .* got 'epsilon'"):
        GaussianDiffusion(paper_betas(10), parameterization="epsilon", variance="fixed_large")
    with pytest.raises(UserError, match="variance must be one of"):
        GaussianDiffusion(paper_betas(10), parameterization="eps", variance="large")
    with pytest.raises(UserError, match=r"\[0, 999\], got dtype torch.int64 and range \[0, 1000\]"):
        diffusion64.check_timesteps(torch.tensor([0, 1000]))
