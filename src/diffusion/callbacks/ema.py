"""EMA of the network's weights through Lightning's EMAWeightAveraging, with a warm-up of the decay."""

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import Tensor


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

    def __init__(self, decay: float = 0.9999, warmup: bool = True):
        super().__init__(decay=decay, use_buffers=False)
        self.decay, self.warmup = decay, warmup
        self._kwargs["avg_fn"] = ema_warmup_avg_fn(decay, warmup)

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
