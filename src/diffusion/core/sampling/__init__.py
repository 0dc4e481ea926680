"""Sampling: samplers over a denoiser (one module each), their registry and spec, guidance, and draw()."""

from diffusion.core.sampling.ancestral import ancestral_loop, ddpm_sample, respace, respaced_sample
from diffusion.core.sampling.common import BlockNoise, Recorder, SampleOutput, Trajectory, gaussian_noise
from diffusion.core.sampling.ddim import ddim_sample, euler_sample
from diffusion.core.sampling.dpmpp import dpmpp_2m_sample, dpmpp_2m_sde_sample
from diffusion.core.sampling.draw import (
    MAX_NOISE_BLOCK,
    NOISE_BLOCK,
    Chunk,
    Drawn,
    as_index,
    check_index,
    chunk_bounds,
    draw,
    draw_chunk,
    draw_chunks,
    draw_labels,
    eval_mode,
    index_chunks,
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
from diffusion.core.sampling.heun import heun_sample
from diffusion.core.sampling.multistep import deis_logrho_sample, deis_sample, ipndm_sample
from diffusion.core.sampling.spec import (
    SAMPLERS,
    SamplerKind,
    SamplerSpec,
    as_sampler_spec,
    sampler_label,
    sampler_spec,
)
from diffusion.core.sampling.unipc import unipc_sample

__all__ = ["MAX_NOISE_BLOCK", "NOISE_BLOCK", "BlockNoise", "as_index", "check_index", "index_chunks",
           "GuidedModel", "balanced_labels", "check_guidance", "class_rows", "draw_labels", "guide", "num_classes_of",
           "resolve_labels", "SAMPLERS", "Chunk", "Drawn", "Recorder", "SampleOutput", "SamplerKind", "SamplerSpec",
           "Trajectory", "ancestral_loop", "as_sampler_spec", "chunk_bounds", "ddim_sample", "ddpm_sample",
           "deis_logrho_sample", "deis_sample", "draw", "dpmpp_2m_sample", "dpmpp_2m_sde_sample", "draw_chunk",
           "draw_chunks",
           "euler_sample", "eval_mode", "gaussian_noise", "heun_sample", "ipndm_sample", "respace", "respaced_sample",
           "sampler_label", "sampler_spec", "unipc_sample"]
