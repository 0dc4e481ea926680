"""The training step with nothing around it: no host-device sync per step, data on the device, fused/foreach
optimizers, and the GPU bench's CPU smoke run."""

import collections
import json
import os
import subprocess
import sys
import traceback

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch.utils._python_dispatch import TorchDispatchMode

from diffusion.config import CIFAR10DataConfig, validate
from diffusion.data import EpochSampler
from diffusion.data.loader import DeviceLoader, ResumableLoader, _ModelInputs, split_on_device
from diffusion.errors import UserError
from diffusion.run.commands.train import train
from helpers import ROOT, build, compose_cfg, train_cfg
from test_data import cifar_pattern, write_cifar

QUIET = ["callbacks.samples=null", "trainer.val_check_interval=1000", "callbacks.checkpoint.every_n_train_steps=1000",
         "callbacks.posthoc_ema.every_n_steps=1000", "trainer.log_every_n_steps=1000",
         "trainer.enable_progress_bar=true"]


class HostReads(TorchDispatchMode):
    """Every read of a tensor's value by the host (.item(), float(), bool(), .tolist(): aten._local_scalar_dense),
    with where it came from. Adam's step counters are left out: without fused/capturable they live on the host."""

    def __init__(self):
        super().__init__()
        self.reads, self.ops = collections.Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if str(func.overloadpacket) in ("aten._local_scalar_dense", "aten.is_nonzero", "aten.equal"):
            frames = traceback.extract_stack()[:-1]
            if not any(f.name == "_get_value" and "torch/optim" in f.filename for f in frames):
                self.reads[" <- ".join(f"{f.name}:{f.lineno}" for f in frames[-6:][::-1])] += 1
        return func(*args, **(kwargs or {}))


class Watch(L.Callback):
    """HostReads over whole steps: from the start of step `first` to the start of step `last` (hooks, logging,
    EMA, the loader's next batch included)."""

    def __init__(self, first: int, last: int):
        self.first, self.last, self.mode = first, last, HostReads()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.first:
            self.mode.__enter__()
        elif trainer.global_step == self.last:
            self.mode.__exit__(None, None, None)


@pytest.mark.parametrize(("extra", "per_step"), [(["data.on_device=false"], 0), (["data.on_device=true"], 0),
                                                 (["training.nonfinite_check_every_n_steps=1"], 1)],
                         ids=["loader", "on_device", "check_every_step"])
def test_training_steps_read_nothing_back_from_the_device(tmp_path, extra, per_step):
    """Four real steps of train.py's default callbacks (EMA, post-hoc EMA, W&B, LR monitor, binned loss, the
    bar): no host read, unless a setting asks for one (the non-finite check every step: one read a step)."""
    watch = Watch(2, 6)
    train(train_cfg(tmp_path, *QUIET, "trainer.max_steps=7", *extra), extra_callbacks=(watch,))
    assert watch.mode.ops > 1000  # the mode saw the steps' work
    assert sum(watch.mode.reads.values()) == 4 * per_step, dict(watch.mode.reads)


def loaders(root, seed, rank=0, world=1, on_device=False):
    data = build(CIFAR10DataConfig, root=str(root), batch_size=4, seed=seed)
    images = data._split("train")
    sampler = EpochSampler(_ModelInputs(images), seed, True, num_replicas=world, rank=rank)
    if on_device:
        return DeviceLoader(images.images, sampler, 4, torch.device("cpu"))
    return ResumableLoader(_ModelInputs(images), sampler=sampler, drop_last=True, batch_size=4,
                           generator=torch.Generator())


def epochs(loader, n: int) -> list[torch.Tensor]:
    out = []
    for epoch in range(n):
        loader.sampler.set_epoch(epoch)  # as Lightning does at each epoch
        out.append(torch.cat(list(loader)))
    return out


def test_on_device_batches_equal_the_loaders_with_flips_shards_and_resume(tmp_path):
    write_cifar(tmp_path, np.stack([cifar_pattern(i) for i in range(46)]), n_test=6)  # 40 train images
    for rank, world in ((0, 1), (0, 2), (1, 2)):  # one device, and each rank's share under DDP
        expected = epochs(loaders(tmp_path, 7, rank, world), 2)
        got = epochs(loaders(tmp_path, 7, rank, world, on_device=True), 2)
        assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True)), (rank, world)
    assert not torch.equal(expected[0], expected[1])  # epochs differ
    interrupted = loaders(tmp_path, 7, on_device=True)
    batches = iter(interrupted)
    next(batches), next(batches)
    state = interrupted.state_dict()
    assert state == {"epoch": 0, "batches": 2}
    resumed = loaders(tmp_path, 7, on_device=True)
    resumed.load_state_dict(state)
    full = epochs(loaders(tmp_path, 7), 1)[0]
    assert torch.equal(torch.cat(list(resumed)), full[8:])  # the rest of epoch 0, flips included


