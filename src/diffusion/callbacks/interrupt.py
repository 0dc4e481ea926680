"""Ctrl-C and SIGTERM: stop at the next step boundary, save a checkpoint, and say how to resume.

Lightning turns SIGTERM into a SIGTERMException between two training steps (its signal connector), when
the weights, optimizer and EMA are consistent. Ctrl-C would otherwise raise KeyboardInterrupt anywhere,
even half-way through an optimizer step, so SIGINT is re-sent as SIGTERM and takes the same path.
"""

import os
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffusion.errors import Interrupted


class GracefulInterrupt(L.Callback):
    """On SIGINT/SIGTERM during fit: checkpoint to <checkpoints>/last.ckpt, then raise Interrupted."""

    def __init__(self):
        self.signal_name = "SIGTERM"
        self._previous = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._previous = signal.signal(signal.SIGINT, self._sigint_as_sigterm)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save the final step to last.ckpt when max_steps is not a multiple of the checkpoint interval.

        Runs before EMA's on_train_end (this callback comes first), so raw and EMA weights are both saved.
        """
        callback = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        if callback is not None and getattr(callback, "_last_global_step_saved", None) != trainer.global_step:
            trainer.save_checkpoint(self.checkpoint_path(trainer))

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _sigint_as_sigterm(self, signum, frame) -> None:
        self.signal_name = "SIGINT"
        os.kill(os.getpid(), signal.SIGTERM)

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        callback = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        if callback is not None and callback.dirpath:
            return Path(callback.dirpath) / "last.ckpt"
        return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # between steps: weights, optimizer and EMA agree
        code = 128 + (signal.SIGINT if self.signal_name == "SIGINT" else signal.SIGTERM)
        raise Interrupted(f"stopped by {self.signal_name} at step {trainer.global_step}; checkpoint saved to {path}",
                          int(code), str(path)) from exception
