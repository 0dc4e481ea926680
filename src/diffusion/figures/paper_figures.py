"""The paper's figures as tensors, and writers for them: Ho et al. 2020 Figs. 5-9 and Table 3.

Every function takes a `net(x_t, t)` callable and DDPM's chain (a GaussianDiffusion, or the DDPM objective that
holds it): the figures are of its Markov chain, which the other objectives have not. Steps are timestep indices in
[0, T-1] (index t is the paper's step t+1); images are (B, C, H, W) in the model range [-1, 1].
`render_all` draws every figure into a folder: the PNG grids, rate_distortion.png/.md/.json.
"""

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib
import torch
from torch import Tensor

from diffusion.core.gaussian import GaussianDiffusion
from diffusion.core.likelihood import LOG2, variational_bound
from diffusion.core.objectives.ddpm import DDPM
from diffusion.core.sampling import (
    SampleOutput,
    SamplerSpec,
    ancestral_loop,
    class_rows,
    draw,
    draw_chunk,
    eval_mode,
    num_classes_of,
)
from diffusion.errors import UserError
from diffusion.figures.saving import save_figure
from diffusion.files import write_file
from diffusion.formats.png import save_grid, save_rows

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Model = Callable[[Tensor, Tensor], Tensor]


def default_steps(num_timesteps: int, fractions: Sequence[float] = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)) -> list[int]:
    """Indices round(f·T) capped at T-1, increasing: for T=1000, 0, 100, 250, 500, 750, 999."""
    return sorted({min(round(f * num_timesteps), num_timesteps - 1) for f in fractions})


def check_steps(diffusion: GaussianDiffusion, steps: Sequence[int], what: str = "figure steps") -> list[int]:
    """The steps as a strictly increasing list of indices in [0, T-1]; a one-line UserError otherwise."""
    T, steps = diffusion.num_timesteps, [int(s) for s in steps]
    increasing = all(b > a for a, b in zip(steps, steps[1:], strict=False))
    if not steps or not all(0 <= s < T for s in steps) or not increasing:
        raise UserError(f"{what} must be increasing timestep indices in [0, {T - 1}], got {steps}; "
                        f"e.g. {default_steps(T)} (index t is the paper's step t+1)")
    return steps


def _randn(like: Tensor, generator: torch.Generator | None, shape: Sequence[int] | None = None) -> Tensor:
    return torch.randn(like.shape if shape is None else shape, generator=generator, device=like.device,
                       dtype=like.dtype)


# --- the forward and reverse processes ------------------------------------------------------------------
@torch.no_grad()
def forward_process(diffusion: GaussianDiffusion, x0: Tensor, steps: Sequence[int],
                    generator: torch.Generator | None = None) -> Tensor:
    """One forward chain per image seen at `steps`: q(x_t | x_s) = N(sqrt(ᾱ_t/ᾱ_s) x_s, (1 - ᾱ_t/ᾱ_s) I)
    between consecutive steps (Eq. 2 composed), so each frame is a draw of Eq. 4's q(x_t | x_0). (S, B, C, H, W)."""
    alphas_cumprod = diffusion.alphas_cumprod_float64
    frames, x, previous = [], x0, 1.0
    for t in check_steps(diffusion, steps):
        ratio = (alphas_cumprod[t] / previous).item()
        x = math.sqrt(ratio) * x + math.sqrt(1.0 - ratio) * _randn(x0, generator)
        frames.append(x)
        previous = alphas_cumprod[t]
    return torch.stack(frames)


def reverse_process(net: Model, objective: DDPM, num_chains: int, shape: tuple[int, int, int],
                    steps: Sequence[int], seed: int = 0) -> SampleOutput:
    """Algorithm 2 from x_T, num_chains chains, keeping x_t and the predicted x̂0 at `steps` (Fig. 6)."""
    return draw_chunk(net, objective, SamplerSpec("ddpm"), range(num_chains), shape=shape, seed=seed,
                      record_steps=check_steps(objective.diffusion, steps))


@torch.no_grad()
def reverse_from(net: Model, diffusion: GaussianDiffusion, x_t: Tensor, t: int,
                 generator: torch.Generator | None = None, clip_denoised: bool = True) -> Tensor:
    """Algorithm 2 from index t down to x_0. For x_t of shape (G, B, C, H, W) the G groups share each step's
    noise z (B, C, H, W), as Fig. 8's interpolations share the reverse noise; (B, C, H, W) is plain Algorithm 2."""
    check_steps(diffusion, [t], "the starting step")
    shape, noise_shape = x_t.shape, x_t.shape[-4:]

    def shared_noise(x: Tensor) -> Tensor:  # one z per step, the same for every group
        return _randn(x, generator, noise_shape).expand(shape).reshape(x.shape)

    x = ancestral_loop(net, diffusion, x_t.reshape(-1, *shape[-3:]), start=t, clip_denoised=clip_denoised,
                       noise=shared_noise)  # on (G·B, C, H, W)
    return x.reshape(shape)


