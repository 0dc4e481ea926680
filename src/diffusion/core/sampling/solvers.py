"""Fast samplers over any `model(x_t, t) -> output` callable: DPM-Solver++(2M), its SDE variant, UniPC, Heun.

Each runs on a grid of N integer indices k_0 < ... < k_{N-1} = T-1 from `space_timesteps`, starting from
x_T ~ N(0, I) at index T-1 and calling the network only at those integer indices. The updates use the exact
ᾱ of the indices (α = sqrt(ᾱ), σ = sqrt(1-ᾱ), λ = log(α/σ)), so the λ and σ a solver steps with are the ones
the network saw. The last step goes to data, σ = 0 (ᾱ = 1, λ = +inf), where every update reduces to the x̂0
predicted at k_0, as DDIM's last step does. The solvers work with the data prediction x̂0 = x_θ(x_t, t),
converted from any parameterization (a learned variance is ignored); clip_denoised clamps every x̂0 to [-1, 1].
Trajectories hold x at each grid point (for UniPC, after its correction) and the x̂0 predicted there. Only
the SDE variant draws noise; the others take `generator` for the common signature and ignore it.

| solver         | num_steps (NFE budget) -> grid N | NFE    | fewest num_steps      | spacings            |
|----------------|----------------------------------|--------|-----------------------|---------------------|
| `dpmpp_2m`     | N = num_steps                    | N      | 1                     | linspace, trailing, |
| `dpmpp_2m_sde` | N = num_steps                    | N      | 1                     | logsnr, karras, or  |
| `unipc`        | N = num_steps                    | N      | 1; order p: 2p - 1    | a list of indices   |
| `heun`         | N = (num_steps + 1) // 2         | 2N - 1 | 1                     | ending at T-1       |

An explicit list of indices fixes N = its length (num_steps is then ignored). "leading" is refused: its grid
does not reach T-1, where x_T lives. Second-order updates need N >= 3 (dpmpp_2m) or N >= 2 (heun); UniPC of
order p needs N >= 2p - 1 (its first steps warm up and its last steps lower the order, as diffusers does), and
its default order is 3 lowered to what N allows.
"""

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion.core.gaussian import GaussianDiffusion
from diffusion.core.sampling.ancestral import Model, Recorder, SampleOutput, _step_indices
from diffusion.core.schedules import space_timesteps
from diffusion.errors import UserError


@dataclass(frozen=True)
class _Grid:
    """Grid indices in sampling order (T-1 first) and α, σ, λ there, with a final data point α=1, σ=0, λ=+inf."""

    steps: list[int]
    alpha: list[float]
    sigma: list[float]
    lam: list[float]


@dataclass(frozen=True)
class _Update:
    """x_next = c_x·x + Σ_j w[j]·x̂0_j (most recent first) + w_new·x̂0 at x_next (a corrector) + c_z·z."""

    c_x: float
    w: tuple[float, ...]
    w_new: float = 0.0
    c_z: float = 0.0


def _make_grid(diffusion: GaussianDiffusion, spacing: str | Sequence[int], num_grid: int | None) -> _Grid:
    """The solver's grid from space_timesteps, checked to start at T-1; α, σ, λ in float64 from the betas."""
    T = diffusion.num_timesteps
    if isinstance(spacing, str) and spacing == "leading":
        raise UserError("spacing 'leading' never reaches index T-1 where x_T lives; use spacing=trailing or logsnr")
    kept = space_timesteps(T, spacing, num_grid, alphas_cumprod=diffusion.alphas_cumprod_float64)
    if kept[-1] != T - 1:
        raise UserError(f"a solver's steps must end at index T-1={T - 1} (x_T), got {kept}; append {T - 1}")
    log_ac = torch.cumsum(torch.log1p(-diffusion.betas_float64), 0)[list(reversed(kept))]  # log ᾱ, T-1 first
    alpha, sigma = (0.5 * log_ac).exp(), (-torch.expm1(log_ac)).sqrt()
    lam = (alpha.log() - sigma.log()).tolist() + [math.inf]
    return _Grid(kept[::-1], alpha.tolist() + [1.0], sigma.tolist() + [0.0], lam)


def _denoise(model: Model, diffusion: GaussianDiffusion, x: Tensor, t: Tensor, clip_denoised: bool) -> Tensor:
    """x̂0 = x_θ(x_t, t) from the network's output under any parameterization (learned-variance half dropped)."""
    mean_out, _ = diffusion.split_output(model(x, t))
    x0 = diffusion.predict_x0(mean_out, x, t)
    return x0.clamp(-1.0, 1.0) if clip_denoised else x0


