"""EMA of the network's weights through Lightning's EMAWeightAveraging, with a warm-up of the decay.

The update is one foreach lerp over all parameters (`ema_update_`), with the decay computed on the host from
a Python count of updates: torch's AveragedModel would read its device-side count (`n_averaged == 0`, and
`float(num_averaged)` for every tensor in a warm-up avg_fn), a host-device sync each step.
"""

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import Tensor


def ema_decay(decay: float, warmup: bool, num_averaged: int) -> float:
    """The decay of update number num_averaged + 1: min(decay, (1 + n) / (10 + n)) with warm-up, else decay."""
    return min(decay, (1.0 + num_averaged) / (10.0 + num_averaged)) if warmup else decay


@torch.no_grad()
def ema_update_(averaged: list[Tensor], current: list[Tensor], decay: float) -> None:
    """averaged <- decay * averaged + (1 - decay) * current, one foreach op over all tensors."""
    torch._foreach_lerp_(averaged, current, 1.0 - decay)


def ema_warmup_avg_fn(decay: float, warmup: bool):
    """avg_fn for torch's AveragedModel: decay_n = min(decay, (1 + n) / (10 + n)) with warm-up, else decay.

    With 0.9999 and no warm-up the average is mostly the random init for the first ~10k steps; the warm-up
    (as in TensorFlow's ExponentialMovingAverage with num_updates) follows the weights closely early on.
    """

    @torch.no_grad()
    def avg_fn(averaged: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
        d = min(decay, (1.0 + float(num_averaged)) / (10.0 + float(num_averaged))) if warmup else decay
        return averaged.lerp(current, 1.0 - d)

    return avg_fn


class EMA(EMAWeightAveraging):
    """Lightning's EMA callback over parameters only: schedule buffers are never averaged.

    EMAWeightAveraging fixes its avg_fn to a constant decay, so the warm-up fn replaces it after init.
    Checkpoints keep the EMA weights in `state_dict` (what load_from_checkpoint returns) and the raw
    ones in `current_model_state`; validation and the end of training use the EMA weights.
    """

    def __init__(self, *, decay: float, warmup: bool):
        super().__init__(decay=decay, use_buffers=False)
        self.decay, self.warmup = decay, warmup
        self._kwargs["avg_fn"] = ema_warmup_avg_fn(decay, warmup)  # what AveragedModel would use elsewhere
        self._num_averaged: int | None = None
        self._pairs: tuple[list[Tensor], list[Tensor]] | None = None  # (averaged, current) parameters, per fit

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        """WeightAveraging's update, as one foreach op with a host-side count (no host-device sync)."""
        if trainer.global_step <= self._latest_update_step or not self.should_update(step_idx=trainer.global_step - 1):
            return
        averaged_model = self._average_model
        if self._num_averaged is None:  # the count restored with the averages: read once per fit
            self._num_averaged = int(averaged_model.n_averaged)
        if self._pairs is None:  # the same tensors all through a fit (swaps and restores copy weights in place); the
            # average lives on the module's device (EMAWeightAveraging's device=None)
            self._pairs = ([p.detach() for p in averaged_model.parameters()],
                           [p.detach() for p in pl_module.parameters()])
        averaged, current = self._pairs
        if self._num_averaged == 0:
            torch._foreach_copy_(averaged, current)
        else:
            ema_update_(averaged, current, ema_decay(self.decay, self.warmup, self._num_averaged))
        averaged_model.n_averaged.add_(1)  # the device-side count stays what AveragedModel's would be (checkpoints)
        self._num_averaged += 1
        self._latest_update_step = trainer.global_step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._num_averaged, self._pairs = None, None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        self._num_averaged = None  # read again from the restored n_averaged

    def averaged_module(self) -> L.LightningModule | None:
        """The EMA copy of the LightningModule (None before fit starts)."""
        return None if self._average_model is None else self._average_model.module


def averaged_net(trainer: L.Trainer) -> torch.nn.Module | None:
    """The EMA copy of the network when an EMA callback runs and fit has started, else None.

    Through fit and after it the copy holds the average (at the end EMA also copies it into the module).
    """
    ema = next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)
    averaged = ema.averaged_module() if ema is not None else None
    return None if averaged is None else averaged.net
