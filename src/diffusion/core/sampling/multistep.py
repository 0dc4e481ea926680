"""Few-step multistep solvers of the probability-flow ODE dx̃/dσ = ε̂(x̃; σ) = (x̃ − D(x̃; σ))/σ in the VE frame
x̃ = x/α, on any denoiser's grid: each level's one network call gives ε̂ there, and a step to the next level
combines the latest ones, so NFE = N levels. The last step, to σ = 0 (the data), is first order, x = x̂0, as
in every solver here (diffusers' lower_order_final). Both warm up with lower orders while fewer earlier calls
exist, and both need a finite first level.

- iPNDM (Zhang & Chen 2023, the improved pseudo-numerical method of Liu et al. 2022; zju-pi/diff-sampler):
  x̃' = x̃ + (σ' − σ) Σ_j a_j ε̂_j with the fixed Adams-Bashforth weights of order p ≤ 4
  (1; 3/2, −1/2; 23/12, −16/12, 5/12; 55/24, −59/24, 37/24, −9/24), whatever the step sizes.
- DEIS tAB (Zhang & Chen 2023, Eq. 15 with the time-polynomial extrapolation): ε̂ is extrapolated by the
  Lagrange polynomial through its last p values in σ, and integrated exactly over [σ, σ']:
  x̃' = x̃ + Σ_j c_j ε̂_j, c_j = ∫_σ^σ' ℓ_j(s) ds, order p ≤ 3 on any grid (p = 1 is Euler, DDIM with η = 0).
  `deis` takes the polynomial in σ (t = σ in the VE frame, as zju-pi/diff-sampler's tAB), `deis_logrho` in log σ
  (diffusers' DEISMultistepScheduler, solver_type="logrho"): c_j = ∫_σ^σ' ℓ_j(log s) ds, the same steps on a
  geometric grid's even spacing in log σ.
"""

import math
from collections.abc import Iterable, Sequence

from torch import Tensor

from diffusion.core.denoiser import Denoiser, Grid
from diffusion.core.sampling.common import Generator, Recorder, SampleOutput, level_names, require_finite_start
from diffusion.errors import UserError

IPNDM_ORDERS, DEIS_ORDERS = (1, 2, 3, 4), (1, 2, 3)
ADAMS_BASHFORTH = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def ipndm_weights(g: Grid, order: int) -> list[tuple[float, ...]]:
    """Per step i: the weights on ε̂ at levels i, i−1, ... (most recent first), (σ' − σ) × Adams-Bashforth's."""
    return [tuple((g.sigma[i + 1] - g.sigma[i]) * a for a in ADAMS_BASHFORTH[min(order, i + 1) - 1])
            for i in range(g.num_levels - 1)]


def _integral(coefficients: list[float], a: float, b: float) -> float:
    """∫_a^b Σ_k coefficients[k] s^k ds."""
    return sum(c * (b ** (k + 1) - a ** (k + 1)) / (k + 1) for k, c in enumerate(coefficients))


def _lagrange(nodes: list[float], j: int) -> list[float]:
    """ℓ_j(s) = Π_{m≠j} (s − s_m)/(s_j − s_m) as coefficients of 1, s, s², ..."""
    poly = [1.0]
    for m, other in enumerate(nodes):
        if m != j:
            scale = 1.0 / (nodes[j] - other)
            poly = [scale * (lo - other * hi) for lo, hi in zip([0.0, *poly], [*poly, 0.0], strict=True)]
    return poly


def _log_integral(coefficients: list[float], a: float, b: float) -> float:
    """∫_a^b P(log s) ds for P = Σ_k coefficients[k] u^k: with u = log s, ∫ P(u) e^u du = e^u (P − P' + P'' − ...)."""
    terms, poly, sign = [0.0] * len(coefficients), list(coefficients), 1.0
    while poly:
        terms = [t + sign * c for t, c in zip(terms, poly + [0.0] * (len(terms) - len(poly)), strict=True)]
        poly, sign = [k * c for k, c in enumerate(poly)][1:], -sign  # the derivative

    def antiderivative(s: float) -> float:
        return s * sum(c * math.log(s) ** k for k, c in enumerate(terms))

    return antiderivative(b) - antiderivative(a)