# --- what the latents keep of the data ----------------------------------------------------------------
@dataclass
class Reconstructions:
    """Fig. 7: for each step, one x_t ~ q(x_t | x_0) per image and N completions x_0 ~ p(x_0 | x_t) sharing it."""

    steps: list[int]
    x0: Tensor  # (B, C, H, W)
    x_t: Tensor  # (S, B, C, H, W)
    samples: Tensor  # (S, B, N, C, H, W)


@torch.no_grad()
def stochastic_reconstructions(net: Model, diffusion: GaussianDiffusion, x0: Tensor, steps: Sequence[int],
                               num_samples: int, generator: torch.Generator | None = None) -> Reconstructions:
    """Draw x_t by Eq. 4 at each step, then complete it num_samples times by Algorithm 2 from t (Fig. 7)."""
    if num_samples < 1:
        raise UserError(f"num_reconstructions must be >= 1, got {num_samples}; try num_reconstructions=6")
    steps, (B, N) = check_steps(diffusion, steps), (x0.shape[0], num_samples)
    x_ts, samples = [], []
    for t in steps:
        x_t = diffusion.q_sample(x0, torch.full((B,), t, device=x0.device), _randn(x0, generator))
        repeated = x_t[:, None].expand(B, N, *x0.shape[1:]).reshape(B * N, *x0.shape[1:])  # (B·N, C, H, W)
        x_ts.append(x_t)
        samples.append(reverse_from(net, diffusion, repeated, t, generator).reshape(B, N, *x0.shape[1:]))
    return Reconstructions(steps, x0, torch.stack(x_ts), torch.stack(samples))


@dataclass
class Interpolation:
    """Fig. 8: the decodings of (1-λ) x_t + λ x'_t, x_t and x'_t encoding x0_a and x0_b at step t."""

    t: int
    lambdas: list[float]
    x0_a: Tensor  # (B, C, H, W)
    x0_b: Tensor  # (B, C, H, W)
    x_t_a: Tensor  # (B, C, H, W)
    x_t_b: Tensor  # (B, C, H, W)
    x0: Tensor  # (L, B, C, H, W)


@torch.no_grad()
def interpolate(net: Model, diffusion: GaussianDiffusion, x0_a: Tensor, x0_b: Tensor, t: int,
                lambdas: Sequence[float], generator: torch.Generator | None = None) -> Interpolation:
    """Encode x_t, x'_t ~ q(x_t | x_0) by Eq. 4 (noise for a, then for b), mix them linearly and decode each
    mixture by Algorithm 2 from t with the same reverse noise for every λ (Sec. 4.3, Fig. 8)."""
    lambdas = [float(lam) for lam in lambdas]
    if not lambdas or not all(0.0 <= lam <= 1.0 for lam in lambdas):
        raise UserError(f"interpolation weights must lie in [0, 1], got {lambdas}; try num_lambdas=9")
    t_batch = torch.full((x0_a.shape[0],), check_steps(diffusion, [t], "the interpolation step")[0],
                         device=x0_a.device)
    x_t_a = diffusion.q_sample(x0_a, t_batch, _randn(x0_a, generator))
    x_t_b = diffusion.q_sample(x0_b, t_batch, _randn(x0_b, generator))
    lam = torch.tensor(lambdas, device=x0_a.device, dtype=x0_a.dtype).reshape(-1, 1, 1, 1, 1)  # (L, 1, 1, 1, 1)
    mixed = (1 - lam) * x_t_a + lam * x_t_b  # (L, B, C, H, W)
    return Interpolation(t, lambdas, x0_a, x0_b, x_t_a, x_t_b, reverse_from(net, diffusion, mixed, t, generator))


# --- progressive coding ---------------------------------------------------------------------------------
@dataclass
class RateDistortion:
    """Fig. 5 / Table 3: at every index t, the bits sent once the receiver holds x_t, and the x̂0 error."""

    steps: list[int]  # 0..T-1
    rate_bpd: list[float]  # L_T + the bound's terms of every step after t, bits/dim (Algorithm 3)
    distortion_rmse: list[float]  # RMSE of x̂0(x_t) against x_0, on the [0, 255] scale
    decoder_bpd: float  # L_0: what is left to send x_0 losslessly
    total_bpd: float  # the whole bound: rate at t = 0 plus L_0
    num_images: int


