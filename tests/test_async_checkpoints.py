"""Checkpoints written by a background thread (training.async_checkpoints, on by default): each holds its own
step's state, a removal never overtakes a newer write, a signal's stop and the end of a run return only once
the checkpoint is on disk, and a kill -9 in the middle of a write leaves the previous checkpoint loadable.

A slow shared file system is played by `SlowDisk`: before each checkpoint it queues a 64 MB fsynced write on
the run's own writer, so the checkpoint's write starts well after the step has moved on.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from diffusion.errors import Interrupted, UserError
from diffusion.lightning.checkpoint_io import BackgroundCheckpointIO
from diffusion.lightning.checkpoints import check_checkpoint
from diffusion.run.commands.train import train
from helpers import ROOT, SignalAt, train_cfg
from test_signal_resume import assert_same_state, load

PAD = 16 * 2**20  # float32 elements: 64 MB


class SlowDisk(L.Callback):
    """Queues a 64 MB write (to `folder`/pad.ckpt) on the trainer's checkpoint writer before each checkpoint."""

    def __init__(self, folder: Path):
        self.folder = folder

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        trainer.strategy.checkpoint_io.save_checkpoint({"pad": torch.zeros(PAD)}, self.folder / "pad.ckpt")


def test_a_tensor_changed_once_its_copy_is_taken_is_written_as_it_was(tmp_path):
    io = BackgroundCheckpointIO()
    weights = torch.arange(2 * io.copy_later_numel, dtype=torch.float32)  # large: the writer's thread copies it
    small = torch.arange(10, dtype=torch.float32)  # small: copied at the save
    io.save_checkpoint({"pad": torch.zeros(PAD)}, tmp_path / "pad.ckpt")  # the writer is busy with this a while
    io.save_checkpoint({"weights": weights, "small": small, "global_step": 1}, tmp_path / "step1.ckpt")
    small.add_(1)
    io.settle()  # what the trainer does before its optimizer step
    weights.add_(1)  # the next optimizer step, in place, while step 1's checkpoint waits for the writer
    assert not (tmp_path / "step1.ckpt").exists()  # it did wait: the copy, not the tensor, is what gets written
    io.teardown()  # what Lightning calls at the end of fit: every write done
    saved = torch.load(tmp_path / "step1.ckpt", weights_only=True)
    assert torch.equal(saved["weights"], torch.arange(2 * io.copy_later_numel, dtype=torch.float32))
    assert torch.equal(saved["small"], torch.arange(10, dtype=torch.float32)) and saved["global_step"] == 1


def test_a_tensor_changed_before_its_copy_is_checked_is_never_written(tmp_path):
    """A wait point missed: the tensor changed between the save and settle(); that checkpoint is dropped with one
    line, whatever the copy caught, and the next one is written."""
    io = BackgroundCheckpointIO()
    weights = torch.zeros(2 * io.copy_later_numel)
    io.save_checkpoint({"weights": weights}, tmp_path / "step1.ckpt")
    weights.add_(1)
    with pytest.raises(UserError, match=r"^checkpoint .*step1\.ckpt was not written: 1 of its tensors \(the first of "
                                        r"shape \(131072,\)\) changed before the background copy was taken; set "
                                        r"training.async_checkpoints=false"):
        io.settle()
    io.save_checkpoint({"weights": weights}, tmp_path / "step2.ckpt")
    io.teardown()
    assert sorted(os.listdir(tmp_path)) == ["step2.ckpt"]  # no step1, no temporary file
    assert torch.equal(torch.load(tmp_path / "step2.ckpt", weights_only=True)["weights"], weights)


def test_background_copies_give_the_synchronous_checkpoint_of_every_step(tmp_path):
    """A model with tensors large enough for the writer's thread to copy, a checkpoint and a validation (which
    swaps the EMA weights in) after every step: each checkpoint equals a synchronous run's, bit for bit."""
    run = [*RUN, "model.ch=48", "data.batch_size=16", "callbacks.checkpoint.every_n_train_steps=1",
           "callbacks.checkpoint.save_top_k=-1", "trainer.val_check_interval=1", "trainer.limit_val_batches=1"]
    train(train_cfg(tmp_path / "sync", *run, "training.async_checkpoints=false"))
    train(train_cfg(tmp_path / "background", *run))
    names = sorted(p.name for p in (tmp_path / "sync" / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "background" / "checkpoints").iterdir())
    assert len(names) == 4  # step 1, 2, 3 and last
    for name in names:
        got, want = load(tmp_path / "background" / "checkpoints" / name), load(tmp_path / "sync" / "checkpoints" / name)
        assert_same_state(got, want, name)
    large = [k for k, v in want["state_dict"].items() if v.numel() >= BackgroundCheckpointIO.copy_later_numel]
    assert large, "no tensor was large enough to be copied by the writer's thread"


