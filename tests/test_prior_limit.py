"""A DDPM chain that ends short of noise is refused before training, with a fix that itself reaches noise; the
linear schedule's 1000/T rescaling (Nichol & Dhariwal 2021) keeps a sweep over T comparable; explicit betas are
never resampled. Expected values are recomputed here in numpy from the papers' formulas."""

import math
import re

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from diffusion.config import validate
from diffusion.core.gaussian import GaussianDiffusion
from diffusion.core.likelihood import largest_prior_bpd, nats_to_bpd, prior_kl
from diffusion.errors import UserError
from helpers import compose_cfg, run_script

LIMIT = 1e-3  # training.max_prior_bpd's default, bits/dim


def worst_prior_bpd(betas: np.ndarray) -> tuple[float, float]:
    """(ᾱ_T, the largest KL(N(sqrt(ᾱ_T) x0, 1 - ᾱ_T) || N(0, 1)) over x0 in [-1, 1] in bits): x0 = ±1."""
    alpha_bar_T = float(np.prod(1.0 - betas))
    kl_nats = 0.5 * (alpha_bar_T + (1 - alpha_bar_T) - 1 - math.log(1 - alpha_bar_T))
    return alpha_bar_T, kl_nats / math.log(2)


def improved_diffusion_linear(T: int) -> np.ndarray:
    """improved-diffusion's get_named_beta_schedule("linear", T)."""
    scale = 1000 / T
    return np.linspace(scale * 0.0001, scale * 0.02, T, dtype=np.float64)


def refusal(tmp_path, *overrides: str) -> str:
    """train.py's one-line error for these overrides (the digits recipe, make train's), checked to be one line."""
    result = run_script("train.py", "experiment=digits", "logger=none", *overrides,
                        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: "), result.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before the first step
    return last


def validated(tmp_path, *overrides: str):
    cfg = compose_cfg("train", ["experiment=digits", *overrides], tmp_path)
    validate(cfg)
    return cfg


def test_largest_prior_term_bounds_the_bounds_own_prior_term():
    """largest_prior_bpd is likelihood.prior_kl at its worst data in [-1, 1] (x0 = ±1), in bits (not nats)."""
    betas = improved_diffusion_linear(100) / 10  # the paper's betas at T=100: ᾱ_T = 0.36
    _, expected = worst_prior_bpd(betas)
    assert largest_prior_bpd(torch.tensor(betas)) == pytest.approx(expected, rel=1e-12)
    diffusion = GaussianDiffusion(torch.tensor(betas), "eps", "fixed_large", torch.float64)
    x0 = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    on_data = nats_to_bpd(prior_kl(diffusion, x0), 64)
    assert (on_data < expected).all() and on_data.min() > 0


def test_the_readme_sweep_over_T_is_refused_with_the_paper_betas_and_names_the_rescaled_ones(tmp_path):
    alpha_bar_T, prior = worst_prior_bpd(improved_diffusion_linear(100) / 10)
    line = refusal(tmp_path, "schedule.num_timesteps=100")
    assert f"schedule=linear with T=100 does not reach noise: ᾱ_T={alpha_bar_T:.3g}" in line
    assert f"up to {prior:.3g} bits/dim, above training.max_prior_bpd=0.001" in line
    assert "use schedule=linear_scaled" in line


@pytest.mark.parametrize("T", [100, 250, 1000])
def test_linear_scaled_is_improved_diffusions_linear_and_reaches_noise(T, tmp_path):
    cfg = validated(tmp_path, "schedule=linear_scaled", f"schedule.num_timesteps={T}")
    betas = instantiate(cfg.schedule).numpy()
    np.testing.assert_allclose(betas, improved_diffusion_linear(T), rtol=1e-15, atol=0)
    assert worst_prior_bpd(betas)[1] < LIMIT


def test_the_paper_schedule_of_make_train_is_unchanged(tmp_path):
    """experiment=digits (make train) validates and its betas are bit for bit linspace(1e-4, 0.02, 1000); so are
    linear_scaled's at T=1000."""
    paper = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.equal(instantiate(validated(tmp_path).schedule), paper)
    assert torch.equal(instantiate(validated(tmp_path, "schedule=linear_scaled").schedule), paper)


@pytest.mark.parametrize("schedule", ["linear_scaled", "cosine"])
@pytest.mark.parametrize("T", [100, 1000])
def test_the_readme_sweep_over_T_validates_every_job(schedule, T, tmp_path):
    validated(tmp_path, f"schedule={schedule}", f"schedule.num_timesteps={T}")


def test_T_1_is_refused_with_a_fix_that_reaches_noise(tmp_path):
    """T=1 of the paper's betas: ᾱ_T = 0.9999. The fix named must itself pass the limit (not the samplers' steps=1,
    which would train that chain)."""
    line = refusal(tmp_path, "schedule.num_timesteps=1")
    assert "T=1 does not reach noise" in line and "steps=1" not in line
    fix = re.search(r"use (schedule=\w+) at this T", line).group(1)
    cfg = compose_cfg("train", ["experiment=digits", fix, "schedule.num_timesteps=1"], tmp_path)
    betas = instantiate(cfg.schedule).numpy()
    assert worst_prior_bpd(betas)[1] < LIMIT
    validate(cfg)


def test_linear_scaled_refuses_a_T_whose_last_beta_reaches_1(tmp_path):
    line = refusal(tmp_path, "schedule=linear_scaled", "schedule.num_timesteps=20")
    assert "schedule=linear_scaled scales beta_end=0.02 by 1000/T, which reaches 1" in line
    assert "use schedule.num_timesteps=21 or more" in line
    validated(tmp_path, "schedule=linear_scaled", "schedule.num_timesteps=21")


def test_explicit_betas_of_another_length_than_T_are_refused_not_resampled(tmp_path):
    with pytest.raises(UserError, match=r"schedule.num_timesteps=5 differs from the 3 betas of schedule.betas"):
        validated(tmp_path, "schedule=explicit", "schedule.betas=[0.01,0.5,0.999]", "schedule.num_timesteps=5")
    with pytest.raises(UserError, match=r"schedule.num_timesteps=2 differs from the 3 betas"):
        validated(tmp_path, "schedule=explicit", "schedule.betas=[0.01,0.5,0.999]", "schedule.num_timesteps=2")
    for T in ("null", "3"):
        cfg = validated(tmp_path, "schedule=explicit", "schedule.betas=[0.01,0.5,0.999]", f"schedule.num_timesteps={T}")
        assert instantiate(cfg.schedule).tolist() == [0.01, 0.5, 0.999]


def test_the_limit_is_a_setting(tmp_path):
    """training.max_prior_bpd=null trains such a chain on purpose; a tighter limit refuses even the paper's."""
    validated(tmp_path, "schedule.num_timesteps=100", "training.max_prior_bpd=null")
    with pytest.raises(UserError, match="schedule=linear with T=1000 does not reach noise"):
        validated(tmp_path, "training.max_prior_bpd=1e-5")
