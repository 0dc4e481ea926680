"""How a job ends: its status.json written, a user's mistake as one line and exit 2, a signal as the command
that resumes it, and under -m a sweep that goes on past a failed job and ends with a summary (exit 1)."""

import json
import sys
from collections.abc import Callable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from diffusion.errors import Interrupted, UserError
from diffusion.run.jobs.console import fail, full_errors
from diffusion.run.jobs.status import FILENAME, JobStatus, check_same_job, finished_before
from diffusion.run.jobs.stopping import INTACT, stop_on_signals


def guarded(fn: Callable[[DictConfig], object], cfg: DictConfig,
            finished: Callable[[DictConfig, dict], object] | None = None):
    """Run fn(cfg); a UserError becomes one line on stderr and exit status 2 (HYDRA_FULL_ERROR=1: traceback).

    The job's status.json (diffusion.run.jobs.status) records how it ended. Under -m a failed job does not stop
    the sweep: its line is printed, the next job runs, and the sweep ends with a summary of the failed jobs and
    exit status 1 (SweepSummary). SIGINT or SIGTERM ends it in one line with 128 + the signal (run/jobs/stopping.py).
    A sweep run again into the same hydra.sweep.dir (after its -m process died) skips the jobs whose status.json
    says finished, answering `finished(cfg, status)` (what fn returned, for a sweeper); the others run again, and a
    training job resumes from its own last.ckpt (run.commands.train). A job folder whose status.json records other
    overrides than the job's stops the sweep in one line (exit 2) before anything in it is touched."""
    if _in_multirun():
        try:
            check_same_job()
        except UserError as err:  # the whole sweep stops: every later job's folder is in the same doubt
            fail(str(err))
    done = finished_before() if _in_multirun() else None
    if done is not None:
        path, state = done
        print(f"job {HydraConfig.get().job.num}: finished before ({path}: step {state.get('step')}, "
              f"{state.get('wall_seconds')} s), skipped; remove that file to run it again", flush=True)
        return None if finished is None else finished(cfg, state)
    status = JobStatus()
    try:
        with stop_on_signals(lambda: INTACT):
            result = fn(cfg)
        status.finished()
        return result
    except Interrupted as err:
        if err.checkpoint is None:  # nothing to resume from (evaluate.py, figures.py, a stop before training)
            status.interrupted(err, None)
            print(f"error: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
        # The job's own overrides (under -m or submitit, sys.argv is the sweep's or submitit's command line)
        multirun = _in_multirun()
        task = list(HydraConfig.get().overrides.task) if multirun else sys.argv[1:]
        overrides = [a for a in task if not a.startswith("ckpt_path=")]
        script = Path(sys.argv[0]).name if sys.argv[0].endswith(".py") and "submitit" not in sys.argv[0] else "train.py"
        resume = f"python {script} {' '.join(overrides)} ckpt_path={err.checkpoint}"
        status.interrupted(err, resume)
        print(f"error: {err}; resume with: {resume}", file=sys.stderr)
        sys.exit(err.exit_code)
    except Exception as err:
        user_error = _user_error_in(err)
        status.failed(user_error or err)
        if user_error is None or full_errors():
            raise
        if not _in_multirun():
            fail(str(user_error))
        # One job of a sweep: say which and why, and let the sweep go on (SweepSummary ends it non-zero).
        job = HydraConfig.get().job
        print(f"error: job {job.num} ({job.override_dirname or 'no overrides'}) failed: {user_error}", file=sys.stderr,
              flush=True)
        return float("nan") if cfg.get("optimized_metric") else None  # Optuna records a NaN trial as failed


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class SweepSummary(Callback):
    """At the end of a sweep (-m): one line per failed job, read from the jobs' status.json files (so jobs that
    ran elsewhere, under submitit, count too), and a non-zero exit when any job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        failed = []
        for path in sorted(Path(config.hydra.sweep.dir).glob(f"*/{FILENAME}"), key=lambda p: _job_number(p.parent)):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if state.get("status") in ("failed", "running"):
                failed.append((path.parent.name, state.get("error") or "it stopped without a word (killed?)"))
        if not failed:
            return
        print(f"error: {len(failed)} job(s) of the sweep failed:", file=sys.stderr)
        for folder, message in failed:
            print(f"  {folder}: {message}", file=sys.stderr)
        sys.stderr.flush()
        sys.exit(1)


def _job_number(folder: Path) -> int:
    head = folder.name.split("_", 1)[0]
    return int(head) if head.isdigit() else sys.maxsize


def _user_error_in(err: BaseException | None) -> UserError | None:
    """The UserError itself or the one that caused it (hydra.utils.instantiate wraps what targets raise)."""
    while err is not None:
        if isinstance(err, UserError):
            return err
        err = err.__cause__
    return None
