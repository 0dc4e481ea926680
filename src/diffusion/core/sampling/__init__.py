"""Sampling: the samplers, the sampler spec that chooses one, and the one function that draws N images."""

from diffusion.core.sampling.ancestral import (
    Model,
    Recorder,
    SampleOutput,
    Trajectory,
    ancestral_loop,
    ddim_sample,
    ddpm_sample,
    gaussian_noise,
    respace,
    respaced_sample,
)
from diffusion.core.sampling.draw import (
    Chunk,
    Drawn,
    chunk_bounds,
    draw,
    draw_chunk,
    draw_chunks,
    draw_labels,
    eval_mode,
)
from diffusion.core.sampling.guidance import (
    GuidedModel,
    balanced_labels,
    check_guidance,
    class_rows,
    guide,
    num_classes_of,
    resolve_labels,
)
from diffusion.core.sampling.solvers import dpmpp_2m_sample, dpmpp_2m_sde_sample, heun_sample, unipc_sample
from diffusion.core.sampling.spec import SAMPLERS, SamplerKind, SamplerSpec, as_sampler_spec, sampler_label

__all__ = ["GuidedModel", "balanced_labels", "check_guidance", "class_rows", "draw_labels", "guide", "num_classes_of",
           "resolve_labels", "SAMPLERS", "Chunk", "Drawn", "Model",
           "Recorder", "SampleOutput", "SamplerKind", "SamplerSpec",
           "Trajectory", "ancestral_loop", "as_sampler_spec", "chunk_bounds", "ddim_sample", "ddpm_sample", "draw",
           "dpmpp_2m_sample", "dpmpp_2m_sde_sample", "draw_chunk", "draw_chunks", "eval_mode", "gaussian_noise",
           "heun_sample", "respace", "respaced_sample", "sampler_label", "unipc_sample"]
