"""Compose the real configs through Hydra's compose API, as train.py would, writing under tmp_path."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from diffusion.config import register_configs
from diffusion.config.build import net_kwargs
from diffusion.run.jobs.precheck import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]


def compose_cfg(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """The composed config with Hydra's runtime set and every output under output_dir."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def train_cfg(tmp_path: Path, *overrides: str) -> DictConfig:
    return compose_cfg("train", ["debug=fast", *overrides], tmp_path)


def run_script(*args: str, cwd: Path, timeout: int = 300, env: dict | None = None,
               preexec_fn=None) -> subprocess.CompletedProcess:
    """Run an entry point (train.py, sample.py) of the repository as a user would (env: extra variables;
    preexec_fn: run in the child before the script, e.g. to set a resource limit)."""
    return subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)


def assert_two_processes_train_as_one(run: list[str], tmp_path: Path) -> None:
    """train.py with these overrides, 3 steps: one process with batch 32 and 2 DDP processes (CPU) with 16 each log
    the same losses and end with the same weights."""
    single = run_script("train.py", *run, "trainer.max_steps=3", "trainer=cpu", "data.batch_size=32",
                        f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_script("train.py", *run, "trainer.max_steps=3", "trainer=ddp_cpu", "data.batch_size=16",
                     f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    def losses(where):
        return {int(r["trainer/global_step"]): r["train/loss"] for r in wandb_history(where) if "train/loss" in r}

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [0, 1, 2]
    torch.testing.assert_close(torch.tensor([two[s] for s in sorted(two)]), torch.tensor([one[s] for s in sorted(one)]),
                               rtol=1e-5, atol=1e-6)
    state_one = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=True)["current_model_state"]
    state_two = torch.load(tmp_path / "two" / "checkpoints" / "last.ckpt", weights_only=True)["current_model_state"]
    for key, value in state_one.items():
        torch.testing.assert_close(state_two[key], value, rtol=1e-4, atol=1e-5, msg=key)


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of an offline W&B run, read back with wandb's own reader (`wandb leet inspect --json`)."""
    wandb_dir = next(run_dir.glob("wandb/offline-run-*"))
    exe = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(exe), "leet", "inspect", "--json", str(wandb_dir)], capture_output=True, text=True,
                         timeout=120, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def wandb_history(run_dir: Path) -> list[dict]:
    return [r["history"]["item"] for r in wandb_records(run_dir) if r.get("type") == "history"]


# Ho et al. 2020's linear schedule and DDPM settings, and EDM's and flow matching's defaults: the product writes them
# once, in the config schemas; tests that build the math directly spell them out here.
PAPER_BETAS = dict(beta_start=1e-4, beta_end=0.02)
DDPM_SETTINGS = dict(parameterization="eps", variance="fixed_large", loss="simple", vlb_weight=0.001,
                     min_snr_gamma=None, timesteps="uniform")
EDM_SETTINGS = dict(sigma_data=0.5, p_mean=-1.2, p_std=1.2, sigma_min=0.002, sigma_max=80.0)
FLOW_SETTINGS = dict(t_distribution="logit_normal", logit_mean=0.0, logit_std=1.0, shift=1.0, t_min=0.001,
                     sigma_max=80.0)
UNET_SETTINGS = dict(num_groups=32, resamp_with_conv=True, channels_last=False, num_classes=None)


def paper_betas(num_timesteps: int = 1000):
    """Ho et al. 2020's betas, linear from 1e-4 to 0.02 (float64)."""
    from diffusion.core.schedules import linear_beta_schedule

    return linear_beta_schedule(num_timesteps, **PAPER_BETAS)


def ddpm(betas=None, **settings):
    """A DDPM objective: the paper's settings unless overridden (betas: the paper's over T=1000)."""
    from diffusion.core.objectives.ddpm import DDPM

    return DDPM(paper_betas() if betas is None else betas, **{**DDPM_SETTINGS, **settings})


def edm(**settings):
    from diffusion.core.objectives.edm import EDM

    return EDM(**{**EDM_SETTINGS, **settings})


def flow(**settings):
    from diffusion.core.objectives.flow import Flow

    return Flow(**{**FLOW_SETTINGS, **settings})


def build(schema: type, **overrides):
    """The target of a config schema (its `_target_`), built as train.py builds it: from the schema's defaults (written
    there once) merged with `overrides`, containers passed as plain lists and dicts (`_convert_="all"`)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    return instantiate(OmegaConf.structured(schema), _convert_="all", **overrides)


def unet(**kwargs):
    """A U-Net with these arguments and UNET_SETTINGS' defaults for the rest of its (all required) arguments."""
    from diffusion.nn import UNet

    return UNet(**{**UNET_SETTINGS, **kwargs})


TRAINING_SETTINGS = dict(val_timestep_fractions=(0.0, 0.25, 0.5, 0.75, 1.0), val_bpd_images=16, loss_bins=10,
                         on_nonfinite="stop", nonfinite_check_every_n_steps=100, compile=False)


def diffusion_module(net: dict, objective=None, **settings):
    """A DiffusionModule of this net (UNET_SETTINGS fill in) and objective (default: DDPM over the paper's betas with
    T=20), with the schema's training settings unless overridden."""
    from diffusion.lightning.module import DiffusionModule

    objective = ddpm(paper_betas(20)) if objective is None else objective
    spec = objective if isinstance(objective, dict) else objective.spec()
    return DiffusionModule(net={**UNET_SETTINGS, **net}, objective=spec, **{**TRAINING_SETTINGS, **settings})


def model_kwargs(*overrides: str) -> dict:
    """The U-Net keyword arguments train.py builds for these overrides (conf/model/*.yaml, shapes from the data)."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    return net_kwargs(cfg)


# diffusers' UNet2DModel spelling of `train.py debug=fast`'s network (conf/model/digits.yaml with ch=32,
# dropout 0) and DDPMScheduler spelling of its schedule (T=20, linear 1e-4..0.02) and fixed_large variance.
DIGITS_UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, norm_eps=1e-6,
                   attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)  # fmt: skip
DIGITS_SCHEDULER = dict(num_train_timesteps=20, beta_start=1e-4, beta_end=0.02, variance_type="fixed_large")


def save_digits_pipeline(folder: Path, seed: int = 0, **scheduler_overrides) -> Path:
    """A DDPMPipeline folder written by diffusers' own save_pretrained, of the digits debug network (random)."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**DIGITS_UNET)
    scheduler = diffusers.DDPMScheduler(**{**DIGITS_SCHEDULER, **scheduler_overrides})
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


class SignalAt(L.Callback):
    """Sends `signum` to this process once, from `hook`, when the trainer's global step is `step`."""

    def __init__(self, signum: signal.Signals, hook: str, step: int):
        self.signum, self.hook, self.step, self.sent = signum, hook, step, False

    def _send(self, trainer, hook: str) -> None:
        if hook == self.hook and trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, *args):
        self._send(trainer, "on_train_batch_start")

    def on_validation_end(self, trainer, *args):
        self._send(trainer, "on_validation_end")

    def on_save_checkpoint(self, trainer, *args):
        self._send(trainer, "on_save_checkpoint")

    def on_validation_batch_end(self, trainer, *args):
        self._send(trainer, "on_validation_batch_end")
