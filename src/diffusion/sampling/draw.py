"""The one way images are drawn: N images from a network and a diffusion, in seeded chunks.

The N images are fixed chunks of `chunk_size`; chunk k starts from x_T ~ N(0, I) drawn, like all of its later
noise, from a generator seeded `seed + k`. Under DDP, rank r draws chunks r, r + W, ...: the union of the
images, and so any score of them, does not depend on the number of devices or on which device drew what.
Sample grids, the quality callback, evaluation, figures and sample.py all come through here.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffusion.gaussian import GaussianDiffusion
from diffusion.sampling.ancestral import Model, SampleOutput, Trajectory
from diffusion.sampling.spec import SAMPLERS, SamplerSpec, as_sampler_spec


def chunk_bounds(num_images: int, chunk_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, int, int]]:
    """Chunks (k, start, stop) of range(num_images) in blocks of chunk_size; rank r takes k = r, r + W, ..."""
    return [(k, k * chunk_size, min(num_images, (k + 1) * chunk_size))
            for k in range(rank, -(-num_images // chunk_size), world_size)]


@dataclass
class Chunk:
    """Images start..stop-1 of a draw, in the model range [-1, 1], and their trajectory when recorded."""

    k: int
    start: int
    stop: int
    images: Tensor  # (stop - start, C, H, W)
    trajectory: Trajectory | None = None


@dataclass
class Drawn:
    """This rank's images of a draw, their sample numbers, and the trajectory when recorded."""

    images: Tensor  # (n, C, H, W) in [-1, 1]
    index: Tensor  # (n,) int64 sample numbers
    trajectory: Trajectory | None = None


@torch.no_grad()
def draw_chunk(model: Model, diffusion: GaussianDiffusion, spec: SamplerSpec, k: int, num_images: int, *,
               shape: tuple[int, int, int], seed: int = 0, device: torch.device | str | None = None,
               record_steps: Iterable[int] | None = None) -> SampleOutput:
    """Chunk k of a draw: num_images images from a generator seeded seed + k, clamped to [-1, 1]."""
    spec = as_sampler_spec(spec).check_steps(diffusion.num_timesteps)
    device = torch.device(device) if device is not None else diffusion.betas.device
    generator = torch.Generator(device=device).manual_seed(seed + k)
    x_T = torch.randn(num_images, *shape, generator=generator, device=device, dtype=diffusion.betas.dtype)
    with eval_mode(model):
        out = SAMPLERS[spec.name].fn(model, diffusion, x_T, generator=generator, record_steps=record_steps,
                                     **spec.sampler_kwargs(diffusion.num_timesteps))
    return SampleOutput(out.x0.clamp(-1, 1), out.trajectory)


def draw_chunks(model: Model, diffusion: GaussianDiffusion, spec: SamplerSpec, num_images: int, *,
                shape: tuple[int, int, int], seed: int = 0, chunk_size: int = 256, rank: int = 0,
                world_size: int = 1, device: torch.device | str | None = None,
                record_steps: Iterable[int] | None = None) -> Iterator[Chunk]:
    """This rank's chunks of a draw of num_images, one at a time (for callers that stream them into a metric)."""
    for k, start, stop in chunk_bounds(num_images, chunk_size, rank, world_size):
        out = draw_chunk(model, diffusion, spec, k, stop - start, shape=shape, seed=seed, device=device,
                         record_steps=record_steps)
        yield Chunk(k, start, stop, out.x0, out.trajectory)


def draw(model: Model, diffusion: GaussianDiffusion, spec: SamplerSpec, num_images: int, *,
         shape: tuple[int, int, int], seed: int = 0, chunk_size: int = 256, rank: int = 0, world_size: int = 1,
         device: torch.device | str | None = None, record_steps: Iterable[int] | None = None) -> Drawn:
    """Draw num_images (this rank's share of them) with the sampler of `spec`; see the module docstring."""
    chunks = list(draw_chunks(model, diffusion, spec, num_images, shape=shape, seed=seed, chunk_size=chunk_size,
                              rank=rank, world_size=world_size, device=device, record_steps=record_steps))
    if not chunks:  # fewer chunks than ranks: nothing for this one
        empty = torch.zeros(0, *shape, device=device or diffusion.betas.device, dtype=diffusion.betas.dtype)
        return Drawn(empty, torch.zeros(0, dtype=torch.int64))
    index = torch.cat([torch.arange(c.start, c.stop) for c in chunks])
    trajectory = None
    if record_steps is not None:
        parts = [c.trajectory for c in chunks]
        trajectory = Trajectory(parts[0].steps, torch.cat([p.x_t for p in parts], 1),
                                torch.cat([p.x0_pred for p in parts], 1))
    return Drawn(torch.cat([c.images for c in chunks]), index, trajectory)


class eval_mode:  # noqa: N801 (used as a context manager, like torch.no_grad)
    """`with eval_mode(net):` the module in eval mode (dropout off) inside, its own mode restored after."""

    def __init__(self, model: Model):
        self.module = model if isinstance(model, nn.Module) else None
        self.was_training = self.module is not None and self.module.training

    def __enter__(self) -> None:
        if self.module is not None:
            self.module.eval()

    def __exit__(self, *exc) -> None:
        if self.module is not None:
            self.module.train(self.was_training)
