"""Two places where a real bug would pass the other tests: the importance sampler must draw t from its own p_t
(unbiased weights hold for any distribution), and the bound's L_0 on the training-loss path must be in bits per
dimension, checked against the discretized decoder's formula evaluated here in float64."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from diffusion.core.gaussian import GaussianDiffusion
from diffusion.core.objectives.ddpm_losses import ImportanceTimesteps, training_losses
from helpers import paper_betas


def test_importance_sampler_draws_t_from_its_own_probabilities():
    """Pearson's χ² of 400,000 seeded draws against N·p_t, p_t ∝ sqrt(E[L_t²]) mixed with 1% uniform (Nichol &
    Dhariwal 2021 Eq. 18) as computed here; a sampler drawing uniformly (or from any other p) has χ² in the
    thousands."""
    T, n = 8, 400_000
    sampler = ImportanceTimesteps(T, history=3, uniform_prob=0.01)
    history = np.array([[1.0, 2.0, 2.0], [3.0, 1.0, 1.0], [0.5, 0.5, 0.5], [8.0, 4.0, 4.0],
                        [0.1, 0.2, 0.3], [5.0, 5.0, 1.0], [2.0, 2.0, 2.0], [0.05, 0.05, 0.05]])
    for k in range(3):
        sampler.update(torch.arange(T), torch.tensor(history[:, k]))
    rms = np.sqrt((history**2).mean(1))
    p = rms / rms.sum() * 0.99 + 0.01 / T
    t, w = sampler.sample(n, torch.device("cpu"), torch.Generator().manual_seed(0))
    counts = np.bincount(t.numpy(), minlength=T)
    statistic = ((counts - n * p) ** 2 / (n * p)).sum()
    assert statistic < chi2.ppf(1 - 1e-6, df=T - 1), (statistic, counts, n * p)
    np.testing.assert_allclose(w.numpy(), 1 / (T * p[t.numpy()]), rtol=1e-6)  # weights of the t drawn


def decoder_nll_bits(x0: np.ndarray, mean: np.ndarray, variance: float) -> np.ndarray:
    """-log2 p(x0 | x1) per image, mean over dimensions: Ho et al. 2020 Eq. 13 with 8-bit bins of half-width 1/255,
    the edge bins open to ±∞, the normal CDF from math.erf in float64."""
    std = math.sqrt(variance)
    cdf = np.vectorize(lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2))))
    upper = np.where(x0 > 0.999, 1.0, cdf((x0 - mean + 1 / 255) / std))
    lower = np.where(x0 < -0.999, 0.0, cdf((x0 - mean - 1 / 255) / std))
    nats = -np.log(upper - lower)
    return (nats / math.log(2)).reshape(len(x0), -1).mean(1)


@pytest.mark.parametrize("loss", ["vlb", "hybrid"])
def test_the_bound_term_at_t_0_on_the_training_path_is_L_0_in_bits(loss):
    """training_losses at t = 0 with a network that predicts μ itself: its vlb is the decoder's -log2 p(x0|x1)
    averaged over dimensions (σ² = β̃ of the second step, Eq. 7, as the paper's code); the loss is T times it
    (plus L_simple in the hybrid). Nats there would be 1/ln 2 = 1.44 times larger."""
    T, B = 10, 3
    betas = paper_betas(T)
    diffusion = GaussianDiffusion(betas, "mean", "fixed_large", torch.float64)
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, 256, (B, 1, 4, 4), generator=gen).double() / 127.5 - 1)  # 8-bit data in [-1, 1]
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # both edge bins
    mean = x0 + 0.01 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)

    b1, b2 = betas[0].item(), betas[1].item()
    variance = b2 * b1 / (1 - (1 - b1) * (1 - b2))  # β̃ at the paper's step 2: β_2 (1 - ᾱ_1) / (1 - ᾱ_2)
    want = decoder_nll_bits(x0.numpy(), mean.numpy(), variance)

    t = torch.zeros(B, dtype=torch.long)
    out = training_losses(lambda x_t, t_: mean, diffusion, x0, t, torch.randn(x0.shape, generator=gen,
                          dtype=torch.float64), loss, 0.001, None)
    np.testing.assert_allclose(out.vlb.numpy(), want, rtol=1e-9)
    scaled = T * want if loss == "vlb" else out.mse.numpy() + 0.001 * T * want
    np.testing.assert_allclose(out.loss.numpy(), scaled, rtol=1e-9)
