"""Checkpoints: written atomically (a real EFBIG part-way leaves the old file whole), bad ones named in one line."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from PIL import Image

from diffusion.core.schedules import cosine_beta_schedule
from diffusion.errors import UserError
from diffusion.lightning.checkpoint_io import AtomicCheckpointIO, BackgroundCheckpointIO
from diffusion.lightning.checkpoints import check_checkpoint
from diffusion.run.commands.train import build_module, check_resumable, train
from helpers import ROOT, paper_betas, train_cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny real run (digits, T=20, 4 steps), watching the Trainer it builds and every checkpoint save."""
    out = tmp_path_factory.mktemp("run")
    seen = {"saves": []}
    fit, save = L.Trainer.fit, AtomicCheckpointIO.save_checkpoint

    def spy_fit(self, *args, **kwargs):
        seen["trainer"] = self
        return fit(self, *args, **kwargs)

    def spy_save(self, checkpoint, path, storage_options=None):
        seen["saves"].append(Path(path))
        return save(self, checkpoint, path, storage_options)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(L.Trainer, "fit", spy_fit)
        mp.setattr(AtomicCheckpointIO, "save_checkpoint", spy_save)
        train(train_cfg(out, "logger=none", "callbacks.samples=null"))
    return out, seen


def test_training_writes_every_checkpoint_through_the_atomic_plugin(trained):
    out, seen = trained
    io = seen["trainer"].strategy.checkpoint_io  # training.async_checkpoints: the atomic writer in a thread
    assert isinstance(io, BackgroundCheckpointIO) and isinstance(io.checkpoint_io, AtomicCheckpointIO)
    written = sorted(p.name for p in (out / "checkpoints").iterdir())  # hidden temp files included
    assert written == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt"]
    assert sorted({p.name for p in seen["saves"]}) == written


# A real Trainer in a child process; after step 1's last.ckpt is on disk the file-size limit drops below a
# checkpoint's size, so step 2's save fails part-way with a real EFBIG from the kernel.
FILL_THE_DISK = r"""
import json, resource, shutil, signal, sys
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from hydra.utils import instantiate
from omegaconf import OmegaConf
from diffusion.lightning.checkpoint_io import AtomicCheckpointIO, BackgroundCheckpointIO, wait_for_checkpoints
from diffusion.config import DigitsDataConfig
from diffusion.errors import UserError
from diffusion.lightning.module import DiffusionModule
from diffusion.core.objectives.ddpm import DDPM
from diffusion.core.schedules import linear_beta_schedule

ckpt_dir, good_copy, limit, io = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

class CapFileSize(L.Callback):  # runs before ModelCheckpoint, which Lightning always puts last
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 2:
            wait_for_checkpoints(trainer)  # step 1's, when written in the background
            shutil.copy(f"{ckpt_dir}/last.ckpt", good_copy)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead of killing us
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

net = dict(in_channels=1, out_channels=1, ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0,
           image_size=8, num_groups=8, resamp_with_conv=True, channels_last=False, num_classes=None)
objective = DDPM(linear_beta_schedule(20, 1e-4, 0.02), "eps", "fixed_large", "simple", 0.001, None, "uniform")
module = DiffusionModule(net=net, objective=objective.spec(), val_timestep_fractions=(0.0, 0.5, 1.0), val_bpd_images=0,
                         loss_bins=10, on_nonfinite="stop", nonfinite_check_every_n_steps=100, compile=False)
checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=0, save_last=True)
io = BackgroundCheckpointIO() if io == "background" else AtomicCheckpointIO()
trainer = L.Trainer(max_steps=3, plugins=[io], callbacks=[CapFileSize(), checkpoint],
                    logger=False, accelerator="cpu", limit_val_batches=0, enable_progress_bar=False,
                    enable_model_summary=False)
try:
    trainer.fit(module, datamodule=instantiate(OmegaConf.structured(DigitsDataConfig), batch_size=16))
except UserError as err:
    print(json.dumps({"message": str(err), "errno": err.__cause__.errno, "step": trainer.global_step}))
else:
    print(json.dumps({"message": None}))
"""


