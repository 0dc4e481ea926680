"""export.py: a trained checkpoint as a diffusers folder that DDPMPipeline loads and samples as we do, with a card."""

import json
import shutil
from pathlib import Path

import diffusers
import pytest
import torch

from diffusion.core.sampling import SamplerSpec, draw
from diffusion.errors import UserError
from diffusion.formats.diffusers import read_diffusers_folder
from diffusion.lightning.checkpoints import load_module
from diffusion.run.commands.evaluate import evaluate
from diffusion.run.commands.export import export as export_command
from helpers import compose_cfg, run_script, wandb_records

TRAIN = ["debug=fast", "callbacks.samples=null", "callbacks.quality.at_train_end=true"]


@pytest.fixture(autouse=True)
def quiet_diffusers():
    diffusers.utils.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny real run through train.py (digits, T=20, 4 steps, W&B offline, quality scored at the end)."""
    out = tmp_path_factory.mktemp("run")
    result = run_script("train.py", *TRAIN, f"hydra.run.dir={out}", cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def export(ckpt: Path, out: Path, *overrides: str) -> Path:
    export_command(compose_cfg("export", [f"ckpt={ckpt}", f"out={out}", *overrides], out.parent / f"{out.name}-hydra"))
    return out


def diffusers_images(pipe, seed: int, **kwargs) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=4, generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images
    return images * 2 - 1  # [0, 1] -> the model range


def our_images(module, spec: SamplerSpec, seed: int) -> torch.Tensor:
    return draw(module.net, module.objective, spec, 4, shape=module.net.image_shape, seed=seed, chunk_size=4,
                noise_block=4).images  # one block: one generator for the 4, as diffusers draws a batch


@pytest.mark.slow
def test_export_script_writes_a_folder_diffusers_samples_as_we_do(trained, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    result = run_script("export.py", f"ckpt={ckpt}", f"out={tmp_path / 'model'}", f"hydra.run.dir={tmp_path / 'h'}",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith(f"exported: {tmp_path / 'model'} (DDPMPipeline")
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "model")
    scheduler = pipe.scheduler.config
    hparams = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert (scheduler.prediction_type, scheduler.variance_type, scheduler.clip_sample) == ("epsilon", "fixed_large",
                                                                                           True)
    saved = json.loads((tmp_path / "model/scheduler/scheduler_config.json").read_text())["trained_betas"]
    assert saved == hparams["objective"]["betas"]  # our float64 betas, every digit
    module = load_module(ckpt)
    # Ancestral sampling (Algorithm 2): x_T and each step's noise from one generator, in the same order.
    ours = our_images(module, SamplerSpec("ddpm"), seed=1)
    torch.testing.assert_close(diffusers_images(pipe, 1, num_inference_steps=20), ours, atol=1e-5, rtol=0)
    # Deterministic DDIM (η = 0) over 5 of the 20 steps, diffusers' "leading" timesteps, from the same x_T.
    ddim = diffusers.DDIMPipeline(unet=pipe.unet, scheduler=diffusers.DDIMScheduler.from_config(scheduler))
    theirs = diffusers_images(ddim, 2, num_inference_steps=5, eta=0.0, use_clipped_model_output=True)
    ours = our_images(module, SamplerSpec("ddim", steps=5, eta=0.0, spacing="leading"), seed=2)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert ours.std() > 0.1  # images, not a constant


@pytest.mark.slow
def test_model_card_holds_config_steps_and_the_runs_scores_with_protocol_ids(trained, tmp_path):
    card = (export(trained / "checkpoints" / "last.ckpt", tmp_path / "model") / "README.md").read_text()
    summary = {}
    for record in wandb_records(trained):  # read independently, with wandb's own reader
        if record.get("type") == "summary":
            summary.update(record["summary"].get("update", {}))
    assert card.startswith("---\nlibrary_name: diffusers\n")
    assert "step 4, ema weights" in card and "num_inference_steps=20" in card
    assert f"[protocol {summary['quality_protocol_id']}: 16 samples ddim-2 η=0 ema vs train 64/val 64" in card
    fid = summary["val/fid"]["min"]  # the summary keeps the run's best FID (wandb_logger.SUMMARY_METRICS); one here
    assert f"val/fid {fid:.4g} · val/fid_test {summary['val/fid_test']:.4g}" in card
    assert "python train.py " + " ".join(TRAIN) + f" hydra.run.dir={trained}" not in card  # hydra.* is not a choice
    assert "python train.py " + " ".join(TRAIN) in card  # the command line Hydra saved
    assert "(.hydra/config.yaml)" in card and "num_timesteps: 20" in card
    assert "T=20, betas 0.0001 … 0.02" in card and "1,112,801 parameters" in card


@pytest.mark.slow
def test_model_card_lists_evaluate_reports_of_this_checkpoint_and_says_not_measured_otherwise(trained, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    evaluate_args = ["num_samples=16", "batch_size=8", "sampler.name=ddim", "sampler.steps=2", "bpd.num_images=8",
                     "max_reference_images=64", "logger=none", "progress_bar=false"]
    report_dir = tmp_path / "run" / "evaluate"
    shutil.copytree(trained, tmp_path / "run")
    copied = tmp_path / "run" / "checkpoints" / "last.ckpt"
    report = evaluate(compose_cfg("evaluate", [f"ckpt={copied}", *evaluate_args], report_dir))
    card = (export(copied, tmp_path / "model") / "README.md").read_text()
    line = next(line for line in card.splitlines() if line.startswith("- evaluate.py"))
    assert f"`evaluate/report.json`: fid_train {report['quality']['fid_train']:.4g}" in line
    assert f"[protocol {report['protocol_id']}: 16 samples ddim-2 η=0 ema vs train 64/val 64" in line
    assert f"NLL {report['nll']['bpd']:.4g} bits/dim on val" in line
    # Another checkpoint of the same run: scores were measured at step 4 only, the report is of last.ckpt.
    card = (export(copied.with_name("step0000002.ckpt"), tmp_path / "step2") / "README.md").read_text()
    assert "- not measured: no quality scores of this checkpoint" in card and "at steps [4]" in card
    # A checkpoint alone, away from its run.
    (tmp_path / "alone").mkdir()
    shutil.copy(ckpt, tmp_path / "alone" / "model.ckpt")
    card = (export(tmp_path / "alone" / "model.ckpt", tmp_path / "alone-model") / "README.md").read_text()
    assert "- not measured" in card and "the checkpoint's hyperparameters" in card


@pytest.mark.slow
def test_round_trip_through_export_is_bit_identical_for_ema_and_raw_weights(trained, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert any(not torch.equal(saved["state_dict"][k], v) for k, v in saved["current_model_state"].items())
    for weights, key in [("ema", "state_dict"), ("raw", "current_model_state")]:
        folder = export(ckpt, tmp_path / weights, f"weights={weights}")
        kwargs, state, spec, _ = read_diffusers_folder(folder)
        assert spec["betas"] == saved["hyper_parameters"]["objective"]["betas"]
        assert (spec["parameterization"], spec["variance"]) == ("eps", "fixed_large")
        assert state.keys() == {k.removeprefix("net.") for k in saved[key]}
        assert all(torch.equal(state[k.removeprefix("net.")], v) for k, v in saved[key].items()), weights
    # A diffusers folder exports again to the same weights (its card says where it came from).
    again = export(tmp_path / "ema", tmp_path / "again")
    assert all(torch.equal(read_diffusers_folder(again)[1][k], v) for k, v in read_diffusers_folder(
        tmp_path / "ema")[1].items())  # fmt: skip
    assert "| source | diffusers folder" in (again / "README.md").read_text()


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"objective": {"parameterization": "mean"}}, "parameterization 'mean' cannot be exported"),
        ({"net": {"ch_mult": [2, 2, 2]}}, "ch_mult=[2, 2, 2] cannot be exported"),
        ({"net": {"resamp_with_conv": False}}, "resamp_with_conv=False cannot be exported"),
    ],
)
def test_what_diffusers_cannot_hold_is_refused_in_one_line(trained, tmp_path, change, fragment):
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for key, value in change.items():
        ckpt["hyper_parameters"][key] = {**ckpt["hyper_parameters"][key], **value}
    torch.save(ckpt, tmp_path / "edited.ckpt")
    with pytest.raises(UserError) as err:
        export(tmp_path / "edited.ckpt", tmp_path / "model")
    assert "\n" not in str(err.value) and fragment in str(err.value)
    assert not (tmp_path / "model").exists()


def test_bad_export_settings_are_one_line(trained, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    for overrides, fragment in [([f"ckpt={ckpt}", f"out={tmp_path / 'full'}"], "already exists and is not an empty"),
                                ([f"ckpt={ckpt}", f"out={tmp_path / 'm'}", "weights=best"], "weights must be 'ema'"),
                                ([f"ckpt={trained}", f"out={tmp_path / 'm'}"], "is a directory but not a diffusers"),
                                ([f"ckpt={tmp_path / 'no.ckpt'}", f"out={tmp_path / 'm'}"], "does not exist")]:
        with pytest.raises(UserError) as err:
            export_command(compose_cfg("export", overrides, tmp_path / "h"))
        assert "\n" not in str(err.value) and fragment in str(err.value), err.value
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and not (tmp_path / "m").exists()


@pytest.mark.slow
def test_export_script_refuses_a_non_empty_folder_in_one_line(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    result = run_script("export.py", "ckpt=/nonexistent/last.ckpt", f"out={tmp_path / 'full'}",
                        f"hydra.run.dir={tmp_path / 'h'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: out={tmp_path / 'full'} already exists and is not an empty folder; choose a new folder, " \
        f"e.g. out={tmp_path / 'full'}-2, or remove it"
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
@pytest.mark.parametrize(("objective", "pipeline", "scheduler"), [
    ("edm", "ConsistencyModelPipeline", "EDMEulerScheduler"),
    ("flow", "DDPMPipeline", "FlowMatchEulerDiscreteScheduler")])
def test_edm_and_flow_runs_export_to_the_pipeline_that_samples_them(tmp_path, objective, pipeline, scheduler):
    """A real run of each objective through train.py and export.py: the folder's pipeline loads and samples, and its
    card says what the model is (the samples themselves are checked against diffusers in test_diffusers_format)."""
    run, model = tmp_path / "run", tmp_path / "model"
    result = run_script("train.py", *TRAIN, f"objective={objective}", "trainer.max_steps=2", "logger=none",
                        f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_script("export.py", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"out={model}",
                        f"hydra.run.dir={tmp_path / 'h'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith(f"exported: {model} ({pipeline}.from_pretrained")
    pipe = getattr(diffusers, pipeline).from_pretrained(model)
    assert type(pipe.scheduler).__name__ == scheduler
    images = diffusers_images(pipe, 0, num_inference_steps=4)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    card = (model / "README.md").read_text()
    assert f"from diffusers import {pipeline}" in card and f"tags: [{objective}," in card and scheduler in card
