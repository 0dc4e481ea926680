"""UniPC (Zhao et al. 2023): the UniP-p predictor and UniC-p corrector, bh2, in data prediction, on any denoiser's
grid; each new network call is reused by the corrector of the step just taken, so NFE = N levels.

x_t = (β_t/β_s) x_s − α_t (e^{−h} − 1) x̂0_s − α_t B(h) Σ_k ρ_k D_k, D_k = (x̂0_{s_k} − x̂0_s)/r_k,
r_k = (λ_{s_k} − λ_s)/h; the corrector adds the point t itself (r = 1) with the x̂0 evaluated there. Order p needs
N >= 2p − 1 levels (its first steps warm up and its last steps lower the order, as diffusers does); the default
order 3 is lowered to what N allows. The differences in λ need a finite first level.
"""

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from diffusion.core.denoiser import Denoiser, Grid
from diffusion.core.sampling.common import (
    Generator,
    Recorder,
    SampleOutput,
    Update,
    apply,
    level_names,
    require_finite_start,
)
from diffusion.errors import UserError

ORDERS = (1, 2, 3)


def _b(hh: float, order: int) -> list[float]:
    """g_k(h)/B(h) = hh·φ_{k+1}(hh)·k!/B(h) for k = 1..order, hh = -h, bh2: B(h) = e^{hh} - 1 (Zhao et al. 2023)."""
    B, g, fact, b = math.expm1(hh), math.expm1(hh) / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(g * fact / B)
        fact *= k + 1
        g = g / hh - 1 / fact  # φ_{k+1}(z) = (φ_k(z) - 1/k!)/z
    return b


def _rhos(rks: list[float], b: list[float]) -> list[float]:
    """Solve R_p ρ = b, R_p[j][k] = r_k^j: UniPC's coefficients for the divided differences (Zhao et al. 2023)."""
    R = torch.tensor([[r**j for r in rks] for j in range(len(rks))], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()


def unipc_step(g: Grid, i: int, p: int) -> tuple[Update, Update]:
    """UniP-p (predictor) and UniC-p (corrector) from level i to i+1."""
    lam = g.lam
    h = lam[i + 1] - lam[i]
    rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
    b = _b(-h, p)
    c_x, c_0 = g.beta[i + 1] / g.beta[i], -g.alpha[i + 1] * math.expm1(-h)  # the first-order (DDIM) part
    c_B = -g.alpha[i + 1] * math.expm1(-h)  # -α_t B(h), bh2: B(h) = e^{-h} - 1
    rho_p = [] if p == 1 else [0.5] if p == 2 else _rhos(rks, b[: p - 1])  # ρ = 1/2 at p = 2, as UniPC's code
    rho_c = [0.5] if p == 1 else _rhos([*rks, 1.0], b)

    def weights(rhos: list[float], rho_new: float) -> tuple[float, ...]:
        w_k = [c_B * rho / r for rho, r in zip(rhos, rks, strict=True)]  # on x̂0 at s_k, through D_k
        return (c_0 - sum(w_k) - c_B * rho_new, *w_k)  # on x̂0 at s: its own term and the -x̂0_s of every D_k

    predictor = Update(c_x, weights(rho_p, 0.0))
    corrector = Update(c_x, weights(rho_c[:-1], rho_c[-1]), w_new=c_B * rho_c[-1])
    return predictor, corrector


def most_order(num_levels: int) -> int:
    """The highest order N levels allow: order p needs N >= 2p - 1 (warm-up and lower_order_final meet)."""
    return min(ORDERS[-1], (num_levels + 1) // 2)


def _order(order: int | None, num_levels: int) -> int:
    """The order asked for (default: 3 where the grid allows), refused if the grid cannot reach it."""
    most = most_order(num_levels)
    if order is None:
        return min(3, most)
    if order not in ORDERS:
        raise UserError(f"unipc order must be 1, 2 or 3, got {order!r}; try order=3")
    if order > most:
        raise UserError(f"unipc order {order} needs at least {2 * order - 1} steps, got {num_levels}; "
                        f"use order={most} or steps={2 * order - 1}")
    return order


def unipc_sample(denoiser: Denoiser, x_T: Tensor, *, num_steps: int | None = None,
                 spacing: str | Sequence[int] = "logsnr", order: int | None = None,
                 generator: Generator = None, record_steps: Iterable[int] | None = None) -> SampleOutput:
    """UniPC-p, Zhao et al. 2023: UniP-p then UniC-p on each new network call, bh2, data prediction; NFE = N."""
    g = denoiser.grid(spacing, num_steps, from_top=True)
    require_finite_start(g, "unipc")
    N, names = g.num_levels, level_names(denoiser, g)
    order = _order(order, N)
    steps = [unipc_step(g, i, min(order, i + 1, N - i)) for i in range(N - 1)]  # warm-up, lower_order_final
    recorder, x, x_prev, x0s = Recorder(record_steps), x_T, x_T, []
    for i in range(N):
        x0 = denoiser(x, g.sigma[i])
        if 0 < i < N - 1:  # UniC on the step just taken, reusing this call; none after the last step (x = x̂0)
            x = apply(steps[i - 1][1], x_prev, x0s, x0_new=x0)
        x0s = [x0, *x0s[:2]]
        recorder(names[i], x, x0)
        if i < N - 1:
            x_prev, x = x, apply(steps[i][0], x, x0s)
    return recorder.output(x0s[0])
