"""Ctrl-C, SIGTERM and SLURM's pre-timeout signal: stop after a whole optimizer step, save a checkpoint that
resumes bit for bit, and say how to resume (for SLURM's signal: requeue the job, which resumes by itself).

Where a signal lands is chance: in a training step, in a validation, in a checkpoint write, between the
micro-batches of an accumulated step. So the handler only notes it. At the end of the next optimizer step
(after that step's validation, when one follows) this callback tells Lightning, whose fit loop then raises a
SIGTERMException at its next check, the end of the step, when the weights, optimizer, EMA, RNG and loader
position are those of the same step. Lightning told at once would stop wherever it checks next, in the middle
of a validation too, where the EMA weights are swapped into the model. Under DDP the ranks agree at every
optimizer step (one all-reduce of a flag), so all of them stop after the same one.

Lightning resumes a checkpoint as the hook that saved it left the loops: one saved in on_train_batch_end goes
on with the next batch and skips the validation due at that step. The stop's checkpoint is saved after the
whole step (its logging and validation done, the logger's step counter advanced), which no hook is; it is
written as the one on_train_batch_end would have saved, so it resumes like it: the next batch comes next, and
W&B steps go on from where they were. (Saved as it is, a run stopped after a validation resumed with every
W&B step one too far.)

SLURM sends the requeue signal (`--signal=USR2@<s>`, as hydra/launcher=slurm asks; submitit's default,
also read from SUBMITIT_PREEMPT_SIGNAL) <s> seconds before the time limit, and on preemption. It takes the
same path, then requeues: through the handler installed before it (submitit's, which resubmits the job and
exits), else with `scontrol requeue $SLURM_JOB_ID`. The requeued job keeps its SLURM job id, hence its
run directory, and train() resumes from the last.ckpt it finds there.
"""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffusion.errors import Interrupted, UserError
from diffusion.lightning.checkpoint_io import wait_for_checkpoints


def default_requeue_signal() -> str:
    """The signal submitit's SLURM jobs are sent before their time limit: SIG + $SUBMITIT_PREEMPT_SIGNAL or USR2."""
    return "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").removeprefix("SIG")


