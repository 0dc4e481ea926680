"""A new score is one entry in diffusion.metrics.quality.SCORES, and it reaches everything that shows scores:
SampleQuality's results, the names a training run logs (and optimized_metric may name), the periodic line,
evaluate.py's printed order, the sampler and guidance tables, the sweep report and the model card."""

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from diffusion.config import register_configs
from diffusion.config.validation import logged_metrics
from diffusion.lightning.callbacks.sample_quality import metric_names, shown_names
from diffusion.metrics import quality
from diffusion.metrics.features import ModuleFeatures
from diffusion.metrics.quality import SampleQuality, Score
from diffusion.run.commands.evaluate import _train_first
from diffusion.run.jobs.precheck import CONF_DIR
from diffusion.run.reports import guidance_table, model_card, sampler_table, sweep

# the mean feature norm of the samples, against each reference set: a made-up score a user might add
NORM = Score("norm_gap", "norm gap", lambda q, s, r: (s.features.norm(dim=1).mean() - r.features.norm(dim=1).mean())
             .abs().item(), headline=True, fmt=".2f")


@pytest.fixture
def with_norm(monkeypatch):
    monkeypatch.setattr(quality, "SCORES", (*quality.SCORES, NORM))


def scored(splits=("train", "val")) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    metric = SampleQuality(ModuleFeatures(nn.Flatten(), "pixels"), kid_subsets=2)
    for split in splits:
        metric.set_reference(split, torch.randint(0, 256, (40, 1, 4, 4), generator=gen, dtype=torch.uint8))
    metric.update(torch.randint(0, 200, (30, 1, 4, 4), generator=gen, dtype=torch.uint8))
    return metric.compute()


def test_sample_quality_computes_every_score_against_every_reference_set_in_the_lists_order():
    scores = scored()
    # in the list's order; a score that does not apply is left out (fd_dinov2 when off, is without logits)
    assert list(scores) == [k for k in quality.result_keys(["train", "val"]) if k in scores]
    assert "fd_dinov2_train" not in scores  # FD-DINOv2 is off unless asked for
    assert {"fid_train", "kid_std_val", "precision_val", "recall_train"} <= set(scores)
    assert "is" not in scores  # the flattened pixels do not classify: no logits, no IS


def test_a_new_score_is_computed_logged_and_offered_to_optimized_metric(with_norm, tmp_path):
    scores = scored()
    assert scores["norm_gap_train"] >= 0 and scores["norm_gap_val"] >= 0
    logged = metric_names(scores)
    assert logged["val/norm_gap"] == scores["norm_gap_train"]
    assert logged["val/norm_gap_test"] == scores["norm_gap_val"]
    assert "val/norm_gap" in shown_names() and "val/norm_gap_test" not in shown_names()  # shown: train only
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}"])
    assert {"val/norm_gap", "val/norm_gap_test", "val/fid", "val/is"} <= logged_metrics(cfg)
    assert list(_train_first(scores))[:3] == ["fid_train", "fid_val", "kid_train"]
    assert "norm_gap_train" in list(_train_first(scores))[:8]


def test_a_new_score_reaches_the_sampler_and_guidance_tables(with_norm, tmp_path):
    scores = scored()
    rows = [{"sampler": "heun-5", "nfe": 9, "seconds_per_image": 0.01, **scores}]
    sampler_table.write_table(rows, 30, "pixels", tmp_path / "s")
    table = (tmp_path / "s" / "samplers.md").read_text().splitlines()
    header = [c.strip() for c in table[2].strip("|").split("|")]
    assert "norm gap" in header and "FD (train)" in header and "FD (val)" in header
    row = [c.strip() for c in table[4].strip("|").split("|")]
    assert row[header.index("norm gap")] == f"{scores['norm_gap_train']:.2f}"
    guided = [{"guidance_scale": w, "num_samples": 30, **scores} for w in (0.0, 1.0)]
    guidance_table.write_guidance_table(guided, "heun-5", "pixels", tmp_path / "g")
    assert "norm gap" in (tmp_path / "g" / "guidance.md").read_text()


def test_a_new_headline_score_is_a_column_of_the_sweep_reports_markdown(with_norm):
    protocol = {"num_generated": 30, "reference": {"train": {"num_images": 40}}, "extractor": "pixels",
                "extractor_sha256": "0" * 12, "sampler": {"name": "heun", "steps": 5}, "weights": "ema"}
    status = {"status": "finished", "step": 10, "wall_seconds": 1.0, "weights": "ema",
              "quality": {"val/fid": 1.0, "val/kid": 0.1, "val/norm_gap": 2.0}, "quality_protocol": protocol}
    job = {"name": "0_x", "overrides": {"x": "1"}, "status": status}
    rows, swept, _ = sweep.build_rows([job])
    brief = sweep.columns(rows, swept, brief=True)
    assert any(c.startswith("val/norm_gap [") for c in brief) and any(c.startswith("val/fid [") for c in brief)
    assert not any(c.startswith("val/kid [") for c in brief)  # not a headline: report.csv only
    assert any(c.startswith("val/kid [") for c in sweep.columns(rows, swept, brief=False))


def test_a_new_score_reaches_the_model_card(with_norm, tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    protocol = {"num_generated": 30, "reference": {"train": {"num_images": 40}}, "extractor": "pixels",
                "sampler": {"name": "heun", "steps": 5}, "weights": "ema"}
    report = {"checkpoint": str(ckpt.resolve()), "quality": scored(), "protocol": protocol, "protocol_id": "ab12cd34",
              "nll": None}
    (run / "evaluate").mkdir()
    (run / "evaluate" / "report.json").write_text(json.dumps(report))
    [line] = model_card.quality_lines(ckpt, step=10)
    assert f"norm_gap_train {report['quality']['norm_gap_train']:.4g}" in line
    assert "fid_train" in line and "protocol ab12cd34" in line


def test_cells_are_formatted_by_their_score_and_nan_where_absent():
    assert quality.cell("fid_val", 0.123456) == "0.1235"
    assert quality.cell("precision_train", 0.5) == "0.500"
    assert quality.cell("is", None) == "nan" and quality.cell("is", math.nan) == "nan"
    assert quality.column_title("fid_val") == "FD (val)" and quality.column_title("recall_train") == "recall"
