"""Consistency tuning (ECT, Geng et al. 2024) of a trained model of any objective, and consistency sampling (Song et
al. 2023 Alg. 1): the mapping r(t) against ECT's formula written out in float64, DDPM's trained levels, the shared
dropout mask, the boundary f(x, 0) = x0, the sampler on the exact consistency function of Gaussian data in each
objective's frame, and the real entry points (tune, resume bit for bit, sample, refusals)."""

import json
import math
import re

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion.core.denoiser import Denoiser
from diffusion.core.objectives.base import build_objective
from diffusion.core.objectives.consistency import Consistency
from diffusion.core.sampling import SamplerSpec, draw
from diffusion.core.sampling.consistency import consistency_sample
from diffusion.errors import UserError
from diffusion.lightning.callbacks import training_time
from diffusion.run.commands.train import train as train_command
from helpers import (
    EDM_SETTINGS,
    FLOW_SETTINGS,
    assert_two_processes_train_as_one,
    ddpm,
    edm,
    flow,
    paper_betas,
    run_script,
    train_cfg,
    wandb_history,
)
from test_resume import assert_same_tensors

ECT = dict(p_mean=-1.1, p_std=2.0, q=2.0, k=8.0, b=1.0, c=0.0, stage_steps=10)


def consistency(base, **settings) -> Consistency:
    return Consistency(base=base.spec(), **{**ECT, **settings})


def ect_r(t: float, stage: int, q=2.0, k=8.0, b=1.0) -> float:
    """Geng et al. 2024: r = t (1 − q^−(s+1) (1 + k σ(−b t))), clipped at 0 (their t_to_r_sigmoid)."""
    return max(0.0, t * (1.0 - (1.0 + k / (1.0 + math.exp(b * t))) / q ** (stage + 1)))


@pytest.mark.parametrize("step,stage", [(0, 0), (9, 0), (10, 1), (35, 3)])
def test_the_mapping_is_ects_at_each_stage(step, stage):
    cm = consistency(edm())
    cm.set_step(step)
    t = torch.tensor([0.002, 0.05, 0.3, 1.0, 2.5, 10.0, 80.0], dtype=torch.float64)
    r = cm.r_of(t)
    want = torch.tensor([ect_r(x, stage) for x in t.tolist()], dtype=torch.float64)
    torch.testing.assert_close(r, want, rtol=1e-12, atol=0)
    assert bool((r < t).all())


def test_ddpm_is_tuned_on_its_trained_levels_only():
    base = ddpm(paper_betas(20))
    cm, levels = consistency(base, stage_steps=1), base.trained_sigmas()
    for step in (0, 2, 6):
        cm.set_step(step)
        t, _ = cm.draw_levels(4096, torch.device("cpu"))
        assert bool(torch.isin(t, levels).all())
        r = cm.r_of(t)
        assert bool((torch.isin(r, levels) | (r == 0)).all()) and bool((r < t).all())
        mapped = torch.tensor([ect_r(x, step) for x in t.tolist()], dtype=torch.float64)
        below = torch.where(r > 0, r, torch.zeros_like(r))
        assert bool((below <= mapped + 1e-12).all())  # the highest trained level at or below r(t) ...
        nxt = torch.searchsorted(levels, r, right=True).clamp(max=len(levels) - 1)
        assert bool(((levels[nxt] > mapped) | (levels[nxt] >= t)).all())  # ... and no higher one


