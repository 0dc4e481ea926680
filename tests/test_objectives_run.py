"""EDM and flow matching through everything DDPM has: bit-exact resume, 2-process DDP equal to one process with the
global batch (class-conditional), post-hoc EMA widths, guidance and labels in sample.py, the loss binned over each
objective's own noise level, and the sweep report of a multirun over objectives. Real entry points, tiny networks."""

import csv
import json

import numpy as np
import pytest

from diffusion.lightning.callbacks.loss_by_t import read_loss_by_t
from helpers import assert_two_processes_train_as_one, run_script
from test_resume import assert_same_tensors, train

OBJECTIVES = ["edm", "flow"]


@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_a_stopped_and_resumed_run_equals_the_uninterrupted_one(objective, tmp_path):
    full = train(tmp_path / "full", f"objective={objective}", "trainer.max_steps=6")
    first = train(tmp_path / "first", f"objective={objective}", "trainer.max_steps=4")  # mid-epoch (3 an epoch)
    resumed = train(tmp_path / "resumed", f"objective={objective}", "trainer.max_steps=6",
                    f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}")
    want, got = full["ckpt"], resumed["ckpt"]
    assert got["global_step"] == want["global_step"] == 6
    assert got["hyper_parameters"]["objective"]["_target_"].endswith({"edm": "EDM", "flow": "Flow"}[objective])
    assert_same_tensors(want["state_dict"], got["state_dict"], "EMA weights")
    assert_same_tensors(want["current_model_state"], got["current_model_state"], "raw weights")
    assert {**first["losses"], **resumed["losses"]} == full["losses"] and len(full["losses"]) == 6


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_two_processes_train_a_class_conditional_model_as_one(objective, tmp_path):
    assert_two_processes_train_as_one(["debug=fast", "callbacks.samples=null", f"objective={objective}",
                                       "model.num_classes=10", "training.cond_drop_prob=0.5",
                                       "validation.bpd_images=0"], tmp_path)


@pytest.mark.slow
def test_a_sweep_over_objectives_samples_with_posthoc_widths_and_guidance_and_is_reported(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_script("train.py", "-m", "objective=ddpm,edm,flow", "debug=fast", "model.num_classes=10",
                        "logger=none", "trainer.max_steps=4", "callbacks.figures=null", f"hydra.sweep.dir={sweep}",
                        "callbacks.quality.at_train_end=true",
                        "callbacks.quality.extra_samplers=[{name: heun, steps: 3}]",
                        cwd=tmp_path, timeout=900, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    overrides = [(p / ".hydra" / "overrides.yaml").read_text() for p in jobs]  # folder names are cut at 120 chars
    assert [f"objective={o}" in s for s, o in zip(overrides, ("ddpm", "edm", "flow"), strict=True)] == [True] * 3
    for job, unit in zip(jobs, ("t0", "sigma", "t0."), strict=True):  # DDPM's steps t0000-0001, σ, flow's t in [0, 1]
        bins = (job / "loss_by_t.csv").read_text().splitlines()[0].split(",")[1:]  # the header: step, then the bins
        assert 5 <= len(bins) <= 10 and all(b.startswith(unit) for b in bins), bins  # bins drawn into, of 10
        assert read_loss_by_t(job / "loss_by_t.csv")[-1]["step"] == 4
        if unit == "t0":
            continue
        out = tmp_path / f"samples-{unit}-{job.name[0]}"
        sample = run_script("sample.py", f"ckpt='{job / 'checkpoints' / 'last.ckpt'}'", "num_samples=4",
                            "batch_size=4", "labels=[3,7]", "sampler.name=dpmpp_2m", "sampler.steps=4",
                            "sampler.guidance_scale=2", "ema.sigma_rel=0.1", f"hydra.run.dir={out}", cwd=tmp_path)
        assert sample.returncode == 0, sample.stderr[-3000:]
        drawn = np.load(out / "samples.npz")
        assert drawn["samples"].shape == (4, 8, 8, 1) and drawn["labels"].tolist() == [3, 7, 3, 7]
    report = run_script("report.py", str(sweep), "--no-wandb", cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    # one sampler setting on three objectives is one measurement: heun-3 (an extra sampler) is one column, all
    # rows filled; ddim-2's default spacing is the objective's (karras for EDM, linspace for the others): two
    header = (sweep / "report.csv").read_text().splitlines()[0].split(",")
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    statuses = [json.loads((job / "status.json").read_text()) for job in jobs]
    (extra,) = [c for c in header if c.startswith("val/fid@heun-3 [")]
    assert [float(r[extra]) for r in rows] == pytest.approx(
        [s["quality_extra"]["heun-3"]["quality"]["val/fid"] for s in statuses])
    main = [c for c in header if c.startswith("val/fid [")]
    assert [[float(r[c]) for c in main if r[c]] for r in rows] == [[s["quality"]["val/fid"]] for s in statuses]
    assert [[bool(r[c]) for c in main] for r in rows] == [[True, False], [False, True], [True, False]]
    table = (sweep / "report.md").read_text()
    for objective in ("ddpm", "edm", "flow"):
        assert any(line.startswith("| ") and f"| {objective} |" in line and "finished" in line
                   for line in table.splitlines()), table
    assert (sweep / "report_loss_by_t.png").is_file()
