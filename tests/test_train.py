"""The training path end to end: Hydra compose API -> run.train -> a real Trainer, files checked afterwards."""

import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from omegaconf import OmegaConf
from PIL import Image

from diffusion.core.gaussian import GaussianDiffusion
from diffusion.lightning.callbacks import progress
from diffusion.lightning.callbacks.progress import StepProgressBar
from diffusion.lightning.checkpoints import load_module
from diffusion.run.commands.train import build_module, resolve_ckpt_path, train
from helpers import ROOT, build, paper_betas, train_cfg, wandb_history


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny real run (digits, T=20, 4 steps) shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run")
    metrics = train(train_cfg(out, "callbacks.ema.decay=0.5", "callbacks.ema.warmup=false",
                                  "callbacks.samples.sampler.name=ddim", "callbacks.samples.sampler.steps=3",
                                  "callbacks.samples.sampler.eta=0"))
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


class StepLosses(L.Callback):
    """Each step's loss as training_step returned it, and the progress bar's postfix and count after each step (read
    at the next batch's start and at the end: after the bar's own hooks, the epoch's end included)."""

    def __init__(self):
        self.loss, self.shown, self.count = {}, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss[trainer.global_step - 1] = float(outputs["loss"])

    def _note(self, trainer):
        bar = next(c for c in trainer.callbacks if isinstance(c, StepProgressBar)).train_progress_bar
        self.shown[trainer.global_step] = dict(item.split("=") for item in (bar.postfix or "").split(", ") if item)
        self.count[trainer.global_step] = bar.n

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._note(trainer)

    def on_train_end(self, trainer, pl_module):
        self._note(trainer)


def test_the_step_loss_reaches_wandb_and_the_bar_at_their_steps(tmp_path, monkeypatch):
    """Logged at the logging cadence only, train/loss and train/mse in W&B are still the loss of the step they are
    logged at; the bar shows the loss of the latest step at which it reads one (every 4th step, an epoch's end: 3
    batches of 500 digits, the last step), and train.py returns the last step's. The bar counts every step but,
    between its timed redraws (here an hour apart), draws only when its loss changes."""
    drawn, display = [], Tqdm.display

    def recording(bar, *args, **kwargs):
        if bar.desc.startswith("train"):
            drawn.append(bar.n)
        return display(bar, *args, **kwargs)

    monkeypatch.setattr(Tqdm, "display", recording)
    monkeypatch.setattr(progress, "REDRAW_S", 3600.0)
    steps = StepLosses()
    metrics = train(train_cfg(tmp_path, "data.batch_size=500", "trainer.max_steps=7", "trainer.log_every_n_steps=4",
                              "trainer.enable_progress_bar=true", "trainer.val_check_interval=100",
                              "callbacks.samples=null", "callbacks.checkpoint.every_n_train_steps=100"),
                    extra_callbacks=(steps,))
    assert sorted(steps.loss) == list(range(7))
    logged = {int(h["trainer/global_step"]): h for h in wandb_history(tmp_path) if "train/loss" in h}
    assert sorted(logged) == [3]  # (step + 1) % log_every_n_steps == 0
    for step, record in logged.items():
        assert record["train/loss"] == record["train/mse"] == steps.loss[step]  # DDPM's simple loss is the MSE
    bar = Tqdm.format_num  # how the bar writes a number
    read_at = {3: 2, 4: 3, 5: 3, 6: 5, 7: 6}  # after step g: the loss of step ...
    assert {g: shown.get("train/loss") for g, shown in steps.shown.items()} == \
        {0: None, 1: None, 2: None, **{g: bar(steps.loss[s]) for g, s in read_at.items()}}
    assert metrics["train/loss"] == steps.loss[6]
    assert steps.count == {g: g for g in range(8)}
    assert sorted(set(drawn)) == [0, 3, 4, 6, 7]


