"""diffusers folders as checkpoints: sample.py, evaluate.py and train.py init_from=, through the real entry points.

The folders are written by diffusers' own save_pretrained (a dev dependency); nothing is downloaded.
"""

import json
import math
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

import diffusion.run.commands.train as train_module
from diffusion.core.images import to_uint8
from diffusion.errors import UserError
from diffusion.lightning.checkpoints import init_weights, load_module, read_weights
from diffusion.run.commands.figures import figures
from diffusion.run.commands.train import train
from helpers import compose_cfg, ddpm, model_kwargs, paper_betas, run_script, save_digits_pipeline, train_cfg

# google/ddpm-cifar10-32's two config files as published (the paper's CIFAR-10 model converted to diffusers).
RELEASED_UNET = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"], "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}  # fmt: skip
RELEASED_SCHEDULER = {
    "_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
    "variance_type": "fixed_small",
}  # fmt: skip


@pytest.fixture(autouse=True)
def quiet_diffusers():
    diffusers.utils.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_digits_pipeline(tmp_path_factory.mktemp("pipe") / "digits-ddpm")


def pipeline(folder: Path) -> diffusers.DDPMPipeline:
    pipe = diffusers.DDPMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def one_line(call) -> str:
    with pytest.raises(UserError) as err:
        call()
    assert "\n" not in str(err.value), err.value
    return str(err.value)


# --- load_module: the one place a module is loaded ------------------------------------------------------------
def test_load_module_builds_the_folder_network_and_schedule(folder):
    module = load_module(folder)
    theirs = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 7, 19])
    with torch.no_grad():
        torch.testing.assert_close(module.net(x, t), theirs(x, t).sample, atol=1e-5, rtol=0)
    assert not module.training and module.net.image_shape == (1, 8, 8)
    diffusion = module.objective.diffusion
    assert torch.equal(diffusion.betas_float64, paper_betas(20))
    assert (diffusion.parameterization, diffusion.variance) == ("eps", "fixed_large")


