"""Training losses and timestep samplers against independent recomputation."""

import numpy as np
import pytest
import torch

from diffusion.core.gaussian import GaussianDiffusion
from diffusion.core.objectives.ddpm_losses import (
    TIMESTEPS,
    ImportanceTimesteps,
    UniformTimesteps,
    min_snr_weight,
    training_losses,
)
from diffusion.errors import UserError
from helpers import paper_betas

T = 200


def make(parameterization="eps", variance="fixed_large"):
    return GaussianDiffusion(paper_betas(T), parameterization, variance, dtype=torch.float64)


def batch(gen, n=16):
    x0 = torch.rand(n, 1, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.randint(0, T, (n,), generator=gen)
    return x0, eps, t


def test_l_simple_is_eps_mse(gen):
    d, (x0, eps, t) = make(), batch(gen)
    out_net = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    out = training_losses(lambda x_t, t_: out_net, d, x0, t, eps, "simple", 0.001, None)
    expected = ((eps - out_net) ** 2).reshape(len(t), -1).mean(1)
    torch.testing.assert_close(out.loss, expected, rtol=1e-14, atol=0)
    oracle = training_losses(lambda x_t, t_: eps, d, x0, t, eps, "simple", 0.001, None)
    assert oracle.loss.abs().max() == 0


def test_vlb_and_hybrid_losses(gen):
    d, (x0, eps, t) = make(variance="learned_range"), batch(gen)
    net = torch.randn(len(t), 2, 4, 4, generator=gen, dtype=torch.float64)
    vlb = training_losses(lambda x_t, t_: net, d, x0, t, eps, loss_type="vlb", vlb_weight=0.001,
                          min_snr_gamma=None)
    torch.testing.assert_close(vlb.loss, T * vlb.vlb)
    hybrid = training_losses(lambda x_t, t_: net, d, x0, t, eps, loss_type="hybrid", vlb_weight=0.001,
                             min_snr_gamma=None)
    torch.testing.assert_close(hybrid.loss, hybrid.mse + 0.001 * T * hybrid.vlb)


def test_hybrid_stops_gradient_of_the_mean_in_the_bound(gen):
    d, (x0, eps, t) = make(variance="learned_range"), batch(gen)
    net = torch.randn(len(t), 2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    training_losses(lambda x_t, t_: net, d, x0, t, eps, "hybrid", 0.001, None).loss.sum().backward()
    grad_hybrid = net.grad.clone()
    net.grad = None
    training_losses(lambda x_t, t_: net, d, x0, t, eps, "simple", 0.001, None).loss.sum().backward()
    torch.testing.assert_close(grad_hybrid[:, :1], net.grad[:, :1], rtol=0, atol=0)  # mean: L_simple only
    assert grad_hybrid[:, 1:].abs().sum() > 0  # variance channels learn from the bound


def test_min_snr_weights_every_parameterization_alike(gen):
    """min-SNR-γ makes each parameterization's weighted loss min(SNR, γ)·||x0 - x̂0||² (Hang et al. 2023)."""
    x0, eps, t = batch(gen)
    ac = np.cumprod(1 - paper_betas(T).numpy())
    snr = ac / (1 - ac)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    expected = np.minimum(snr[t.numpy()], 5.0) * ((x0 - x0_hat) ** 2).reshape(len(t), -1).mean(1).numpy()
    for p in ("eps", "x0", "v", "mean"):
        d = make(p)
        x_t = d.q_sample(x0, t, eps)
        # the network output implied by x0_hat under this parameterization
        net = d.training_target(x0_hat, x_t, t, d.predict_eps_from_x0(x_t, t, x0_hat))
        out = training_losses(lambda x, t_: net, d, x0, t, eps, "simple", 0.001, min_snr_gamma=5.0)  # noqa: B023
        np.testing.assert_allclose(out.loss.numpy(), expected, rtol=1e-8, err_msg=p)
    w = min_snr_weight(make("eps"), t, 5.0).numpy()
    np.testing.assert_allclose(w, np.minimum(snr[t.numpy()], 5.0) / snr[t.numpy()], rtol=1e-12)


def test_bad_loss_type(gen):
    d, (x0, eps, t) = make(), batch(gen)
    with pytest.raises(UserError, match="objective.loss must be one of .* got 'l2'"):
        training_losses(lambda x_t, t_: x_t, d, x0, t, eps, loss_type="l2", vlb_weight=0.001, min_snr_gamma=None)


def test_timesteps_by_name():
    assert TIMESTEPS == {"uniform": UniformTimesteps, "importance": ImportanceTimesteps}


def test_uniform_sampler(gen):
    t, w = UniformTimesteps(10).sample(10_000, torch.device("cpu"), gen)
    counts = torch.bincount(t, minlength=10).double()
    assert (w == 1).all() and ((counts - 1000).abs() < 4 * np.sqrt(1000 * 0.9)).all()


def test_importance_sampler_is_uniform_until_warm_then_unbiased(gen):
    sampler = ImportanceTimesteps(4, history=2, uniform_prob=0.01)
    torch.testing.assert_close(sampler.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
    losses = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    for _ in range(2):
        sampler.update(torch.arange(4), losses)
    p = sampler.probabilities().numpy()
    expected = losses.numpy() / losses.sum().item() * 0.99 + 0.01 / 4  # sqrt(E[L²]) = L for constant L
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    # E_p[w·L_t] equals the uniform mean of L_t: the weights keep the estimate unbiased.
    t, w = sampler.sample(200_000, torch.device("cpu"), gen)
    estimate = (w.double() * losses[t]).mean().item()
    assert estimate == pytest.approx(losses.mean().item(), rel=0.02)
    restored = ImportanceTimesteps(4, history=2, uniform_prob=0.01)
    restored.load_state_dict(sampler.state_dict())
    np.testing.assert_array_equal(restored.probabilities().numpy(), p)