def test_checkpoint_loads_in_a_fresh_process_without_config(trained):
    out, _ = trained
    code = (
        "import torch, sys\n"
        "from diffusion.lightning.module import DiffusionModule\n"
        f"m = DiffusionModule.load_from_checkpoint(r'{out / 'checkpoints' / 'last.ckpt'}')\n"
        "x = torch.zeros(2, 1, 8, 8); t = torch.tensor([0, 19])\n"
        "print(m.objective.num_levels, tuple(m(x, t).shape))\n"
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
    module = load_module(str(out / "checkpoints" / "last.ckpt"))
    fresh = GaussianDiffusion(paper_betas(20), "eps", "fixed_large")
    for name, buffer in fresh.named_buffers():
        assert torch.equal(getattr(module.objective.diffusion, name), buffer), name
    assert torch.equal(module.net.state_dict()[differs[0].removeprefix("net.")], ema[differs[0]])
    raw_module = load_module(str(out / "checkpoints" / "last.ckpt"), weights="raw")
    assert torch.equal(raw_module.net.state_dict()[differs[0].removeprefix("net.")], raw[differs[0]])


def test_ema_averages_parameters_only_during_training(tmp_path):
    """During fit the EMA copy's schedule buffers stay bit-identical: nothing averages betas."""
    import lightning as L

    from diffusion.config import DigitsDataConfig
    from diffusion.lightning.callbacks import EMA

    seen = {}

    class Probe(L.Callback):
        def on_train_end(self, trainer, pl_module):
            ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
            seen["ema"] = {k: v.clone() for k, v in ema.averaged_module().objective.diffusion.named_buffers()}
            seen["module"] = {k: v.clone() for k, v in pl_module.objective.diffusion.named_buffers()}
            seen["params_differ"] = any(
                not torch.equal(a, b) for a, b in zip(ema.averaged_module().net.parameters(),
                                                      pl_module.net.parameters(), strict=True))

    cfg = train_cfg(tmp_path)
    module = build_module(cfg)
    # the probe runs before EMA.on_train_end, which copies the average into the module
    trainer = L.Trainer(max_steps=3, callbacks=[Probe(), EMA(decay=0.9, warmup=False)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=build(DigitsDataConfig, batch_size=16))
    fresh = dict(GaussianDiffusion(paper_betas(20), "eps", "fixed_large").named_buffers())
    for name, buffer in fresh.items():
        assert torch.equal(seen["ema"][name], buffer), name
        assert torch.equal(seen["module"][name], buffer), name
    assert seen["params_differ"]


def test_resume_continues_step_count_optimizer_and_ema(tmp_path, trained):
    out, _ = trained
    ckpt = out / "checkpoints" / "last.ckpt"
    before = torch.load(ckpt, weights_only=True)
    resumed_dir = tmp_path / "resumed"
    train(train_cfg(resumed_dir, f"ckpt_path={ckpt}", "trainer.max_steps=6", "callbacks.samples=null",
                        "callbacks.checkpoint.every_n_train_steps=1", "callbacks.ema.decay=0.5",
                        "callbacks.ema.warmup=false", "logger=none"))
    step5 = torch.load(resumed_dir / "checkpoints" / "step0000005.ckpt", weights_only=True)
    after = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert before["global_step"] == 4 and step5["global_step"] == 5 and after["global_step"] == 6
    # The optimizer continued: Adam's step count went on from the checkpoint's.
    adam_steps = lambda c: c["optimizer_states"][0]["state"][0]["step"].item()  # noqa: E731
    assert (adam_steps(before), adam_steps(step5)) == (4, 5)
    # The EMA continued from the restored average: with decay 0.5, ema5 = 0.5·ema4 + 0.5·raw5.
    # (A fresh EMA would start as a copy of raw5.)
    for key in before["state_dict"]:
        ema4, ema5, raw5 = before["state_dict"][key], step5["state_dict"][key], step5["current_model_state"][key]
        torch.testing.assert_close(ema5, 0.5 * ema4 + 0.5 * raw5, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(step5["state_dict"][k], step5["current_model_state"][k]) for k in before["state_dict"])


def test_mnist_with_cosine_schedule_from_the_readme(tmp_path):
    """`schedule=cosine schedule.num_timesteps=500 data=mnist` on MNIST idx files written here."""
    import numpy as np

    from test_data import write_idx

    raw = tmp_path / "data" / "MNIST" / "raw"
    rng = np.random.default_rng(0)
    write_idx(raw, "train", rng.integers(0, 256, (40, 28, 28), dtype=np.uint8))
    write_idx(raw, "t10k", rng.integers(0, 256, (8, 28, 28), dtype=np.uint8))
    cfg = train_cfg(tmp_path / "run", "schedule=cosine", "schedule.num_timesteps=500", "data=mnist",
                    f"data.root={tmp_path / 'data'}", "data.num_workers=0", "trainer.max_steps=2",
                    "callbacks.samples=null", "logger=none")
    assert cfg.model.attn_resolutions == [8]  # data=mnist picked the 32×32 model
    metrics = train(cfg)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert len(torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt",
                          weights_only=True)["hyper_parameters"]["objective"]["betas"]) == 500
    assert "val/loss_t0499" in metrics


def test_paper_card_reaches_the_wandb_summary(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    train(train_cfg(tmp_path, "trainer.max_steps=1", "callbacks.samples=null",
                        "+paper_card={fid_vs_train: 3.17, nll_bits_per_dim_upper_bound: 3.75}"))
    exe = Path(sys.executable).parent / "wandb"
    summary = json.loads(subprocess.run([str(exe), "leet", "inspect", "--summary", "--json",
                                         str(next(tmp_path.glob("wandb/offline-run-*")))],
                                        capture_output=True, text=True, check=True, timeout=120).stdout)
    text = json.dumps(summary)
    assert '"paper/fid_vs_train": 3.17' in text and '"paper/nll_bits_per_dim_upper_bound": 3.75' in text


def test_ckpt_path_last_finds_the_newest_run(tmp_path, trained):
    out, _ = trained
    base = tmp_path / "outputs" / "digits"
    (base / "a" / "checkpoints").mkdir(parents=True)
    target = base / "a" / "checkpoints" / "last.ckpt"
    target.write_bytes((out / "checkpoints" / "last.ckpt").read_bytes())
    assert resolve_ckpt_path("last", base / "b") == str(target)


def test_ckpt_path_last_picks_the_newest_of_several_runs(tmp_path):
    """Three earlier runs whose names sort otherwise than their times: the last.ckpt written last wins,
    and a run folder without a last.ckpt (a run that failed before its first checkpoint) is passed over."""
    import os

    base = tmp_path / "outputs" / "digits"
    mtimes = {"2026-01-03_09-00-00": 1_000, "2026-01-01_09-00-00": 3_000, "2026-01-02_09-00-00": 2_000}
    for name, mtime in mtimes.items():
        ckpt = base / name / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"x")
        os.utime(ckpt, (mtime, mtime))
    (base / "2026-01-04_09-00-00" / "checkpoints").mkdir(parents=True)  # newest folder, no checkpoint
    newest = base / "2026-01-01_09-00-00" / "checkpoints" / "last.ckpt"
    assert resolve_ckpt_path("last", base / "2026-01-05_09-00-00") == str(newest)
    resumed = base / "2026-01-03_09-00-00" / "checkpoints" / "last.ckpt"
    os.utime(resumed, (4_000, 4_000))  # that run was resumed and saved again
    assert resolve_ckpt_path("last", base / "new") == str(resumed)


@pytest.mark.parametrize("sampler", ["sampler.name=ddim sampler.steps=5 sampler.eta=0",
                                     "sampler.name=respaced sampler.steps=4 sampler.spacing=trailing",
                                     "sampler.name=ddpm",
                                     "sampler.name=unipc sampler.steps=5 sampler.order=2 sampler.spacing=karras"])
def test_sample_script_writes_png_and_uint8_npz(sampler, trained, tmp_path):
    import numpy as np

    from helpers import run_script

    out, _ = trained
    result = run_script("sample.py", f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "num_samples=6", "batch_size=4",
                        *sampler.split(), f"hydra.run.dir={tmp_path}", cwd=tmp_path)
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
    betas = [torch.load(j / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]["objective"]["betas"]
             for j in jobs]
    assert betas[0] != betas[1] and len(betas[0]) == len(betas[1]) == 20


def test_a_path_in_the_overrides_names_one_folder():
    """init_from=/runs/a/last.ckpt in a multirun made job folders nested along the path's parts."""
    from diffusion.config import short_dirname

    assert short_dirname("init_from=/runs/a/last.ckpt,seed=1") == "init_from=_runs_a_last.ckpt,seed=1"
    long = short_dirname("init_from=/" + "d/" * 100 + "last.ckpt")
    assert "/" not in long and len(long) == 120


@pytest.mark.slow
def test_a_sweep_over_many_overrides_names_its_job_folder_within_the_file_system_limit(tmp_path):
    """Hydra names a job's folder after its overrides; past 255 bytes the sweep died with "File name too long".
    The folder name is cut to 120 characters with a hash of the whole; the overrides stay in .hydra/."""
    from helpers import run_script

    overrides = ["callbacks.quality.num_samples=12", "callbacks.quality.max_reference_images=48",
                 "callbacks.samples.num_samples=4", "optim.optimizer.weight_decay=0.0", "optim.optimizer.eps=1e-08",
                 "optim.lr_scheduler.total_iters=2", "trainer.gradient_clip_val=0.5", "validation.bpd_images=2",
                 "callbacks.checkpoint.every_n_train_steps=3", "data.val_size=297"]
    result = run_script("train.py", "-m", "debug=fast", "logger=none", "trainer.max_steps=2", *overrides,
                        f"hydra.sweep.dir={tmp_path}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = [p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(",".join(overrides)) > 255 and len(job.name.split("_", 1)[1]) <= 120
    assert job.name.startswith("0_callbacks.checkpoint")  # Hydra sorts the overrides by key
    assert (job / "checkpoints" / "last.ckpt").is_file()
    saved = OmegaConf.load(job / ".hydra" / "overrides.yaml")
    assert set(overrides) <= set(saved)


@pytest.mark.slow
def test_train_script_ends_with_the_quality_line_that_status_and_wandb_hold(tmp_path):
    """`make train`'s last line through train.py: the final scores and protocol id, the same numbers that
    status.json and the W&B summary (read with wandb's own reader) keep."""
    import json
    import re

    from helpers import run_script, wandb_records

    out = tmp_path / "run"
    result = run_script("train.py", "debug=fast", "callbacks.samples=null", "callbacks.quality.at_train_end=true",
                        "callbacks.quality.num_samples=12", "callbacks.quality.max_reference_images=48",
                        f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"quality: (.+) \[protocol ([0-9a-f]{8}): 12 samples ddim-2 η=0 ema vs train 48/val 48, "
                         r"\S+ sha [0-9a-f]{8}\]", last)
    assert match, last
    printed = dict(pair.rsplit(" ", 1) for pair in match.group(1).split(" · "))
    assert "val/fid" in printed
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "finished" and status["step"] == 4 and status["quality_protocol_id"] == match.group(2)
    assert {k: f"{status['quality'][k]:.4g}" for k in printed} == printed
    summary = {}
    for record in wandb_records(out):
        if record.get("type") == "summary":
            summary.update(record["summary"].get("update", {}))
    assert summary["quality_protocol_id"] == match.group(2)
    # FIDs are summarised by their best (wandb_logger.py's define_metric): here the one measurement
    best = {k: v["min"] if isinstance(v, dict) else v for k, v in summary.items() if k in status["quality"]}
    assert best == status["quality"]
    # metrics go through the trainer's callback_metrics, float32 tensors: the same number to float32 precision
    assert status["metrics"]["val/fid"] == pytest.approx(status["quality"]["val/fid"], rel=1e-6)


@pytest.mark.slow
def test_make_train_passes_hydra_overrides_through(tmp_path):
    """`make train ARGS="..."`, as a cluster user types it: the digits recipe unless ARGS names an experiment,
    ARGS's overrides reach train.py, and `-m` in ARGS makes a multirun."""
    import shutil

    make = shutil.which("make")
    assert make, "make is needed: the README's two commands are make targets"

    def make_train(args: str) -> subprocess.CompletedProcess:
        # -o: the venv stamp counts as up to date, so make runs this interpreter's train.py and installs nothing
        return subprocess.run([make, "-s", "-C", str(ROOT), "train", "-o", ".venv/.installed-dev",
                               f"PY={sys.executable}", f"ARGS={args}"], capture_output=True, text=True, timeout=300)

    tiny = "debug=fast trainer.max_steps=1 logger=none callbacks.samples=null"
    other = make_train(f"experiment=digits_cond {tiny} hydra.run.dir={tmp_path / 'cond'}")
    assert other.returncode == 0, other.stderr[-3000:]
    cfg = OmegaConf.load(tmp_path / "cond" / ".hydra" / "config.yaml")
    assert cfg.name == "digits_cond" and cfg.trainer.max_steps == 1
    assert (tmp_path / "cond" / "checkpoints" / "last.ckpt").is_file()

    sweep = make_train(f"-m {tiny} seed=1,2 hydra.sweep.dir={tmp_path / 'sweep'}")
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [OmegaConf.load(job / ".hydra" / "config.yaml").seed for job in jobs] == [1, 2]
    assert all(OmegaConf.load(job / ".hydra" / "config.yaml").name == "digits" for job in jobs)
