"""A signal wherever it lands, then a resume: bit for bit the uninterrupted run, W&B step numbers included.

One run of N steps against a chain of runs, each stopped by a signal that a test callback sends to its own
process from a chosen hook, and resumed from the last.ckpt the stop wrote. Digits at batch size 250 make 6
steps an epoch and 2 validation batches; validation every 2 steps, a checkpoint every step.
"""

import signal
from pathlib import Path

import pytest
import torch

from diffusion.errors import Interrupted
from diffusion.run.commands.train import train
from helpers import SignalAt, train_cfg, wandb_history

N = 10
RUN = ["data.batch_size=250", "model.ch=16", "model.dropout=0.1", "trainer.val_check_interval=2",
       "trainer.limit_val_batches=null", "trainer.deterministic=true", "callbacks.samples=null",
       "callbacks.checkpoint.every_n_train_steps=1", "callbacks.checkpoint.save_top_k=-1", f"trainer.max_steps={N}"]
# (signal, the hook that sends it, the global step there, the step after which the run stops)
CHAIN = [
    (signal.SIGTERM, "on_train_batch_start", 1, 2),  # in step 2: stops after it and its validation
    (signal.SIGINT, "on_validation_end", 4, 5),  # right after a validation: stops after the next step
    (signal.SIGUSR2, "on_save_checkpoint", 6, 6),  # in the checkpoint write of the epoch's last step
    (signal.SIGTERM, "on_validation_batch_end", 8, 8),  # between the two batches of a validation
]


def history(run_dir: Path) -> dict[tuple[int, str], float]:
    """Every number a W&B run logged, keyed by (trainer/global_step, name); wall-clock fields left out."""
    logged = {}
    for row in wandb_history(run_dir):
        step = row["trainer/global_step"]
        for key, value in row.items():
            if isinstance(value, int | float) and not key.startswith("_") and key != "trainer/global_step":
                assert logged.get((step, key), value) == value, f"{key} logged twice at step {step}, differently"
                logged[(step, key)] = value
    return logged


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same_state(got: dict, want: dict, what: str) -> None:
    """Weights, EMA, Adam, RNG, step counters and the loader's position, bit for bit."""
    assert got["global_step"] == want["global_step"], what
    for key in ("state_dict", "current_model_state"):  # EMA, raw
        assert got[key].keys() == want[key].keys()
        differ = [k for k in want[key] if not torch.equal(got[key][k], want[key][k])]
        assert not differ, f"{what}: {key} differs in {differ[:3]}"
    got_adam, want_adam = got["optimizer_states"][0]["state"], want["optimizer_states"][0]["state"]
    for p in want_adam:
        for name, value in want_adam[p].items():
            assert torch.equal(got_adam[p][name], value), f"{what}: Adam {name} of parameter {p}"
    assert torch.equal(got["rng_states"][0]["torch"], want["rng_states"][0]["torch"]), what
    got_loop, want_loop = got["loops"]["fit_loop"], want["loops"]["fit_loop"]
    # The loggers' step counter: what W&B's trainer/global_step of the next logged row will be.
    assert got_loop["epoch_loop.state_dict"] == want_loop["epoch_loop.state_dict"], what
    assert got_loop["state_dict"]["combined_loader"] == want_loop["state_dict"]["combined_loader"], what


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    train(train_cfg(out, *RUN))
    return out


@pytest.mark.slow
def test_a_signal_anywhere_resumes_bit_for_bit(uninterrupted, tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # SIGUSR2 outside SLURM: stop, nothing requeued
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    runs, resume = [], []
    for i, (signum, hook, at, stops_after) in enumerate(CHAIN):
        out = tmp_path / f"{i}_{signum.name}_{hook}"
        with pytest.raises(Interrupted) as stopped:
            train(train_cfg(out, *RUN, *resume), extra_callbacks=(SignalAt(signum, hook, at),))
        ckpt = out / "checkpoints" / "last.ckpt"
        assert stopped.value.exit_code == 128 + signum and stopped.value.checkpoint == str(ckpt)
        assert str(stopped.value).startswith(f"stopped by {signum.name} at step {stops_after}; "), stopped.value
        # The stop's checkpoint is the uninterrupted run's at that step, and resumes as it would.
        assert_same_state(load(ckpt), load(uninterrupted / "checkpoints" / f"step{stops_after:07d}.ckpt"),
                          f"stop {i} ({signum.name} in {hook})")
        runs.append(out)
        resume = [f"ckpt_path={ckpt}"]
    last = tmp_path / "last"
    train(train_cfg(last, *RUN, *resume))
    runs.append(last)
    final, full = load(last / "checkpoints" / "last.ckpt"), load(uninterrupted / "checkpoints" / "last.ckpt")
    assert_same_state(final, full, "the end")
    for got, want in zip(final["train_loss_by_t"], full["train_loss_by_t"], strict=True):
        assert all(torch.equal(got[k], want[k]) for k in want)
    # W&B: every number at every step (train and val losses, bits/dim, loss by t, learning rate), once.
    want = history(uninterrupted)
    got = {}
    for out in runs:
        for key, value in history(out).items():
            assert got.get(key, value) == value, f"{key} logged by two runs, differently"
            got[key] = value
    assert sorted(got) == sorted(want)
    differ = [(k, got[k], want[k]) for k in want if got[k] != want[k]]
    assert not differ, differ[:5]
    assert {k for k in want if k[1] == "val/loss"} == {(s, "val/loss") for s in range(1, N, 2)}
