"""Every rank's global random state in checkpoints, so a resumed run draws the noise the uninterrupted one would.

Lightning saves no RNG state. The training step draws t and ε from torch's global RNG (and dropout does), so
without it a resumed run repeats the noise of the seed instead of continuing it.
"""

import random

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn


def get_rng_state() -> dict:
    """This process's global random state: torch CPU, CUDA (every device), numpy, Python's `random`.

    Tensors, numbers and strings only, so checkpoints still load with torch.load(weights_only=True).
    """
    numpy = np.random.get_state(legacy=False)  # {"bit_generator", "state": {"key", "pos"}, "has_gauss", "gauss"}
    numpy["state"] = {"key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)), "pos": numpy["state"]["pos"]}
    return {"torch": torch.get_rng_state(), "numpy": numpy, "python": random.getstate(),
            "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    """Restore what `get_rng_state` returned (CUDA devices beyond those saved or present are left alone)."""
    torch.set_rng_state(state["torch"])
    numpy = dict(state["numpy"])
    numpy["state"] = {"key": state["numpy"]["state"]["key"].numpy().astype(np.uint32),
                      "pos": state["numpy"]["state"]["pos"]}
    np.random.set_state(numpy)
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if torch.cuda.is_available():
        for device, cuda_state in enumerate(state["torch.cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


class RNGState(L.Callback):
    """Saves every rank's RNG state in the checkpoint (`rng_states`, a list by global rank); each rank restores its own.

    Saving gathers the states from all ranks (Lightning calls `save_checkpoint` on every rank, and only rank 0
    writes the file). The restore waits for the first training batch after resuming: Lightning runs
    `on_fit_start` hooks and may validate between loading and training, which the interrupted run did not.
    """

    def __init__(self):
        self._pending: dict | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        state = get_rng_state()
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if states is None:
            rank_zero_warn("the checkpoint holds no RNG state (saved without the RNGState callback); the resumed "
                           "run draws other noise than the uninterrupted one would have")
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(f"the checkpoint holds the RNG states of {len(states)} processes, this run has "
                           f"{trainer.world_size}; ranks without a saved state go on from the seed, so the resumed "
                           "run is not the uninterrupted one")
        self._pending = states[trainer.global_rank] if trainer.global_rank < len(states) else None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._pending is not None:
            set_rng_state(self._pending)
            self._pending = None