def slurm_job_id() -> str | None:
    """The id that `scontrol requeue` takes: <array job>_<task> for an array task, else SLURM_JOB_ID."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


class GracefulInterrupt(L.Callback):
    """On SIGINT/SIGTERM/requeue_signal during fit: checkpoint to <checkpoints>/last.ckpt after a whole optimizer
    step, then raise Interrupted (see the module docstring).

    Exit codes: 130 (SIGINT), 143 (SIGTERM), 128 + requeue_signal (140 for SIGUSR2), or the code with which
    the previous handler of requeue_signal exits (submitit: 255 on SLURM, 144 locally, which requeue).
    """

    def __init__(self, requeue_signal: str | None = None):
        name = requeue_signal or default_requeue_signal()
        if name not in signal.Signals.__members__ or name in ("SIGINT", "SIGTERM", "SIGKILL", "SIGSTOP"):
            raise UserError(f"the requeue signal must be a catchable signal other than SIGINT/SIGTERM, got {name!r}; "
                            "use SIGUSR2 (submitit's default: unset SUBMITIT_PREEMPT_SIGNAL) or SIGUSR1")
        self.requeue_signal = signal.Signals[name]
        self.signal_name: str | None = None  # the first signal received during this fit
        self._previous: dict[signal.Signals, object] = {}
        self._step_at_batch_start = 0
        self._stopping = False  # the checkpoint being written is the stop's (see on_save_checkpoint)
        self._outside_fit = signal.SIG_DFL  # SIGTERM's handler before fit, given back after it

    # --- signals: noted by the handler, told to Lightning after a whole step ------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signal_name = None
        if threading.current_thread() is threading.main_thread():  # only there may handlers be installed
            for signum in (signal.SIGINT, self.requeue_signal):
                self._previous[signum] = signal.signal(signum, self._note)
            # Lightning calls the SIGTERM handler it finds installed besides its own: the entry point's (which ends
            # the process at once, run/jobs/stopping.py) must not run during fit, so Lightning finds the default.
            self._outside_fit = signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_sigterm()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_sigterm()

    def _take_sigterm(self) -> None:
        """SIGTERM from Lightning (which installs its handler after on_fit_start) to `_note`; Lightning's kept."""
        if threading.current_thread() is threading.main_thread() and signal.SIGTERM not in self._previous:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum, frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not _validates_after_this_batch(trainer):  # else on_validation_end decides, once it has validated
            self._stop_if_signalled(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._stop_if_signalled(trainer)

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        """After an optimizer step (not between accumulated micro-batches) and before the last one's end: if any
        rank got a signal, tell Lightning, which stops at the end of this step."""
        stepped = trainer.global_step > self._step_at_batch_start
        done = trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps  # training ends normally
        if stepped and not done and self._any_rank_signalled(trainer):
            handler = self._previous.get(signal.SIGTERM)  # Lightning's
            if callable(handler):
                handler(signal.SIGTERM, None)

    def _any_rank_signalled(self, trainer: L.Trainer) -> bool:
        """Whether a signal was noted on any rank (every rank calls this after every optimizer step)."""
        noted = self.signal_name is not None
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([float(noted)], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and not noted:
                self.signal_name, noted = "SIGTERM", True  # another rank's (Lightning forwards it as SIGTERM)
        return noted

    # --- the checkpoint ---------------------------------------------------------------------------------
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()
        if threading.current_thread() is threading.main_thread():  # after Lightning's teardown
            signal.signal(signal.SIGTERM, self._outside_fit)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Give SIGTERM back to Lightning (its teardown, next, restores what was there before fit), and save the
        final step to last.ckpt when max_steps is not a multiple of the checkpoint interval.

        Runs before EMA's on_train_end (this callback comes first), so raw and EMA weights are both saved.
        """
        self._restore(signal.SIGTERM)
        callback = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        if callback is not None and getattr(callback, "_last_global_step_saved", None) != trainer.global_step:
            trainer.save_checkpoint(self.checkpoint_path(trainer), weights_only=False)

    def _restore(self, *signums: signal.Signals) -> dict:
        """Reinstall the handlers replaced during fit (those of `signums`, default all); return them."""
        restored = {s: self._previous.pop(s) for s in (signums or list(self._previous)) if s in self._previous}
        for signum, handler in restored.items():
            signal.signal(signum, handler)
        return restored

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        callback = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        if callback is not None and callback.dirpath:
            return Path(callback.dirpath) / "last.ckpt"
        return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._stopping:
            as_saved_at_train_batch_end(checkpoint)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        previous = self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        name = self.signal_name or "SIGTERM"
        path = self.checkpoint_path(trainer)
        if trainer.training:  # after a whole step (see the module docstring): weights, optimizer and EMA agree
            self._stopping = True
            try:
                trainer.save_checkpoint(path, weights_only=False)
            finally:
                self._stopping = False
            wait_for_checkpoints(trainer)  # on disk before we say so, requeue, or exit
            message = f"stopped by {name} at step {trainer.global_step}; checkpoint saved to {path}"
        else:  # in a validation (Lightning heard of it on its own), its EMA weights swapped in: nothing to save
            message, path = (f"stopped by {name} in a validation at step {trainer.global_step}; nothing was saved, "
                             "the last checkpoint (if any) is unchanged"), None
        signum = signal.Signals[name]
        if signum == self.requeue_signal:
            message, code = self._requeue(trainer, message, previous.get(signum))
        else:
            code = 128 + signum
        raise Interrupted(message, int(code), None if path is None else str(path)) from exception

    def _requeue(self, trainer: L.Trainer, message: str, previous) -> tuple[str, int]:
        if isinstance(getattr(previous, "__self__", None), GracefulInterrupt):
            previous = None  # left behind by an earlier fit of this process that failed: not a requeue handler
        return requeue_job(self.requeue_signal, previous, message, trainer.is_global_zero)


def requeue_job(signum: signal.Signals, previous, message: str, rank_zero: bool = True,
                resumes: str = "this checkpoint") -> tuple[str, int]:
    """After the requeue signal `signum`: hand over to its previous handler (submitit's requeues and exits), else
    `scontrol requeue` this SLURM job (rank 0 only). (the line to print, the exit code)."""
    code, name = 128 + signum, signal.Signals(signum).name
    if callable(previous):
        qualname = getattr(previous, "__qualname__", repr(previous))
        print(f"{message}; calling the previous {name} handler ({qualname}) to requeue", file=sys.stderr, flush=True)
        try:
            previous(signum, None)
        except SystemExit as done:  # submitit: requeued, now exits (its local executor restarts on 144)
            code = done.code if isinstance(done.code, int) else 1
            return f"{message}; requeued by the previous {name} handler (exit {code})", code
        return f"{message}; the previous {name} handler returned (not rank 0, or no requeue)", code
    job_id = slurm_job_id()
    if job_id is None:
        return f"{message}; not a SLURM job, nothing requeued", code
    if not rank_zero:
        return f"{message}; rank 0 requeues SLURM job {job_id}", code
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        failure = None if done.returncode == 0 else f"exit {done.returncode}: {' '.join(done.stderr.split())}"
    except (OSError, subprocess.TimeoutExpired) as err:
        failure = str(err)
    if failure is not None:
        return f"{message}; `scontrol requeue {job_id}` failed ({failure}), resubmit the job", code
    return f"{message}; requeued SLURM job {job_id} (scontrol requeue), it resumes from {resumes}", code


def _validates_after_this_batch(trainer: L.Trainer) -> bool:
    """Lightning's own decision, asked in on_train_batch_end, whether it validates before the next batch."""
    loop = trainer.fit_loop
    try:
        return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))
    except (AttributeError, TypeError):  # another Lightning: stop now; on_exception refuses a mid-validation state
        return False


def as_saved_at_train_batch_end(checkpoint: dict) -> None:
    """Rewrite the loops' state of a checkpoint saved after a whole step as on_train_batch_end would have left it.

    After on_train_batch_end Lightning counts the batch completed and, after the step's validation, advances
    the loggers' step (`_batches_that_stepped`); resuming from on_train_batch_end it does both itself.
    """
    loop = checkpoint["loops"]["fit_loop"]
    for progress in ("total", "current"):
        loop["epoch_loop.batch_progress"][progress]["completed"] -= 1
    loop["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1
