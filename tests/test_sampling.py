"""Samplers with oracle models, equivalences between samplers, and the per-step loop's hygiene."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffusion.core.gaussian import GaussianDiffusion
from diffusion.core.objectives.ddpm import DDPMDenoiser
from diffusion.core.sampling import ddim_sample, ddpm_sample, respaced_sample
from diffusion.core.schedules import space_timesteps
from diffusion.errors import UserError
from helpers import ddpm, paper_betas

T = 100
X_STAR = torch.tensor([[-0.6, 0.2], [0.9, -1.0]], dtype=torch.float64).reshape(1, 1, 2, 2)


def oracle(x_star: torch.Tensor, learned_variance: bool = False):
    """The exact ε-predictor for a one-point dataset {x*}, with ᾱ recomputed by numpy."""
    ac = torch.from_numpy(np.cumprod(1 - paper_betas(T).numpy()))

    def model(x_t, t):
        a = ac[t].reshape(-1, 1, 1, 1).to(x_t.dtype)
        eps = (x_t - a.sqrt() * x_star) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learned_variance else eps

    return model


def denoiser(model, variance="fixed_large", parameterization="eps", clip=True, betas=None) -> DDPMDenoiser:
    """The DDPM objective's denoiser of `model`, its chain's coefficients in float64."""
    betas = paper_betas(T) if betas is None else betas
    objective = ddpm(betas, parameterization=parameterization, variance=variance)
    objective.diffusion = GaussianDiffusion(betas, parameterization, variance, dtype=torch.float64)
    return objective.denoiser(model, clip=clip)


def x_T(gen, n=4):
    return torch.randn(n, 1, 2, 2, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small", "learned_range"])
def test_ancestral_oracle_lands_on_the_data(variance, gen):
    out = ddpm_sample(denoiser(oracle(X_STAR, variance == "learned_range"), variance), x_T(gen), generator=gen)
    torch.testing.assert_close(out.x0, X_STAR.expand(4, -1, -1, -1), rtol=0, atol=1e-10)
    assert out.x0.dtype == torch.float64


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_ddim_and_respaced_oracle_land_on_the_data(eta, spacing, gen):
    d = denoiser(oracle(X_STAR))
    out = ddim_sample(d, x_T(gen), num_steps=7, spacing=spacing, eta=eta, generator=gen)
    torch.testing.assert_close(out.x0, X_STAR.expand(4, -1, -1, -1), rtol=0, atol=1e-10)
    out = respaced_sample(d, x_T(gen), num_steps=7, spacing=spacing, generator=gen)
    torch.testing.assert_close(out.x0, X_STAR.expand(4, -1, -1, -1), rtol=0, atol=1e-10)


def test_ddim_eta0_is_deterministic_and_follows_kept_steps(gen):
    """With η=0 and the oracle, x at each kept step k is sqrt(ᾱ_k)x* + sqrt(1-ᾱ_k)ε₀ exactly.

    A sampler that stepped to t-1 instead of the previous kept step would miss these values.
    """
    d, xT = denoiser(oracle(X_STAR)), x_T(gen)
    kept = space_timesteps(T, "trailing", 5)
    a = np.cumprod(1 - paper_betas(T).numpy())
    run = lambda g: ddim_sample(d, xT, spacing=kept, generator=g, record_steps=kept)  # noqa: E731
    first, second = run(torch.Generator().manual_seed(1)), run(torch.Generator().manual_seed(2))
    assert torch.equal(first.x0, second.x0)
    eps0 = (xT - np.sqrt(a[kept[-1]]) * X_STAR) / np.sqrt(1 - a[kept[-1]])
    assert first.trajectory.steps == kept[::-1]
    for x, k in zip(first.trajectory.x_t, first.trajectory.steps, strict=True):
        torch.testing.assert_close(x, np.sqrt(a[k]) * X_STAR + np.sqrt(1 - a[k]) * eps0, rtol=0, atol=1e-12)


def test_ddim_eta1_all_steps_equals_ddpm_with_posterior_variance(gen):
    """DDIM with η=1 over every step has DDPM's β̃ mean and variance, so the same noise gives the same chain."""
    net = lambda x, t: torch.sin(3 * x) + 0.01 * t.reshape(-1, 1, 1, 1)  # noqa: E731 any deterministic model
    d, xT = denoiser(net, "fixed_small"), x_T(gen)
    ddim = ddim_sample(d, xT, num_steps=T, eta=1.0, generator=torch.Generator().manual_seed(5))
    ancestral = ddpm_sample(d, xT, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ddim.x0, ancestral.x0, rtol=0, atol=1e-10)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_on_a_trained_chain_keeps_its_float32_arithmetic_bit_for_bit(eta, gen):
    """DDIM on DDPM's chain is Song et al. 2021 Eqs. 12 and 16 in the chain's stored float32 ᾱ, written out here;
    the images `make train` scores are drawn this way, so its printed numbers depend on every bit of it."""
    net = lambda x, t: torch.sin(3 * x) + 0.01 * t.reshape(-1, 1, 1, 1)  # noqa: E731 any deterministic model
    chain = ddpm(paper_betas(T)).diffusion  # float32 buffers, as in training
    xT = torch.randn(4, 1, 2, 2, generator=gen)
    out = ddim_sample(ddpm(paper_betas(T)).denoiser(net), xT, num_steps=10, eta=eta,
                      generator=torch.Generator().manual_seed(7))
    kept, g, x = space_timesteps(T, "linspace", 10), torch.Generator().manual_seed(7), xT
    for j in reversed(range(len(kept))):
        t = torch.full((4,), kept[j])
        ac, ac_prev = chain.alphas_cumprod[kept[j]], chain.alphas_cumprod[kept[j - 1]] if j else torch.tensor(1.0)
        r = chain.sqrt_recip_alphas_cumprod[t].view(-1, 1, 1, 1)
        rm1 = chain.sqrt_recipm1_alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = (r * x - rm1 * net(x, t)).clamp(-1, 1)
        eps = (r * x - x0) / rm1
        sigma = eta * ((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev)).sqrt()
        x = ac_prev.sqrt() * x0 + (1 - ac_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and j > 0:
            x = x + sigma * torch.randn(x.shape, generator=g)
    assert out.x0.dtype == torch.float32 and torch.equal(out.x0, x)


def test_respaced_with_all_steps_equals_full_sampler(gen):
    net = lambda x, t: torch.tanh(x) * (1 + t.reshape(-1, 1, 1, 1) / T)  # noqa: E731
    d, xT = denoiser(net, "fixed_large"), x_T(gen)
    full = ddpm_sample(d, xT, generator=torch.Generator().manual_seed(3))
    respaced = respaced_sample(d, xT, num_steps=T, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(respaced.x0, full.x0, rtol=0, atol=1e-10)


def test_respaced_ancestral_keeps_the_forward_marginals(gen):
    """With the oracle and σ² = β̃ of the respaced chain, x at each kept step k ~ q(x_k | x*) exactly."""
    x_star = torch.full((1, 1, 1, 1), 0.5, dtype=torch.float64)
    d = denoiser(oracle(x_star), "fixed_small")
    kept = space_timesteps(T, "linspace", 6)
    a = np.cumprod(1 - paper_betas(T).numpy())
    n = 40_000
    # start from q(x_{k_max} | x*) itself so that every later kept step has a known marginal
    noise = torch.randn(n, 1, 1, 1, generator=gen, dtype=torch.float64)
    xT = np.sqrt(a[kept[-1]]) * 0.5 + np.sqrt(1 - a[kept[-1]]) * noise
    out = respaced_sample(d, xT, spacing=kept, generator=gen, record_steps=kept)
    for x, k in zip(out.trajectory.x_t, out.trajectory.steps, strict=True):
        mean, var = np.sqrt(a[k]) * 0.5, 1 - a[k]
        assert abs(x.mean().item() - mean) < 5 * np.sqrt(var / n), k
        assert abs(x.var().item() - var) < 5 * var * np.sqrt(2 / n), k


def test_model_sees_original_timesteps_in_decreasing_order(gen):
    seen = []
    net = lambda x, t: (seen.append(t.tolist()), torch.zeros_like(x))[1]  # noqa: E731
    respaced_sample(denoiser(net), x_T(gen, 2), num_steps=4, spacing="trailing")
    assert seen == [[99, 99], [74, 74], [49, 49], [24, 24]]


def test_generator_makes_sampling_reproducible(gen):
    d, xT = denoiser(lambda x, t: 0.5 * x), x_T(gen)
    a = ddpm_sample(d, xT, generator=torch.Generator().manual_seed(7)).x0
    b = ddpm_sample(d, xT, generator=torch.Generator().manual_seed(7)).x0
    c = ddpm_sample(d, xT, generator=torch.Generator().manual_seed(8)).x0
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_trajectory_shapes_and_clipping(gen):
    out = ddpm_sample(denoiser(lambda x, t: -10 * x, clip=True), x_T(gen, 3), record_steps=[99, 50, 0])
    assert out.trajectory.steps == [99, 50, 0]
    assert out.trajectory.x_t.shape == (3, 3, 1, 2, 2) and out.trajectory.x0_pred.shape == (3, 3, 1, 2, 2)
    assert out.trajectory.x0_pred.abs().max() <= 1.0  # x̂0 clipped to [-1, 1]


def test_bad_sampler_arguments(gen):
    with pytest.raises(UserError, match="eta must be in \\[0, 1\\], got 1.5"):
        ddim_sample(denoiser(lambda x, t: x), x_T(gen), num_steps=5, eta=1.5)
    with pytest.raises(UserError, match="got 0"):
        respaced_sample(denoiser(lambda x, t: x), x_T(gen), num_steps=0)


class OpLog(TorchDispatchMode):
    """Record every aten op run under it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


FORBIDDEN = {"aten._to_copy", "aten.lift_fresh", "aten.scalar_tensor", "aten.arange", "aten.linspace",
             "aten.full", "aten.ones", "aten.zeros", "aten.empty", "aten.copy_", "aten._local_scalar_dense"}


def forbidden_ops(run) -> dict[str, int]:
    with OpLog() as log:
        run()
    return {op: log.ops.count(op) for op in FORBIDDEN}


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "respaced"])
def test_loop_creates_no_coefficient_tensors(sampler):
    """Per step, only device-side arithmetic: no tensor from host data, no copy, no new coefficient table.

    Ops that creating or copying tensors would show must not grow with the number of steps (10 vs 20),
    and the whole run happens on the meta device, where a tensor made from host data would not mix in.
    """
    net = lambda x, t: torch.cat([x, x], 1)  # noqa: E731 learned-variance-shaped output
    x = torch.empty(2, 1, 2, 2, device="meta")

    def run(steps: int):
        if sampler == "ddpm":
            d = ddpm(paper_betas(steps), variance="learned_range").to("meta").denoiser(net, clip=True)
            return lambda: ddpm_sample(d, x)
        d = ddpm(paper_betas(T), variance="learned_range").to("meta").denoiser(net, clip=True)
        if sampler == "ddim":
            return lambda: ddim_sample(d, x, num_steps=steps, eta=0.5)
        return lambda: respaced_sample(d, x, num_steps=steps)

    assert forbidden_ops(run(10)) == forbidden_ops(run(20))
