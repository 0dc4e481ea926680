"""The one way images are drawn: images numbered 0..N-1 from a network and its objective, each from its own noise.

Image i starts from x_T ~ N(0, prior_std² I) at the first level of the sampler's grid (DDPM: N(0, I), the paper's
p(x_T)), and takes all of its later noise, from its own stream: row i mod B of every draw of a generator seeded
seed + ⌊i / B⌋, B = `noise_block` (250; common.BlockNoise). So an image depends on its number and the seed alone,
not on the batch it is drawn in, the device that draws it, or which other images are drawn: any `chunk_size`, device
or node count gives the same images, and a subset of the numbers (`index`, sample.py and evaluate.py's `seeds`)
gives the same images as the whole draw does. B = 1 is EDM's per-image seeds (image i from seed + i); B = 250, the
default, keeps the images the framework drew before image seeds, when it drew 250 at a time (the quality callback
and evaluate.py's default batch): those numbers stay. Drawing is in chunks of `chunk_size` consecutive image
numbers (chunk k: those in [k·chunk_size, (k+1)·chunk_size)); under DDP rank r draws the chunks r, r + W, ... of
those that hold any of the images asked for. Sample grids, the quality callback, evaluation, figures and sample.py
all come through here.

A class-conditional net (one with `num_classes`) draws image i with label `labels[i]` (default: balanced over the
N images, the same count per class, in class order) under the spec's guidance scale (sampling/guidance.py); the
labels, like the noise, belong to the image's number, not to the device that draws it.
"""

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffusion.core.objectives.base import Model, Objective
from diffusion.core.sampling.common import BlockNoise, SampleOutput, Trajectory
from diffusion.core.sampling.guidance import GuidedModel, balanced_labels, check_guidance, num_classes_of
from diffusion.core.sampling.spec import SAMPLERS, SamplerSpec, sampler_spec
from diffusion.errors import UserError

NOISE_BLOCK = 250  # images per noise block (see the module docstring); 1 = EDM's one seed per image
MAX_NOISE_BLOCK = 1000  # a batch draws every block it touches whole: its noise is at most this many images
Index = Sequence[int] | Tensor  # image numbers



