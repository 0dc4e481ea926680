"""Every config option and experiment composes, passes validation and instantiates; bad input is one line."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion.config import validate
from diffusion.config.build import objective_of
from diffusion.errors import UserError
from diffusion.run.commands.train import build_module
from helpers import ROOT, compose_cfg, save_digits_pipeline

CONF = ROOT / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def build_all(cfg, tmp_path: Path):
    """Instantiate what run.train builds, short of fitting: objective (and its schedule), data, module, callbacks,
    trainer."""
    validate(cfg)
    objective = objective_of(cfg)
    data = instantiate(cfg.data)
    module = build_module(cfg, objective)
    callbacks = [instantiate(c, _convert_="all") for name, c in cfg.callbacks.items()
                 if c is not None and name != "lr_monitor"]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False, default_root_dir=str(tmp_path))
    return objective, data, module, trainer


EXTRA = {
    "schedule": {"explicit": ["schedule.betas=[0.01,0.5,0.999]"], "none": ["objective=edm"]},
    "data": {"image_folder": ["data.root=/nonexistent", "data.image_size=32", "model=small32"],
             "lsun": ["data.category=church_outdoor", "data.image_size=32", "model=small32"]},
    "model": {"small32": ["data=mnist"], "unet256": ["data=image_folder", "data.root=/nonexistent"],
              "image_folder": ["data=image_folder", "data.root=/nonexistent"], "lsun": ["data.category=bedroom"]},
}


@pytest.fixture(scope="module")
def digits_pipeline(tmp_path_factory) -> Path:
    return save_digits_pipeline(tmp_path_factory.mktemp("pipe"))


@pytest.fixture(scope="module")
def rgb32_shards(tmp_path_factory) -> Path:
    """Shards (prepare.py's format) of eight 3×32×32 PNGs: what data=streaming's defaults describe."""
    import numpy as np
    from PIL import Image

    from diffusion.data import ImageFolderDataModule, write_shards

    folder = tmp_path_factory.mktemp("rgb32")
    for i in range(8):
        Image.fromarray(np.full((32, 32, 3), 30 * i, np.uint8)).save(folder / f"{i}.png")
    images = ImageFolderDataModule(root=str(folder), batch_size=1, num_workers=0, download=False, seed=0,
                                   random_flip=False, image_size=32, channels=3, val_fraction=0.25,
                                   max_image_pixels=None)
    write_shards(images, folder / "shards", "1MB", 1)
    return folder / "shards"


def tuning(request, overrides: list[str]) -> list[str]:
    """The overrides, and for a consistency-tuning config a model to tune (init_from: diffusers' digits pipeline; its
    objective is what the config takes from it, its network is compared only when training starts)."""
    if not any("consistency" in o for o in overrides):
        return overrides
    return [*overrides, f"init_from={request.getfixturevalue('digits_pipeline')}"]


@pytest.mark.parametrize("group, option", [(g, o) for g in ("schedule", "objective", "model", "data",
                                                            "trainer", "callbacks", "logger", "paths", "debug")
                                            for o in options(g)])
def test_every_option_composes_and_instantiates(group, option, tmp_path, request):
    overrides = tuning(request, [f"{group}={option}", *EXTRA.get(group, {}).get(option, [])])
    if group == "model" and option in options("data"):  # each data set's own network, with that data
        overrides.append(f"data={option}")
    if "data=streaming" in overrides:  # shards to stream: prepare.py's format, of the default shape
        overrides.append(f"data.input_dir={request.getfixturevalue('rgb32_shards')}")
    cfg = compose_cfg("train", overrides, tmp_path)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        with pytest.raises(UserError, match="accelerator=gpu but no CUDA GPU is visible; use trainer=cpu"):
            validate(cfg)
        return
    objective, data, module, trainer = build_all(cfg, tmp_path)
    assert module.net.image_size == data.image_size and module.net.in_channels == data.channels
    assert module.objective.spec() == objective.spec()
    if cfg.schedule is not None:  # DDPM: its levels are the schedule's T steps
        assert module.objective.num_levels == len(instantiate(cfg.schedule))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_instantiates(experiment, tmp_path, request):
    cfg = compose_cfg("train", tuning(request, [f"experiment={experiment}"]), tmp_path)
    build_all(cfg, tmp_path)


def test_cifar10_recipe_is_the_papers(tmp_path):
    cfg = compose_cfg("train", ["experiment=cifar10_ddpm"], tmp_path)
    _, data, module, _ = build_all(cfg, tmp_path)
    assert sum(p.numel() for p in module.net.parameters()) == 35_746_307
    assert (cfg.schedule.num_timesteps, cfg.schedule.beta_start, cfg.schedule.beta_end) == (1000, 1e-4, 0.02)
    assert cfg.optim.optimizer.lr == 2e-4 and cfg.data.batch_size == 128 and data.random_flip
    assert cfg.optim.lr_scheduler.total_iters == 5000 and cfg.callbacks.ema.decay == 0.9999
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.trainer.max_steps == 800_000
    assert cfg.model.dropout == 0.1 and cfg.objective.variance == "fixed_large"
    assert cfg.paper_card.fid_vs_train == 3.17 and cfg.paper_card.nll_bits_per_dim_upper_bound == 3.75


@pytest.mark.parametrize("experiment, objective, settings, card", [
    ("cifar10_edm", "EDM", {"data.batch_size": 512, "optim.optimizer.lr": 1e-3, "optim.lr_scheduler.total_iters": 19531,
                            "model.dropout": 0.13, "trainer.max_steps": 390_625, "trainer.gradient_clip_val": None,
                            "objective.p_mean": -1.2, "objective.p_std": 1.2, "objective.sigma_data": 0.5},
     {"fid": 1.97, "nfe": 35}),
    ("cifar10_flow", "Flow", {"data.batch_size": 256, "optim.optimizer.lr": 5e-4,
                              "optim.lr_scheduler.total_iters": 45000, "model.dropout": 0.0,
                              "trainer.max_steps": 391_000, "objective.t_distribution": "uniform"},
     {"fid": 6.35, "nll_bits_per_dim": 2.99, "nfe": 142}),
])
def test_cifar10_edm_and_flow_recipes_are_their_papers_on_the_same_network(experiment, objective, settings, card,
                                                                          tmp_path):
    cfg = compose_cfg("train", [f"experiment={experiment}"], tmp_path)
    _, data, module, _ = build_all(cfg, tmp_path)
    assert type(module.objective).__name__ == objective and cfg.schedule is None
    assert sum(p.numel() for p in module.net.parameters()) == 35_746_307  # model=cifar10, as cifar10_ddpm
    assert {k: OmegaConf.select(cfg, k) for k in settings} == settings
    # EDM: EMA half-life 0.5 Mimg at 512 images a step
    assert objective != "EDM" or cfg.callbacks.ema.decay == pytest.approx(0.5 ** (512 / 500_000), abs=1e-5)
    assert {k: cfg.paper_card[k] for k in card} == card and data.random_flip
    assert cfg.callbacks.quality.sampler.name == "heun" and cfg.callbacks.quality.sampler.steps == 35


def test_sample_config_composes(tmp_path):
    cfg = compose_cfg("sample", ["ckpt=x.ckpt", "sampler.name=ddim", "sampler.steps=10"], tmp_path)
    assert cfg.sampler.name == "ddim" and cfg.sampler.steps == 10 and cfg.num_samples == 64


def test_every_entry_point_takes_the_fast_samplers_with_the_same_keys(tmp_path):
    """sampler.name=... sampler.steps=... compose for sample.py, evaluate.py, figures.py and every train.py
    sampler node (extra_samplers too), and reach the callbacks as SamplerSpecs."""
    from diffusion.config import check_samplers
    from diffusion.core.sampling import SamplerSpec

    keys = ["sampler.name=unipc", "sampler.steps=10", "sampler.order=2", "sampler.spacing=karras"]
    for entry in ("sample", "evaluate", "figures"):
        spec = check_samplers(compose_cfg(entry, ["ckpt=x.ckpt", *keys], tmp_path))[0]  # evaluate: + its table
        assert spec == SamplerSpec("unipc", steps=10, spacing="karras", order=2), entry
    cfg = compose_cfg("train", [
        "debug=fast", "callbacks.samples.sampler.name=heun", "callbacks.samples.sampler.steps=9",
        "callbacks.quality.sampler.name=dpmpp_2m_sde", "callbacks.quality.sampler.eta=0.5",
        "callbacks.quality.extra_samplers=[{name: dpmpp_2m, steps: 10}, {name: unipc, steps: 20}]",
        "callbacks.figures.sampler.name=dpmpp_2m", "callbacks.figures.sampler.spacing=trailing"], tmp_path)
    objective, _, _, trainer = build_all(cfg, tmp_path)
    callbacks = {type(c).__name__: c for c in trainer.callbacks}
    assert callbacks["SampleGrid"].sampler == SamplerSpec("heun", steps=9)
    quality = callbacks["SampleQualityCallback"]
    assert quality.sampler == SamplerSpec("dpmpp_2m_sde", steps=2, eta=0.5)  # debug=fast sets steps=2
    assert quality.extra_samplers == [SamplerSpec("dpmpp_2m", steps=10), SamplerSpec("unipc", steps=20)]
    assert quality._tags(objective) == ["dpmpp_2m-10", "unipc-20"]
    assert callbacks["PaperFigures"].spec.sampler == SamplerSpec("dpmpp_2m", spacing="trailing")
