"""The one way images are drawn: N images from a network and its objective, in seeded chunks.

The N images are fixed chunks of `chunk_size`; chunk k starts from x_T ~ N(0, prior_std² I) at the first level of
the sampler's grid (DDPM: N(0, I), the paper's p(x_T)), drawn like all of its later noise from a generator seeded
`seed + k`. Under DDP, rank r draws chunks r, r + W, ...: the union of the images, and so any score of them, does
not depend on the number of devices or on which device drew what.
Sample grids, the quality callback, evaluation, figures and sample.py all come through here.

A class-conditional net (one with `num_classes`) draws image i with label `labels[i]` (default: balanced,
the same count per class, in class order) under the spec's guidance scale (sampling/guidance.py); the
labels, like the noise, belong to the image's number, not to the device that draws it.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffusion.core.objectives.base import Model, Objective
from diffusion.core.sampling.common import SampleOutput, Trajectory
from diffusion.core.sampling.guidance import GuidedModel, balanced_labels, check_guidance, num_classes_of
from diffusion.core.sampling.spec import SAMPLERS, SamplerSpec, sampler_spec
from diffusion.errors import UserError


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
    labels: Tensor | None = None  # (stop - start,) requested labels (class-conditional nets)


@dataclass
class Drawn:
    """This rank's images of a draw, their sample numbers, and the trajectory when recorded."""

    images: Tensor  # (n, C, H, W) in [-1, 1]
    index: Tensor  # (n,) int64 sample numbers
    trajectory: Trajectory | None = None
    labels: Tensor | None = None  # (n,) int64 requested labels (class-conditional nets)


def draw_labels(model: Model, spec: SamplerSpec, num_images: int, labels: Tensor | None = None) -> Tensor | None:
    """The N images' labels for this model (balanced by default), checked; None for an unconditional model."""
    num_classes = num_classes_of(model)
    check_guidance(sampler_spec(spec).guidance_scale, num_classes)
    if num_classes is None:
        if labels is not None:
            raise UserError("labels were given for an unconditional model (trained without model.num_classes); "
                            "drop the labels")
        return None
    labels = balanced_labels(num_images, num_classes) if labels is None else torch.as_tensor(labels).long().cpu()
    if labels.shape != (num_images,) or (num_images and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes):
        raise UserError(f"labels of shape {tuple(labels.shape)} with values outside [0, {num_classes}) for "
                        f"{num_images} images; give one label in 0..{num_classes - 1} per image")
    return labels


def prior_std(objective: Objective, spec: SamplerSpec) -> float:
    """The std of x at the first level of the spec's grid (1 for DDPM's ancestral samplers: p(x_T) = N(0, I))."""
    kind = SAMPLERS[spec.name]
    if "spacing" not in kind.defaults:
        return 1.0
    return objective.grid(spec.spacing, kind.levels(spec.steps), from_top=kind.from_top).prior_std


def _placement(model: Model, device, dtype) -> tuple[torch.device, torch.dtype]:
    """Where and in which precision to sample: as asked, else where the model's weights are (else the CPU), float32."""
    weight = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    device = torch.device(device) if device is not None else weight.device if weight is not None else \
        torch.device("cpu")
    return device, dtype or torch.float32


@torch.no_grad()
def draw_chunk(model: Model, objective: Objective, spec: SamplerSpec, k: int, num_images: int, *,
               shape: tuple[int, int, int], seed: int = 0, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None, record_steps: Iterable[int] | None = None,
               labels: Tensor | None = None) -> SampleOutput:
    """Chunk k of a draw: num_images images from a generator seeded seed + k, clamped to [-1, 1]; `labels`
    (num_images,) are this chunk's, for a class-conditional model (default: balanced within the chunk). The spec is
    taken as checked (SamplerSpec.check, then check_for the objective: what every command does before drawing)."""
    spec = sampler_spec(spec).resolved(objective)
    labels = draw_labels(model, spec, num_images, labels)
    device, dtype = _placement(model, device, dtype)
    generator = torch.Generator(device=device).manual_seed(seed + k)
    x_T = torch.randn(num_images, *shape, generator=generator, device=device, dtype=dtype)
    std = prior_std(objective, spec)
    x_T = x_T if std == 1.0 else std * x_T
    sampled = model if labels is None else GuidedModel(model, labels.to(device), spec.guidance_scale)
    with eval_mode(model):
        out = SAMPLERS[spec.name].fn(objective.denoiser(sampled, spec.clip_denoised), x_T, generator=generator,
                                     record_steps=record_steps, **spec.sampler_kwargs(objective))
    return SampleOutput(out.x0.clamp(-1, 1), out.trajectory)


def draw_chunks(model: Model, objective: Objective, spec: SamplerSpec, num_images: int, *,
                shape: tuple[int, int, int], seed: int = 0, chunk_size: int = 256, rank: int = 0,
                world_size: int = 1, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                record_steps: Iterable[int] | None = None, labels: Tensor | None = None) -> Iterator[Chunk]:
    """This rank's chunks of a draw of num_images, one at a time (for callers that stream them into a metric);
    `labels` (num_images,) for a class-conditional model (default balanced over all num_images)."""
    labels = draw_labels(model, spec, num_images, labels)
    for k, start, stop in chunk_bounds(num_images, chunk_size, rank, world_size):
        mine = None if labels is None else labels[start:stop]
        out = draw_chunk(model, objective, spec, k, stop - start, shape=shape, seed=seed, device=device,
                         dtype=dtype, record_steps=record_steps, labels=mine)
        yield Chunk(k, start, stop, out.x0, out.trajectory, mine)


def draw(model: Model, objective: Objective, spec: SamplerSpec, num_images: int, *,
         shape: tuple[int, int, int], seed: int = 0, chunk_size: int = 256, rank: int = 0, world_size: int = 1,
         device: torch.device | str | None = None, dtype: torch.dtype | None = None,
         record_steps: Iterable[int] | None = None, labels: Tensor | None = None) -> Drawn:
    """Draw num_images (this rank's share of them) with the sampler of `spec`; see the module docstring."""
    chunks = list(draw_chunks(model, objective, spec, num_images, shape=shape, seed=seed, chunk_size=chunk_size,
                              rank=rank, world_size=world_size, device=device, dtype=dtype, record_steps=record_steps,
                              labels=labels))
    if not chunks:  # fewer chunks than ranks: nothing for this one
        device, dtype = _placement(model, device, dtype)
        empty = torch.zeros(0, *shape, device=device, dtype=dtype)
        return Drawn(empty, torch.zeros(0, dtype=torch.int64))
    index = torch.cat([torch.arange(c.start, c.stop) for c in chunks])
    trajectory = None
    if record_steps is not None:
        parts = [c.trajectory for c in chunks]
        trajectory = Trajectory(parts[0].steps, torch.cat([p.x_t for p in parts], 1),
                                torch.cat([p.x0_pred for p in parts], 1))
    drawn_labels = None if chunks[0].labels is None else torch.cat([c.labels for c in chunks])
    return Drawn(torch.cat([c.images for c in chunks]), index, trajectory, drawn_labels)


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