def chunk_bounds(num_images: int, chunk_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, int, int]]:
    """Chunks (k, start, stop) of range(num_images) in blocks of chunk_size; rank r takes k = r, r + W, ..."""
    return [(k, k * chunk_size, min(num_images, (k + 1) * chunk_size))
            for k in range(rank, -(-num_images // chunk_size), world_size)]


def as_index(index: Index) -> Tensor:
    """Image numbers as an int64 CPU tensor, sorted, each once."""
    return torch.unique(torch.as_tensor(index, dtype=torch.int64).cpu().flatten())


def index_chunks(index: Index, chunk_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, Tensor]]:
    """This rank's chunks (k, image numbers) of the images `index`: chunk k holds those in [k·chunk_size,
    (k+1)·chunk_size), the whole draw's chunk k or the part of it asked for (a resumed or partial evaluation draws
    the batches the whole one would have); the non-empty chunks are dealt out, rank r taking the r-th, r + W-th..."""
    index = as_index(index)
    ks = index // chunk_size
    chunks = [(int(k), index[ks == k]) for k in torch.unique(ks).tolist()]
    return chunks[rank::world_size]


@dataclass
class Chunk:
    """Chunk k of a draw: the images numbered `index`, in the model range [-1, 1], and their trajectory."""

    k: int
    index: Tensor  # (n,) int64 image numbers
    images: Tensor  # (n, C, H, W)
    trajectory: Trajectory | None = None
    labels: Tensor | None = None  # (n,) requested labels (class-conditional nets)


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
def draw_chunk(model: Model, objective: Objective, spec: SamplerSpec, index: Index, *,
               shape: tuple[int, int, int], seed: int = 0, noise_block: int = NOISE_BLOCK,
               device: torch.device | str | None = None, dtype: torch.dtype | None = None,
               record_steps: Iterable[int] | None = None, labels: Tensor | None = None) -> SampleOutput:
    """The images numbered `index` (in increasing order), each from its own noise (see the module docstring), in
    one batch, clamped to [-1, 1]; `labels` (len(index),) are theirs, for a class-conditional model (default:
    balanced within the batch). The spec is taken as checked (SamplerSpec.check, then check_for the objective:
    what every command does before drawing)."""
    spec = sampler_spec(spec).resolved(objective)
    index = as_index(index)
    labels = draw_labels(model, spec, len(index), labels)
    device, dtype = _placement(model, device, dtype)
    noise = BlockNoise(index, seed, noise_block, device)
    x_T = noise.fill_(torch.empty(len(index), *shape, device=device, dtype=dtype))
    std = prior_std(objective, spec)
    x_T = x_T if std == 1.0 else std * x_T
    sampled = model if labels is None else GuidedModel(model, labels.to(device), spec.guidance_scale)
    with eval_mode(model):
        out = SAMPLERS[spec.name].fn(objective.denoiser(sampled, spec.clip_denoised), x_T, generator=noise,
                                     record_steps=record_steps, **spec.sampler_kwargs(objective))
    return SampleOutput(out.x0.clamp(-1, 1), out.trajectory)


def draw_chunks(model: Model, objective: Objective, spec: SamplerSpec, num_images: int, *,
                shape: tuple[int, int, int], seed: int = 0, chunk_size: int = 256, rank: int = 0,
                world_size: int = 1, index: Index | None = None, noise_block: int = NOISE_BLOCK,
                device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                record_steps: Iterable[int] | None = None, labels: Tensor | None = None) -> Iterator[Chunk]:
    """This rank's chunks of a draw of the images numbered `index` out of num_images (default: all of them), one
    at a time (for callers that stream them into a metric); `labels` (num_images,) for a class-conditional model
    (default balanced over all num_images)."""
    labels = draw_labels(model, spec, num_images, labels)
    index = torch.arange(num_images) if index is None else check_index(index, num_images)
    for k, mine in index_chunks(index, chunk_size, rank, world_size):
        asked = None if labels is None else labels[mine]
        out = draw_chunk(model, objective, spec, mine, shape=shape, seed=seed, noise_block=noise_block,
                         device=device, dtype=dtype, record_steps=record_steps, labels=asked)
        yield Chunk(k, mine, out.x0, out.trajectory, asked)


def check_index(index: Index, num_images: int, key: str = "seeds") -> Tensor:
    """`index` as image numbers, each in 0..num_images-1, else a one-line error."""
    index = as_index(index)
    if len(index) and not 0 <= int(index[0]) <= int(index[-1]) < num_images:
        raise UserError(f"{key} asks for images {int(index[0])}..{int(index[-1])} of num_samples={num_images} "
                        f"(numbered 0..{num_images - 1}); raise num_samples to {int(index[-1]) + 1} or ask for fewer")
    return index


def draw(model: Model, objective: Objective, spec: SamplerSpec, num_images: int, *,
         shape: tuple[int, int, int], seed: int = 0, chunk_size: int = 256, rank: int = 0, world_size: int = 1,
         index: Index | None = None, noise_block: int = NOISE_BLOCK, device: torch.device | str | None = None,
         dtype: torch.dtype | None = None, record_steps: Iterable[int] | None = None,
         labels: Tensor | None = None) -> Drawn:
    """Draw the images numbered `index` of num_images (default all; this rank's share of them) with the sampler of
    `spec`; see the module docstring."""
    chunks = list(draw_chunks(model, objective, spec, num_images, shape=shape, seed=seed, chunk_size=chunk_size,
                              rank=rank, world_size=world_size, index=index, noise_block=noise_block, device=device,
                              dtype=dtype, record_steps=record_steps, labels=labels))
    if not chunks:  # fewer chunks than ranks: nothing for this one
        device, dtype = _placement(model, device, dtype)
        empty = torch.zeros(0, *shape, device=device, dtype=dtype)
        return Drawn(empty, torch.zeros(0, dtype=torch.int64))
    index = torch.cat([c.index for c in chunks])
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