@torch.no_grad()
def progressive_coding(net: Model, diffusion: GaussianDiffusion, x0: Tensor,
                       generator: torch.Generator | None = None) -> RateDistortion:
    """Rate-distortion of progressive lossy compression (Algorithm 3, Fig. 5, Table 3) from Eq. 5's terms.

    Holding x_t, the receiver has been sent L_T and one KL term per later step; distortion is the RMSE of the
    x̂0 predicted from x_t ~ q(x_t | x_0), over every pixel of the batch, in [0, 255] units (127.5 × [-1, 1]).
    """
    bound = variational_bound(net, diffusion, x0, generator)
    terms_bpd = bound.terms_nats.double() / (x0[0].numel() * LOG2)  # (B, T)
    later = terms_bpd.flip(1).cumsum(1).flip(1) - terms_bpd  # (B, T): Σ over columns s > t
    rate = (bound.prior_bpd.double()[:, None] + later).mean(0)
    distortion = 127.5 * bound.x0_mse.double().mean(0).sqrt()
    return RateDistortion(list(range(diffusion.num_timesteps)), rate.tolist(), distortion.tolist(),
                          terms_bpd[:, 0].mean().item(), bound.total_bpd.double().mean().item(), x0.shape[0])


def rate_distortion_table(rd: RateDistortion, num_rows: int = 10) -> str:
    """Table 3's kind in Markdown: rate and distortion at reverse steps T, T - T/n, ..., T/n, and 1."""
    T = len(rd.steps)
    rows = sorted({min(round(k * T / num_rows), T - 1) for k in range(num_rows)} | {T - 1})
    lines = ["| reverse step (T-t+1) | rate (bits/dim) | distortion (RMSE, [0, 255]) |", "|---:|---:|---:|"]
    lines += [f"| {T - i} | {rd.rate_bpd[i]:.5f} | {rd.distortion_rmse[i]:.5f} |" for i in rows]
    lines.append(f"\nL_0 (the rest, for lossless x_0): {rd.decoder_bpd:.5f} bits/dim; whole bound: "
                 f"{rd.total_bpd:.5f} bits/dim; {rd.num_images} images, T = {T}.")
    return "\n".join(lines) + "\n"


def save_rate_distortion_plot(rd: RateDistortion, path: Path) -> Path:
    """Fig. 5's three panels: distortion and rate against the reverse step, distortion against rate."""
    reverse = [len(rd.steps) - i for i in rd.steps]  # T - t: the reverse process step
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (x, y, xlabel, ylabel) in zip(axes, [
        (reverse, rd.distortion_rmse, "reverse process steps (T - t + 1)", "distortion (RMSE, [0, 255])"),
        (reverse, rd.rate_bpd, "reverse process steps (T - t + 1)", "rate (bits/dim)"),
        (rd.rate_bpd, rd.distortion_rmse, "rate (bits/dim)", "distortion (RMSE, [0, 255])"),
    ], strict=True):
        ax.plot(x, y)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    fig.tight_layout()
    return save_figure(fig, path, dpi=80)


# --- figure layouts ------------------------------------------------------------------------------------
def forward_rows(frames: Tensor) -> Tensor:
    """Per image a row x_t at the steps, x_0 to x_T left to right."""
    return frames.transpose(0, 1)


def reverse_rows(out: SampleOutput) -> Tensor:
    """Fig. 6's layout: per chain a row of x_t and below it a row of x̂0, sampling order left to right."""
    traj = out.trajectory  # (S, B, C, H, W) each
    return torch.stack([traj.x_t, traj.x0_pred], 0).permute(2, 0, 1, 3, 4, 5).flatten(0, 1)  # (2B, S, ...)


def reconstruction_rows(rec: Reconstructions) -> Tensor:
    """Fig. 7's layout: per image and step a row x_0 | x_t | completions."""
    S = rec.x_t.shape[0]
    x0 = rec.x0[None, :, None].expand(S, -1, -1, -1, -1, -1)  # (S, B, 1, C, H, W)
    rows = torch.cat([x0, rec.x_t[:, :, None], rec.samples], 2)  # (S, B, N + 2, C, H, W)
    return rows.transpose(0, 1).flatten(0, 1)  # (B·S, N + 2, C, H, W)


def interpolation_rows(interp: Interpolation) -> Tensor:
    """Fig. 8's layout: per pair a row x0_a | decodings for λ = 0 ... 1 | x0_b."""
    return torch.cat([interp.x0_a[:, None], interp.x0.transpose(0, 1), interp.x0_b[:, None]], 1)


