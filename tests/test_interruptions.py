"""Interruptions with real signals on real training processes, SLURM requeue, and non-finite losses."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from diffusion.lightning.module import NonFiniteLoss
from diffusion.run.commands.train import train
from helpers import ROOT, train_cfg

LONG_RUN = ["debug=fast", "trainer.max_steps=100000", "callbacks.samples=null",
            "callbacks.checkpoint.every_n_train_steps=1000",
            "trainer.val_check_interval=100000"]


def start_training(run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *LONG_RUN, *extra, f"hydra.run.dir={run_dir}"],
                            cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or os.environ.copy())


def wait_for_training(run_dir: Path, timeout: float = 120) -> None:
    """Until the W&B offline run shows logged steps (training has begun)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        logs = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
        if logs and logs[0].stat().st_size > 20_000:
            time.sleep(1.0)
            return
        time.sleep(0.5)
    raise TimeoutError("training did not start")


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_checkpoint_closes_wandb_and_says_how_to_resume(sig, code, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = start_training(run_dir)
    wait_for_training(run_dir)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-3000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert last.startswith(f"error: stopped by {sig.name} at step ") and f"ckpt_path={ckpt}" in last, last
    assert "resume with: python train.py" in last
    state = torch.load(ckpt, weights_only=True)
    step = int(last.split(" at step ")[1].split(";")[0])
    assert state["global_step"] == step > 0 and "current_model_state" in state
    # W&B closed the run: its log ends with an exit record.
    wandb_log = next(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    exe = Path(sys.executable).parent / "wandb"
    records = subprocess.run([str(exe), "leet", "inspect", "--json", str(wandb_log)], capture_output=True,
                             text=True, timeout=120).stdout
    assert '"type":"exit"' in records


@pytest.mark.slow
def test_slurm_requeue_resumes_in_the_same_run_directory(tmp_path):
    """Same SLURM job id -> same run directory -> the requeued job resumes from the checkpoint it left."""
    env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train"}
    outputs = tmp_path / "outputs"
    cmd = [sys.executable, str(ROOT / "train.py"), *LONG_RUN, "name=slurmtest"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = outputs / "slurmtest" / "slurm-4242"
    deadline = time.time() + 120
    while not run_dir.exists() and time.time() < deadline:
        time.sleep(0.5)
    wait_for_training(run_dir)
    proc.send_signal(signal.SIGTERM)  # what SLURM sends before the time limit / preemption
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    first_step = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    requeued = subprocess.run([*cmd[:2], "debug=fast", "name=slurmtest", "callbacks.samples=null",
                               f"trainer.max_steps={first_step + 2}"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in requeued.stdout
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == first_step + 2
    assert [p.name for p in (outputs / "slurmtest").iterdir()] == ["slurm-4242"]
    # the requeued job continues the W&B run of the first attempt: two offline folders, one run id
    first, second = sorted(run_dir.glob("wandb/offline-run-*"))
    run_id = first.name.rsplit("-", 1)[1]
    assert second.name.endswith(f"-{run_id}") and f"W&B: continuing run {run_id}" in requeued.stdout


@pytest.mark.slow
def test_slurm_time_limit_signal_saves_requeues_and_the_requeued_job_resumes(tmp_path):
    """SIGUSR2 (SLURM's --signal before the time limit) -> last.ckpt, `scontrol requeue <job>`, exit 140; the
    requeued job (same id, so same run directory) resumes from it. scontrol is a fake that records its call."""
    calls = tmp_path / "scontrol_calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "SLURM_JOB_ID": "5151", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env.pop("SUBMITIT_PREEMPT_SIGNAL", None)
    run_dir = tmp_path / "outputs" / "usr2" / "slurm-5151"
    cmd = [sys.executable, str(ROOT / "train.py"), *LONG_RUN, "name=usr2", "logger=none",
           "callbacks.checkpoint.every_n_train_steps=10"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "step0000010.ckpt").exists() and time.time() < deadline:
        time.sleep(0.2)  # training has begun
    proc.send_signal(signal.SIGUSR2)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR2, stderr[-2000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: stopped by SIGUSR2 at step ") and f"checkpoint saved to {ckpt}" in last, last
    assert "requeued SLURM job 5151 (scontrol requeue)" in last
    assert calls.read_text().split() == ["requeue", "5151"]
    step = torch.load(ckpt, weights_only=True)["global_step"]
    assert step == int(last.split(" at step ")[1].split(";")[0]) > 0
    requeued = subprocess.run([*cmd[:2], "debug=fast", "name=usr2", "callbacks.samples=null", "logger=none",
                               f"trainer.max_steps={step + 2}"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"resuming from {ckpt}" in requeued.stdout
    assert torch.load(ckpt, weights_only=True)["global_step"] == step + 2
    assert [p.name for p in run_dir.parent.iterdir()] == ["slurm-5151"]


class PoisonAtStep(L.Callback):
    """Make the loss non-finite at one step by filling a weight with inf (restored after that step)."""

    def __init__(self, step: int):
        self.step, self.saved = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.saved is None:
            self.saved = pl_module.net.conv_in.weight.detach().clone()
            pl_module.net.conv_in.weight.data.fill_(float("inf"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.saved is not None and pl_module.net.conv_in.weight.isinf().any():
            pl_module.net.conv_in.weight.data.copy_(self.saved)


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = train_cfg(tmp_path, "logger=none", "callbacks.samples=null", "trainer.max_steps=6")
    with pytest.raises(NonFiniteLoss, match=r"training loss is (inf|nan) at step 3; .*checkpoints/last.ckpt") as err:
        train(cfg, extra_callbacks=(PoisonAtStep(3),))
    assert "\n" not in str(err.value) and "training.on_nonfinite=skip" in str(err.value)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_nonfinite_loss_can_be_skipped_and_counted(tmp_path):
    cfg = train_cfg(tmp_path, "logger=none", "callbacks.samples=null", "trainer.max_steps=6",
                    "training.on_nonfinite=skip")
    train(cfg, extra_callbacks=(PoisonAtStep(3),))
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["nonfinite_skips"] == 1 and state["global_step"] >= 5
    assert all(torch.isfinite(v).all() for v in state["current_model_state"].values())


@pytest.mark.slow
def test_a_signal_in_process_finishes_wandb_before_train_returns(tmp_path):
    """Our code closes the W&B run on a stop, not the interpreter's exit hook (which would also write the exit
    record, so a subprocess could not tell): checked in this process, before it ends."""
    import wandb

    from diffusion.errors import Interrupted
    from helpers import SignalAt, wandb_records

    with pytest.raises(Interrupted):
        train(train_cfg(tmp_path, "callbacks.samples=null", "trainer.max_steps=6", "trainer.val_check_interval=6"),
                  extra_callbacks=(SignalAt(signal.SIGTERM, "on_train_batch_start", 2),))
    assert wandb.run is None
    records = wandb_records(tmp_path)
    assert [r for r in records if r.get("type") == "exit"], [r.get("type") for r in records]
    assert any("train/loss" in r["history"]["item"] for r in records if r.get("type") == "history")
