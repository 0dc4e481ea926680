"""The Gaussian diffusion of Ho et al. 2020: forward process, posterior, parameterizations, p(x_{t-1}|x_t).

Timestep convention: an index ``t`` in ``[0, T-1]`` is the paper's step ``t+1``; index 0 is the decoder
step (paper t=1), whose posterior variance is 0. Indices are int64 tensors of shape (B,) and are never
remapped. Coefficients are computed in float64 from the betas and rounded once to ``dtype`` (float32 by
default; pass ``dtype=torch.float64`` to sample or evaluate in double precision).

Parameterizations of the network output: "eps" (the paper's choice), "x0", "v" (Salimans & Ho 2022) and
"mean" (μ̃ directly, the paper's Table 2 baseline). Variances: "fixed_large" (σ² = β_t, the paper's code
"fixedlarge"), "fixed_small" (σ² = β̃_t) and "learned_range" (Nichol & Dhariwal 2021 Eq. 15, which
doubles the network's output channels).
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffusion.core.schedules import check_betas
from diffusion.errors import UserError

PARAMETERIZATIONS = ("eps", "x0", "v", "mean")
VARIANCES = ("fixed_large", "fixed_small", "learned_range")


def extract(coef: Tensor, t: Tensor, x_shape: torch.Size) -> Tensor:
    """Gather coef[t] for a batch of indices t, shaped (B, 1, ..., 1) to broadcast against x."""
    return coef[t].reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


@dataclass
class PMeanVariance:
    """The reverse step's Gaussian p(x_{t-1} | x_t) and the x0 it implies."""

    mean: Tensor
    variance: Tensor
    log_variance: Tensor
    x0_pred: Tensor
    eps_pred: Tensor


def _schedule_arrays(betas: Tensor) -> dict[str, Tensor]:
    """Every per-step coefficient of Ho et al. 2020 Eqs. 4-7, in float64."""
    alphas = 1.0 - betas
    # ᾱ_t through log-space sums so that 1 - ᾱ_t keeps its digits at small t (where ᾱ_t ≈ 1).
    log_alphas_cumprod = torch.cumsum(torch.log1p(-betas), 0)
    alphas_cumprod = log_alphas_cumprod.exp()
    one_minus = -torch.expm1(log_alphas_cumprod)  # 1 - ᾱ_t
    one_minus_prev = torch.cat([betas.new_zeros(1), one_minus[:-1]])
    alphas_cumprod_prev = torch.cat([betas.new_ones(1), alphas_cumprod[:-1]])
    posterior_variance = betas * one_minus_prev / one_minus  # β̃_t, Eq. 7
    # log β̃ clipped at the first step (β̃ there is 0), as the paper's code: log(append(β̃_1, β̃[1:])).
    first = posterior_variance[1:2] if len(betas) > 1 else betas[:1]
    log_var_clipped = torch.log(torch.cat([first, posterior_variance[1:]]))
    # σ² = β_t ("fixedlarge"); the paper's code also uses β̃ at the first step so that L_0 is sensible.
    large_variance = torch.cat([first, betas[1:]])
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "one_minus_alphas_cumprod": one_minus,
        "sqrt_one_minus_alphas_cumprod": one_minus.sqrt(),
        "log_one_minus_alphas_cumprod": one_minus.log(),
        "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": torch.expm1(-log_alphas_cumprod).sqrt(),  # sqrt(1/ᾱ_t - 1)
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": log_var_clipped,
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / one_minus,
        "posterior_mean_coef2": one_minus_prev * alphas.sqrt() / one_minus,
        "log_betas": torch.log(betas),
        "large_variance": large_variance,
        "large_log_variance": torch.log(large_variance),
        "snr": alphas_cumprod / one_minus,
    }