class Net(torch.nn.Module):
    """F = dropout(a·x + noise_in): its output depends on its dropout mask."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, x, noise_in):
        return F.dropout(self.a * x + noise_in.reshape(-1, 1, 1, 1).to(x.dtype), p=0.5, training=True)


def test_both_calls_share_one_dropout_mask_and_r_zero_is_the_data():
    base, net = edm(), Net()
    cm = consistency(base)
    x0, eps = torch.randn(6, 1, 4, 4), torch.randn(6, 1, 4, 4)
    t = torch.tensor([0.01, 0.02, 5.0, 10.0, 20.0, 40.0], dtype=torch.float64)
    torch.manual_seed(3)
    got = cm.loss(net, x0, t, eps).loss
    r = cm.r_of(t)
    assert bool((r[:2] == 0).all()) and bool((r[2:] > 0).all())  # stage 0: small t pair with the data itself
    torch.manual_seed(3)
    mask = F.dropout(torch.ones(6, 1, 4, 4), p=0.5, training=True)  # the one mask both calls must use

    def f(x, sigma):
        c_skip, c_out, c_in, c_noise = base.precondition(sigma)
        b = (-1, 1, 1, 1)
        return c_skip.reshape(b) * x + c_out.reshape(b) * mask * (0.7 * c_in.reshape(b) * x + c_noise.reshape(b))

    x_t, x_r = x0 + t.reshape(-1, 1, 1, 1) * eps, x0 + r.reshape(-1, 1, 1, 1) * eps
    target = torch.where((r > 0).reshape(-1, 1, 1, 1), f(x_r, r.clamp(min=1e-3)), x0.double())
    want = (f(x_t, t) - target).flatten(1).norm(dim=1) / (t - r)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


class GaussianConsistency(Denoiser):
    """The exact consistency function of data N(0, s² I) in an objective's frame: the PF-ODE maps x̃ at σ to
    x0 = s x̃ / sqrt(s² + σ²) (x̃ = x/α; at σ = ∞, flow's t = 1, x itself is the noise: x0 = s x)."""

    def __init__(self, objective, s: float):
        super().__init__(objective, clip=False)
        self.s = s

    def denoise(self, x, sigma):
        if math.isinf(sigma):
            return self.s * x
        alpha = 1.0 / (1.0 + sigma) if self.objective.name == "flow" else 1.0
        return self.s * (x / alpha) / math.sqrt(self.s**2 + sigma**2)


@pytest.mark.parametrize("objective", ["edm", "flow"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_the_sampler_draws_the_data_from_an_exact_consistency_function(objective, steps):
    obj, s = (edm() if objective == "edm" else flow()), 0.5
    spacing = "karras" if objective == "edm" else "linspace"
    grid = obj.grid(spacing, steps + 1, from_top=True)
    gen = torch.Generator().manual_seed(0)
    x_T = grid.prior_std * torch.randn(20000, 1, 2, 2, generator=gen)
    out = consistency_sample(GaussianConsistency(obj, s), x_T, num_steps=steps, spacing=spacing, generator=gen)
    assert abs(out.x0.std().item() - s) < 0.01 and abs(out.x0.mean().item()) < 0.01


def test_one_step_on_a_diffusion_denoiser_is_the_blurred_mean():
    """What tuning is for: one jump with the posterior mean E[x0 | x] (a diffusion model's D) from σ = 80 gives
    almost no spread, s²·80/(s² + 80²), where the consistency function gives s."""
    obj, s = edm(), 0.5

    class PosteriorMean(Denoiser):
        def denoise(self, x, sigma):
            return s**2 / (s**2 + sigma**2) * x

    x_T = 80.0 * torch.randn(20000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    out = consistency_sample(PosteriorMean(obj, clip=False), x_T, num_steps=1, spacing="karras")
    assert out.x0.std().item() == pytest.approx(s**2 * 80 / (s**2 + 80**2), rel=0.02)


def test_the_sampler_makes_steps_network_calls_and_its_limits_are_one_line():
    obj = consistency(ddpm(paper_betas(20)))
    calls = []

    def model(x, t):
        calls.append(t[0].item())
        return torch.zeros_like(x)

    for steps in (1, 2, 5):
        calls.clear()
        draw(model, obj, SamplerSpec(name="consistency", steps=steps).check_for(obj), 3, shape=(1, 2, 2))
        assert len(calls) == steps and calls[0] == 19  # from x_T at T-1
    with pytest.raises(UserError, match=r"^sampler.steps=20 exceeds .* use sampler.steps=1 or at most 19"):
        SamplerSpec(name="consistency", steps=20).check_for(obj)
    with pytest.raises(UserError, match=r"sampler.name=ddpm walks DDPM's Markov chain"):
        SamplerSpec(name="ddpm").check_for(obj)


def test_a_checkpoint_spec_rebuilds_the_tuned_objective():
    for base in (ddpm(paper_betas(20)), edm(**EDM_SETTINGS), flow(**FLOW_SETTINGS)):
        cm = consistency(base)
        again = build_objective(cm.spec())
        assert isinstance(again, Consistency) and again.spec() == cm.spec() and again.base.name == base.name
        assert again.default_sampler == "consistency" and again.num_levels == base.num_levels


# --- the entry points ------------------------------------------------------------------------------------------
RUN = ["callbacks.samples=null", "trainer.deterministic=true", "callbacks.checkpoint.every_n_train_steps=1",
       "callbacks.checkpoint.save_top_k=0", "data.batch_size=500", "objective.stage_steps=2", "logger=none",
       "validation.bpd_images=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained EDM run to tune."""
    out = tmp_path_factory.mktemp("edm")
    train_command(train_cfg(out, "objective=edm", "callbacks.samples=null", "logger=none", "trainer.max_steps=2"))
    return out / "checkpoints" / "last.ckpt"


def tune(out, trained, *overrides, extra_callbacks=()):
    train_command(train_cfg(out, "experiment=digits_consistency", f"init_from={trained}", *RUN, *overrides),
                  extra_callbacks=extra_callbacks)
    return torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)


class Stages(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.seen.append(pl_module.objective.stage)


@pytest.mark.slow
def test_a_tuning_run_resumes_bit_for_bit_across_a_stage(trained, tmp_path):
    stages = Stages()
    full = tune(tmp_path / "full", trained, "trainer.max_steps=5", extra_callbacks=(stages,))
    assert stages.seen == [0, 0, 1, 1, 2]  # objective.stage_steps=2: Δt halves every 2 optimizer steps
    tune(tmp_path / "first", trained, "trainer.max_steps=3")
    cfg = train_cfg(tmp_path / "resumed", "experiment=digits_consistency", *RUN, "trainer.max_steps=5",
                    f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}")
    train_command(cfg)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    spec = full["hyper_parameters"]["objective"]
    assert spec["_target_"].endswith("Consistency") and spec["base"]["_target_"].endswith("EDM")
    assert resumed["global_step"] == full["global_step"] == 5
    assert_same_tensors(full["state_dict"], resumed["state_dict"], "EMA weights")
    assert_same_tensors(full["current_model_state"], resumed["current_model_state"], "raw weights")


@pytest.mark.slow
def test_tune_then_sample_in_two_steps_through_the_scripts(trained, tmp_path):
    """The experiment's quality callback scores 2-step and 1-step samples at the end; W&B (offline) holds the run."""
    run = tmp_path / "cm"
    done = run_script("train.py", "experiment=digits_consistency", "debug=fast", f"init_from={trained}",
                      "trainer.max_steps=2", "callbacks.quality.at_train_end=true", "callbacks.quality.num_samples=12",
                      "callbacks.quality.max_reference_images=48", "callbacks.quality.sampler.name=consistency",
                      "callbacks.quality.sampler.steps=2", f"hydra.run.dir={run}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "objective=consistency: consistency tuning (ECT" in done.stdout and "of objective=edm" in done.stdout
    assert re.search(r"^quality: val/fid \S+ .*\[protocol [0-9a-f]{8}: 12 samples consistency-2 ema", done.stdout,
                     re.M), done.stdout[-2000:]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "finished" and "consistency-1" in status["quality_extra"]
    assert status["quality_extra"]["consistency-1"]["quality"]["val/fid"] > 0
    assert [h["trainer/global_step"] for h in wandb_history(run) if "train/loss" in h] == [0, 1]
    out = tmp_path / "samples"
    sampled = run_script("sample.py", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "sampler.name=consistency",
                         "sampler.steps=2", "num_samples=6", f"output_dir={out}", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    with np.load(out / "samples.npz") as f:
        assert f[f.files[0]].shape[0] == 6


@pytest.mark.slow
def test_without_a_model_to_tune_it_stops_in_one_line(tmp_path):
    done = run_script("train.py", "experiment=digits_consistency", "debug=fast", "logger=none",
                      f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == ["error: objective=consistency tunes a trained diffusion model: set init_from=<its checkpoint or "
                     "diffusers folder> (a run resumed with ckpt_path= gives the path of its .ckpt)"], done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_another_network_is_refused_in_one_line(trained, tmp_path):
    done = run_script("train.py", "experiment=digits_consistency", "debug=fast", "logger=none", "model.ch=16",
                      "model.num_groups=16", f"init_from={trained}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: init_from ") and "net.ch=32, this run has net.ch=16" in done.stderr


@pytest.mark.slow
@pytest.mark.ddp
def test_two_processes_tune_as_one_with_the_global_batch(trained, tmp_path):
    assert_two_processes_train_as_one(["experiment=digits_consistency", "debug=fast", f"init_from={trained}",
                                       "callbacks.samples=null", "objective.stage_steps=1",
                                       "validation.bpd_images=0"], tmp_path)


@pytest.mark.slow
def test_the_sampler_table_puts_the_tuned_rows_beside_the_solvers_with_their_tuning_seconds(trained, tmp_path):
    tuned = tune(tmp_path / "cm", trained, "trainer.max_steps=2")
    seconds, devices = training_time(tuned)
    assert seconds > 0 and devices == "1× cpu"
    out = tmp_path / "eval"
    done = run_script("evaluate.py", f"ckpt={trained}", "logger=none", "num_samples=8", "bpd.enabled=false",
                      "max_reference_images=48", "sampler.name=dpmpp_2m", "sampler.steps=5",
                      "sampler_table.enabled=true",
                      "sampler_table.samplers=[{name:dpmpp_2m,steps:5},{name:heun,steps:3}]",
                      f"sampler_table.tuned_ckpt={tmp_path / 'cm' / 'checkpoints' / 'last.ckpt'}",
                      "sampler_table.tuned_steps=[1,2]", f"hydra.run.dir={out}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "report.json").read_text())["sampler_table"]
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("dpmpp_2m-5 karras", 5), ("heun-3", 3),
                                                        ("consistency-1 (tuned)", 1), ("consistency-2 (tuned)", 2)]
    assert [r.get("tuning_seconds") for r in rows] == [None, None, seconds, seconds]
    table = (out / "samplers.md").read_text()
    assert "| tuning s |" in table and "| consistency-2 (tuned) | 2 | " in table and f"{seconds:.0f} (1× cpu)" in table
    assert "| heun-3 | 3 | " in table and (out / "samplers.png").is_file()


@pytest.mark.slow
def test_a_table_of_a_model_that_is_not_tuned_is_refused_in_one_line(trained, tmp_path):
    done = run_script("evaluate.py", f"ckpt={trained}", "logger=none", "sampler_table.enabled=true",
                      f"sampler_table.tuned_ckpt={trained}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: sampler_table.tuned_ckpt={trained} is a model of objective=edm, not a tuned one; give the checkpoint "
        "of a `train.py objective=consistency init_from=<this ckpt>` run"]
    assert not (tmp_path / "eval" / "report.json").exists()