def deis_weights(g: Grid, order: int, log_basis: bool = False) -> list[tuple[float, ...]]:
    """Per step i: c_j = ∫_{σ_i}^{σ_{i+1}} ℓ_j ds over the Lagrange basis through σ_i, σ_{i−1}, ... (float64), in σ
    or (log_basis) in log σ. The last step, to σ = 0, is x̂0 (`_multistep`): its weights are never used."""
    weights = []
    for i in range(g.num_levels - 1):
        nodes = [g.sigma[i - j] for j in range(min(order, i + 1))]
        a, b = g.sigma[i], g.sigma[i + 1]
        if log_basis and b > 0:
            logs = [math.log(n) for n in nodes]
            weights.append(tuple(_log_integral(_lagrange(logs, j), a, b) for j in range(len(nodes))))
        else:
            weights.append(tuple(_integral(_lagrange(nodes, j), a, b) for j in range(len(nodes))))
    return weights


def most_order(orders: tuple[int, ...]):
    """The highest order N levels allow: order p is reached once p network calls exist."""
    return lambda num_levels: min(orders[-1], num_levels)


def _multistep(denoiser: Denoiser, x_T: Tensor, g: Grid, weights: list[tuple[float, ...]],
               record_steps: Iterable[int] | None) -> SampleOutput:
    names, recorder = level_names(denoiser, g), Recorder(record_steps)
    x, eps = x_T / g.alpha[0], []
    for i in range(g.num_levels):
        x0 = denoiser(g.alpha[i] * x, g.sigma[i])
        recorder(names[i], g.alpha[i] * x, x0)
        if i == g.num_levels - 1:  # the last step, to the data, is first order: x̃ − σ ε̂ = x̂0
            return recorder.output(x0)
        eps = [(x - x0) / g.sigma[i], *eps[: len(ADAMS_BASHFORTH) - 1]]
        for w, e in zip(weights[i], eps, strict=False):
            x = x + w * e


def _order(name: str, order: int | None, orders: tuple[int, ...], num_levels: int) -> int:
    most = most_order(orders)(num_levels)
    if order is None:
        return most
    if order not in orders:
        raise UserError(f"{name} order must be one of {list(orders)}, got {order!r}; try order={orders[-1]}")
    if order > most:
        raise UserError(f"{name} order {order} needs at least {order} steps, got {num_levels}; "
                        f"use order={most} or steps={order}")
    return order


def ipndm_sample(denoiser: Denoiser, x_T: Tensor, *, num_steps: int | None = None,
                 spacing: str | Sequence[int] = "karras", order: int | None = None,
                 generator: Generator = None, record_steps: Iterable[int] | None = None) -> SampleOutput:
    """iPNDM (Zhang & Chen 2023): Adams-Bashforth of order ≤ 4 on ε̂ in σ, warm-up from order 1; NFE = N."""
    g = denoiser.grid(spacing, num_steps, from_top=True)
    require_finite_start(g, "ipndm")
    return _multistep(denoiser, x_T, g, ipndm_weights(g, _order("ipndm", order, IPNDM_ORDERS, g.num_levels)),
                      record_steps)


def deis_sample(denoiser: Denoiser, x_T: Tensor, *, num_steps: int | None = None,
                spacing: str | Sequence[int] = "karras", order: int | None = None,
                generator: Generator = None, record_steps: Iterable[int] | None = None) -> SampleOutput:
    """DEIS tAB (Zhang & Chen 2023): ε̂'s Lagrange extrapolation in σ of order ≤ 3 integrated exactly; NFE = N."""
    g = denoiser.grid(spacing, num_steps, from_top=True)
    require_finite_start(g, "deis")
    return _multistep(denoiser, x_T, g, deis_weights(g, _order("deis", order, DEIS_ORDERS, g.num_levels)),
                      record_steps)


def deis_logrho_sample(denoiser: Denoiser, x_T: Tensor, *, num_steps: int | None = None,
                       spacing: str | Sequence[int] = "logsnr", order: int | None = None,
                       generator: Generator = None,
                       record_steps: Iterable[int] | None = None) -> SampleOutput:
    """DEIS with ε̂'s Lagrange extrapolation in log σ (diffusers' DEISMultistepScheduler), order ≤ 3; NFE = N."""
    g = denoiser.grid(spacing, num_steps, from_top=True)
    require_finite_start(g, "deis_logrho")
    weights = deis_weights(g, _order("deis_logrho", order, DEIS_ORDERS, g.num_levels), log_basis=True)
    return _multistep(denoiser, x_T, g, weights, record_steps)