class GaussianDiffusion(nn.Module):
    """Schedule coefficients as buffers (not parameters: EMA and optimizers never touch them)."""

    def __init__(
        self,
        betas: Tensor,
        parameterization: str,
        variance: str,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise UserError(
                f"diffusion.parameterization must be one of {list(PARAMETERIZATIONS)}, "
                f"got {parameterization!r}; try diffusion.parameterization=eps"
            )
        if variance not in VARIANCES:
            raise UserError(
                f"diffusion.variance must be one of {list(VARIANCES)}, got {variance!r}; "
                "try diffusion.variance=fixed_large"
            )
        self.parameterization = parameterization
        self.variance = variance
        self.num_timesteps = len(betas)
        self.betas_float64 = check_betas(betas)  # the exact schedule, kept on the CPU for respacing
        for name, value in _schedule_arrays(self.betas_float64).items():
            # Computed in float64, rounded once to dtype; not persistent: rebuilt from the config.
            self.register_buffer(name, value.to(dtype), persistent=False)

    @property
    def alphas_cumprod_float64(self) -> Tensor:
        """ᾱ_t in float64 on the CPU, whatever the buffers' dtype and device."""
        return torch.cumprod(1.0 - self.betas_float64, 0)

    @property
    def learned_variance(self) -> bool:
        return self.variance == "learned_range"

    def check_timesteps(self, t: Tensor) -> None:
        """Raise if any index lies outside [0, T-1] (call at public boundaries, not per sampling step)."""
        if t.dtype not in (torch.int32, torch.int64) or t.min() < 0 or t.max() >= self.num_timesteps:
            raise UserError(
                f"timesteps must be int64 indices in [0, {self.num_timesteps - 1}], got dtype {t.dtype} "
                f"and range [{t.min().item()}, {t.max().item()}]; index t is the paper's step t+1"
            )

    # --- forward process -------------------------------------------------------------------------
    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0), Ho et al. 2020 Eq. 4."""
        mean = extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
        variance = extract(self.one_minus_alphas_cumprod, t, x0.shape)
        return mean, variance, extract(self.log_one_minus_alphas_cumprod, t, x0.shape)

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Sample q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1-ᾱ_t) I), Ho et al. 2020 Eq. 4."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * eps
        )

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean μ̃_t, variance β̃_t and clipped log-variance of q(x_{t-1} | x_t, x_0), Eqs. 6-7."""
        mean = (
            extract(self.posterior_mean_coef1, t, x_t.shape) * x0
            + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = extract(self.posterior_variance, t, x_t.shape)
        return mean, variance, extract(self.posterior_log_variance_clipped, t, x_t.shape)

    # --- parameterization conversions (exact) ---------------------------------------------------
    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0 = (x_t - sqrt(1-ᾱ_t) eps) / sqrt(ᾱ_t), inverting Eq. 4."""
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """eps = (x_t - sqrt(ᾱ_t) x0) / sqrt(1-ᾱ_t), inverting Eq. 4."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0) / extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.shape
        )

    def predict_x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x0 = sqrt(ᾱ_t) x_t - sqrt(1-ᾱ_t) v, Salimans & Ho 2022 Sec. 4."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v
        )

    def v_from_x0_eps(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(ᾱ_t) eps - sqrt(1-ᾱ_t) x0, Salimans & Ho 2022 Sec. 4."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.shape) * eps
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0
        )

    def predict_x0_from_mean(self, x_t: Tensor, t: Tensor, mean: Tensor) -> Tensor:
        """x0 from the posterior mean μ̃ by inverting Eq. 7 (coef1 > 0 at every step)."""
        return (mean - extract(self.posterior_mean_coef2, t, x_t.shape) * x_t) / extract(
            self.posterior_mean_coef1, t, x_t.shape
        )

    def split_output(self, model_out: Tensor) -> tuple[Tensor, Tensor | None]:
        """Split the net's output into the mean part and, for learned variance, the interpolation part."""
        if not self.learned_variance:
            return model_out, None
        return model_out.chunk(2, dim=1)

    def predict_x0(self, mean_out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x0 implied by the network's (mean-channel) output under this parameterization."""
        if self.parameterization == "eps":
            return self.predict_x0_from_eps(x_t, t, mean_out)
        if self.parameterization == "x0":
            return mean_out
        if self.parameterization == "v":
            return self.predict_x0_from_v(x_t, t, mean_out)
        return self.predict_x0_from_mean(x_t, t, mean_out)

    def training_target(self, x0: Tensor, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """What the network should output for this parameterization (eps, x0, v or μ̃)."""
        if self.parameterization == "eps":
            return eps
        if self.parameterization == "x0":
            return x0
        if self.parameterization == "v":
            return self.v_from_x0_eps(x0, eps, t)
        return self.q_posterior_mean_variance(x0, x_t, t)[0]

    # --- reverse process ---------------------------------------------------------------------------
    def model_log_variance(self, var_out: Tensor | None, x_t: Tensor, t: Tensor) -> Tensor:
        """log σ_t²: fixed β_t or β̃_t (paper Sec. 3.2), or learned, Nichol & Dhariwal 2021 Eq. 15."""
        if self.variance == "fixed_large":
            return extract(self.large_log_variance, t, x_t.shape).expand_as(x_t)
        if self.variance == "fixed_small":
            return extract(self.posterior_log_variance_clipped, t, x_t.shape).expand_as(x_t)
        frac = (var_out + 1) / 2  # network output in [-1, 1] -> interpolation weight in [0, 1]
        min_log = extract(self.posterior_log_variance_clipped, t, x_t.shape)
        max_log = extract(self.log_betas, t, x_t.shape)
        return frac * max_log + (1 - frac) * min_log

    def p_mean_variance(self, model_out: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = True) -> PMeanVariance:
        """p(x_{t-1} | x_t) from the network output: mean by Eq. 11 (via x̂0 and Eq. 7), variance as configured."""
        mean_out, var_out = self.split_output(model_out)
        log_variance = self.model_log_variance(var_out, x_t, t)
        x0_pred = self.predict_x0(mean_out, x_t, t)
        if clip_denoised:
            x0_pred = x0_pred.clamp(-1.0, 1.0)
        if self.parameterization == "mean":
            mean = mean_out  # the network predicts μ̃ itself; clipping only affects the reported x̂0
        else:
            mean = self.q_posterior_mean_variance(x0_pred, x_t, t)[0]
        eps_pred = self.predict_eps_from_x0(x_t, t, x0_pred)
        return PMeanVariance(mean, log_variance.exp(), log_variance, x0_pred, eps_pred)