def _apply(u: _Update, x: Tensor, x0s: list[Tensor], x0_new: Tensor | None = None) -> Tensor:
    """One linear multistep update x_next = c_x x + Σ w_j x̂0_j (+ w_new x̂0_new), without its noise."""
    out = u.c_x * x
    for w, x0 in zip(u.w, x0s[: len(u.w)], strict=True):
        out = out + w * x0
    return out if x0_new is None else out + u.w_new * x0_new


def _check_num_steps(name: str, num_steps: int | None, fewest: int, most: int) -> None:
    if num_steps is not None and not fewest <= num_steps <= most:
        raise UserError(f"{name} needs num_steps (NFE) in [{fewest}, {most}], got {num_steps}; try steps=20")


# --- DPM-Solver++(2M) and its SDE variant ------------------------------------------------------------
def _dpmpp_2m_updates(g: _Grid, eta: float) -> list[_Update]:
    """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2 (first order at the first step); η > 0: its SDE form.

    x_t = (σ_t/σ_s) e^{-ηh} x_s + α_t (1 - e^{-(1+η)h}) D + σ_t sqrt(1 - e^{-2ηh}) z, h = λ_t - λ_s,
    D = (1 + 1/2r) x̂0_s - (1/2r) x̂0_prev, r = h_prev/h (k-diffusion's sample_dpmpp_2m_sde; η = 0 is the ODE).
    """
    updates = []
    for i in range(len(g.steps) - 1):  # the last step, to σ = 0, is x = x̂0
        h = g.lam[i + 1] - g.lam[i]
        c_x = g.sigma[i + 1] / g.sigma[i] * math.exp(-eta * h)
        c_d = -g.alpha[i + 1] * math.expm1(-(1 + eta) * h)
        c_z = g.sigma[i + 1] * math.sqrt(-math.expm1(-2 * eta * h))
        if i == 0:
            w = (c_d,)  # DPM-Solver++1 (= DDIM) for want of a previous x̂0
        else:
            half_inv_r = 0.5 * h / (g.lam[i] - g.lam[i - 1])
            w = (c_d * (1 + half_inv_r), -c_d * half_inv_r)
        updates.append(_Update(c_x, w, c_z=c_z))
    return updates


def _dpmpp_2m(model: Model, diffusion: GaussianDiffusion, x: Tensor, g: _Grid, eta: float, clip_denoised: bool,
              generator: torch.Generator | None, recorder: Recorder) -> Tensor:
    """Run the multistep updates of _dpmpp_2m_updates, one network call per grid point."""
    updates, t_model = _dpmpp_2m_updates(g, eta), _step_indices(g.steps, x.shape[0], x.device)
    noise, x0s = torch.empty_like(x), []
    for i, update in enumerate(updates):
        x0s = [_denoise(model, diffusion, x, t_model[i], clip_denoised), *x0s[:1]]
        recorder(g.steps[i], x, x0s[0])
        x = _apply(update, x, x0s)
        if update.c_z > 0:
            x = x + update.c_z * noise.normal_(generator=generator)
    x0 = _denoise(model, diffusion, x, t_model[-1], clip_denoised)
    recorder(g.steps[-1], x, x0)
    return x0


def dpmpp_2m_sample(model: Model, diffusion: GaussianDiffusion, x_T: Tensor, *, num_steps: int | None = None,
                    spacing: str | Sequence[int] = "logsnr", clip_denoised: bool = True,
                    generator: torch.Generator | None = None,
                    record_steps: Iterable[int] | None = None) -> SampleOutput:
    """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2, in data prediction: num_steps network calls."""
    _check_num_steps("dpmpp_2m", num_steps, 1, diffusion.num_timesteps)
    recorder = Recorder(record_steps)
    x0 = _dpmpp_2m(model, diffusion, x_T, _make_grid(diffusion, spacing, num_steps), 0.0, clip_denoised,
                   generator, recorder)
    return recorder.output(x0)


def dpmpp_2m_sde_sample(model: Model, diffusion: GaussianDiffusion, x_T: Tensor, *, num_steps: int | None = None,
                        spacing: str | Sequence[int] = "logsnr", eta: float = 1.0, clip_denoised: bool = True,
                        generator: torch.Generator | None = None,
                        record_steps: Iterable[int] | None = None) -> SampleOutput:
    """SDE-DPM-Solver++(2M), Lu et al. 2022, with noise scale η (η = 1: diffusers' sde-dpmsolver++; η = 0: ODE)."""
    if not (math.isfinite(eta) and eta >= 0):
        raise UserError(f"sampler.eta must be >= 0 for dpmpp_2m_sde, got {eta}; use 1 for the SDE, 0 for the ODE")
    _check_num_steps("dpmpp_2m_sde", num_steps, 1, diffusion.num_timesteps)
    recorder = Recorder(record_steps)
    x0 = _dpmpp_2m(model, diffusion, x_T, _make_grid(diffusion, spacing, num_steps), eta, clip_denoised,
                   generator, recorder)
    return recorder.output(x0)


