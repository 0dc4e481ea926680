"""Beta schedules as pure functions returning float64 tensors of length T, and timestep respacing.

Their parameters have no defaults here: the paper's values (1e-4 to 0.02 over T = 1000; cosine s = 0.008) are
written once, in the schedule group's schemas (config/groups.py). Nor are they checked here: the schemas' rules
and config/validation.py (beta_end > beta_start) check a config before anything is built, and the diffusers reader
checks a scheduler file's values itself.

Every schedule is built in float64 (a float32 cumprod over T=1000 steps loses digits that the
variational bound needs); callers round once to the network's dtype.
"""

import math
from collections.abc import Sequence

import torch

from diffusion.errors import UserError

LINEAR_REFERENCE_TIMESTEPS = 1000  # linear_scaled: its beta_start and beta_end are those of T = 1000
SPACINGS = ("linspace", "leading", "trailing", "logsnr", "karras")
SNR_SPACINGS = ("logsnr", "karras")  # these need the schedule's ᾱ
KARRAS_RHO = 7.0  # Karras et al. 2022 Eq. 5


def _check_num_timesteps(num_timesteps: int) -> None:
    if not isinstance(num_timesteps, int) or isinstance(num_timesteps, bool) or num_timesteps < 1:
        raise UserError(
            f"schedule.num_timesteps must be an integer >= 1, got {num_timesteps!r}; "
            "try schedule.num_timesteps=1000"
        )


def check_betas(betas: torch.Tensor) -> torch.Tensor:
    """Check a 1-D schedule lies in (0, 1) and return it as float64."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1 or betas.numel() < 1:
        raise UserError(
            f"betas must be a non-empty 1-D list, got shape {tuple(betas.shape)}; "
            "try schedule.betas=[0.0001,0.02]"
        )
    bad = ((betas <= 0) | (betas >= 1) | ~torch.isfinite(betas)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise UserError(
            f"every beta must be in (0, 1), got betas[{i}]={betas[i].item()}; "
            "fix that entry of schedule.betas (the paper uses 1e-4 to 0.02)"
        )
    return betas


def linear_beta_schedule(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Linear betas from beta_start to beta_end, Ho et al. 2020 Sec. 4 (1e-4 to 0.02 for T=1000)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def linear_scaled_beta_schedule(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Linear betas whose ends are scaled by 1000/T (Nichol & Dhariwal 2021's code, get_named_beta_schedule
    "linear"): every T then ends near the paper's ᾱ_T of T = 1000, and T = 1000 is the paper's schedule exactly."""
    scale = LINEAR_REFERENCE_TIMESTEPS / num_timesteps
    return linear_beta_schedule(num_timesteps, scale * beta_start, scale * beta_end)