@pytest.mark.parametrize("io, raised_at", [("atomic", 2), ("background", 3)])
def test_a_save_failing_part_way_leaves_the_previous_checkpoint_whole(io, raised_at, tmp_path):
    """Written in the step, the error stops the run at once; written in the background, at the next save."""
    ckpt_dir, good_copy, limit = tmp_path / "checkpoints", tmp_path / "step1_copy.ckpt", 16 * 1024
    result = subprocess.run([sys.executable, "-c", FILL_THE_DISK, str(ckpt_dir), str(good_copy), str(limit), io],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    last = ckpt_dir / "last.ckpt"
    assert good_copy.stat().st_size > limit  # the new save really was cut off part-way, not refused up front
    # The error reached trainer.fit's caller, at step 2 (3), as one line naming the path, the OS error and a fix.
    assert report["errno"] == errno.EFBIG and report["step"] == raised_at
    message = report["message"]
    assert "\n" not in message and str(last) in message and "File too large" in message
    assert "previous checkpoint there is intact" in message and f"ckpt_path={last}" in message
    # The old checkpoint is untouched, still loads, and no temporary file is left beside it.
    assert os.listdir(ckpt_dir) == ["last.ckpt"]
    assert last.read_bytes() == good_copy.read_bytes()
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 1


def test_round_trip_writes_a_temp_file_beside_the_destination(trained, tmp_path, monkeypatch):
    out, _ = trained
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    replaced, real_replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append((Path(src), Path(dst))),
                                                         real_replace(src, dst))[1])
    io, path = AtomicCheckpointIO(), tmp_path / "new" / "copy.ckpt"
    io.save_checkpoint({"global_step": 0}, path)
    io.save_checkpoint(ckpt, path)  # over an existing file
    loaded = io.load_checkpoint(path, weights_only=True)
    assert loaded["global_step"] == 4 and loaded["hyper_parameters"] == ckpt["hyper_parameters"]
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(loaded["state_dict"][key], value), key
    assert [dst for _, dst in replaced] == [path, path]
    assert all(src.parent == path.parent and src.name.startswith(".copy.ckpt.") for src, _ in replaced)
    assert os.listdir(path.parent) == ["copy.ckpt"]
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # the umask's mode, not mkstemp's 0600


def with_objective(hparams: dict, **changes) -> dict:
    """A module's hyperparameters with these settings of its objective changed."""
    return {**hparams, "objective": {**hparams["objective"], **changes}}


def _error(path, expected=None) -> str:
    """check_checkpoint's message, checked to be one line naming the path."""
    with pytest.raises(UserError) as info:
        check_checkpoint(path, expected)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_a_good_checkpoint_loads_and_matches_its_own_config(trained, tmp_path):
    out, _ = trained
    path = out / "checkpoints" / "last.ckpt"
    same = build_module(train_cfg(tmp_path, "model.dropout=0.3")).hparams
    ckpt = check_checkpoint(path, same)  # dropout does not change what the weights mean
    assert ckpt["global_step"] == 4 and set(ckpt["state_dict"]) == set(ckpt["current_model_state"])
    assert check_checkpoint(str(path))["global_step"] == 4


def test_missing_file_and_directory(tmp_path):
    assert "does not exist" in _error(tmp_path / "nope.ckpt")
    assert "is a directory" in _error(tmp_path) and "last.ckpt" in _error(tmp_path)


def test_truncated_and_empty_checkpoints(trained, tmp_path):
    out, _ = trained
    data = (out / "checkpoints" / "last.ckpt").read_bytes()
    half, empty = tmp_path / "half.ckpt", tmp_path / "empty.ckpt"
    half.write_bytes(data[: len(data) // 2])
    empty.write_bytes(b"")
    message = _error(half)
    assert "truncated or corrupt" in message and "RuntimeError" in message and f"{len(data) // 2} bytes" in message
    assert "earlier checkpoint" in message
    assert "empty (0 bytes)" in _error(empty)


def test_files_that_are_not_checkpoints(trained, tmp_path):
    out, _ = trained
    text, png, weights, pickled = (tmp_path / n for n in ("notes.ckpt", "grid.ckpt", "sd.ckpt", "net.ckpt"))
    text.write_text("step,loss\n1,0.5\n")
    Image.new("L", (8, 8)).save(png, format="PNG")
    state_dict = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    torch.save(state_dict, weights)
    torch.save(torch.nn.Linear(2, 2), pickled)
    assert "not a PyTorch checkpoint (it is text, starting 'step,los')" in _error(text)
    assert "not a PyTorch checkpoint (it is a PNG image)" in _error(png)
    message = _error(weights)
    assert "not a Lightning training checkpoint" in message and "net.conv_in.bias" in message
    assert "'state_dict', 'hyper_parameters', 'global_step'" in message
    assert "torch.nn.modules.linear.Linear" in _error(pickled)
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1}, "global_step": 0}, weights)
    assert "not of a DiffusionModule" in _error(weights)


