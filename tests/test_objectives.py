"""The three objectives against their papers' formulas, recomputed here in plain Python / numpy, in float64.

EDM: Karras et al. 2022, Table 1 (preconditioning, loss weight, ln σ ~ N(P_mean, P_std²)) and Eq. 5 (the ρ = 7
levels). Flow matching: Lipman et al. 2023 / Liu et al. 2023 (straight path, velocity target), Esser et al. 2024
(logit-normal t and the shift), diffusers' FlowMatchEulerDiscreteScheduler (the grid from t = 1). DDPM: its loss
and denoiser are those of the chain (gaussian.py, ddpm_losses.py), asked only at the T trained levels.

Networks here are toy callables whose output depends on both inputs, so a wrong input scale or noise input shows.
The network's noise input is float32 (EDM's c_noise, flow's 1000 t: what the U-Net's embedding takes); the
recomputations round it the same way.
"""

import math

import numpy as np
import pytest
import torch

from diffusion.core.gaussian import GaussianDiffusion
from diffusion.core.objectives.ddpm_losses import training_losses
from diffusion.errors import UserError
from helpers import ddpm, edm, flow, paper_betas

CPU = torch.device("cpu")
N_DRAWS = 200_000


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def per_image(x):
    return x.reshape(x.shape[0], -1).mean(1)


# --- EDM --------------------------------------------------------------------------------------------------------
def edm_table_1(sigma: float, sd: float) -> tuple[float, float, float, float]:
    """c_skip, c_out, c_in, c_noise of Karras et al. 2022, Table 1."""
    return (sd**2 / (sigma**2 + sd**2), sigma * sd / math.sqrt(sigma**2 + sd**2), 1 / math.sqrt(sigma**2 + sd**2),
            math.log(sigma) / 4)


def toy_F(x_in, c_noise):
    """A network F(x_in; c_noise), nonlinear in both."""
    c = c_noise.to(x_in.dtype).reshape(-1, 1, 1, 1)
    return torch.tanh(1.3 * x_in + 0.2) * (1 + c) + 0.1 * x_in**2 - 0.3 * c