def write_rate_distortion(rd: RateDistortion, out_dir: Path) -> dict[str, Path]:
    """rate_distortion.png (Fig. 5), .md (Table 3's kind) and .json (every step) under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"rate_distortion": save_rate_distortion_plot(rd, out_dir / "rate_distortion.png"),
             "rate_distortion_table": out_dir / "rate_distortion.md",
             "rate_distortion_json": out_dir / "rate_distortion.json"}
    write_file(paths["rate_distortion_table"], rate_distortion_table(rd))
    write_file(paths["rate_distortion_json"], json.dumps(asdict(rd)))
    return paths


# --- all at once ----------------------------------------------------------------------------------------
@dataclass
class FigureSpec:
    """What render_all draws; steps left None take defaults from T."""

    num_images: int = 8  # data images in Figs. 7-8 and the forward process; chains in Fig. 6
    num_samples: int = 64  # the sample grid
    num_reconstructions: int = 6  # completions per x_t (Fig. 7)
    num_lambdas: int = 9  # λ evenly spaced in [0, 1] (Fig. 8)
    rd_images: int = 64  # images in the rate-distortion curve (T network passes over them)
    seed: int = 0
    forward_steps: list[int] | None = None  # default 0, T/10, T/4, T/2, 3T/4, T-1
    reverse_steps: list[int] | None = None  # default 0, T/10, 2T/10, ..., T-1
    reconstruction_steps: list[int] | None = None  # default as forward_steps
    interpolation_steps: list[int] | None = None  # default T/2 (the paper: 500 of 1000)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)  # the sample grid's (Figs. 6-8 are Algorithm 2)


@torch.no_grad()
def render_all(net: Model, objective: DDPM, x0: Tensor, out_dir: Path, spec: FigureSpec) -> dict:
    """Every figure of `spec` from data x0 (at least num_images and rd_images of them), written under out_dir.

    Each figure draws from its own generator seeded with spec.seed, the net in eval mode (no dropout).
    Returns {name: path} of what was written.
    """
    with eval_mode(net):
        return _render_all(net, objective, x0, out_dir, spec)


def _render_all(net: Model, objective: DDPM, x0: Tensor, out_dir: Path, spec: FigureSpec) -> dict:
    diffusion = objective.diffusion
    T, device, out_dir = diffusion.num_timesteps, x0.device, Path(out_dir)
    if spec.num_images < 2:
        raise UserError(f"num_images must be >= 2 (the interpolation takes pairs), got {spec.num_images}; try 8")
    if x0.shape[0] < max(spec.num_images, spec.rd_images):
        raise UserError(f"the figures need {max(spec.num_images, spec.rd_images)} data images, got {x0.shape[0]}; "
                        "lower num_images / rd_images or use a larger split")
    images, n = x0[: spec.num_images], spec.num_images

    def gen() -> torch.Generator:
        return torch.Generator(device).manual_seed(spec.seed)

    # Each figure is written as soon as it is drawn: a run stopped half-way keeps the figures it has made.
    frames = forward_process(diffusion, images, spec.forward_steps or default_steps(T), gen())
    paths = {"forward": save_rows(forward_rows(frames), out_dir / "forward.png")}
    chains = reverse_process(net, objective, n, tuple(images.shape[1:]),
                             spec.reverse_steps or default_steps(T, [k / 10 for k in range(11)]), spec.seed)
    paths["reverse"] = save_rows(reverse_rows(chains), out_dir / "reverse.png")
    rec = stochastic_reconstructions(net, diffusion, images, spec.reconstruction_steps or default_steps(T),
                                     spec.num_reconstructions, gen())
    paths["reconstructions"] = save_rows(reconstruction_rows(rec), out_dir / "reconstructions.png")
    lambdas = torch.linspace(0, 1, spec.num_lambdas, dtype=torch.float64).tolist()
    steps = check_steps(diffusion, spec.interpolation_steps or [T // 2], "interpolation_steps")
    interps = [interpolate(net, diffusion, images[0:n - 1:2], images[1:n:2], t, lambdas, gen()) for t in steps]
    paths["interpolation"] = save_rows(torch.stack([interpolation_rows(i) for i in interps], 1).flatten(0, 1),
                                       out_dir / "interpolation.png")
    labels, nrow = class_rows(spec.num_samples, num_classes_of(net))  # class-conditional: a row per class
    count = spec.num_samples if labels is None else len(labels)
    samples = draw(net, objective, spec.sampler, count, shape=tuple(images.shape[1:]), seed=spec.seed,
                   chunk_size=count, labels=labels).images
    paths["samples"] = save_grid(samples, out_dir / "samples.png", nrow, pad_value=1.0)
    rd = progressive_coding(net, diffusion, x0[: spec.rd_images], gen())
    return paths | write_rate_distortion(rd, out_dir)
