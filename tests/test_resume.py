"""Bit-exact resume: N steps in one run equal N/2 steps, a stop, and a resume from last.ckpt, bit for bit.

Digits at batch size 500 make 3 steps an epoch (1,500 train images), so 8 steps cross two epoch boundaries;
the stop falls on one (step 3) or in the middle of an epoch (step 4, right after a validation).
"""

from itertools import pairwise

import lightning as L
import numpy as np
import pytest
import torch

from diffusion.config import CIFAR10DataConfig, DigitsDataConfig, EMAConfig, SampleGridConfig
from diffusion.core.images import to_model_range
from diffusion.data import EpochSampler
from diffusion.lightning.callbacks import ScheduleLogger
from diffusion.run.commands.train import build_module
from diffusion.run.commands.train import train as train_command
from helpers import build, train_cfg, wandb_history
from test_data import cifar_pattern, first_epoch, write_cifar

N = 8
RUN = ["callbacks.samples=null", "trainer.val_check_interval=2", "trainer.deterministic=true",
       "callbacks.checkpoint.every_n_train_steps=1", "callbacks.checkpoint.save_top_k=0"]  # only last.ckpt


def train(out, *overrides: str) -> dict:
    """A real run under `out` (W&B offline); its last checkpoint and its training loss by step."""
    train_command(train_cfg(out, "data.batch_size=500", *RUN, *overrides))
    losses = {h["trainer/global_step"]: h["train/loss"] for h in wandb_history(out) if "train/loss" in h}
    return {"ckpt": torch.load(out / "checkpoints" / "last.ckpt", weights_only=True), "losses": losses}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train(tmp_path_factory.mktemp("uninterrupted"), f"trainer.max_steps={N}")


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} of {len(a)} tensors differ, first {differ[0]}"


@pytest.mark.parametrize("stop", [3, 4], ids=["at_epoch_boundary", "mid_epoch"])
def test_stop_and_resume_equals_the_uninterrupted_run(stop, uninterrupted, tmp_path):
    first = train(tmp_path / "first", f"trainer.max_steps={stop}")
    assert first["ckpt"]["global_step"] == stop
    resumed = train(tmp_path / "resumed", f"trainer.max_steps={N}",
                    f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}")
    full, ckpt = uninterrupted["ckpt"], resumed["ckpt"]
    assert ckpt["global_step"] == full["global_step"] == N
    assert_same_tensors(full["state_dict"], ckpt["state_dict"], "EMA weights")
    assert_same_tensors(full["current_model_state"], ckpt["current_model_state"], "raw weights")
    assert_same_tensors(full["optimizer_states"][0]["state"][0], ckpt["optimizer_states"][0]["state"][0], "Adam")
    # Every step's loss, from the W&B runs: the same noise and the same batches, step by step.
    assert len(uninterrupted["losses"]) == N
    assert {**first["losses"], **resumed["losses"]} == uninterrupted["losses"]


IMPORTANCE = ["objective.variance=learned_range", "objective.loss=hybrid", "objective.timesteps=importance",
              "data.batch_size=200", "model.ch=16"]  # 8 steps an epoch: the stop at 4 is mid-epoch


@pytest.mark.slow
def test_importance_sampled_training_resumes_bit_for_bit(tmp_path):
    """objective.timesteps=importance (Nichol & Dhariwal 2021 Eq. 18): its history of VLB terms is saved and
    restored, so the t drawn after a resume, and all that follows, are those of the uninterrupted run."""
    full = train(tmp_path / "full", *IMPORTANCE, "trainer.max_steps=6")
    first = train(tmp_path / "first", *IMPORTANCE, "trainer.max_steps=4")
    sampler = first["ckpt"]["timestep_sampler"]
    assert (sampler["counts"] == 10).all()  # the history is full: t is already importance-sampled at the stop
    resumed = train(tmp_path / "resumed", *IMPORTANCE, "trainer.max_steps=6",
                    f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}")
    want, got = full["ckpt"], resumed["ckpt"]
    assert got["global_step"] == want["global_step"] == 6
    assert_same_tensors(want["state_dict"], got["state_dict"], "EMA weights")
    assert_same_tensors(want["current_model_state"], got["current_model_state"], "raw weights")
    for p, state in want["optimizer_states"][0]["state"].items():
        assert_same_tensors(state, got["optimizer_states"][0]["state"][p], f"Adam state of parameter {p}")
    assert_same_tensors(want["timestep_sampler"], got["timestep_sampler"], "importance sampler history")
    assert {**first["losses"], **resumed["losses"]} == full["losses"] and len(full["losses"]) == 6


def test_checkpoint_holds_every_rank_rng_state_and_the_loader_position(uninterrupted):
    ckpt = uninterrupted["ckpt"]
    (state,) = ckpt["rng_states"]  # one process
    assert set(state) == {"torch", "torch.cuda", "numpy", "python"}
    # 8 steps of 3 per epoch: epoch 2 (0-based), 2 batches served.
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 2, "batches": 2}]