SIGMAS = [0.002, 0.05, 0.5, 1.0, 7.3, 80.0]


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_edm_preconditioning_is_table_1(sigma_data):
    objective = edm(sigma_data=sigma_data)
    got = objective.precondition(torch.tensor(SIGMAS, dtype=torch.float64))
    for i, sigma in enumerate(SIGMAS):
        for name, value, expected in zip(("c_skip", "c_out", "c_in", "c_noise"), got,
                                         edm_table_1(sigma, sigma_data), strict=True):
            assert value[i].item() == pytest.approx(expected, rel=1e-14, abs=1e-16), (name, sigma)


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_edm_denoiser_is_c_skip_x_plus_c_out_F(sigma_data):
    """D(x; σ) = c_skip x + c_out F(c_in x; c_noise), the network given exactly c_in x and ln(σ)/4."""
    objective, x = edm(sigma_data=sigma_data), randn(len(SIGMAS), 1, 3, 3)
    seen = []
    d = objective.denoiser(lambda x_in, c_noise: (seen.append((x_in, c_noise)), toy_F(x_in, c_noise))[1],
                           clip=False)
    for i, sigma in enumerate(SIGMAS):
        c_skip, c_out, c_in, c_noise = edm_table_1(sigma, sigma_data)
        noise_in = torch.full((1,), c_noise, dtype=torch.float32)
        expected = c_skip * x[i:i + 1] + c_out * toy_F(c_in * x[i:i + 1], noise_in)
        torch.testing.assert_close(d(x[i:i + 1], sigma), expected, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(seen[-1][0], c_in * x[i:i + 1], rtol=1e-14, atol=0)
        assert seen[-1][1].dtype == torch.float32 and seen[-1][1].item() == noise_in.item()


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_edm_loss_is_lambda_weighted_denoising_error(sigma_data):
    """λ(σ)·mean ||D(x0 + σε; σ) − x0||², λ = (σ² + σ_d²)/(σ σ_d)² (Karras et al. 2022, Table 1 and Eq. 2)."""
    objective = edm(sigma_data=sigma_data)
    x0, eps = randn(len(SIGMAS), 1, 4, 4, seed=1).clamp(-1, 1), randn(len(SIGMAS), 1, 4, 4, seed=2)
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    out = objective.loss(toy_F, x0, sigma, eps)
    for i, s in enumerate(SIGMAS):
        c_skip, c_out, c_in, c_noise = edm_table_1(s, sigma_data)
        x = x0[i:i + 1] + s * eps[i:i + 1]
        D = c_skip * x + c_out * toy_F(c_in * x, torch.full((1,), c_noise, dtype=torch.float32))
        weight = (s**2 + sigma_data**2) / (s * sigma_data) ** 2
        expected = weight * ((D - x0[i:i + 1]) ** 2).mean().item()
        assert out.loss[i].item() == pytest.approx(expected, rel=1e-10), s
    assert out.loss.shape == (len(SIGMAS),) and torch.equal(out.mse, out.loss) and out.vlb is None


@pytest.mark.parametrize("p_mean, p_std", [(-1.2, 1.2), (0.4, 0.5)])
def test_edm_draws_ln_sigma_from_normal_p_mean_p_std(p_mean, p_std):
    """ln σ ~ N(P_mean, P_std²) (Sec. 5): mean and std of 200,000 draws within 4 standard errors; unit weights."""
    torch.manual_seed(0)
    sigma, weights = edm(p_mean=p_mean, p_std=p_std).draw_levels(N_DRAWS, CPU)
    assert sigma.shape == weights.shape == (N_DRAWS,) and (sigma > 0).all() and (weights == 1).all()
    log_sigma = sigma.double().log()
    assert abs(log_sigma.mean().item() - p_mean) < 4 * p_std / math.sqrt(N_DRAWS)
    assert abs(log_sigma.std().item() - p_std) < 4 * p_std / math.sqrt(2 * (N_DRAWS - 1))
    # and its quartiles: P(ln σ < P_mean ± 0.6745 P_std) = 1/4, 3/4
    for z, q in ((-0.6744897501960817, 0.25), (0.0, 0.5), (0.6744897501960817, 0.75)):
        frac = (log_sigma < p_mean + z * p_std).double().mean().item()
        assert abs(frac - q) < 4 * math.sqrt(q * (1 - q) / N_DRAWS), (z, frac)


# --- flow matching ----------------------------------------------------------------------------------------------
def toy_v(x, time):
    """A velocity network v(x, 1000 t), nonlinear in both (its time input in the units of 1000 t)."""
    tt = time.to(x.dtype).reshape(-1, 1, 1, 1)
    return torch.sin(2 * x) * tt / 1000 + torch.cos(tt / 250) * x - 0.2


def test_flow_loss_is_the_velocity_error_on_the_straight_path():
    """||v(x_t, 1000 t) − (ε − x0)||² with x_t = (1 − t) x0 + t ε (Lipman et al. 2023, Eq. 23 with σ_min = 0)."""
    t = torch.tensor([0.001, 0.1, 0.37, 0.5, 0.8, 0.999], dtype=torch.float64)
    x0, eps = randn(len(t), 1, 4, 4, seed=1).clamp(-1, 1), randn(len(t), 1, 4, 4, seed=2)
    out = flow().loss(toy_v, x0, t, eps)
    for i, ti in enumerate(t.tolist()):
        x_t = (1 - ti) * x0[i:i + 1] + ti * eps[i:i + 1]
        v = toy_v(x_t, torch.full((1,), 1000 * ti, dtype=torch.float32))
        expected = ((v - (eps[i:i + 1] - x0[i:i + 1])) ** 2).mean().item()
        assert out.loss[i].item() == pytest.approx(expected, rel=1e-12), ti
    assert torch.equal(out.mse, out.loss) and out.vlb is None


def test_flow_denoiser_is_x_minus_t_v():
    """D(x; σ) = x − t v(x, 1000 t) with t = σ/(1 + σ); t = 1 at σ = ∞; the network sees float32 1000 t."""
    seen = []
    d = flow().denoiser(lambda x, time: (seen.append(time), toy_v(x, time))[1], clip=False)
    x = randn(2, 1, 3, 3)
    for sigma in (0.001, 0.3, 1.0, 4.0, 80.0, math.inf):
        t = 1.0 if math.isinf(sigma) else sigma / (1 + sigma)
        time = torch.full((2,), 1000 * t, dtype=torch.float32)
        torch.testing.assert_close(d(x, sigma), x - t * toy_v(x, time), rtol=1e-14, atol=1e-14)
        assert seen[-1].dtype == torch.float32 and torch.equal(seen[-1], time)


def shift(t, s):
    return s * t / (1 + (s - 1) * t)


@pytest.mark.parametrize("s", [1.0, 3.0, 0.5])
def test_flow_shift_is_sd3s_and_scales_sigma_by_the_shift(s):
    """t' = s t/(1 + (s − 1) t) (Esser et al. 2024, Eq. 23), which in the VE frame is σ' = s σ, σ = t/(1 − t)."""
    t = torch.linspace(0.001, 0.999, 101, dtype=torch.float64)
    shifted = flow(shift=s).shifted(t)
    for ti, got in zip(t.tolist(), shifted.tolist(), strict=True):
        assert got == pytest.approx(shift(ti, s), rel=1e-14)
        assert got / (1 - got) == pytest.approx(s * ti / (1 - ti), rel=1e-12)
    assert flow(shift=s).shifted(torch.tensor([0.0, 1.0], dtype=torch.float64)).tolist() == [0.0, 1.0]


def cdf_within(draws, cdf, points):
    """The empirical CDF of the draws at the points is the theoretical one within 4 standard errors."""
    for p in points:
        q = cdf(p)
        frac = (draws < p).double().mean().item()
        assert abs(frac - q) < 4 * math.sqrt(q * (1 - q) / len(draws)), (p, frac, q)


@pytest.mark.parametrize("s", [1.0, 3.0])
def test_flow_draws_t_uniformly_then_shifts_it(s):
    torch.manual_seed(0)
    t, weights = flow(t_distribution="uniform", shift=s).draw_levels(N_DRAWS, CPU)
    t = t.double()
    assert (weights == 1).all() and (0 <= t).all() and (t <= 1).all()
    cdf_within(t, lambda p: p / (s - (s - 1) * p), [0.05, 0.25, 0.5, 0.75, 0.95])  # P(t' < p) = P(t < shift⁻¹(p))
    if s == 1.0:  # U(0, 1): mean 1/2, variance 1/12 (the variance's standard error from the 4th moment, 1/80)
        assert abs(t.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / N_DRAWS)
        assert abs(t.var().item() - 1 / 12) < 4 * math.sqrt((1 / 80 - 1 / 144) / N_DRAWS)


@pytest.mark.parametrize("m, std, s", [(0.0, 1.0, 1.0), (-0.5, 0.8, 1.0), (0.0, 1.0, 3.0)])
def test_flow_draws_t_logit_normally_then_shifts_it(m, std, s):
    """t = sigmoid(m + std n), n ~ N(0, 1) (Esser et al. 2024, Eq. 19), then shifted: the unshifted logit is normal."""
    torch.manual_seed(0)
    t, weights = flow(t_distribution="logit_normal", logit_mean=m, logit_std=std, shift=s).draw_levels(N_DRAWS, CPU)
    t = t.double()
    assert (weights == 1).all() and (0 < t).all() and (t < 1).all()
    unshifted = t / (s - (s - 1) * t)
    logit = torch.log(unshifted) - torch.log1p(-unshifted)
    assert abs(logit.mean().item() - m) < 4 * std / math.sqrt(N_DRAWS)
    assert abs(logit.std().item() - std) < 4 * std / math.sqrt(2 * (N_DRAWS - 1))
    normal_cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    cdf_within(t, lambda p: normal_cdf((math.log(p / s / (1 - p)) - m) / std), [0.1, 0.3, 0.5, 0.7, 0.9])


# --- DDPM -------------------------------------------------------------------------------------------------------
T = 200
BETAS = paper_betas(T)
AC = np.cumprod(1 - BETAS.numpy())  # ᾱ_t by numpy


def ddpm64(**settings):
    """A DDPM objective of T = 200 paper betas, its chain in float64 (the denoiser and the loss read it)."""
    objective = ddpm(BETAS, **settings)
    objective.diffusion = GaussianDiffusion(BETAS, objective.diffusion.parameterization, objective.diffusion.variance,
                                            dtype=torch.float64)
    return objective


def toy_net(learned: bool):
    def net(x, t):
        tt = t.to(x.dtype).reshape(-1, 1, 1, 1) / T
        out = torch.sin(3 * x) * (1 + tt) - 0.4 * x * tt
        return torch.cat([out, torch.tanh(x - tt)], 1) if learned else out

    return net


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v", "mean"])
@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small", "learned_range"])
@pytest.mark.parametrize("loss", ["simple", "vlb", "hybrid"])
def test_ddpm_loss_is_training_losses(parameterization, variance, loss):
    """Every parameterization, variance and loss type (with min-SNR-γ where it applies) is ddpm_losses' own."""
    x0, eps = randn(8, 1, 4, 4, seed=1).clamp(-1, 1), randn(8, 1, 4, 4, seed=2)
    t = torch.tensor([0, 1, 5, 50, 100, 150, 198, 199])
    net = toy_net(variance == "learned_range")
    for gamma in ([None, 5.0] if loss != "vlb" else [None]):
        objective = ddpm64(parameterization=parameterization, variance=variance, loss=loss, vlb_weight=0.003,
                           min_snr_gamma=gamma)
        got = objective.loss(net, x0, t, eps)
        want = training_losses(net, objective.diffusion, x0, t, eps, loss, 0.003, gamma)
        assert torch.equal(got.loss, want.loss) and torch.equal(got.mse, want.mse)
        assert (got.vlb is None) == (loss == "simple") and (got.vlb is None or torch.equal(got.vlb, want.vlb))
        if parameterization == "eps" and loss == "simple" and gamma is None:  # L_simple, Ho et al. 2020 Eq. 14
            a = torch.from_numpy(AC[t.numpy()]).reshape(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
            out = net(x_t, t)[:, :1]
            torch.testing.assert_close(got.loss, per_image((eps - out) ** 2), rtol=1e-12, atol=0)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v", "mean"])
@pytest.mark.parametrize("variance", ["fixed_large", "learned_range"])
def test_ddpm_denoiser_at_a_trained_step_is_predict_x0(parameterization, variance):
    """At step t, σ_t = sqrt((1 − ᾱ_t)/ᾱ_t), and D(x; σ_t) = predict_x0 of the net's (mean) output at t (int64)."""
    objective = ddpm64(parameterization=parameterization, variance=variance)
    net, seen = toy_net(variance == "learned_range"), []
    d = objective.denoiser(lambda x, t: (seen.append(t), net(x, t))[1], clip=False)
    steps = [0, 1, 17, 100, 198, 199]
    grid = objective.grid(steps, None)
    assert objective.steps_of(grid) == steps[::-1]
    x = randn(3, 1, 2, 2)
    for k, sigma, alpha, beta in zip(steps[::-1], grid.sigma, grid.alpha, grid.beta, strict=False):
        assert sigma == pytest.approx(math.sqrt((1 - AC[k]) / AC[k]), rel=1e-12)
        assert (alpha, beta) == (pytest.approx(math.sqrt(AC[k]), rel=1e-13), pytest.approx(math.sqrt(1 - AC[k]),
                                                                                            rel=1e-12))
        t = torch.full((3,), k)
        mean_out, _ = objective.diffusion.split_output(net(x, t))
        torch.testing.assert_close(d(x, sigma), objective.diffusion.predict_x0(mean_out, x, t), rtol=0, atol=0)
        assert seen[-1].dtype == torch.int64 and seen[-1].tolist() == [k] * 3


def test_ddpm_denoiser_refuses_a_level_it_was_not_trained_at():
    objective = ddpm64()
    d, x = objective.denoiser(toy_net(False), clip=False), randn(2, 1, 2, 2)
    trained = objective.grid([0, 50, 199], None).sigma[1]
    d(x, trained)  # a trained level is fine
    for sigma in (0.5, trained * (1 + 1e-9), math.inf, 0.0):
        with pytest.raises(UserError) as err:
            d(x, sigma)
        message = str(err.value)
        assert f"DDPM's denoiser is asked only at its T={T} trained noise levels" in message, message
        assert "objective.grid" in message and "\n" not in message


# --- grids, every objective -------------------------------------------------------------------------------------
GRIDS = [("ddpm", s) for s in ("linspace", "leading", "trailing", "logsnr", "karras")] + \
        [("edm", s) for s in ("karras", "logsnr", "linspace")] + [("flow", s) for s in ("linspace", "karras", "logsnr")]
MAKE = {"ddpm": lambda: ddpm64(), "edm": edm, "flow": flow}


def test_the_spacings_tested_are_the_spacings_offered():
    assert {o: [s for n, s in GRIDS if n == o] for o in MAKE} == {o: list(MAKE[o]().spacings) for o in MAKE}


@pytest.mark.parametrize("name, spacing", GRIDS)
@pytest.mark.parametrize("n", [1, 2, 12])
def test_grids_are_decreasing_levels_ending_at_the_data(name, spacing, n):
    """σ decreasing (σ[0] may be ∞), then the data (σ = 0, α = 1, β = 0); β = α σ; each objective's frame."""
    grid = MAKE[name]().grid(spacing, n)
    sigma, alpha, beta = grid.sigma, grid.alpha, grid.beta
    assert grid.num_levels == n and len(sigma) == len(alpha) == len(beta) == n + 1
    assert (sigma[-1], alpha[-1], beta[-1]) == (0.0, 1.0, 0.0) and grid.lam[-1] == math.inf
    assert all(a > b for a, b in zip(sigma, sigma[1:], strict=False)) and sigma[-2] > 0
    for s, a, b, lam in zip(sigma[:-1], alpha[:-1], beta[:-1], grid.lam[:-1], strict=True):
        if math.isinf(s):
            assert (a, b, lam) == (0.0, 1.0, -math.inf)
        else:
            assert b == pytest.approx(a * s, rel=1e-12) and lam == pytest.approx(-math.log(s), rel=1e-12, abs=1e-12)
        frame = {"ddpm": a**2 + b**2, "edm": a, "flow": a + b}[name]  # VP, VE, the straight path
        assert frame == pytest.approx(1.0, rel=1e-12)
    assert grid.prior_std == {"ddpm": 1.0, "edm": 80.0, "flow": beta[0]}[name]


def karras_eq5(sigma_max, sigma_min, n, rho=7.0):
    """Karras et al. 2022, Eq. 5: σ_i = (σ_max^{1/ρ} + i/(N − 1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i < N."""
    if n == 1:
        return [sigma_max]
    return [(sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
            for i in range(n)]


@pytest.mark.parametrize("n", [2, 5, 18, 40])
def test_edm_grids_are_karras_eq5_and_uniform_in_log_sigma_or_sigma(n):
    objective = edm(sigma_min=0.002, sigma_max=80.0)
    np.testing.assert_allclose(objective.grid("karras", n).sigma[:-1], karras_eq5(80.0, 0.002, n), rtol=1e-13)
    np.testing.assert_allclose(objective.grid("logsnr", n).sigma[:-1],
                               [80.0 * (0.002 / 80.0) ** (i / (n - 1)) for i in range(n)], rtol=1e-13)
    np.testing.assert_allclose(objective.grid("linspace", n).sigma[:-1],
                               [80.0 + i / (n - 1) * (0.002 - 80.0) for i in range(n)], rtol=1e-13, atol=1e-15)
    with pytest.raises(UserError, match="spacing 'trailing' is not one of objective=edm's"):
        objective.grid("trailing", n)


@pytest.mark.parametrize("s", [1.0, 3.0])
def test_flow_grids_from_sigma_max_and_from_t1(s):
    objective = flow(shift=s, t_min=0.001, sigma_max=80.0)
    sigma_min = 0.001 / (1 - 0.001)
    grid = objective.grid("karras", 18)
    np.testing.assert_allclose(grid.sigma[:-1], karras_eq5(80.0, sigma_min, 18), rtol=1e-13)
    np.testing.assert_allclose(grid.beta[:-1], [x / (1 + x) for x in karras_eq5(80.0, sigma_min, 18)], rtol=1e-13)
    linspace = objective.grid("linspace", 18)  # t from 1 down to t_min, shifted
    expected_t = [shift(1 + i / 17 * (0.001 - 1), s) for i in range(18)]
    assert (linspace.sigma[0], linspace.alpha[0], linspace.beta[0]) == (math.inf, 0.0, 1.0)
    np.testing.assert_allclose(linspace.beta[:-1], expected_t, rtol=1e-13)


@pytest.mark.slow  # importing diffusers takes seconds
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("s", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 2, 10, 28, 50])
def test_flow_linspace_grid_is_diffusers_flow_match_euler(s, n):
    """FlowMatchEulerDiscreteScheduler's sigmas (which are t, with a final 0) are our grid's t = β.

    diffusers spaces t from 1 to its `sigma_min`, the *shifted* smallest training t, then shifts again: our t_min is
    that value (for shift 1 it is 1/1000, our default t_min). Its values are float32, so they agree to half an ulp."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=s)
    scheduler.set_timesteps(n)
    if s == 1.0:
        assert scheduler.sigma_min == pytest.approx(0.001, rel=1e-7)
    grid = flow(shift=s, t_min=scheduler.sigma_min).grid("linspace", n)
    theirs = scheduler.sigmas.double()
    assert len(theirs) == n + 1 and grid.sigma[0] == math.inf
    torch.testing.assert_close(torch.tensor(grid.beta, dtype=torch.float64), theirs, rtol=0, atol=1e-7)
    torch.testing.assert_close(scheduler.timesteps.double(), 1000 * theirs[:-1], rtol=0, atol=1e-4)


def test_ddpm_grids_are_its_trained_steps():
    """Each level is a trained step's (α, β) = (sqrt(ᾱ), sqrt(1 − ᾱ)), steps by space_timesteps; x_T ~ N(0, I)."""
    from diffusion.core.schedules import space_timesteps

    objective = ddpm64()
    for spacing in objective.spacings:
        steps = space_timesteps(T, spacing, 12, alphas_cumprod=torch.from_numpy(AC))[::-1]
        grid = objective.grid(spacing, 12)
        assert objective.steps_of(grid) == steps
        np.testing.assert_allclose(grid.alpha[:-1], np.sqrt(AC[steps]), rtol=1e-13)
        np.testing.assert_allclose(grid.beta[:-1], np.sqrt(1 - AC[steps]), rtol=1e-12)
    with pytest.raises(UserError, match=r"must end at index T-1=199 \(x_T\)"):
        objective.grid("leading", 12, from_top=True)
    assert objective.grid("trailing", 12, from_top=True).sigma[0] == objective.grid([T - 1], None).sigma[0]