def quadratic_beta_schedule(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Betas linear in sqrt(beta) from beta_start to beta_end (the 'quad' schedule of the paper's code)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def sigmoid_beta_schedule(num_timesteps: int, beta_start: float, beta_end: float, steepness: float) -> torch.Tensor:
    """Betas along a sigmoid over [-steepness, steepness], scaled to [beta_start, beta_end] (GeoDiff's sigmoid
    schedule, Xu et al. 2022, with steepness 6)."""
    x = torch.linspace(-steepness, steepness, num_timesteps, dtype=torch.float64)
    return torch.sigmoid(x) * (beta_end - beta_start) + beta_start


def cosine_alphas_cumprod(t: torch.Tensor, s: float) -> torch.Tensor:
    """ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s)·π/2), t in [0, 1]: Nichol & Dhariwal 2021 Eq. 17."""
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return f / math.cos(s / (1 + s) * math.pi / 2) ** 2


def cosine_beta_schedule(num_timesteps: int, s: float, max_beta: float) -> torch.Tensor:
    """Cosine schedule, Nichol & Dhariwal 2021 Eq. 17: beta_t = 1 - ᾱ(t)/ᾱ(t-1), clipped at max_beta."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alphas_cumprod = cosine_alphas_cumprod(steps, s)
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=max_beta)


def explicit_beta_schedule(betas: Sequence[float], num_timesteps: int | None) -> torch.Tensor:
    """A user-given list of betas as given: T is their number. num_timesteps, when given, equals it (validation refuses
    any other: no beta is dropped or made up), as the schema checks they lie in (0, 1)."""
    return torch.tensor(list(betas), dtype=torch.float64)


BETA_SCHEDULES = {
    "linear": linear_beta_schedule,
    "linear_scaled": linear_scaled_beta_schedule,
    "cosine": cosine_beta_schedule,
    "quadratic": quadratic_beta_schedule,
    "sigmoid": sigmoid_beta_schedule,
}


def make_beta_schedule(name: str, num_timesteps: int, **kwargs) -> torch.Tensor:
    """Build a named schedule ("linear", "linear_scaled", "cosine", "quadratic", "sigmoid") of num_timesteps float64
    betas."""
    if name not in BETA_SCHEDULES:
        raise UserError(
            f"unknown beta schedule {name!r}; choose one of {sorted(BETA_SCHEDULES)} or give explicit betas"
        )
    return BETA_SCHEDULES[name](num_timesteps, **kwargs)


def space_timesteps(num_timesteps: int, spacing: str | Sequence[int], num_steps: int | None = None,
                    alphas_cumprod: torch.Tensor | None = None) -> list[int]:
    """Pick the kept timestep indices (increasing, in [0, T-1]) for a K-step sampler.

    linspace: round(linspace(0, T-1, K)); leading: 0, T//K, 2T//K, ...; trailing: T-1, T-1-T/K, ...
    (the three spacings of Lin et al. 2024, Table 2); or an explicit increasing list of indices.
    logsnr: uniform in λ = log(ᾱ/(1-ᾱ)) from λ(T-1) to λ(0); karras: σ = sqrt((1-ᾱ)/ᾱ) from σ(T-1) to σ(0)
    with ρ = 7 (Karras et al. 2022 Eq. 5). These two need `alphas_cumprod` and fall between integer steps:
    each target is ROUNDED to the index with the nearest λ (the same as rounding the time that linear
    interpolation of λ between integer steps gives), and a repeated index moves up to the next free one
    (then, if that overruns, down from T-1), so K <= T always gives K distinct indices, 0 and T-1 included.
    Samplers use the exact ᾱ of these integer indices: the λ and σ they step with are the ones the network sees.
    """
    _check_num_timesteps(num_timesteps)
    if not isinstance(spacing, str):
        return _check_explicit_steps(list(spacing), num_timesteps)
    if spacing not in SPACINGS:
        raise UserError(f"unknown timestep spacing {spacing!r}; choose one of {list(SPACINGS)} or a list of steps")
    if num_steps is None or not 1 <= num_steps <= num_timesteps:
        raise UserError(
            f"number of sampling steps must be in [1, {num_timesteps}], got {num_steps}; "
            f"try steps={min(50, num_timesteps)}"
        )
    if spacing in SNR_SPACINGS:
        log_snr = _log_snr(alphas_cumprod, num_timesteps, spacing)
        return _round_to_steps(log_snr, _log_snr_targets(spacing, log_snr, num_steps))
    if spacing == "linspace":
        steps = torch.linspace(0, num_timesteps - 1, num_steps, dtype=torch.float64).round()
    elif spacing == "leading":
        steps = torch.arange(num_steps, dtype=torch.float64) * (num_timesteps // num_steps)
    else:
        steps = (torch.arange(num_timesteps, 0, -num_timesteps / num_steps, dtype=torch.float64).round() - 1)
    return sorted(int(s) for s in steps[:num_steps].tolist())


def _log_snr(alphas_cumprod: torch.Tensor | None, num_timesteps: int, spacing: str) -> torch.Tensor:
    """λ_t = log(ᾱ_t / (1 - ᾱ_t)) in float64, decreasing in t, after checking ᾱ was given and fits."""
    if alphas_cumprod is None:
        raise UserError(
            f"spacing {spacing!r} needs the schedule's ᾱ; pass alphas_cumprod=diffusion.alphas_cumprod_float64 "
            "or use spacing=linspace"
        )
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    if ac.shape != (num_timesteps,) or not ((ac > 0) & (ac < 1)).all() or not (ac[1:] < ac[:-1]).all():
        raise UserError(
            f"alphas_cumprod must be {num_timesteps} decreasing values in (0, 1), got shape {tuple(ac.shape)}; "
            "pass diffusion.alphas_cumprod_float64"
        )
    return torch.log(ac) - torch.log1p(-ac)


def _log_snr_targets(spacing: str, log_snr: torch.Tensor, num_steps: int) -> torch.Tensor:
    """K target λs from λ(T-1) up to λ(0): uniform in λ, or in σ^(1/ρ) (Karras et al. 2022 Eq. 5)."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)  # 0 at T-1 (noise), 1 at index 0 (data)
    if spacing == "logsnr":
        return log_snr[-1] + ramp * (log_snr[0] - log_snr[-1])
    sigma_max, sigma_min = torch.exp(-0.5 * log_snr[-1]), torch.exp(-0.5 * log_snr[0])
    inv_rho = 1 / KARRAS_RHO
    sigmas = (sigma_max**inv_rho + ramp * (sigma_min**inv_rho - sigma_max**inv_rho)) ** KARRAS_RHO
    return -2 * torch.log(sigmas)  # λ = -2 log σ


def _round_to_steps(log_snr: torch.Tensor, targets: torch.Tensor) -> list[int]:
    """The index of nearest λ for each target, repeats moved up to the next free index (then below T-1)."""
    nearest = (log_snr[None, :] - targets[:, None]).abs().argmin(dim=1)  # (K,)
    steps: list[int] = []
    for s in sorted(nearest.tolist()):  # from data (index 0) towards noise
        steps.append(s if not steps else max(s, steps[-1] + 1))
    top = len(log_snr)
    for j in reversed(range(len(steps))):  # an overrun past T-1 is pulled back down, keeping them distinct
        steps[j] = top = min(steps[j], top - 1)
    return steps


def _check_explicit_steps(steps: list[int], num_timesteps: int) -> list[int]:
    if not steps or any(not 0 <= int(s) < num_timesteps for s in steps):
        raise UserError(
            f"explicit sampling steps must be indices in [0, {num_timesteps - 1}], got {steps}; "
            "give an increasing list such as [0, 250, 500, 750, 999]"
        )
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise UserError(f"explicit sampling steps must be strictly increasing, got {steps}; sort them and drop repeats")
    return [int(s) for s in steps]


def respace_betas(alphas_cumprod: torch.Tensor, kept_steps: Sequence[int]) -> torch.Tensor:
    """Betas of the K-step process keeping ᾱ on kept_steps: β'_i = 1 - ᾱ_{k_i}/ᾱ_{k_{i-1}} (Nichol & Dhariwal 2021
    Sec. 4)."""
    kept = alphas_cumprod.to(torch.float64)[torch.as_tensor(list(kept_steps), dtype=torch.long)]
    prev = torch.cat([kept.new_ones(1), kept[:-1]])
    return 1 - kept / prev
