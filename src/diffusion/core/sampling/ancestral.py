"""Ancestral DDPM, DDIM and respaced DDPM over any `model(x_t, t) -> output` callable.

Every coefficient the loop needs lives on the sample's device before the loop starts; each step only
indexes those tensors (views or device-side gathers), so nothing is re-created or copied host→device
per step. Pass `dtype=torch.float64` to GaussianDiffusion and a float64 x_T to sample in double.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion.core.gaussian import GaussianDiffusion
from diffusion.core.schedules import respace_betas, space_timesteps
from diffusion.errors import UserError

Model = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Trajectory:
    """x_t entering each recorded step and the x̂0 predicted there, in sampling order (paper Fig. 6)."""

    steps: list[int]  # original timestep indices, decreasing
    x_t: Tensor  # (S, B, C, H, W)
    x0_pred: Tensor  # (S, B, C, H, W)


@dataclass
class SampleOutput:
    """Final samples x_0 and, when asked for, the trajectory."""

    x0: Tensor
    trajectory: Trajectory | None = None


class Recorder:
    """Keep x_t and x̂0 at the chosen original timesteps."""

    def __init__(self, record_steps: Iterable[int] | None):
        self.wanted = None if record_steps is None else set(int(s) for s in record_steps)
        self.steps, self.x_t, self.x0 = [], [], []

    def __call__(self, t: int, x_t: Tensor, x0_pred: Tensor) -> None:
        if self.wanted is not None and t in self.wanted:
            self.steps.append(t)
            self.x_t.append(x_t.clone())
            self.x0.append(x0_pred.clone())

    def output(self, x0: Tensor) -> SampleOutput:
        if self.wanted is None:
            return SampleOutput(x0)
        if not self.steps:
            return SampleOutput(x0, Trajectory([], x0.new_zeros(0, *x0.shape), x0.new_zeros(0, *x0.shape)))
        return SampleOutput(x0, Trajectory(self.steps, torch.stack(self.x_t), torch.stack(self.x0)))


def _step_indices(timesteps: Sequence[int], batch_size: int, device: torch.device) -> Tensor:
    """(K, B) int64 indices on the device, built once; row i is the batch of step i."""
    return torch.as_tensor(list(timesteps), dtype=torch.long, device=device)[:, None].expand(-1, batch_size)


def ancestral_loop(model: Model, diffusion: GaussianDiffusion, x: Tensor, *, start: int | None = None,
                   model_steps: Sequence[int] | None = None, clip_denoised: bool = True,
                   noise: Callable[[Tensor], Tensor] | None = None, recorder: "Recorder | None" = None) -> Tensor:
    """Algorithm 2 from the diffusion's step `start` (default T-1) down to x_0, Ho et al. 2020.

    The model sees the original indices `model_steps` (a respaced chain's kept steps; default its own steps).
    `noise(x)` gives z for each step (default N(0, I) like x); the last step adds none.
    """
    start = diffusion.num_timesteps - 1 if start is None else start
    model_steps = range(diffusion.num_timesteps) if model_steps is None else model_steps
    noise = noise or (lambda like: torch.randn_like(like))
    B = x.shape[0]
    t_own = _step_indices(range(start + 1), B, x.device)  # (K, B)
    t_model = _step_indices(model_steps[: start + 1], B, x.device)  # (K, B)
    for i in reversed(range(start + 1)):
        p = diffusion.p_mean_variance(model(x, t_model[i]), x, t_own[i], clip_denoised)
        if recorder is not None:
            recorder(model_steps[i], x, p.x0_pred)
        x = p.mean
        if i > 0:  # x_{t-1} = μ + σ z, z ~ N(0, I); no noise at the last step
            x = x + (0.5 * p.log_variance).exp() * noise(x)
    return x


def gaussian_noise(generator: torch.Generator | None) -> Callable[[Tensor], Tensor]:
    """z ~ N(0, I) shaped like x from `generator`, into one buffer reused at every step."""
    buffer: list[Tensor] = []

    def draw(like: Tensor) -> Tensor:
        if not buffer:
            buffer.append(torch.empty_like(like))
        return buffer[0].normal_(generator=generator)

    return draw


def ddpm_sample(model: Model, diffusion: GaussianDiffusion, x_T: Tensor, *, clip_denoised: bool = True,
                generator: torch.Generator | None = None, record_steps: Iterable[int] | None = None) -> SampleOutput:
    """Ancestral sampling, Ho et al. 2020 Algorithm 2, with the diffusion's fixed or learned variance."""
    recorder = Recorder(record_steps)
    x0 = ancestral_loop(model, diffusion, x_T, clip_denoised=clip_denoised, noise=gaussian_noise(generator),
                        recorder=recorder)
    return recorder.output(x0)


def respace(diffusion: GaussianDiffusion, kept_steps: Sequence[int]) -> GaussianDiffusion:
    """The K-step diffusion whose ᾱ equals the original's on kept_steps (betas recomputed in float64)."""
    betas = respace_betas(diffusion.alphas_cumprod_float64, kept_steps)
    parameterization = "x0" if diffusion.parameterization == "mean" else diffusion.parameterization
    respaced = GaussianDiffusion(betas, parameterization, diffusion.variance, dtype=diffusion.betas.dtype)
    return respaced.to(diffusion.betas.device)


def _mean_to_x0(model: Model, diffusion: GaussianDiffusion) -> Model:
    """Wrap a μ̃-predicting model so it predicts x0 (μ̃ belongs to the original chain, x0 to every chain)."""

    def wrapped(x_t: Tensor, t: Tensor) -> Tensor:
        mean_out, var_out = diffusion.split_output(model(x_t, t))
        x0 = diffusion.predict_x0_from_mean(x_t, t, mean_out)
        return x0 if var_out is None else torch.cat([x0, var_out], dim=1)

    return wrapped


def respaced_sample(model: Model, diffusion: GaussianDiffusion, x_T: Tensor, *, num_steps: int | None = None,
                    spacing: str | Sequence[int] = "linspace", clip_denoised: bool = True,
                    generator: torch.Generator | None = None,
                    record_steps: Iterable[int] | None = None) -> SampleOutput:
    """Ancestral sampling over K of T steps, each step going to the previous *kept* step (Nichol & Dhariwal 2021)."""
    kept = space_timesteps(diffusion.num_timesteps, spacing, num_steps, diffusion.alphas_cumprod_float64)
    respaced = respace(diffusion, kept)
    if diffusion.parameterization == "mean":
        model = _mean_to_x0(model, diffusion)
    recorder = Recorder(record_steps)
    x0 = ancestral_loop(model, respaced, x_T, model_steps=kept, clip_denoised=clip_denoised,
                        noise=gaussian_noise(generator), recorder=recorder)
    return recorder.output(x0)


def ddim_sample(model: Model, diffusion: GaussianDiffusion, x_T: Tensor, *, num_steps: int | None = None,
                spacing: str | Sequence[int] = "linspace", eta: float = 0.0, clip_denoised: bool = True,
                generator: torch.Generator | None = None, record_steps: Iterable[int] | None = None) -> SampleOutput:
    """DDIM, Song et al. 2021 Eq. 12, over an increasing subsequence of steps; η=0 is deterministic."""
    if not 0.0 <= eta <= 1.0:
        raise UserError(f"sampler.eta must be in [0, 1], got {eta}; use 0 for deterministic DDIM, 1 for DDPM-like")
    kept = space_timesteps(diffusion.num_timesteps, spacing, num_steps, diffusion.alphas_cumprod_float64)
    B, device = x_T.shape[0], x_T.device
    # Per-step coefficients, built once on the device: ᾱ_t at each kept step and ᾱ at the previous kept one.
    idx = torch.as_tensor(kept, dtype=torch.long, device=device)
    ac = diffusion.alphas_cumprod[idx]
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    sigma = eta * ((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev)).sqrt()  # σ_t(η), Song et al. 2021 Eq. 16
    coef_x0, coef_eps = ac_prev.sqrt(), (1 - ac_prev - sigma**2).clamp(min=0).sqrt()
    t_model = _step_indices(kept, B, device)
    recorder, noise, x = Recorder(record_steps), torch.empty_like(x_T), x_T
    for i in reversed(range(len(kept))):
        t = t_model[i]
        mean_out, _ = diffusion.split_output(model(x, t))
        x0_pred = diffusion.predict_x0(mean_out, x, t)
        if clip_denoised:
            x0_pred = x0_pred.clamp(-1.0, 1.0)
        eps = diffusion.predict_eps_from_x0(x, t, x0_pred)
        recorder(kept[i], x, x0_pred)
        x = coef_x0[i] * x0_pred + coef_eps[i] * eps  # Eq. 12: predicted x0, direction to x_t
        if eta > 0 and i > 0:
            x = x + sigma[i] * noise.normal_(generator=generator)  # Eq. 12: random noise
    return recorder.output(x)

