"""Consistency sampling (Song et al. 2023, Algorithm 1), multistep with the usual re-noising, on any denoiser.

With N steps the sampler visits the first N levels of the spacing's grid of N + 1 (the last, the smallest, is left
out: a jump there would only re-noise to almost nothing): x̂0 = f(x, σ_0) from x at the largest level, then for each
next level σ_n the data estimate is noised again, x̃ = x̂0 + σ_n z, and mapped back, x̂0 = f(x̃, σ_n). N network
calls. On a consistency-tuned model (objective=consistency) one or two calls give an image; on a diffusion model
it is a valid but poor sampler (x̂0 at high noise is a blurred mean), which is why the tuning exists.
"""

from collections.abc import Iterable, Sequence

from torch import Tensor

from diffusion.core.denoiser import Denoiser
from diffusion.core.sampling.common import Generator, Recorder, SampleOutput, gaussian_noise, level_names


def levels_for(steps: int) -> int:
    """The grid a consistency sampler of `steps` calls is drawn on: steps + 1 levels, the smallest left out."""
    return steps + 1


def most_steps(num_levels: int) -> int:
    return num_levels - 1


def consistency_sample(denoiser: Denoiser, x_T: Tensor, *, num_steps: int | None = None,
                       spacing: str | Sequence[int] = "karras", generator: Generator = None,
                       record_steps: Iterable[int] | None = None) -> SampleOutput:
    """Song et al. 2023 Algorithm 1 on the grid's first `num_steps` levels; x_T is x at the first (the grid's
    prior_std), and each later level's noise is drawn from `generator`."""
    g = denoiser.grid(spacing, levels_for(num_steps), from_top=True)
    names, recorder, noise = level_names(denoiser, g), Recorder(record_steps), gaussian_noise(generator)
    x = x_T
    for i in range(num_steps):
        x0 = denoiser(x, g.sigma[i])
        recorder(names[i], x, x0)
        if i == num_steps - 1:
            return recorder.output(x0)
        x = g.alpha[i + 1] * x0 + g.beta[i + 1] * noise(x)