def test_a_removal_waits_for_the_writes_queued_before_it(tmp_path):
    io, old, new = BackgroundCheckpointIO(), tmp_path / "step1.ckpt", tmp_path / "step2.ckpt"
    io.save_checkpoint({"global_step": 1}, old)
    io.wait()
    io.save_checkpoint({"pad": torch.zeros(PAD)}, tmp_path / "pad.ckpt")
    io.save_checkpoint({"global_step": 2}, new)
    io.remove_checkpoint(old)  # as ModelCheckpoint does once the newer one is "saved" (save_top_k)
    assert old.is_file() and not new.exists()  # a kill now still finds the old checkpoint
    io.wait()
    assert not old.exists() and torch.load(new, weights_only=True)["global_step"] == 2


RUN = ["data.batch_size=250", "model.ch=16", "trainer.deterministic=true", "callbacks.samples=null", "logger=none",
       "trainer.max_steps=3"]


def test_a_signal_stop_returns_with_its_checkpoint_written_and_resumes_bit_for_bit(tmp_path):
    """Synchronous writes for the reference run; background writes behind a slow disk for the stopped one, whose
    first checkpoint is the stop's (every 3 steps, the signal after step 2): it must be whole when train() raises."""
    reference = tmp_path / "synchronous"
    train(train_cfg(reference, *RUN, "training.async_checkpoints=false", "callbacks.checkpoint.every_n_train_steps=1"))
    stopped, resumed = tmp_path / "stopped", tmp_path / "resumed"
    every_3 = "callbacks.checkpoint.every_n_train_steps=3"
    with pytest.raises(Interrupted) as stop:
        train(train_cfg(stopped, *RUN, every_3),
              extra_callbacks=(SlowDisk(tmp_path), SignalAt(signal.SIGTERM, "on_train_batch_start", 1)))
    ckpt = stopped / "checkpoints" / "last.ckpt"
    assert str(stop.value).startswith("stopped by SIGTERM at step 2; checkpoint saved to")
    assert_same_state(load(ckpt), load(reference / "checkpoints" / "step0000002.ckpt"), "the stop's checkpoint")
    train(train_cfg(resumed, *RUN, every_3, f"ckpt_path={ckpt}"), extra_callbacks=(SlowDisk(tmp_path),))
    assert_same_state(load(resumed / "checkpoints" / "last.ckpt"), load(reference / "checkpoints" / "last.ckpt"),
                      "the end of the resumed run")
    assert check_checkpoint(resumed / "checkpoints" / "step0000003.ckpt")["global_step"] == 3
    assert sorted(os.listdir(resumed / "checkpoints")) == ["last.ckpt", "step0000003.ckpt"]  # no temporary file


def open_files_under(pid: int, folder: Path) -> list[str]:
    """The files under `folder` that process `pid` (any of its threads) holds open now."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith(f"{folder}/"):
            found.append(target)
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see a write in progress")
def test_kill_9_during_a_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    """train.py writing a checkpoint every step in the background, killed (SIGKILL, its whole process group) the
    moment a file under checkpoints/ is seen open, after a first last.ckpt exists; then resumed in place."""
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    args = ["debug=fast", "model.ch=16", "callbacks.samples=null", "logger=none", "trainer.max_steps=100000",
            "callbacks.checkpoint.every_n_train_steps=1", f"hydra.run.dir={run}"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    caught, deadline = [], time.monotonic() + 240
    try:
        while not caught and proc.poll() is None and time.monotonic() < deadline:
            if (checkpoints / "last.ckpt").is_file():
                caught = open_files_under(proc.pid, checkpoints)
        if caught:
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        stderr = proc.communicate(timeout=60)[1].decode()
    assert caught, f"no checkpoint write seen in progress (exit {proc.returncode}): {stderr[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    # Every file under a checkpoint's name loads; what the killed write left is a hidden temporary file at most.
    names = sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith("."))
    steps = {name: int(check_checkpoint(checkpoints / name)["global_step"]) for name in names}
    assert steps["last.ckpt"] >= 1 and steps["last.ckpt"] == max(steps.values()), steps
    assert all(Path(c).name.startswith(".") for c in caught), caught  # the write in progress was to a temp file
    # The same command, in the same run directory, resumes from that last.ckpt (replacing the killed run's lock).
    step = steps["last.ckpt"]
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args[:-3], f"trainer.max_steps={step + 2}",
                           "callbacks.checkpoint.every_n_train_steps=1", f"hydra.run.dir={run}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {checkpoints / 'last.ckpt'}" in done.stdout
    assert check_checkpoint(checkpoints / "last.ckpt")["global_step"] == step + 2
