"""evaluate.py and figures.py stopped by SIGTERM or Ctrl-C: one line naming what is on disk, exit 143/130."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffusion.run.commands.train import train
from helpers import ROOT, train_cfg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slow_ckpt(tmp_path_factory) -> Path:
    """A thin net with T=100, one step: every figure or sample takes T network passes, time to be stopped in."""
    out = tmp_path_factory.mktemp("train")
    train(train_cfg(out, "logger=none", "callbacks.samples=null", "schedule.num_timesteps=100", "model.ch=16",
                        "trainer.max_steps=1", "trainer.val_check_interval=100000"))
    return out / "checkpoints" / "last.ckpt"


def start(script: str, *args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stopped(proc: subprocess.Popen, sig: signal.Signals) -> tuple[int, str, list[str]]:
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, [line for line in stderr.splitlines() if line.strip()]


def test_figures_stopped_by_ctrl_c_names_the_figures_already_saved(slow_ckpt, tmp_path):
    out = tmp_path / "figures"
    # The rate-distortion curve comes last: 1,500 images through the bound of 100 steps, long enough to be in.
    proc = start("figures.py", f"ckpt={slow_ckpt}", f"output_dir={out}", "num_images=2", "num_samples=4",
                 "num_reconstructions=1", "num_lambdas=2", "sampler.name=ddim", "sampler.steps=2", "split=train",
                 "rd_images=1500", f"hydra.run.dir={tmp_path / 'h'}", cwd=tmp_path)
    deadline = time.time() + 300
    while not (out / "samples.png").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    code, stdout, stderr = stopped(proc, signal.SIGINT)
    assert code == 130, stderr[-20:]
    assert not any("Traceback" in line for line in stderr), stderr
    saved = ["forward.png", "interpolation.png", "reconstructions.png", "reverse.png", "samples.png"]
    assert stderr[-1] == f"error: stopped by SIGINT; figures saved so far in {out}: {', '.join(saved)}"
    assert sorted(p.name for p in out.iterdir()) == saved  # no rate_distortion.*, no half-written PNG


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_evaluate_stopped_by_a_signal_says_the_report_was_not_written(sig, slow_ckpt, tmp_path):
    proc = start("evaluate.py", f"ckpt={slow_ckpt}", "num_samples=2000", "batch_size=500", "sampler.name=ddpm",
                 "max_reference_images=64", "progress_bar=false", "logger=wandb", f"hydra.run.dir={tmp_path}",
                 cwd=tmp_path)
    first = proc.stdout.readline()  # printed once the checkpoint and the data are loaded
    assert first.startswith(f"evaluating {slow_ckpt}: 2000 samples (ddpm-100)"), first
    time.sleep(1.0)  # into the sampling
    code, stdout, stderr = stopped(proc, sig)
    assert code == 128 + sig, stderr[-20:]
    assert not any("Traceback" in line for line in stderr), stderr
    assert stderr[-1] == f"error: stopped by {sig.name}; the report ({tmp_path / 'report.json'}) was not written"
    assert not (tmp_path / "report.json").exists() and "quality:" not in stdout
