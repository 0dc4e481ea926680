"""What every sampler shares: its output, the trajectory recorder, the noise it draws, and linear multistep updates.

Every sampler takes a denoiser (core/denoiser.py), the starting x drawn at the grid's first level, and a
generator; only the stochastic ones draw from it: one N(0, I) tensor shaped like x per noisy step, in step order,
into a buffer reused at every step (`fill_normal`). The generator is a torch.Generator, or a `BlockNoise` that
gives each image of the batch its own stream of noise, whatever the batch (draw.py).
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion.core.denoiser import Denoiser, Grid
from diffusion.errors import UserError


@dataclass
class Trajectory:
    """x entering each recorded grid level and the x̂0 predicted there, in sampling order (Ho et al. 2020 Fig. 6).
    `steps` name the levels: DDPM's step indices, else the grid positions."""

    steps: list[int]
    x_t: Tensor  # (S, B, C, H, W)
    x0_pred: Tensor  # (S, B, C, H, W)


@dataclass
class SampleOutput:
    """Final samples x_0 and, when asked for, the trajectory."""

    x0: Tensor
    trajectory: Trajectory | None = None


class Recorder:
    """Keep x and x̂0 at the chosen levels (record_steps: DDPM step indices, or grid positions)."""

    def __init__(self, record_steps: Iterable[int] | None):
        self.wanted = None if record_steps is None else set(int(s) for s in record_steps)
        self.steps, self.x_t, self.x0 = [], [], []

    def __call__(self, step: int, x_t: Tensor, x0_pred: Tensor) -> None:
        if self.wanted is not None and step in self.wanted:
            self.steps.append(step)
            self.x_t.append(x_t.clone())
            self.x0.append(x0_pred.clone())

    def output(self, x0: Tensor) -> SampleOutput:
        if self.wanted is None:
            return SampleOutput(x0)
        if not self.steps:
            return SampleOutput(x0, Trajectory([], x0.new_zeros(0, *x0.shape), x0.new_zeros(0, *x0.shape)))
        return SampleOutput(x0, Trajectory(self.steps, torch.stack(self.x_t), torch.stack(self.x0)))


def level_names(denoiser: Denoiser, grid: Grid) -> list[int]:
    """How a trajectory names a grid's levels: DDPM's step indices (its steps_of), else positions 0, 1, ..."""
    steps_of = getattr(denoiser.objective, "steps_of", None)
    return steps_of(grid) if steps_of is not None else list(range(grid.num_levels))


class BlockNoise:
    """N(0, I) noise for images numbered `index`, the same for an image whatever batch it is drawn in.

    Image i's noise is row i mod `block` of every draw of shape (block, *x's shape) from a generator seeded
    seed + ⌊i / block⌋, its block's; a batch draws every block it touches, in full, and keeps its rows. A batch that
    is one whole block, in order, draws exactly what one generator seeded seed + k gives a batch of `block` images
    (what draws of chunk k gave before image seeds); block=1 gives each image its own seed, seed + i (EDM's
    `--seeds`). The cost is the noise of the whole blocks a batch touches, a network's batch of work a step at most.
    """

    def __init__(self, index: Tensor, seed: int, block: int, device: torch.device | str):
        index = torch.as_tensor(index, dtype=torch.int64).cpu()
        self.block, self.size, self.parts = block, len(index), []
        for b in torch.unique(index // block).tolist():  # (generator, rows in the block, positions in the batch)
            positions = (index // block == b).nonzero().flatten()
            rows = index[positions] - b * block
            whole = len(index) == block and torch.equal(rows, torch.arange(block))  # the batch is this block
            self.parts.append((torch.Generator(device=device).manual_seed(seed + b), None if whole else rows.tolist(),
                               positions.tolist()))

    def fill_(self, out: Tensor) -> Tensor:
        """out (len(index), ...) <- each image's next N(0, I) draw."""
        if len(out) != self.size:
            raise ValueError(f"BlockNoise for {self.size} images asked to fill {len(out)}")
        for generator, rows, positions in self.parts:
            if rows is None:
                out.normal_(generator=generator)
            else:
                full = torch.empty(self.block, *out.shape[1:], device=out.device, dtype=out.dtype)
                out[positions] = full.normal_(generator=generator)[rows]
        return out


Generator = torch.Generator | BlockNoise | None


def fill_normal(buffer: Tensor, generator: Generator) -> Tensor:
    """buffer <- z ~ N(0, I) from `generator` (a torch.Generator, a BlockNoise, or None: the global RNG)."""
    if isinstance(generator, BlockNoise):
        return generator.fill_(buffer)
    return buffer.normal_(generator=generator)


def gaussian_noise(generator: Generator) -> Callable[[Tensor], Tensor]:
    """z ~ N(0, I) shaped like x from `generator`, into one buffer reused at every step."""
    buffer: list[Tensor] = []

    def draw(like: Tensor) -> Tensor:
        if not buffer:
            buffer.append(torch.empty_like(like))
        return fill_normal(buffer[0], generator)

    return draw


@dataclass(frozen=True)
class Update:
    """x_next = c_x·x + Σ_j w[j]·x̂0_j (most recent first) + w_new·x̂0 at x_next (a corrector) + c_z·z."""

    c_x: float
    w: tuple[float, ...]
    w_new: float = 0.0
    c_z: float = 0.0


def apply(u: Update, x: Tensor, x0s: list[Tensor], x0_new: Tensor | None = None) -> Tensor:
    """One linear multistep update without its noise: c_x x + Σ w_j x̂0_j (+ w_new x̂0_new)."""
    out = u.c_x * x
    for w, x0 in zip(u.w, x0s[: len(u.w)], strict=True):
        out = out + w * x0
    return out if x0_new is None else out + u.w_new * x0_new


def require_finite_start(grid: Grid, name: str, key: str = "sampler") -> None:
    """Samplers whose steps need a finite first level (Heun's trapezoid, UniPC's differences in λ)."""
    if grid.sigma[0] == float("inf"):
        raise UserError(f"{key}.name={name} cannot start at σ = ∞ (flow matching's t = 1, where the linspace grid "
                        f"starts): its higher-order step needs a finite first level; use {key}.spacing=karras or "
                        f"logsnr (from σ_max), or {key}.name=euler or dpmpp_2m")