# --- UniPC ---------------------------------------------------------------------------------------------
def _unipc_b(hh: float, order: int) -> list[float]:
    """g_k(h)/B(h) = hh·φ_{k+1}(hh)·k!/B(h) for k = 1..order, hh = -h, bh2: B(h) = e^{hh} - 1 (Zhao et al. 2023)."""
    B, g, fact, b = math.expm1(hh), math.expm1(hh) / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(g * fact / B)
        fact *= k + 1
        g = g / hh - 1 / fact  # φ_{k+1}(z) = (φ_k(z) - 1/k!)/z
    return b


def _unipc_rhos(rks: list[float], b: list[float]) -> list[float]:
    """Solve R_p ρ = b, R_p[j][k] = r_k^j: UniPC's coefficients for the divided differences (Zhao et al. 2023)."""
    R = torch.tensor([[r**j for r in rks] for j in range(len(rks))], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()


def _unipc_step(g: _Grid, i: int, p: int) -> tuple[_Update, _Update]:
    """UniP-p (predictor) and UniC-p (corrector) from grid point i to i+1, data prediction, bh2 (Zhao et al. 2023).

    x_t = (σ_t/σ_s) x_s - α_t (e^{-h} - 1) x̂0_s - α_t B(h) Σ_k ρ_k D_k, D_k = (x̂0_{s_k} - x̂0_s)/r_k,
    r_k = (λ_{s_k} - λ_s)/h; the corrector adds the point t itself (r = 1) with the x̂0 evaluated there.
    """
    h = g.lam[i + 1] - g.lam[i]
    rks = [(g.lam[i - k] - g.lam[i]) / h for k in range(1, p)]
    b = _unipc_b(-h, p)
    c_x, c_0 = g.sigma[i + 1] / g.sigma[i], -g.alpha[i + 1] * math.expm1(-h)  # the first-order (DDIM) part
    c_B = -g.alpha[i + 1] * math.expm1(-h)  # -α_t B(h), bh2: B(h) = e^{-h} - 1
    rho_p = [] if p == 1 else [0.5] if p == 2 else _unipc_rhos(rks, b[: p - 1])  # ρ = 1/2 at p = 2, as UniPC's code
    rho_c = [0.5] if p == 1 else _unipc_rhos([*rks, 1.0], b)

    def weights(rhos: list[float], rho_new: float) -> tuple[float, ...]:
        w_k = [c_B * rho / r for rho, r in zip(rhos, rks, strict=True)]  # on x̂0 at s_k, through D_k
        return (c_0 - sum(w_k) - c_B * rho_new, *w_k)  # on x̂0 at s: its own term and the -x̂0_s of every D_k

    predictor = _Update(c_x, weights(rho_p, 0.0))
    corrector = _Update(c_x, weights(rho_c[:-1], rho_c[-1]), w_new=c_B * rho_c[-1])
    return predictor, corrector


UNIPC_ORDERS = (1, 2, 3)


def unipc_most_order(num_grid: int) -> int:
    """The highest order N grid points allow: order p needs N >= 2p - 1 (warm-up and lower_order_final meet)."""
    return min(UNIPC_ORDERS[-1], (num_grid + 1) // 2)


def _unipc_order(order: int | None, num_grid: int) -> int:
    """The order asked for (default: 3 where the grid allows), refused if the grid cannot reach it."""
    most = unipc_most_order(num_grid)
    if order is None:
        return min(3, most)
    if order not in UNIPC_ORDERS:
        raise UserError(f"unipc order must be 1, 2 or 3, got {order!r}; try order=3")
    if order > most:
        raise UserError(f"unipc order {order} needs at least {2 * order - 1} steps, got {num_grid}; "
                        f"use order={most} or steps={2 * order - 1}")
    return order


def unipc_sample(model: Model, diffusion: GaussianDiffusion, x_T: Tensor, *, num_steps: int | None = None,
                 spacing: str | Sequence[int] = "logsnr", order: int | None = None, clip_denoised: bool = True,
                 generator: torch.Generator | None = None,
                 record_steps: Iterable[int] | None = None) -> SampleOutput:
    """UniPC-p, Zhao et al. 2023: UniP-p then UniC-p on each new network call, bh2, data prediction; NFE = N."""
    _check_num_steps("unipc", num_steps, 1, diffusion.num_timesteps)
    g = _make_grid(diffusion, spacing, num_steps)
    N, order = len(g.steps), _unipc_order(order, len(g.steps))
    steps = [_unipc_step(g, i, min(order, i + 1, N - i)) for i in range(N - 1)]  # warm-up, lower_order_final
    recorder, t_model = Recorder(record_steps), _step_indices(g.steps, x_T.shape[0], x_T.device)
    x, x_prev, x0s = x_T, x_T, []
    for i in range(N):
        x0 = _denoise(model, diffusion, x, t_model[i], clip_denoised)
        if 0 < i < N - 1:  # UniC on the step just taken, reusing this call; none after the last step (x = x̂0)
            x = _apply(steps[i - 1][1], x_prev, x0s, x0_new=x0)
        x0s = [x0, *x0s[:2]]
        recorder(g.steps[i], x, x0)
        if i < N - 1:
            x_prev, x = x, _apply(steps[i][0], x, x0s)
    return recorder.output(x0s[0])


# --- Heun ----------------------------------------------------------------------------------------------
def heun_sample(model: Model, diffusion: GaussianDiffusion, x_T: Tensor, *, num_steps: int | None = None,
                spacing: str | Sequence[int] = "karras", clip_denoised: bool = True,
                generator: torch.Generator | None = None,
                record_steps: Iterable[int] | None = None) -> SampleOutput:
    """Heun's method on the PF-ODE dx̃/dσ = (x̃ - x̂0)/σ, x̃ = x_t/α (Karras et al. 2022 Algorithm 1): 2N-1 NFE."""
    T = diffusion.num_timesteps
    _check_num_steps("heun", num_steps, 1, SOLVER_SPECS["heun"].most_steps(T))
    g = _make_grid(diffusion, spacing, None if num_steps is None else (num_steps + 1) // 2)
    s = [math.exp(-lam) for lam in g.lam]  # σ of the VE form, σ/α = e^{-λ}; 0 at the end
    recorder, t_model = Recorder(record_steps), _step_indices(g.steps, x_T.shape[0], x_T.device)
    x, last = x_T / g.alpha[0], len(g.steps) - 1
    for i in range(last):
        x0 = _denoise(model, diffusion, g.alpha[i] * x, t_model[i], clip_denoised)
        recorder(g.steps[i], g.alpha[i] * x, x0)
        d = (x - x0) / s[i]
        x_euler = x + (s[i + 1] - s[i]) * d  # Euler step
        x0_euler = _denoise(model, diffusion, g.alpha[i + 1] * x_euler, t_model[i + 1], clip_denoised)
        x = x + (s[i + 1] - s[i]) * 0.5 * (d + (x_euler - x0_euler) / s[i + 1])  # 2nd-order correction
    x0 = _denoise(model, diffusion, g.alpha[last] * x, t_model[last], clip_denoised)
    recorder(g.steps[last], g.alpha[last] * x, x0)
    return recorder.output(x0)  # Euler to σ = 0: x̃ + (0 - σ)(x̃ - x̂0)/σ = x̂0


# --- the table ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SolverSpec:
    """A solver's fewest num_steps, its spacings, the network calls it makes for a budget num_steps, and the
    most num_steps a T-step model allows (N <= T grid points)."""

    fewest_steps: int
    spacings: tuple[str, ...]
    nfe: Callable[[int], int]
    most_steps: Callable[[int], int] = lambda T: T


SOLVER_SPACINGS = ("linspace", "trailing", "logsnr", "karras")  # or a list of indices ending at T-1
SOLVERS = {"dpmpp_2m": dpmpp_2m_sample, "dpmpp_2m_sde": dpmpp_2m_sde_sample, "unipc": unipc_sample,
           "heun": heun_sample}
SOLVER_SPECS = {
    "dpmpp_2m": SolverSpec(1, SOLVER_SPACINGS, lambda n: n),
    "dpmpp_2m_sde": SolverSpec(1, SOLVER_SPACINGS, lambda n: n),
    "unipc": SolverSpec(1, SOLVER_SPACINGS, lambda n: n),  # order p needs 2p - 1; the default order adapts
    "heun": SolverSpec(1, SOLVER_SPACINGS, lambda n: 2 * ((n + 1) // 2) - 1, lambda T: 2 * T),
}
