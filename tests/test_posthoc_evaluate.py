"""Post-hoc EMA in the product: the callbacks.posthoc_ema node, snapshots of a real train.py run, and
evaluate.py ema.sigma_rel=... (one width, a -m sweep over widths tabulated by report.py, one-line errors);
sample.py and figures.py take the same ema.sigma_rel."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

import diffusion.run.commands.figures as figures_command
from diffusion.config import validate, validate_entry
from diffusion.core.images import to_uint8
from diffusion.core.posthoc_ema import snapshot_name
from diffusion.core.sampling import SamplerSpec, draw
from diffusion.errors import UserError
from diffusion.lightning.callbacks import PostHocEMA
from diffusion.lightning.checkpoints import load_module, load_posthoc_module
from diffusion.run.commands.evaluate import evaluate
from diffusion.run.commands.figures import figures
from diffusion.run.commands.sample import sample
from diffusion.run.commands.train import train
from helpers import compose_cfg, run_script, train_cfg

WIDTHS = ["0.05", "0.1", "0.15", "0.25"]  # 8 snapshots rebuild about [0.037, 0.171]: 0.25 is out of range
EVAL = ["num_samples=16", "batch_size=8", "sampler.name=ddim", "sampler.steps=2", "bpd.num_images=8",
        "max_reference_images=64", "progress_bar=false", "logger=none"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A debug run of 8 steps through the real train path, a post-hoc EMA snapshot every step."""
    out = tmp_path_factory.mktemp("train")
    train(train_cfg(out, "logger=none", "callbacks.samples=null", "trainer.max_steps=8",
                        "callbacks.posthoc_ema.every_n_steps=1"))
    return out


def test_callback_node_composes_with_its_defaults_and_the_recipes_cadence(tmp_path):
    cfg = compose_cfg("train", [], tmp_path)
    callback = instantiate(cfg.callbacks.posthoc_ema, _convert_="all")
    assert isinstance(callback, PostHocEMA) and callback.sigma_rels == (0.05, 0.10)
    assert callback.every_n_steps is None and callback.num_snapshots == 16
    assert compose_cfg("train", ["experiment=digits"], tmp_path).callbacks.posthoc_ema.num_snapshots == 12
    assert compose_cfg("train", ["experiment=cifar10_ddpm"], tmp_path).callbacks.posthoc_ema.every_n_steps == 10000
    assert compose_cfg("train", ["callbacks.posthoc_ema=null"], tmp_path).callbacks.posthoc_ema is None
    for override, expected in [
            ("callbacks.posthoc_ema.sigma_rels=[0.05,0.5]", "sigma_rels must be distinct widths"),
            ("callbacks.posthoc_ema.num_snapshots=0",
             r"num_snapshots must be in \[1, 10000\], got 0; try callbacks.posthoc_ema.num_snapshots=16"),
            ("callbacks.posthoc_ema.every_n_steps=0", "every_n_steps must be null or an integer >= 1, got 0")]:
        with pytest.raises(UserError, match=expected) as info:
            validate(compose_cfg("train", [override], tmp_path))
        assert "\n" not in str(info.value)


def test_a_real_run_writes_snapshots_and_its_checkpoint_rebuilds_a_tracked_width(trained):
    assert sorted(p.name for p in (trained / "posthoc_ema").iterdir()) == [snapshot_name(s) for s in range(1, 9)]
    module, info = load_posthoc_module(trained / "checkpoints" / "last.ckpt", 0.10)
    assert info["step"] == info["checkpoint_step"] == 8 and info["fit_error"] < 1e-6
    tracked = torch.load(trained / "posthoc_ema" / snapshot_name(8), weights_only=True)["averages"][1]
    for name, value in module.net.named_parameters():
        torch.testing.assert_close(value, tracked[name], rtol=1e-5, atol=1e-7)
    # An earlier checkpoint uses the snapshots up to its own step only
    _, info = load_posthoc_module(trained / "checkpoints" / "step0000004.ckpt", 0.10)
    assert info["step"] == 4 and max(s for s, _, _ in info["snapshots"]) == 4


def test_posthoc_evaluation_errors_are_one_line(trained, tmp_path):
    alone = tmp_path / "elsewhere" / "checkpoints" / "last.ckpt"
    alone.parent.mkdir(parents=True)
    shutil.copy(trained / "checkpoints" / "last.ckpt", alone)
    cases = [
        (lambda: load_posthoc_module(alone, 0.05), "post-hoc EMA snapshot folder .*elsewhere/posthoc_ema does not "
                                                   "exist; give the posthoc_ema folder of a run"),
        (lambda: load_posthoc_module(trained / "checkpoints" / "last.ckpt", 0.01),
         r"sigma_rel=0.01 cannot be reconstructed .* they allow about \[0.037, 0.171\]"),
        (lambda: evaluate(compose_cfg("evaluate", [f"ckpt={alone}", "ema.sigma_rel=0.05", "weights=raw", *EVAL],
                                          tmp_path)), "weights=raw and ema.sigma_rel=0.05 both choose the weights"),
        (lambda: validate_entry("evaluate", compose_cfg("evaluate", [f"ckpt={alone}", "ema.sigma_rel=0.5"], tmp_path)),
         r"ema.sigma_rel must be in \(0, 0.2887\]"),
    ]
    for call, expected in cases:
        with pytest.raises(UserError, match=expected) as info:
            call()
        assert "\n" not in str(info.value)


SAMPLE = ["num_samples=6", "batch_size=4", "seed=3", "sampler.name=ddim", "sampler.steps=3", "device=cpu"]


