"""evaluate.py and the evaluation loop: JSON report, W&B summary, sampler table, NLL against the closed form."""

import json
import math

import lightning as L
import numpy as np
import pytest
import torch

from diffusion import run
from diffusion.evaluation import Evaluator
from diffusion.run import build_module
from diffusion.schedules import linear_beta_schedule
from helpers import run_script, train_cfg, wandb_records

EVAL = ["num_samples=16", "batch_size=8", "sampler.name=ddim", "sampler.steps=2", "sampler.eta=0", "bpd.num_images=8",
        "max_reference_images=64"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    run.train(train_cfg(out, "logger=none", "callbacks.samples=null"))
    return out / "checkpoints" / "last.ckpt"


def test_evaluate_writes_report_wandb_summary_and_sampler_table(tiny_ckpt, tmp_path):
    table = "sampler_table.samplers=[{name: ddim, steps: 2}, {name: respaced, steps: 5}, {name: ddpm}]"
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

    summary = {}
    for record in wandb_records(tmp_path):
        if record.get("type") == "summary":
            summary.update(record["summary"].get("update", {}))
    assert summary["eval/bpd"] == pytest.approx(nll["bpd"])
    assert summary["eval/fid_train"] == pytest.approx(quality["fid_train"])

    rows = report["sampler_table"]
    assert [r["steps"] for r in rows] == [2, 5, 20]
    assert len({r["protocol_id"] for r in rows}) == 3  # different samplers are different protocols
    lines = (tmp_path / "samplers.md").read_text().splitlines()
    assert sum(line.startswith(("| ddim-2 η=0 |", "| respaced-5 |", "| ddpm-20 |")) for line in lines) == 3
    assert (tmp_path / "samplers.png").stat().st_size > 1000


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


def test_bits_per_dim_of_an_oracle_equal_the_closed_form(tmp_path):
    """With ε known exactly and σ² = β̃, every L_{t-1} (t ≥ 2) vanishes: the bound is L_T + L_0 in closed form."""
    T = 50
    betas = linear_beta_schedule(T, 1e-4, 0.02)
    module = build_module(train_cfg(tmp_path, "diffusion.variance=fixed_small"), betas)
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
