"""Heun's second-order method on the probability-flow ODE dx̃/dσ = (x̃ − D(x̃; σ))/σ in the VE frame x̃ = x/α
(Karras et al. 2022, Algorithm 1 with σ(t) = t, s(t) = 1, their choice for every model): 2N − 1 network calls on
N levels. The last step, to σ = 0, is Euler's: x̃ + (0 − σ)(x̃ − x̂0)/σ = x̂0.
"""

from collections.abc import Iterable, Sequence

from torch import Tensor

from diffusion.core.denoiser import Denoiser
from diffusion.core.sampling.common import Generator, Recorder, SampleOutput, level_names, require_finite_start


def heun_sample(denoiser: Denoiser, x_T: Tensor, *, num_steps: int | None = None,
                spacing: str | Sequence[int] = "karras", generator: Generator = None,
                record_steps: Iterable[int] | None = None) -> SampleOutput:
    """Heun (Karras et al. 2022 Alg. 1): num_steps network calls on N = (num_steps + 1) // 2 levels."""
    g = denoiser.grid(spacing, None if num_steps is None else (num_steps + 1) // 2, from_top=True)
    require_finite_start(g, "heun")
    s, names, last = g.sigma, level_names(denoiser, g), g.num_levels - 1
    recorder, x = Recorder(record_steps), x_T / g.alpha[0]
    for i in range(last):
        x0 = denoiser(g.alpha[i] * x, s[i])
        recorder(names[i], g.alpha[i] * x, x0)
        d = (x - x0) / s[i]
        x_euler = x + (s[i + 1] - s[i]) * d  # Euler step
        x0_euler = denoiser(g.alpha[i + 1] * x_euler, s[i + 1])
        x = x + (s[i + 1] - s[i]) * 0.5 * (d + (x_euler - x0_euler) / s[i + 1])  # 2nd-order correction
    x0 = denoiser(g.alpha[last] * x, s[last])
    recorder(names[last], g.alpha[last] * x, x0)
    return recorder.output(x0)
