"""Ancestral sampling, DDPM's own: Algorithm 2 over all T steps, and over K of them (respaced), on a DDPM denoiser.

They walk DDPM's Markov chain p(x_{t-1} | x_t) with its fixed or learned variance, so they need the chain (the
objective's `markov_chain`) and the network's whole output (a learned variance's half too): the DDPM denoiser
carries both. Every coefficient the loop needs lives on the sample's device before the loop starts; each step only
indexes those tensors, so nothing is copied host→device per step. Pass `dtype=torch.float64` to GaussianDiffusion
and a float64 x_T to sample in double.
"""

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from diffusion.core.gaussian import GaussianDiffusion
from diffusion.core.objectives.ddpm import DDPMDenoiser
from diffusion.core.sampling.common import Generator, Recorder, SampleOutput, gaussian_noise
from diffusion.core.schedules import respace_betas, space_timesteps

Model = Callable[[Tensor, Tensor], Tensor]


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


def ddpm_sample(denoiser: DDPMDenoiser, x_T: Tensor, *, generator: Generator = None,
                record_steps: Iterable[int] | None = None) -> SampleOutput:
    """Ancestral sampling, Ho et al. 2020 Algorithm 2, with the diffusion's fixed or learned variance."""
    recorder = Recorder(record_steps)
    x0 = ancestral_loop(denoiser.model, denoiser.diffusion, x_T, clip_denoised=denoiser.clip,
                        noise=gaussian_noise(generator), recorder=recorder)
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


def respaced_sample(denoiser: DDPMDenoiser, x_T: Tensor, *, num_steps: int | None = None,
                    spacing: str | Sequence[int] = "linspace", generator: Generator = None,
                    record_steps: Iterable[int] | None = None) -> SampleOutput:
    """Ancestral sampling over K of T steps, each step going to the previous *kept* step (Nichol & Dhariwal 2021)."""
    diffusion, model = denoiser.diffusion, denoiser.model
    kept = space_timesteps(diffusion.num_timesteps, spacing, num_steps, diffusion.alphas_cumprod_float64)
    respaced = respace(diffusion, kept)
    if diffusion.parameterization == "mean":
        model = _mean_to_x0(model, diffusion)
    recorder = Recorder(record_steps)
    x0 = ancestral_loop(model, respaced, x_T, model_steps=kept, clip_denoised=denoiser.clip,
                        noise=gaussian_noise(generator), recorder=recorder)
    return recorder.output(x0)