def test_folders_that_cannot_be_loaded_are_one_line(folder, tmp_path):
    assert "holds one set of weights; use weights=ema" in one_line(lambda: load_module(folder, weights="raw"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    message = one_line(lambda: load_module(tmp_path / "run"))
    assert "is a directory but not a diffusers folder" in message and "last.ckpt" in message
    assert "ckpt /nowhere does not exist" in one_line(lambda: load_module("/nowhere"))
    edited = save_digits_pipeline(tmp_path / "thresholding", thresholding=True)
    assert "thresholding=True is not supported" in one_line(lambda: load_module(edited))


@pytest.mark.slow
def test_the_released_cifar10_model_fine_tunes_under_the_papers_recipe(tmp_path):
    """The README's commands: google/ddpm-cifar10-32's configs (random weights of that shape) are our CIFAR-10
    U-Net, betas and ε-prediction; its variance is β̃, so experiment=cifar10_ddpm (σ² = β) must say so."""
    config = {k: v for k, v in RELEASED_UNET.items() if not k.startswith("_")}
    diffusers.UNet2DModel(**config).save_pretrained(tmp_path / "unet")
    (tmp_path / "unet" / "config.json").write_text(json.dumps(RELEASED_UNET))
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(RELEASED_SCHEDULER))

    def expected(variance: str) -> dict:
        return {"net": model_kwargs("experiment=cifar10_ddpm"), "objective": ddpm(variance=variance).spec()}

    state = init_weights(tmp_path, expected("fixed_small"))  # experiment=cifar10_ddpm objective.variance=fixed_small
    assert sum(v.numel() for v in state.values()) == 35_746_307
    message = one_line(lambda: init_weights(tmp_path, expected("fixed_large")))  # the recipe as it is
    assert message == (f"init_from {tmp_path} was trained with objective.variance=fixed_small, this run has "
                       "objective.variance=fixed_large; use objective.variance=fixed_small or start without init_from")


# --- sample.py and evaluate.py ckpt=<diffusers folder> ----------------------------------------------------------
@pytest.mark.slow
def test_sample_script_draws_what_diffusers_draws_from_the_same_noise(folder, tmp_path):
    """Ancestral sampling over all T steps, x_T and every step's z of the 4 images from one generator seeded `seed`
    (one noise block of 4): the same draws as DDPMPipeline's, so the same images (to the uint8 level)."""
    result = run_script("sample.py", f"ckpt={folder}", "num_samples=4", "batch_size=4", "seed=3", "noise_block=4",
                        "sampler.name=ddpm", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ours = torch.from_numpy(np.load(tmp_path / "samples.npz")["samples"]).permute(0, 3, 1, 2)  # (N, C, H, W) uint8
    theirs = pipeline(folder)(batch_size=4, generator=torch.Generator().manual_seed(3), num_inference_steps=20,
                              output_type="pt").images  # (N, C, H, W) in [0, 1]  # fmt: skip
    theirs = to_uint8(theirs * 2 - 1)
    assert 0.2 < (ours.float() / 255).std() and len(ours.unique()) > 50  # images, not a constant
    difference = (ours.int() - theirs.int()).abs()
    assert difference.max() <= 1 and (difference == 0).float().mean() > 0.99  # a float32 rounding may flip a level


@pytest.mark.slow
def test_evaluate_script_scores_a_diffusers_folder(folder, tmp_path):
    result = run_script("evaluate.py", f"ckpt={folder}", "num_samples=16", "batch_size=8", "sampler.name=ddim",
                        "sampler.steps=2", "bpd.num_images=8", "max_reference_images=64", "logger=none",
                        "progress_bar=false", f"hydra.run.dir={tmp_path}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["checkpoint"] == str(folder.resolve()) and report["data"] == "digits"
    protocol = report["protocol"]
    assert (protocol["num_timesteps"], protocol["variance"], protocol["num_generated"]) == (20, "fixed_large", 16)
    assert all(math.isfinite(v) for v in report["quality"].values())
    assert report["nll"]["prior_bpd"] < report["nll"]["bpd"] and math.isfinite(report["nll"]["bpd"])
    assert f"protocol {report['protocol_id']}" in result.stdout


def test_figures_of_a_diffusers_folder(folder, tmp_path):
    cfg = compose_cfg("figures", [f"ckpt={folder}", "num_images=2", "num_samples=4", "num_reconstructions=2",
                                  "num_lambdas=3", "rd_images=4", f"output_dir={tmp_path}", "sampler.name=ddim",
                                  "sampler.steps=3"], tmp_path / "h")  # fmt: skip
    paths = figures(cfg)
    assert {"forward", "reverse", "samples", "rate_distortion"} <= set(paths)
    assert all(Path(p).is_file() for p in paths.values())
    rate_distortion = json.loads(paths["rate_distortion_json"].read_text())
    assert rate_distortion["steps"] == list(range(20)) and math.isfinite(rate_distortion["total_bpd"])  # the folder's T


# --- train.py init_from= --------------------------------------------------------------------------------------
FINE_TUNE = ["debug=fast", "logger=none", "callbacks.samples=null", "trainer.max_steps=2", "optim.optimizer.lr=1e-9"]


@pytest.fixture(scope="module")
def fine_tuned(folder, tmp_path_factory) -> tuple[Path, str]:
    """train.py from the folder's weights: 2 steps at lr 1e-9 (Adam moves each weight by about lr per step)."""
    out = tmp_path_factory.mktemp("fine-tune")
    result = run_script("train.py", *FINE_TUNE, f"init_from={folder}", f"hydra.run.dir={out}", cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "checkpoints" / "last.ckpt", result.stdout


def assert_net_weights(ckpt: dict, expected: dict[str, torch.Tensor]) -> None:
    for key in ("state_dict", "current_model_state"):  # the EMA and the raw weights
        state = {k.removeprefix("net."): v for k, v in ckpt[key].items()}
        assert state.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(state[name], value, atol=1e-7, rtol=0, msg=f"{key} {name}")


@pytest.mark.slow
def test_train_init_from_a_diffusers_folder_starts_from_its_weights(folder, fine_tuned):
    last, stdout = fine_tuned
    assert f"init_from: the U-Net starts from the weights of {folder}" in stdout
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2  # a new run: the step count starts at 0
    assert [s["step"] for s in ckpt["optimizer_states"][0]["state"].values()][0] == 2  # a fresh Adam, 2 steps old
    assert_net_weights(ckpt, read_weights(folder)[1])


@pytest.mark.slow
def test_train_init_from_a_checkpoint_takes_its_ema_weights_only(fine_tuned, tmp_path):
    """The checkpoint's EMA weights (its state_dict), not its raw ones, step count or optimizer."""
    source = torch.load(fine_tuned[0], map_location="cpu", weights_only=True)
    source["current_model_state"] = {k: v + 0.1 for k, v in source["current_model_state"].items()}  # raw != EMA
    source["global_step"] = 1000
    torch.save(source, tmp_path / "source.ckpt")
    train(train_cfg(tmp_path / "run", *FINE_TUNE[1:], f"init_from={tmp_path / 'source.ckpt'}"))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert_net_weights(ckpt, {k.removeprefix("net."): v for k, v in source["state_dict"].items()})


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("schedule.num_timesteps=30", "trained with T=20 timesteps, this run has T=30; use schedule.num_timesteps=20"),
        ("schedule=cosine", "was trained with other betas (T=20 in both, betas[0]=0.0001 there"),
        ("model.ch=16", "was trained with net.ch=32, this run has net.ch=16; use the same model config (model.ch=32)"),
        ("objective.parameterization=v", "objective.parameterization=eps, this run has objective.parameterization=v"),
        ("objective.variance=learned_range", "this run has objective.variance=learned_range; use objective.variance="),
    ],
)  # fmt: skip
def test_init_from_another_network_or_schedule_is_refused(folder, tmp_path, override, fragment):
    """Checked against the run's config before the data, the module or the Trainer is built."""
    cfg = train_cfg(tmp_path, "logger=none", f"init_from={folder}", override)
    built, instantiate = [], train_module.instantiate
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "instantiate", lambda node, *a, **kw: (built.append(node._target_),
                                                                             instantiate(node, *a, **kw))[1])
        mp.setattr(train_module, "build_module", lambda *a: pytest.fail("the module was built"))
        message = one_line(lambda: train(cfg))
    assert message.startswith(f"init_from {folder} ") and fragment in message and "start without init_from" in message
    assert built == []  # the objective and its betas only (config/build.py): no data, module, logger or Trainer


def test_init_weights_of_a_matching_folder_are_its_weights(folder):
    expected = {"net": read_weights(folder)[0]["net"], "objective": ddpm(paper_betas(20)).spec()}
    state = init_weights(folder, expected)
    assert all(torch.equal(state[k], v) for k, v in read_weights(folder)[1].items())