def test_on_device_batches_carry_their_labels_as_the_loaders_do(tmp_path):
    """A class-conditional run on the device path: (images, labels) batches equal to the DataLoader's."""
    write_cifar(tmp_path, np.stack([cifar_pattern(i) for i in range(46)]), n_test=6)  # 5 batches: labels 0..4
    batches = {}
    for on_device in (False, True):
        data = build(CIFAR10DataConfig, root=str(tmp_path), batch_size=4, seed=7, on_device=on_device)
        data.with_labels = True
        batches[on_device] = list(data.train_dataloader())
    for (xa, ya), (xb, yb) in zip(batches[False], batches[True], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(batches[True]) == 10 and len(set(torch.cat([y for _, y in batches[True]]).tolist())) == 5


@pytest.mark.slow
def test_on_device_training_equals_the_loader_path_and_resumes_mid_epoch(tmp_path):
    """train.py with data.on_device=true: the loader path's weights after 4 steps (3 an epoch), bit for bit,
    also when stopped at step 2 (mid-epoch) and resumed."""
    common = ["logger=none", "callbacks.samples=null", "data.batch_size=500", "trainer.deterministic=true",
              "callbacks.checkpoint.every_n_train_steps=1", "callbacks.checkpoint.save_top_k=0"]
    last = {}
    for name, extra in [("loader", ["trainer.max_steps=4", "data.on_device=false"]),
                        ("device", ["trainer.max_steps=4", "data.on_device=true"]),
                        ("first", ["trainer.max_steps=2", "data.on_device=true"]),
                        ("resumed", ["trainer.max_steps=4", "data.on_device=true",
                                     f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}"])]:
        train(train_cfg(tmp_path / name, *common, *extra))
        last[name] = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
    for name in ("device", "resumed"):
        for key in ("state_dict", "current_model_state"):
            a, b = last["loader"][key], last[name][key]
            assert all(torch.equal(a[k], b[k]) for k in a), (name, key)
    # so the data sets held in memory go on the device when they fit (null), the digits included (make train's
    # numbers stay)
    assert compose_cfg("train", ["experiment=digits"], tmp_path / "cfg").data.on_device is None
    assert compose_cfg("train", ["experiment=cifar10_ddpm"], tmp_path / "cfg").data.on_device is None


GIB = 2**30
CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize(("on_device", "nbytes", "device", "free", "chosen"), [
    (None, 150 * 2**20, CUDA, 70 * GIB, True),  # CIFAR-10's train split on an H100: on the device
    (None, 20 * GIB, CUDA, 70 * GIB, False),  # over a quarter of the free memory: the DataLoader
    (None, 20 * GIB, torch.device("cpu"), None, True),  # the CPU: in host memory already, nothing copied
    (None, 1, torch.device("mps"), None, False),  # free memory unknown: the DataLoader
    (True, 20 * GIB, CUDA, 70 * GIB, True),  # asked for, and it fits
    (False, 1, CUDA, 70 * GIB, False)])
def test_on_device_null_puts_the_split_on_the_device_when_it_fits(on_device, nbytes, device, free, chosen):
    assert split_on_device(on_device, nbytes, device, free) is chosen


def test_on_device_true_is_refused_in_one_line_when_the_split_does_not_fit():
    with pytest.raises(UserError) as err:
        split_on_device(True, 80 * GIB, CUDA, 70 * GIB)
    assert str(err.value) == ("data.on_device=true: the train split takes 80.00 GiB and cuda:0 has 70.00 GiB free; "
                              "set data.on_device=false (the DataLoader) or null (on the device only when it fits)")


def test_cifar10_trains_from_the_device_by_default(tmp_path):
    """CIFAR-10 with data.on_device left at null: the train loader draws from the device copy (here the CPU)."""
    write_cifar(tmp_path, np.stack([cifar_pattern(i) for i in range(46)]), n_test=6)
    cfg = compose_cfg("train", ["experiment=cifar10_ddpm", f"data.root={tmp_path}", "data.batch_size=4"],
                      tmp_path / "cfg")
    data = instantiate(cfg.data)
    assert isinstance(data.train_dataloader(), DeviceLoader)
    cfg.data.on_device = False
    assert isinstance(instantiate(cfg.data).train_dataloader(), ResumableLoader)


def test_optimizer_foreach_and_fused_are_checked_and_reach_torch(tmp_path, monkeypatch):
    cfg = train_cfg(tmp_path, "optim.optimizer.fused=true")
    validate(cfg)  # torch has fused Adam kernels for the CPU
    optimizer = instantiate(cfg.optim.optimizer)(params=[torch.nn.Parameter(torch.zeros(2))])
    assert optimizer.defaults["fused"] is True
    with pytest.raises(UserError, match=r"^optim.optimizer.fused=true and optim.optimizer.foreach=true exclude"):
        validate(train_cfg(tmp_path, "optim.optimizer.fused=true", "optim.optimizer.foreach=true"))
    monkeypatch.setattr("torch.utils._foreach_utils._get_fused_kernels_supported_devices", lambda: ["cuda"])
    with pytest.raises(UserError, match=r"fused=true has no fused kernels on cpu .*foreach=true instead$"):
        validate(cfg)


@pytest.mark.slow
def test_gpu_bench_runs_on_cpu_with_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    result = subprocess.run([str(ROOT / "bench" / "gpu.sh"), "--smoke", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    rows = record["throughput_b2_bf16"]
    assert set(rows) == {"eager-nchw", "eager-channels_last", "compile-nchw", "compile-channels_last"}
    assert all(r["train"]["ours"] > 0 and r["train"]["diffusers"] > 0 and r["sample"]["ours"] > 0
               for r in rows.values())
    train_py = record["train_py_on_device"]
    assert train_py["img_per_s"] > 0 and "data.on_device=true" in train_py["overrides"]
    assert record["peak_memory_unet256"]["batch_1"]["parameters"] > 0