def drawn_uint8(module, seed: int = 3) -> np.ndarray:
    """What sample.py writes to samples.npz for SAMPLE, drawn here from the module's net and objective: NHWC uint8."""
    images = draw(module.net, module.objective, SamplerSpec("ddim", steps=3), 6, shape=module.net.image_shape,
                  seed=seed, chunk_size=4, device="cpu").images
    return to_uint8(images).permute(0, 2, 3, 1).numpy()


def test_sample_and_figures_take_the_same_posthoc_width_as_evaluate(trained, tmp_path, monkeypatch):
    ckpt = trained / "checkpoints" / "last.ckpt"
    out = tmp_path / "posthoc"
    sample(compose_cfg("sample", [f"ckpt={ckpt}", "ema.sigma_rel=0.1", *SAMPLE], out))
    images = np.load(out / "samples.npz")["samples"]
    assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8
    # the very images of the post-hoc EMA evaluate.py loads for that width, with the same sampler and seed
    assert np.array_equal(images, drawn_uint8(load_posthoc_module(ckpt, 0.1)[0]))
    # ... and not those of another width, nor of the checkpoint's own (classic) EMA
    assert not np.array_equal(images, drawn_uint8(load_posthoc_module(ckpt, 0.05)[0]))
    own = tmp_path / "own"
    sample(compose_cfg("sample", [f"ckpt={ckpt}", *SAMPLE], own))
    assert np.array_equal(np.load(own / "samples.npz")["samples"], drawn_uint8(load_module(ckpt, "cpu", "ema")))
    assert not np.array_equal(np.load(own / "samples.npz")["samples"], images)

    # figures.py draws DDPM's chain of the same post-hoc net
    rendered = []
    real_render_all = figures_command.render_all

    def recording(net, objective, *args, **kwargs):
        rendered.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        return real_render_all(net, objective, *args, **kwargs)

    monkeypatch.setattr(figures_command, "render_all", recording)
    paths = figures(compose_cfg("figures", [f"ckpt={ckpt}", "ema.sigma_rel=0.1", "num_images=2", "num_samples=4",
                                            "num_reconstructions=2", "num_lambdas=2", "rd_images=2", "device=cpu",
                                            "sampler.name=ddim", "sampler.steps=3", f"output_dir={tmp_path / 'f'}"],
                                tmp_path / "h"))
    assert {"forward", "reverse", "samples", "rate_distortion"} <= set(paths) and paths["samples"].is_file()
    expected = load_posthoc_module(ckpt, 0.1)[0].net.state_dict()
    assert len(rendered) == 1 and rendered[0].keys() == expected.keys()
    assert all(torch.equal(rendered[0][k], expected[k]) for k in expected)

    # the same checks of the width as evaluate.py's, and the same one-line refusal of two choices of weights
    for name in ("sample", "figures"):
        validate_entry(name, compose_cfg(name, [f"ckpt={ckpt}", "ema.sigma_rel=0.1"], tmp_path / "v"))
        with pytest.raises(UserError, match=r"ema.sigma_rel must be in \(0, 0.2887\]") as info:
            validate_entry(name, compose_cfg(name, [f"ckpt={ckpt}", "ema.sigma_rel=0.5"], tmp_path / "v"))
        assert "\n" not in str(info.value)
    both = "weights=raw and ema.sigma_rel=0.1 both choose the weights"
    with pytest.raises(UserError, match=both) as info:
        sample(compose_cfg("sample", [f"ckpt={ckpt}", "weights=raw", "ema.sigma_rel=0.1", *SAMPLE], tmp_path / "r"))
    assert "\n" not in str(info.value)
    result = run_script("sample.py", f"ckpt={ckpt}", "weights=raw", "ema.sigma_rel=0.1", *SAMPLE,
                        f"hydra.run.dir={tmp_path / 'cli'}", cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1 and both in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "cli" / "samples.npz").exists()


@pytest.mark.slow
def test_evaluate_sweep_over_sigma_rel_gives_one_row_per_width(trained, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_script("evaluate.py", "-m", f"ckpt={trained / 'checkpoints' / 'last.ckpt'}",
                        f"ema.sigma_rel={','.join(WIDTHS)}", *EVAL, f"hydra.sweep.dir={sweep}", cwd=tmp_path,
                        timeout=600, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert result.returncode == 1, result.stderr[-3000:]  # the width out of range fails; the others ran
    jobs = sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name.split("_")[0]))
    assert [p.name.split("ema.sigma_rel=")[1].split(",")[0] for p in jobs] == WIDTHS
    for job, width in zip(jobs[:3], WIDTHS, strict=False):
        report = json.loads((job / "report.json").read_text())
        assert report["protocol"]["weights"] == f"posthoc-ema σ_rel={width}" and report["posthoc_ema"]["step"] == 8

    done = run_script("report.py", str(sweep), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(sweep / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["ema.sigma_rel"] for r in rows] == WIDTHS
    assert [r["status"] for r in rows] == ["finished"] * 3 + ["failed"]
    fid = [c for c in rows[0] if c.startswith("eval/fid_train [")]
    assert len(fid) == 1 and all(float(r[fid[0]]) > 0 for r in rows[:3])  # one column: measured alike
    assert len({r["protocol_id"] for r in rows[:3]}) == 3  # though the full protocols differ in their weights
    assert "sigma_rel=0.25 cannot be reconstructed" in rows[3]["note"] and "[0.037, 0.171]" in rows[3]["note"]
    assert (sweep / "report_vs_ema.sigma_rel.png").stat().st_size > 5000
