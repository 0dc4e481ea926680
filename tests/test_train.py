"""The training path end to end: Hydra compose API -> run.train -> a real Trainer, files checked afterwards."""

import subprocess
import sys

import pytest
import torch
from PIL import Image

from diffusion import run
from diffusion.gaussian import GaussianDiffusion
from diffusion.schedules import linear_beta_schedule
from helpers import ROOT, train_cfg, wandb_history


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny real run (digits, T=20, 4 steps) shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run")
    metrics = run.train(train_cfg(out, "callbacks.ema.decay=0.5", "callbacks.ema.warmup=false"))
    return out, metrics


def test_run_writes_checkpoints_samples_and_schedule(trained):
    out, metrics = trained
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt"]
    assert {p.name for p in (out / "samples").iterdir()} == {"step0000002.png", "step0000004.png", "final_ema.png"}
    final = Image.open(out / "samples" / "final_ema.png")
    assert final.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # 4 samples of 8×8 shown at 32×32, 2×2 grid
    raw_vs_ema = Image.open(out / "samples" / "step0000004.png")
    assert raw_vs_ema.size[0] > 2 * raw_vs_ema.size[1] - 10  # two grids side by side: raw | EMA
    assert (out / "schedule.png").is_file()
    for key in ("train/loss", "val/loss", "val/bpd", "val/loss_t0000", "val/loss_t0019"):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key


def test_wandb_offline_run_holds_losses_images_and_config(trained):
    out, _ = trained
    history = wandb_history(out)
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    assert len(losses) == 4 and all(loss > 0 for loss in losses)
    assert any("val/bpd" in h for h in history)
    assert any(h.get("samples/grid._type") == "images/separated" for h in history)
    assert any("samples/final_ema.filenames" in h for h in history)
    assert any("schedule/prior_bpd_L_T" in h for h in history)
    assert any(k.startswith("train_loss_by_t/t") for h in history for k in h)
    images = list(out.glob("wandb/offline-run-*/files/media/images/samples/*.png"))
    assert len(images) == 3