def test_checkpoint_from_another_architecture(trained, tmp_path):
    out, _ = trained
    path = out / "checkpoints" / "last.ckpt"
    hparams = torch.load(path, weights_only=True)["hyper_parameters"]
    thinner = build_module(train_cfg(tmp_path, "model.ch=16")).hparams
    message = _error(path, thinner)
    assert "trained with net.ch=32, this run has net.ch=16" in message and "model.ch=32" in message
    deeper = {**hparams, "net": {**hparams["net"], "ch_mult": (1, 2, 2, 2)}}
    assert "net.ch_mult=[1,2,2], this run has net.ch_mult=[1,2,2,2]" in _error(path, deeper)
    rgb = {**hparams, "net": {**hparams["net"], "in_channels": 3}}
    assert "net.in_channels=1, this run has net.in_channels=3" in _error(path, rgb)


def test_checkpoint_from_another_schedule(trained, tmp_path):
    out, _ = trained
    path = out / "checkpoints" / "last.ckpt"
    hparams = torch.load(path, weights_only=True)["hyper_parameters"]
    message = _error(path, with_objective(hparams, betas=paper_betas(1000).tolist()))
    assert "trained with T=20 timesteps, this run has T=1000" in message and "schedule.num_timesteps=20" in message
    message = _error(path, with_objective(hparams, betas=cosine_beta_schedule(20, 0.008, 0.999).tolist()))
    assert "other betas (T=20 in both, betas[0]=" in message


@pytest.mark.parametrize("key, value", [("parameterization", "v"), ("variance", "fixed_small")])
def test_checkpoint_with_another_parameterization_or_variance(trained, key, value):
    out, _ = trained
    path = out / "checkpoints" / "last.ckpt"
    hparams = torch.load(path, weights_only=True)["hyper_parameters"]
    message = _error(path, with_objective(hparams, **{key: value}))
    assert f"this run has objective.{key}={value}" in message
    assert f"trained with objective.{key}={hparams['objective'][key]}" in message
    assert "start without ckpt_path" in message


@pytest.mark.parametrize("other", ["net", "T", "variance"])
def test_the_run_directorys_own_checkpoint_of_another_model_names_the_fix_that_works(trained, other, tmp_path):
    """Resumed without ckpt_path (the directory's own last.ckpt), leaving out ckpt_path cannot be the fix."""
    out, _ = trained
    path = out / "checkpoints" / "last.ckpt"
    hparams = torch.load(path, weights_only=True)["hyper_parameters"]
    changed = {"net": {"net": {**hparams["net"], "ch": 16}},
               "T": {"objective": {**hparams["objective"], "betas": paper_betas(30).tolist()}},
               "variance": {"objective": {**hparams["objective"], "variance": "learned_range"}}}[other]
    module = SimpleNamespace(hparams={**hparams, **changed})
    difference = {"net": "net.ch=32, this run has net.ch=16", "T": "T=20 timesteps, this run has T=30",
                  "variance": "objective.variance=fixed_large, this run has objective.variance=learned_range"}[other]
    with pytest.raises(UserError) as own:
        check_resumable(str(path), module, {}, out, own=True)
    assert str(own.value) == (f"run directory {out} holds a checkpoint of another model (trained with {difference}): "
                              f"use another hydra.run.dir, or remove {out / 'checkpoints'} (that model's checkpoints) "
                              "to train this one there")
    with pytest.raises(UserError) as given:  # ckpt_path=... given: then leaving it out is the fix
        check_resumable(str(path), module, {}, out, own=False)
    assert f"trained with {difference}; " in str(given.value) and str(given.value).endswith("start without ckpt_path")


def test_a_damaged_own_checkpoint_names_the_fix_that_works(trained, tmp_path):
    out, _ = trained
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "last.ckpt").write_bytes((out / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    hparams = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    module = SimpleNamespace(hparams=hparams)
    with pytest.raises(UserError) as err:
        check_resumable(str(checkpoints / "last.ckpt"), module, {}, tmp_path, own=True)
    assert "is truncated or corrupt" in str(err.value) and "ckpt_path" not in str(err.value).split("; ")[-1]
    assert str(err.value).endswith(f"or remove {checkpoints} to start afresh there")