def test_nothing_between_two_training_steps_draws_from_the_global_rng(tmp_path):
    """EMA, sample grids, checkpoints, validation, the schedule plot and new epochs leave the training noise alone.

    RNGState restores the state saved with the checkpoint just before the first step after resuming; the
    uninterrupted run must reach that step with the same state, whatever ran in between.
    """
    seen = []

    class Probe(L.Callback):  # first in the list: its batch end hook runs before the others'
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(("end", trainer.global_step, torch.get_rng_state()))

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            seen.append(("saved", trainer.global_step, torch.get_rng_state()))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(("start", trainer.global_step, torch.get_rng_state()))

    cfg = train_cfg(tmp_path)
    module = build_module(cfg)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=1, save_top_k=0, save_last=True)
    callbacks = [Probe(), build(EMAConfig, decay=0.9),
                 build(SampleGridConfig, every_n_steps=2, num_samples=2, sampler={"name": "ddpm"}), ScheduleLogger(),
                 checkpoint]
    trainer = L.Trainer(max_steps=7, callbacks=callbacks, logger=False, enable_progress_bar=False,
                        val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=build(DigitsDataConfig, batch_size=500))
    kinds = [kind for kind, _, _ in seen]
    assert kinds == ["start"] + ["end", "saved", "start"] * 6 + ["end", "saved"]  # steps 1..7, 3 an epoch
    for (kind, step, before), (next_kind, _, after) in pairwise(seen):
        if kind != "start":  # from the end of a step to the start of the next (a step itself draws t and ε)
            assert torch.equal(before, after), f"the global RNG moved between {kind} and {next_kind} at step {step}"


def test_train_loader_resumed_mid_epoch_gives_the_same_batches_and_flips(tmp_path):
    """The loader's state_dict as Lightning saves it; a fresh loader with a worker and another global seed."""
    write_cifar(tmp_path, np.stack([cifar_pattern(i) for i in range(46)]), n_test=6)  # 40 train: 5 batches
    loader = lambda workers: build(CIFAR10DataConfig, root=str(tmp_path), batch_size=8,  # noqa: E731
                                   num_workers=workers, seed=3).train_dataloader()
    uninterrupted = loader(0)
    epochs = [torch.cat(first_epoch(uninterrupted)) for _ in range(3)]
    interrupted = loader(0)
    first_epoch(interrupted)
    batches = iter(interrupted)
    next(batches), next(batches)
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches": 2}
    torch.manual_seed(12345)  # the order and the flips do not come from the global RNG
    resumed = loader(1)
    resumed.load_state_dict(state)
    assert torch.equal(torch.cat(first_epoch(resumed)), epochs[1][16:])  # the rest of epoch 1, flips included
    assert torch.equal(torch.cat(first_epoch(resumed)), epochs[2])  # then epoch 2 from its start
    originals = to_model_range(torch.from_numpy(np.stack([cifar_pattern(i) for i in range(40)])))
    flipped = sum(not (x == originals).flatten(1).all(1).any() for x in epochs[0])
    assert 5 <= flipped <= 35  # Binomial(40, 1/2): flips happen, and not always


def test_epoch_sampler_shards_ranks_and_skips_what_a_rank_has_seen():
    dataset = range(103)
    ranks = [EpochSampler(dataset, seed=1, random_flip=True, num_replicas=2, rank=r) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(4)
    draws = [list(sampler) for sampler in ranks]
    assert len(draws[0]) == len(draws[1]) == len(ranks[0]) == 51  # the remainder (1 image) is dropped
    indices = [i for i, _ in draws[0] + draws[1]]
    assert len(set(indices)) == 102  # disjoint shares, each image at most once
    ranks[1].start = 20
    assert list(ranks[1]) == draws[1][20:]
    ranks[1].start, ranks[1].epoch = 0, 5
    assert list(ranks[1]) != draws[1]  # another epoch, another order


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_resume_mid_epoch_equals_the_uninterrupted_run(tmp_path):
    """Two CPU processes (gloo) through train.py: every rank's RNG state saved, each rank's share resumed; the
    weights, Adam's moments and every logged training loss (rank 0's W&B run) those of the uninterrupted run."""
    from helpers import run_script

    ddp = ["debug=fast", "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu",
           "data.batch_size=250", *RUN]  # 750 images a rank: 3 steps an epoch
    resume = f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}"
    last, losses = {}, {}
    for name, extra in [("full", [f"trainer.max_steps={N}"]), ("first", ["trainer.max_steps=4"]),
                        ("resumed", [f"trainer.max_steps={N}", resume])]:
        result = run_script("train.py", *ddp, *extra, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        last[name] = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
        losses[name] = {h["trainer/global_step"]: h["train/loss"] for h in wandb_history(tmp_path / name)
                        if "train/loss" in h}
    assert len(last["first"]["rng_states"]) == 2
    assert last["first"]["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 1}]
    assert len(losses["full"]) == N and len(losses["first"]) == 4
    assert {**losses["first"], **losses["resumed"]} == losses["full"]
    for p, state in last["full"]["optimizer_states"][0]["state"].items():  # step, exp_avg, exp_avg_sq
        assert_same_tensors(state, last["resumed"]["optimizer_states"][0]["state"][p], f"Adam state of parameter {p}")
    assert_same_tensors(last["full"]["state_dict"], last["resumed"]["state_dict"], "EMA weights")
    assert_same_tensors(last["full"]["current_model_state"], last["resumed"]["current_model_state"], "raw weights")