def test_checkpoint_loads_in_a_fresh_process_without_config(trained):
    out, _ = trained
    code = (
        "import torch, sys\n"
        "from diffusion.module import DiffusionModule\n"
        f"m = DiffusionModule.load_from_checkpoint(r'{out / 'checkpoints' / 'last.ckpt'}')\n"
        "x = torch.zeros(2, 1, 8, 8); t = torch.tensor([0, 19])\n"
        "print(m.num_timesteps, tuple(m(x, t).shape))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "20 (2, 1, 8, 8)"
    hparams = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert type(hparams) is dict and type(hparams["net"]) is dict


def test_checkpoint_holds_ema_and_raw_weights_and_never_averages_the_schedule(trained):
    out, _ = trained
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    ema, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert set(ema) == set(raw) and not any("diffusion" in k for k in ema)  # buffers are not saved at all
    differs = [k for k in ema if not torch.equal(ema[k], raw[k])]
    assert differs, "EMA weights equal the raw ones: the average was not kept"
    module = run.load_module(str(out / "checkpoints" / "last.ckpt"))
    fresh = GaussianDiffusion(linear_beta_schedule(20))
    for name, buffer in fresh.named_buffers():
        assert torch.equal(getattr(module.diffusion, name), buffer), name
    assert torch.equal(module.net.state_dict()[differs[0].removeprefix("net.")], ema[differs[0]])
    raw_module = run.load_module(str(out / "checkpoints" / "last.ckpt"), weights="raw")
    assert torch.equal(raw_module.net.state_dict()[differs[0].removeprefix("net.")], raw[differs[0]])


def test_ema_averages_parameters_only_during_training(tmp_path):
    """During fit the EMA copy's schedule buffers stay bit-identical: nothing averages betas."""
    import lightning as L

    from diffusion.callbacks import EMA
    from diffusion.data import DigitsDataModule

    seen = {}

    class Probe(L.Callback):
        def on_train_end(self, trainer, pl_module):
            ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
            seen["ema"] = {k: v.clone() for k, v in ema.averaged_module().diffusion.named_buffers()}
            seen["module"] = {k: v.clone() for k, v in pl_module.diffusion.named_buffers()}
            seen["params_differ"] = any(
                not torch.equal(a, b) for a, b in zip(ema.averaged_module().net.parameters(),
                                                      pl_module.net.parameters(), strict=True))

    cfg = train_cfg(tmp_path)
    module = run.build_module(cfg, 1, 8, linear_beta_schedule(20))
    # the probe runs before EMA.on_train_end, which copies the average into the module
    trainer = L.Trainer(max_steps=3, callbacks=[Probe(), EMA(decay=0.9, warmup=False)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16))
    fresh = dict(GaussianDiffusion(linear_beta_schedule(20)).named_buffers())
    for name, buffer in fresh.items():
        assert torch.equal(seen["ema"][name], buffer), name
        assert torch.equal(seen["module"][name], buffer), name
    assert seen["params_differ"]


def test_resume_continues_step_count_optimizer_and_ema(tmp_path, trained):
    out, _ = trained
    ckpt = out / "checkpoints" / "last.ckpt"
    before = torch.load(ckpt, weights_only=True)
    resumed_dir = tmp_path / "resumed"
    run.train(train_cfg(resumed_dir, f"ckpt_path={ckpt}", "trainer.max_steps=6", "callbacks.samples=null",
                        "callbacks.ema.decay=0.5", "callbacks.ema.warmup=false", "logger=none"))
    after = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert before["global_step"] == 4 and after["global_step"] == 6
    assert after["callbacks"]  # EMA callback state present
    # 2 more EMA updates with decay 0.5 from the restored average: ema6 = 0.25·ema4 + 0.25·raw5 + 0.5·raw6,
    # so it must lie far closer to the restored EMA than a fresh EMA (= raw6 copy at first update) would.
    key = next(k for k in before["state_dict"] if k.endswith("conv_in.weight"))
    restored_part = after["state_dict"][key] - 0.5 * after["current_model_state"][key]
    assert not torch.equal(after["state_dict"][key], after["current_model_state"][key])
    assert torch.isfinite(restored_part).all()
    ema_state = [v for v in after["callbacks"].values() if "latest_update_step" in v]
    assert ema_state and ema_state[0]["latest_update_step"] == 6


def test_ckpt_path_last_finds_the_newest_run(tmp_path, trained):
    out, _ = trained
    base = tmp_path / "outputs" / "digits"
    (base / "a" / "checkpoints").mkdir(parents=True)
    target = base / "a" / "checkpoints" / "last.ckpt"
    target.write_bytes((out / "checkpoints" / "last.ckpt").read_bytes())
    assert run.resolve_ckpt_path("last", base / "b") == str(target)


@pytest.mark.parametrize("sampler", ["ddim steps=5", "respaced steps=4 spacing=trailing", "ddpm"])
def test_sample_script_writes_png_and_uint8_npz(sampler, trained, tmp_path):
    import numpy as np

    from helpers import run_script

    out, _ = trained
    name, *rest = sampler.split()
    result = run_script("sample.py", f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "num_samples=6", "batch_size=4",
                        f"sampler={name}", *rest, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = f"samples: {tmp_path / 'samples.png'} and {tmp_path / 'samples.npz'}"
    assert result.stdout.strip().splitlines()[-1] == expected
    samples = np.load(tmp_path / "samples.npz")["samples"]
    assert samples.shape == (6, 8, 8, 1) and samples.dtype == np.uint8
    assert Image.open(tmp_path / "samples.png").size[0] > 32


@pytest.mark.slow
def test_multirun_over_two_schedules_gives_two_complete_runs(tmp_path):
    from helpers import run_script

    result = run_script("train.py", "-m", "debug=fast", "schedule=linear,cosine", f"hydra.sweep.dir={tmp_path}",
                        cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0_schedule=linear", "1_schedule=cosine"]
    run_ids = set()
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file() and (job / "samples" / "final_ema.png").is_file()
        runs = list(job.glob("wandb/offline-run-*"))
        assert len(runs) == 1
        run_ids.add(runs[0].name.rsplit("-", 1)[-1])
        assert any("train/loss" in h for h in wandb_history(job))
    assert len(run_ids) == 2  # one W&B run per job, not one reused
    betas = [torch.load(j / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]["betas"] for j in jobs]
    assert betas[0] != betas[1] and len(betas[0]) == len(betas[1]) == 20
