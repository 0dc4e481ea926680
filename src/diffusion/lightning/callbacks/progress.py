"""A progress bar over the run's optimizer steps (step 350/1200, with its ETA), not over epochs.

Lightning's TQDM bar counts the batches of each epoch and names the epoch out of max_epochs, which for a run
budgeted in steps (max_epochs=-1) reads "Epoch 36/-2". Runs here are budgeted in steps, so one bar goes
from the step the run starts at (a resumed run: its checkpoint's) to max_steps; validation keeps its own bar.
The loss beside it is read (a host-device sync) at the logging cadence, trainer.log_every_n_steps, not every step.
The step count is redrawn at most every REDRAW_S seconds (tqdm's mininterval), and whenever the loss changes: each
redraw is a write to the terminal, which W&B's console capture also copies to its service.
"""

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

REDRAW_S = 0.5  # tqdm's default 0.1 s is every step of a run at up to 10 steps/s


class StepProgressBar(TQDMProgressBar):
    """`train 350/1200 [00:41<01:58, 7.2 step/s, loss=0.0312]`: the bar a step-budgeted run needs."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.initial = trainer.global_step
        self.train_progress_bar.unit = "step"
        self.train_progress_bar.set_description("train")
        self.train_progress_bar.mininterval = REDRAW_S

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        """One bar for the whole run: nothing restarts at an epoch."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and self._should_update(step, bar.total):
            bar.update(step - bar.n)  # tqdm redraws once mininterval has passed (Lightning's _update_n: always)
            if step % trainer.log_every_n_steps == 0 or step == bar.total:  # reading the loss syncs the device
                bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """The logged progress-bar metrics and the training loss, without Lightning's version number ("v_num")."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        loss = trainer.callback_metrics.get("train/loss")  # not prog_bar: see DiffusionModule.training_step
        if loss is not None and trainer.training:
            metrics["train/loss"] = float(loss)
        return metrics
