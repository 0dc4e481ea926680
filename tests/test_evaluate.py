"""evaluate.py and the evaluation loop: JSON report, W&B summary, sampler table, NLL against the closed form."""

import json
import math

import lightning as L
import numpy as np
import pytest
import torch

from diffusion.core.schedules import linear_beta_schedule
from diffusion.errors import UserError
from diffusion.lightning.evaluation import Evaluator
from diffusion.run.commands.train import build_module, train
from helpers import compose_cfg, ddpm, edm, paper_betas, run_script, train_cfg, wandb_records

EVAL = ["num_samples=16", "batch_size=8", "sampler.name=ddim", "sampler.steps=2", "sampler.eta=0", "bpd.num_images=8",
        "max_reference_images=64"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    train(train_cfg(out, "logger=none", "callbacks.samples=null"))
    return out / "checkpoints" / "last.ckpt"


def test_evaluate_writes_report_wandb_summary_and_sampler_table(tiny_ckpt, tmp_path):
    table = ("sampler_table.samplers=[{name: ddim, steps: 2}, {name: dpmpp_2m, steps: 3}, {name: dpmpp_2m_sde, "
             "steps: 3}, {name: unipc, steps: 5}, {name: heun, steps: 4}, {name: ddpm}]")
    result = run_script("evaluate.py", f"ckpt={tiny_ckpt}", *EVAL, "sampler_table.enabled=true", table,
                        f"hydra.run.dir={tmp_path}", "progress_bar=false", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    quality, nll = report["quality"], report["nll"]
    assert {"fid_train", "fid_val", "is", "kid_train", "precision_train", "recall_train"} <= set(quality)
    assert all(math.isfinite(v) for v in quality.values())
    assert 0 < nll["bpd"] < 64 and nll["prior_bpd"] < nll["bpd"]  # an untrained 4-step model: a poor but real bound
    protocol = report["protocol"]
    assert protocol["num_generated"] == 16 and protocol["extractor"].startswith("digits")
    assert protocol["reference"]["train"]["num_images"] == 64 and protocol["sampler"]["name"] == "ddim"
    assert "NLL:" in result.stdout and f"protocol {report['protocol_id']}" in result.stdout

    records = wandb_records(tmp_path)
    summary = {}
    for record in records:
        if record.get("type") == "summary":
            summary.update(record["summary"].get("update", {}))
    assert summary["eval/bpd"] == pytest.approx(nll["bpd"])
    assert summary["eval/fid_train"] == pytest.approx(quality["fid_train"])
    logged = {key.split(".")[0] for r in records if r.get("type") == "history" for key in r["history"]["item"]}
    assert {"eval/sampler_table", "eval/samplers"} <= logged  # the table and the plot

    rows = report["sampler_table"]
    assert [(r["name"], r["steps"], r["nfe"]) for r in rows] == [
        ("ddim", 2, 2), ("dpmpp_2m", 3, 3), ("dpmpp_2m_sde", 3, 3), ("unipc", 5, 5), ("heun", 4, 3), ("ddpm", 20, 20)]
    assert rows[0]["protocol_id"] == report["protocol_id"]  # the main pass, reused
    assert len({r["protocol_id"] for r in rows}) == 6  # different samplers are different protocols
    assert all(r["seconds_per_image"] > 0 and math.isfinite(r["fid_train"]) for r in rows)
    lines = (tmp_path / "samplers.md").read_text().splitlines()
    # the scores' columns are SCORES' brief list, in its order (a score added there joins this table)
    assert "| sampler | NFE | s / image | FD (train) | FD (val) | KID | precision | recall | IS |" in lines
    starts = ("| ddim-2 η=0 | 2 |", "| dpmpp_2m-3 | 3 |", "| dpmpp_2m_sde-3 η=1 | 3 |", "| unipc-5 order=3 | 5 |",
              "| heun-4 | 3 |", "| ddpm-20 | 20 |")
    assert sum(line.startswith(starts) for line in lines) == 6
    assert (tmp_path / "samplers.png").stat().st_size > 1000


def test_evaluate_py_computes_the_ode_likelihood_through_its_test_loop(tiny_ckpt, tmp_path):
    """Lightning's test loop runs under torch.inference_mode, where the ODE's divergence (autograd) cannot be taken."""
    result = run_script("evaluate.py", f"ckpt={tiny_ckpt}", *EVAL, "bpd.method=ode", "bpd.ode_levels=3",
                        f"hydra.run.dir={tmp_path}", "progress_bar=false", "logger=none", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    nll = json.loads((tmp_path / "report.json").read_text())["nll"]
    assert math.isfinite(nll["bpd"]) and nll["bpd"] > 0 and "NLL:" in result.stdout


def test_the_default_sampler_table_skips_what_T_cannot_run_and_a_given_one_refuses(capsys, tmp_path):
    from diffusion.run.reports.sampler_table import table_samplers

    default = compose_cfg("evaluate", ["ckpt=x", "sampler_table.enabled=true"], tmp_path).sampler_table
    names = [(s.name, s.steps) for s in table_samplers(default, ddpm(paper_betas(1000)))]
    assert names == [("ddpm", None)] + [(n, k) for n in ("ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "heun")
                                        for k in (5, 10, 20, 50, 100)]
    assert capsys.readouterr().out == ""
    kept = [(s.name, s.steps) for s in table_samplers(default, ddpm(paper_betas(20)))]
    assert ("heun", 20) in kept and ("ddim", 20) in kept and len(kept) == 1 + 5 * 3
    assert capsys.readouterr().out.strip() == (
        "sampler table: skipping ddim-50, ddim-100, dpmpp_2m-50, dpmpp_2m-100, dpmpp_2m_sde-50, dpmpp_2m_sde-100, "
        "unipc-50, unipc-100, heun-50, heun-100 (more steps than the model's T=20 allows)")
    given = compose_cfg("evaluate", ["ckpt=x", "sampler_table.samplers=[{name: dpmpp_2m, steps: 5}, "
                                     "{name: ddim, steps: 50}]"], tmp_path).sampler_table
    with pytest.raises(UserError, match=r"sampler_table.samplers\[1\].steps=50 exceeds the model's T=20 steps"):
        table_samplers(given, ddpm(paper_betas(20)))
    continuous = [(s.name, s.steps) for s in table_samplers(default, edm())]  # every NFE; no ancestral sampling
    assert continuous == names[1:]
    assert capsys.readouterr().out.strip() == (
        "sampler table: skipping ddpm (DDPM's Markov chain, which objective=edm has not)")


class OracleEps(torch.nn.Module):
    """Knows the one training image x0: returns the exact ε of x_t = √ᾱ x0 + √(1-ᾱ) ε."""

    def __init__(self, x0: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.in_channels, self.image_size = x0.shape[0], x0.shape[-1]
        self.register_buffer("x0", x0)
        self.register_buffer("abar", alphas_cumprod)

    def forward(self, x_t, t):
        a = self.abar[t].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * self.x0) / (1 - a).sqrt()


class Pooled(torch.nn.Module):
    """uint8 (B, 1, 8, 8) -> the means of its four 4x4 quarters: a cheap 4-d feature."""

    def forward(self, images):
        return torch.nn.functional.avg_pool2d(images.float(), 4).flatten(1)


def test_passes_share_one_metric_and_extract_the_real_images_once(tmp_path, monkeypatch):
    """The sampler table's passes reuse the first pass's reference features: the scores of a fresh metric."""
    from diffusion.core.sampling import SamplerSpec
    from diffusion.metrics import ModuleFeatures, SampleQuality

    extracted, set_reference = [], SampleQuality.set_reference
    monkeypatch.setattr(SampleQuality, "set_reference",
                        lambda self, name, *a, **k: (extracted.append(name), set_reference(self, name, *a, **k))[1])
    torch.manual_seed(0)
    module = build_module(train_cfg(tmp_path, "schedule.num_timesteps=10"))
    with torch.no_grad():  # the U-Net's output layer starts at zero: make its ε depend on x_t
        for p in module.net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    refs = {"train": torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator())}

    def score(metric, spec):
        evaluator = Evaluator(module, spec, 24, 8, 0, metric, refs, None, 1)
        L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False).test(evaluator, verbose=False)
        return evaluator.results["quality"]

    shared = SampleQuality(ModuleFeatures(Pooled(), "pooled"))
    first = score(shared, SamplerSpec("ddim", steps=3))
    second = score(shared, SamplerSpec("unipc", steps=3))
    assert extracted == ["train"]
    assert second == pytest.approx(score(SampleQuality(ModuleFeatures(Pooled(), "pooled")), SamplerSpec("unipc",
                                                                                                       steps=3)))
    assert second["fid_train"] != pytest.approx(first["fid_train"])


def test_bits_per_dim_of_an_oracle_equal_the_closed_form(tmp_path):
    """With ε known exactly and σ² = β̃, every L_{t-1} (t ≥ 2) vanishes: the bound is L_T + L_0 in closed form."""
    T = 50
    betas = linear_beta_schedule(T, 1e-4, 0.02)
    module = build_module(train_cfg(tmp_path, "objective.variance=fixed_small", f"schedule.num_timesteps={T}"))
    assert torch.equal(module.objective.diffusion.betas_float64, betas)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(1, 8, 8))
    pixels[0, 0, :2] = [0, 255]  # both edge bins, whose decoder mass runs to ±infinity
    images = torch.from_numpy(pixels).to(torch.uint8)[None].repeat(4, 1, 1, 1)
    x0 = torch.from_numpy(pixels / 127.5 - 1)  # (1, 8, 8) float64

    b = betas.double().numpy()
    abar = np.cumprod(1 - b)
    module.net = OracleEps(x0.float(), torch.from_numpy(abar).float())
    evaluator = Evaluator(module, {"name": "ddpm"}, 4, 4, 0, None, {}, images, bpd_batch_size=2)
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
              enable_model_summary=False).test(evaluator, verbose=False)

    # L_T = KL(N(√ᾱ_T x0, 1-ᾱ_T) ‖ N(0, 1)) per dimension
    prior = 0.5 * (-math.log(1 - abar[-1]) + (1 - abar[-1]) + abar[-1] * x0.numpy() ** 2 - 1)
    # L_0 = -log ∫ over x0's bin of N(x0, σ²), σ² = β̃ at the paper's step 2 (what the first step uses)
    sigma = math.sqrt((1 - abar[0]) / (1 - abar[1]) * b[1])
    half_bin = 1 / 255
    p = np.vectorize(lambda v: 0.5 * (1 + math.erf(half_bin / (sigma * math.sqrt(2)))) if abs(v) == 1
                     else math.erf(half_bin / (sigma * math.sqrt(2))))(x0.numpy())
    expected = (prior - np.log(p)).mean() / math.log(2)
    assert evaluator.results["nll"]["bpd"] == pytest.approx(expected, rel=1e-4)
    assert evaluator.results["nll"]["prior_bpd"] == pytest.approx(prior.mean() / math.log(2), rel=1e-4)


@pytest.mark.ddp
def test_two_processes_evaluate_exactly_as_one(tiny_ckpt, tmp_path):
    # The samples and the bound's noise are dealt out in seeded chunks: the same numbers on 1 or 2 devices.
    reports = []
    for devices in (1, 2):
        out = tmp_path / f"devices{devices}"
        result = run_script("evaluate.py", f"ckpt={tiny_ckpt}", *EVAL, "bpd.batch_size=3", "accelerator=cpu",
                            f"devices={devices}", "logger=none", "progress_bar=false", f"hydra.run.dir={out}",
                            cwd=tmp_path, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        reports.append(json.loads((out / "report.json").read_text()))
    one, two = reports
    assert two["timing"]["devices"] == 2 and one["protocol_id"] == two["protocol_id"]
    assert two["quality"] == pytest.approx(one["quality"], rel=1e-6, abs=1e-9)
    assert two["nll"] == pytest.approx(one["nll"], rel=1e-6)
