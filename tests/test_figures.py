"""The paper's figures: shapes, the math under each checked independently, the PNGs, the callback, figures.py."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from diffusion.config import DigitsDataConfig, PaperFiguresConfig
from diffusion.core.gaussian import GaussianDiffusion
from diffusion.core.images import to_model_range
from diffusion.core.likelihood import variational_bound
from diffusion.core.objectives.ddpm import DDPM
from diffusion.core.sampling import ddpm_sample
from diffusion.core.schedules import linear_beta_schedule
from diffusion.errors import UserError
from diffusion.figures.paper_figures import (
    FigureSpec,
    check_steps,
    default_steps,
    forward_process,
    interpolate,
    progressive_coding,
    rate_distortion_table,
    render_all,
    reverse_from,
    reverse_process,
    stochastic_reconstructions,
)
from diffusion.nn import UNet
from diffusion.run.commands.figures import figures
from diffusion.run.commands.train import train
from helpers import build, compose_cfg, ddpm, paper_betas, run_script, train_cfg, unet, wandb_records

T = 12
BETAS = linear_beta_schedule(T, 1e-3, 0.3)


def alphas_cumprod(betas: torch.Tensor) -> np.ndarray:
    """ᾱ_t recomputed with numpy, independently of gaussian.py."""
    return np.cumprod(1.0 - betas.numpy())


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def chain(betas: torch.Tensor, dtype: torch.dtype = torch.float32) -> GaussianDiffusion:
    """DDPM's chain as the figures draw it: ε prediction, σ² = β_t (the paper's fixedlarge)."""
    return GaussianDiffusion(betas, "eps", "fixed_large", dtype=dtype)


@pytest.fixture(scope="module")
def objective() -> DDPM:
    """The DDPM objective over BETAS: render_all and reverse_process take it; the rest take its chain."""
    return ddpm(BETAS)


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return chain(BETAS)


@pytest.fixture(scope="module")
def net() -> UNet:
    torch.manual_seed(0)
    net = unet(in_channels=1, out_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
               dropout=0.0, image_size=8, num_groups=4).eval()
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)  # the zero-initialised output would predict eps = 0
    return net


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return to_model_range(build(DigitsDataConfig).reference_images("val", 8))  # (8, 1, 8, 8) real digits


def test_steps_are_checked_at_the_boundary(diffusion):
    assert default_steps(1000) == [0, 100, 250, 500, 750, 999]
    for bad in ([5, 3], [0, T], [], [-1, 2]):
        with pytest.raises(UserError, match="increasing timestep indices in"):
            check_steps(diffusion, bad)


def test_forward_process_starts_at_the_data_and_has_the_moments_of_eq4():
    diffusion = chain(paper_betas(1000), dtype=torch.float64)
    ac = alphas_cumprod(paper_betas(1000))
    x0 = torch.rand(4096, 1, 8, 8, generator=seeded(1), dtype=torch.float64) * 2 - 1
    steps = [0, 100, 300, 999]
    frames = forward_process(diffusion, x0, steps, seeded())
    assert frames.shape == (4, 4096, 1, 8, 8)
    assert (frames[0] - x0).abs().max() < 6 * math.sqrt(1e-4)  # x_1 = sqrt(1-β_1) x0 + sqrt(β_1) z
    residuals = [((frames[i] - math.sqrt(ac[t]) * x0) / math.sqrt(1 - ac[t])).flatten() for i, t in enumerate(steps)]
    n = residuals[0].numel()
    for r in residuals:  # q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I)
        assert abs(r.mean().item()) < 4 / math.sqrt(n)
        assert abs(r.var().item() - 1) < 4 * math.sqrt(2 / n)
    # One Markov chain: Cov(x_s, x_t | x_0) = sqrt(ᾱ_t / ᾱ_s) (1 - ᾱ_s) for s < t.
    s, t = steps[1], steps[2]
    rho = math.sqrt(ac[t] / ac[s]) * math.sqrt((1 - ac[s]) / (1 - ac[t]))  # ≈ 0.28
    assert abs((residuals[1] * residuals[2]).mean().item() - rho) < 4 / math.sqrt(n)


def test_reverse_process_keeps_x_t_and_the_x0_the_net_predicts(net, objective):
    x_T = torch.randn(3, 1, 8, 8, generator=seeded(2))  # chunk 0 of a draw seeded 2
    out = reverse_process(net, objective, 3, (1, 8, 8), [0, 5, T - 1], seed=2)
    traj, ac = out.trajectory, alphas_cumprod(BETAS)
    assert traj.steps == [T - 1, 5, 0] and traj.x_t.shape == traj.x0_pred.shape == (3, 3, 1, 8, 8)
    assert torch.equal(traj.x_t[0], x_T)
    for x_t, x0_pred, t in zip(traj.x_t, traj.x0_pred, traj.steps, strict=True):
        eps = net(x_t, torch.full((3,), t))
        expected = ((x_t - math.sqrt(1 - ac[t]) * eps) / math.sqrt(ac[t])).clamp(-1, 1)  # Eq. 4 inverted
        assert_close(x0_pred, expected, rtol=1e-4, atol=1e-5)


def test_reverse_from_the_last_step_is_algorithm_2_and_groups_share_noise(net, diffusion, objective):
    x_T = torch.randn(3, 1, 8, 8, generator=seeded(2))
    assert torch.equal(reverse_from(net, diffusion, x_T, T - 1, seeded(5)),
                       ddpm_sample(objective.denoiser(net, clip=True), x_T, generator=seeded(5)).x0)
    grouped = reverse_from(net, diffusion, x_T.expand(4, -1, -1, -1, -1), 7, seeded(5))  # (4, 3, 1, 8, 8)
    alone = reverse_from(net, diffusion, x_T, 7, seeded(5))
    for group in grouped:
        assert_close(group, alone)
    assert not torch.allclose(alone[0], alone[1])


def oracle(x_star: torch.Tensor, betas: torch.Tensor):
    """A model that knows the one-image data set {x_star}: eps = (x_t - sqrt(ᾱ_t) x*) / sqrt(1 - ᾱ_t)."""
    ac = torch.from_numpy(alphas_cumprod(betas))

    def model(x_t, t):
        a = ac[t].reshape(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x_star) / (1 - a).sqrt()

    return model


def test_stochastic_reconstructions_share_x_t_and_stay_close_at_the_first_step(net, diffusion, digits):
    rec = stochastic_reconstructions(net, diffusion, digits[:3], [0, 4, T - 1], 5, seeded())
    assert rec.x_t.shape == (3, 3, 1, 8, 8) and rec.samples.shape == (3, 3, 5, 1, 8, 8)
    assert not torch.allclose(rec.samples[1, :, 0], rec.samples[1, :, 1])  # completions differ from step 1 on
    fine = chain(paper_betas(1000))  # β_1 = 1e-4: x_1 is x_0 up to ~0.01
    rec = stochastic_reconstructions(net, fine, digits[:3], [0], 4, seeded())
    assert (rec.samples[0] - digits[:3, None]).abs().max() < 0.1
    # An oracle of a one-image data set completes every x_t into that image.
    x_star = digits[:1].double()
    exact = chain(BETAS, dtype=torch.float64)
    rec = stochastic_reconstructions(oracle(x_star, BETAS), exact, x_star, [0, 6, T - 1], 3, seeded())
    assert_close(rec.samples, x_star[None, :, None].expand_as(rec.samples), rtol=0, atol=1e-9)


def test_interpolation_ends_are_the_decodings_of_a_and_b_alone(net, diffusion, digits):
    a, b, t = digits[0:4:2], digits[1:4:2], 6
    interp = interpolate(net, diffusion, a, b, t, [0.0, 0.5, 1.0], seeded(3))
    assert interp.x0.shape == (3, 2, 1, 8, 8)
    # The documented protocol: noise for a, then for b (Eq. 4), then the reverse noise shared by every λ.
    gen, ac = seeded(3), alphas_cumprod(BETAS)[t]
    x_t_a = math.sqrt(ac) * a + math.sqrt(1 - ac) * torch.randn(a.shape, generator=gen)
    x_t_b = math.sqrt(ac) * b + math.sqrt(1 - ac) * torch.randn(b.shape, generator=gen)
    assert_close(interp.x_t_a, x_t_a)
    assert_close(interp.x_t_b, x_t_b)
    state = gen.get_state()
    assert_close(interp.x0[0], reverse_from(net, diffusion, interp.x_t_a, t, gen))
    gen.set_state(state)
    assert_close(interp.x0[2], reverse_from(net, diffusion, interp.x_t_b, t, gen))
    assert not torch.allclose(interp.x0[1], interp.x0[0]) and not torch.allclose(interp.x0[1], interp.x0[2])
    with pytest.raises(UserError, match="interpolation weights must lie in"):
        interpolate(net, diffusion, a, b, t, [0.0, 1.5])


def test_progressive_coding_rate_is_the_bound_spent_so_far(net, diffusion, digits):
    rd = progressive_coding(net, diffusion, digits, seeded())
    bound = variational_bound(net, diffusion, digits, seeded())  # the same draws: an independent summation
    nats_per_bit = 64 * math.log(2)
    assert rd.steps == list(range(T)) and len(rd.rate_bpd) == len(rd.distortion_rmse) == T
    assert rd.rate_bpd[-1] == pytest.approx(bound.prior_bpd.mean().item(), rel=1e-6)
    assert rd.rate_bpd[0] + rd.decoder_bpd == pytest.approx(bound.total_bpd.mean().item(), rel=1e-6)
    terms = bound.terms_nats.double()
    for t in range(T):  # L_T plus every KL term after t, Algorithm 3
        rate = np.mean([(bound.prior_bpd[b].item() + sum(terms[b, s].item() for s in range(t + 1, T)) / nats_per_bit)
                        for b in range(len(digits))])
        assert rd.rate_bpd[t] == pytest.approx(rate, rel=1e-6, abs=1e-9)
        assert rd.distortion_rmse[t] == pytest.approx(127.5 * bound.x0_mse[:, t].double().mean().sqrt().item())
    assert all(b <= a + 1e-12 for a, b in zip(rd.rate_bpd, rd.rate_bpd[1:], strict=False))
    table = rate_distortion_table(rd, num_rows=4).splitlines()
    assert [row.split("|")[1].strip() for row in table[2:7]] == ["12", "9", "6", "3", "1"]


def test_render_all_writes_every_figure(net, objective, digits, tmp_path):
    spec = FigureSpec(num_images=4, num_samples=4, num_reconstructions=2, num_lambdas=3, rd_images=8,
                      reverse_steps=[0, 6, T - 1])
    paths = render_all(net, objective, digits, tmp_path, spec)
    cell = 34  # 8×8 images shown at 32×32, 2 px padding
    sizes = {"forward": (6, 4), "reverse": (3, 8), "reconstructions": (4, 4 * 6), "interpolation": (5, 2),
             "samples": (2, 2)}  # (columns, rows); default_steps(12) = [0, 1, 3, 6, 9, 11]
    for name, (cols, rows) in sizes.items():
        assert Image.open(paths[name]).size == (cols * cell + 2, rows * cell + 2), name
    forward = np.asarray(Image.open(paths["forward"]).convert("L"), dtype=np.float64)
    first = forward[2:34:4, 2:34:4]  # the first image at t = 0, back to 8×8
    assert np.abs(first - (digits[0, 0].numpy() + 1) * 127.5).max() < 25  # x_1 ≈ x_0 (σ = sqrt(β_1) ≈ 0.03)
    assert Image.open(paths["rate_distortion"]).size[0] > 500
    assert len(json.loads(paths["rate_distortion_json"].read_text())["rate_bpd"]) == T
    assert paths["rate_distortion_table"].read_text().startswith("| reverse step")


@pytest.fixture(scope="module")
def trained_with_figures(tmp_path_factory):
    """A tiny real run (digits, T=20, 4 steps, W&B offline) with the figures callback every 2 steps."""
    out = tmp_path_factory.mktemp("figrun")
    callback = build(PaperFiguresConfig, every_n_steps=2, at_train_end=True, num_images=2, num_samples=4,
                     num_reconstructions=2, num_lambdas=3, rd_images=4, sampler={"name": "unipc", "steps": 4})
    train(train_cfg(out, "callbacks.ema.decay=0.5", "callbacks.ema.warmup=false",
                        "callbacks.samples.sampler.name=heun", "callbacks.samples.final_sampler.name=dpmpp_2m",
                        "callbacks.samples.final_sampler.steps=4"), extra_callbacks=(callback,))
    return out, callback


def test_callback_writes_and_logs_figures_in_a_real_run(trained_with_figures):
    out, callback = trained_with_figures
    names = {"forward", "reverse", "reconstructions", "interpolation", "samples", "rate_distortion"}
    for folder in (out / "figures", out / "figures" / "step0000002", out / "figures" / "step0000004"):
        assert {p.stem for p in folder.glob("*.png")} == names, folder
    assert callback.last_paths["forward"] == out / "figures" / "forward.png"
    # the sample grids of heun (every 2 steps) and dpmpp_2m (the final one) came through the same spec
    assert {p.name for p in (out / "samples").glob("*.png")} >= {"step0000002.png", "final_ema.png"}
    logged = {p.name.split("_")[0] for p in out.glob("wandb/offline-run-*/files/media/images/figures/*.png")}
    assert logged == names - {"rate_distortion"} | {"rate"}  # W&B names files <key>_<step>_<hash>.png


def test_figures_script_on_a_checkpoint(trained_with_figures, tmp_path):
    out, _ = trained_with_figures
    ckpt = out / "checkpoints" / "last.ckpt"
    result = run_script("figures.py", f"ckpt={ckpt}", "num_images=2", "num_samples=4", "num_reconstructions=2",
                        "num_lambdas=3", "rd_images=4", "interpolation_steps=[5,15]", f"output_dir={tmp_path / 'f'}",
                        "sampler.name=dpmpp_2m_sde", "sampler.steps=3", "sampler.eta=0.5",
                        f"hydra.run.dir={tmp_path / 'h'}", "logger=wandb", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    names = {"forward", "reverse", "reconstructions", "interpolation", "samples", "rate_distortion",
             "rate_distortion_table", "rate_distortion_json"}
    printed = dict(line.split(": ", 1) for line in result.stdout.splitlines() if line.split(": ")[0] in names)
    assert set(printed) == names
    logged = {key.split(".")[0] for r in wandb_records(tmp_path / "h") if r.get("type") == "history"
              for key in r["history"]["item"] if key.startswith("figures/")}
    assert {"figures/forward", "figures/rate_distortion", "figures/samples"} <= logged
    assert all(Path(p).is_file() and Path(p).parent == tmp_path / "f" for p in printed.values())
    assert Image.open(tmp_path / "f" / "interpolation.png").size[1] == 2 * 34 + 2  # 1 pair × 2 steps
    bad = run_script("figures.py", "ckpt=/nonexistent/last.ckpt", f"hydra.run.dir={tmp_path / 'h2'}", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: ckpt /nonexistent/last.ckpt does not exist")
    cfg = compose_cfg("figures", [f"ckpt={ckpt}", "forward_steps=[5,3]"], tmp_path / "h3")
    with pytest.raises(UserError, match=r"must be increasing timestep indices in \[0, 19\], got \[5, 3\]"):
        figures(cfg)
