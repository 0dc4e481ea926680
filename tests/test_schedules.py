"""Beta schedules against the papers' formulas, recomputed independently in numpy / plain Python."""

import math

import numpy as np
import pytest
import torch

from diffusion.config import validate
from diffusion.core.schedules import (
    check_betas,
    cosine_beta_schedule,
    explicit_beta_schedule,
    linear_beta_schedule,
    make_beta_schedule,
    quadratic_beta_schedule,
    respace_betas,
    sigmoid_beta_schedule,
    space_timesteps,
)
from diffusion.errors import UserError
from helpers import PAPER_BETAS, paper_betas, train_cfg

COSINE = dict(s=0.008, max_beta=0.999)  # Nichol & Dhariwal 2021
SCHEDULE_SETTINGS = {"linear": PAPER_BETAS, "quadratic": PAPER_BETAS, "sigmoid": {**PAPER_BETAS, "steepness": 6.0},
                     "cosine": COSINE}


def test_linear_endpoints_and_alpha_bar_T():
    betas = linear_beta_schedule(1000, 1e-4, 0.02)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == 1e-4 and betas[-1].item() == pytest.approx(0.02, abs=1e-17)
    # ᾱ_T = Π (1 - β_t) with β_t = 1e-4 + (0.02 - 1e-4) (t-1)/999, computed by a plain loop.
    prod = 1.0
    for i in range(1000):
        prod *= 1.0 - (1e-4 + (0.02 - 1e-4) * i / 999)
    assert prod == pytest.approx(4.0358e-5, rel=1e-4)
    assert torch.cumprod(1 - betas, 0)[-1].item() == pytest.approx(prod, rel=1e-12)


def test_cosine_alpha_bar_matches_closed_form():
    T, s = 1000, 0.008
    betas = cosine_beta_schedule(T, s=s, max_beta=0.999)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f(t) / f(0) for t in range(1, T + 1)])
    got = torch.cumprod(1 - betas, 0).numpy()
    unclipped = betas.numpy() < 0.999
    np.testing.assert_allclose(got[unclipped], expected[unclipped], rtol=1e-12, atol=0)
    assert betas.max().item() == 0.999  # the last beta is clipped, as Nichol & Dhariwal do


def test_quadratic_and_sigmoid_formulas():
    T = 50
    q = quadratic_beta_schedule(T, 1e-4, 0.02).numpy()
    np.testing.assert_allclose(q, np.linspace(1e-2, 0.02**0.5, T) ** 2, rtol=1e-14)
    sg = sigmoid_beta_schedule(T, 1e-4, 0.02, 6.0).numpy()
    x = np.linspace(-6, 6, T)
    np.testing.assert_allclose(sg, 1 / (1 + np.exp(-x)) * (0.02 - 1e-4) + 1e-4, rtol=1e-13)
    assert np.all(np.diff(q) > 0) and np.all(np.diff(sg) > 0)


@pytest.mark.parametrize("name", ["linear", "cosine", "quadratic", "sigmoid"])
@pytest.mark.parametrize("T", [1, 2, 7, 1000])
def test_every_schedule_any_T(name, T):
    betas = make_beta_schedule(name, T, **SCHEDULE_SETTINGS[name])
    assert betas.shape == (T,) and betas.dtype == torch.float64
    assert ((betas > 0) & (betas < 1)).all()


def test_explicit_list():
    betas = explicit_beta_schedule([0.1, 0.2, 0.3], None)
    assert betas.tolist() == [0.1, 0.2, 0.3] and betas.dtype == torch.float64


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: check_betas([0.1, 1.0]), "betas[1]=1.0"),  # what the objective checks of any betas it is given
        (lambda: check_betas([0.0]), "betas[0]=0.0"),
        (lambda: make_beta_schedule("cosin", 10, **COSINE), "unknown beta schedule 'cosin'"),
    ],
)
def test_bad_parameters_give_one_line_errors(call, fragment):
    with pytest.raises(UserError) as err:
        call()
    message = str(err.value)
    assert fragment in message and "\n" not in message


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["schedule.beta_start=0.02", "schedule.beta_end=0.01"], "beta_end must be in (beta_start=0.02, 1), got 0.01"),
        (["schedule=sigmoid", "schedule.beta_start=0.05", "schedule.beta_end=0.01"],
         "beta_end must be in (beta_start=0.05, 1), got 0.01; try schedule.beta_end=0.1"),
        (["schedule.beta_end=1.5"], "got 1.5; try schedule.beta_end=0.02"),
        (["schedule.beta_start=-1e-4"], "beta_start must be in (0, 1), got -0.0001"),
        (["schedule.num_timesteps=0"], "num_timesteps must be in [1, 100000], got 0"),
        (["schedule=cosine", "schedule.num_timesteps=-3"], "got -3"),
        (["schedule=cosine", "schedule.s=0"], "schedule.s must be a number > 0, got 0.0"),
        (["schedule=explicit", "schedule.betas=[0.1,1.0]"], "schedule.betas must be a non-empty list, each in (0, 1)"),
    ],
)
def test_bad_schedule_settings_give_one_line_errors_before_anything_is_built(overrides, fragment, tmp_path):
    """The schedule functions take what they are given: the config's rules and validation check it first."""
    with pytest.raises(UserError) as err:
        validate(train_cfg(tmp_path, *overrides))
    message = str(err.value)
    assert fragment in message and "\n" not in message


def test_spacings():
    assert space_timesteps(1000, "leading", 10) == list(range(0, 1000, 100))
    assert space_timesteps(1000, "trailing", 10) == list(range(99, 1000, 100))
    lin = space_timesteps(1000, "linspace", 10)
    assert lin[0] == 0 and lin[-1] == 999 and len(lin) == 10
    assert space_timesteps(10, "linspace", 10) == list(range(10))
    assert space_timesteps(1000, [0, 10, 999]) == [0, 10, 999]
    for bad in ([5, 3], [0, 1000], []):
        with pytest.raises(UserError):
            space_timesteps(1000, bad)
    with pytest.raises(UserError, match="in \\[1, 100\\], got 101"):
        space_timesteps(100, "linspace", 101)


def test_respaced_betas_reproduce_alpha_bar_on_kept_steps():
    alphas_cumprod = torch.cumprod(1 - paper_betas(1000), 0)
    kept = space_timesteps(1000, "linspace", 37)
    new_betas = respace_betas(alphas_cumprod, kept)
    # cumulative product of the new alphas, by a plain loop
    prod, got = 1.0, []
    for b in new_betas.tolist():
        prod *= 1 - b
        got.append(prod)
    np.testing.assert_allclose(got, alphas_cumprod[kept].numpy(), rtol=1e-13, atol=0)
    full = respace_betas(alphas_cumprod, list(range(1000)))
    torch.testing.assert_close(full, paper_betas(1000), rtol=1e-12, atol=1e-15)
