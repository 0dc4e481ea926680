"""Ctrl-C, SIGTERM and SLURM's pre-timeout signal: stop at the next step boundary, save a checkpoint, and
say how to resume (for SLURM's signal: requeue the job, which resumes by itself).

Lightning turns SIGTERM into a SIGTERMException between two training steps (its signal connector), when
the weights, optimizer and EMA are consistent. Ctrl-C would otherwise raise KeyboardInterrupt anywhere,
even half-way through an optimizer step, so SIGINT is re-sent as SIGTERM and takes the same path.

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
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffusion.errors import Interrupted, UserError


def default_requeue_signal() -> str:
    """The signal submitit's SLURM jobs are sent before their time limit: SIG + $SUBMITIT_PREEMPT_SIGNAL or USR2."""
    return "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").removeprefix("SIG")


def slurm_job_id() -> str | None:
    """The id that `scontrol requeue` takes: <array job>_<task> for an array task, else SLURM_JOB_ID."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


class GracefulInterrupt(L.Callback):
    """On SIGINT/SIGTERM/requeue_signal during fit: checkpoint to <checkpoints>/last.ckpt, then raise Interrupted.

    Exit codes: 130 (SIGINT), 143 (SIGTERM), 128 + requeue_signal (140 for SIGUSR2), or the code with which
    the previous handler of requeue_signal exits (submitit: 255 on SLURM, 144 locally, which requeue).
    """

    def __init__(self, requeue_signal: str | None = None):
        name = requeue_signal or default_requeue_signal()
        if name not in signal.Signals.__members__ or name in ("SIGINT", "SIGTERM", "SIGKILL", "SIGSTOP"):
            raise UserError(f"the requeue signal must be a catchable signal other than SIGINT/SIGTERM, got {name!r}; "
                            "use SIGUSR2 (submitit's default: unset SUBMITIT_PREEMPT_SIGNAL) or SIGUSR1")
        self.requeue_signal = signal.Signals[name]
        self.signal_name = "SIGTERM"
        self._previous: dict[signal.Signals, object] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signal_name = "SIGTERM"
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may install handlers (Lightning's connector skips them there too)
        for signum in (signal.SIGINT, self.requeue_signal):
            self._previous[signum] = signal.signal(signum, self._as_sigterm)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save the final step to last.ckpt when max_steps is not a multiple of the checkpoint interval.

        Runs before EMA's on_train_end (this callback comes first), so raw and EMA weights are both saved.
        """
        callback = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        if callback is not None and getattr(callback, "_last_global_step_saved", None) != trainer.global_step:
            trainer.save_checkpoint(self.checkpoint_path(trainer), weights_only=False)

    def _restore(self) -> dict:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        return previous

    def _as_sigterm(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        os.kill(os.getpid(), signal.SIGTERM)

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        callback = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        if callback is not None and callback.dirpath:
            return Path(callback.dirpath) / "last.ckpt"
        return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        previous = self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # between steps: weights, optimizer and EMA agree
        message = f"stopped by {self.signal_name} at step {trainer.global_step}; checkpoint saved to {path}"
        signum = signal.Signals[self.signal_name]
        if signum == self.requeue_signal:
            message, code = self._requeue(trainer, message, previous.get(signum))
        else:
            code = 128 + signum
        raise Interrupted(message, int(code), str(path)) from exception

    def _requeue(self, trainer: L.Trainer, message: str, previous) -> tuple[str, int]:
        """Hand over to the signal's previous handler (submitit's requeues and exits), else `scontrol requeue`."""
        code = 128 + self.requeue_signal
        if isinstance(getattr(previous, "__self__", None), GracefulInterrupt):
            previous = None  # left behind by an earlier fit of this process that failed: not a requeue handler
        if callable(previous):
            name = getattr(previous, "__qualname__", repr(previous))
            print(f"{message}; calling the previous {self.signal_name} handler ({name}) to requeue", file=sys.stderr,
                  flush=True)
            try:
                previous(self.requeue_signal, None)
            except SystemExit as done:  # submitit: requeued, now exits (its local executor restarts on 144)
                code = done.code if isinstance(done.code, int) else 1
                return f"{message}; requeued by the previous {self.signal_name} handler (exit {code})", code
            return f"{message}; the previous {self.signal_name} handler returned (not rank 0, or no requeue)", code
        job_id = slurm_job_id()
        if job_id is None:
            return f"{message}; not a SLURM job, nothing requeued", code
        if not trainer.is_global_zero:
            return f"{message}; rank 0 requeues SLURM job {job_id}", code
        try:
            done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
            failure = None if done.returncode == 0 else f"exit {done.returncode}: {' '.join(done.stderr.split())}"
        except (OSError, subprocess.TimeoutExpired) as err:
            failure = str(err)
        if failure is not None:
            return f"{message}; `scontrol requeue {job_id}` failed ({failure}), resubmit the job", code
        return f"{message}; requeued SLURM job {job_id} (scontrol requeue), it resumes from this checkpoint", code
