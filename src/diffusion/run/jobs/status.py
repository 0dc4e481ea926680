"""status.json in each job's run directory: how the job ended and what it measured, for `report.py`.

`diffusion.run.jobs.guard.guarded` opens a `JobStatus` as a job starts (status "running": a job killed outright stays
so) and closes it as "finished", "failed" (the one-line error) or "interrupted" (the command that resumes it).
What the job measured reaches it through `record(...)`, which run.train and run.evaluate call:

    {"status": "finished", "error": null, "resume": null, "entry": "train", "wall_seconds": 41.2, "step": 1200,
     "metrics": {"train/loss": 0.031, "val/loss": 0.029, "val/bpd": 4.66, "val/fid": 0.19, ...},
     "quality": {"val/fid": 0.19, ...}, "quality_protocol_id": "645b2bbb", "quality_protocol": {...},
     "quality_extra": {"heun-9": {"quality": {"val/fid": 0.83, ...}, "quality_protocol": {...}}, ...},
     "weights": "ema", "started": "...", "updated": "..."}

Only rank 0 writes; a job requeued into the same directory adds the wall time of its interrupted attempts.
"""

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from lightning_utilities.core.rank_zero import (
    rank_zero_only,  # the rank Lightning sets (utils_rank_zero_only), without importing Lightning
)

from diffusion.errors import UserError
from diffusion.files import write_file

FILENAME = "status.json"
_recorded: dict[str, Any] = {}  # what the running job measured (one job at a time, also under -m)


def record(**fields: Any) -> None:
    """Remember what this job measured: step, metrics (floats by name), quality (the sample-quality scores among
    them), quality_protocol and quality_protocol_id (their protocol and its id), quality_extra (each extra
    sampler's scores and protocol, by its tag), weights. (This module imports neither Lightning nor the metrics:
    every entry point imports it before it has checked its command line.)"""
    _recorded.update(fields)


class JobStatus:
    """The status file of the job Hydra is running (nothing is written outside a Hydra job, or off rank 0)."""

    def __init__(self):
        _recorded.clear()
        self.began, self.started = time.monotonic(), datetime.now().astimezone().isoformat(timespec="seconds")
        self.path, self.entry, self.overrides = None, None, None
        if HydraConfig.initialized() and rank_zero_only.rank == 0:
            hydra = HydraConfig.get()
            self.path, self.entry = Path(hydra.runtime.output_dir) / FILENAME, hydra.job.config_name
            self.overrides = job_overrides()
        before = read_status(self.path.parent) if self.path else None
        self.earlier = before["wall_seconds"] if before and before.get("status") == "interrupted" else 0.0
        self._write("running")

    def finished(self) -> None:
        self._write("finished")

    def failed(self, err: BaseException) -> None:
        self._write("failed", error=one_line(err), best_effort=True)

    def interrupted(self, err: BaseException, resume: str) -> None:
        self._write("interrupted", error=one_line(err), resume=resume, best_effort=True)

    def _write(self, status: str, error: str | None = None, resume: str | None = None,
               best_effort: bool = False) -> None:
        """best_effort: a job that already failed (perhaps a full disk) keeps its own one-line error; a status.json
        that cannot be written then is left out (report.py shows such a job as running or unknown)."""
        if self.path is None:
            return
        state = {"status": status, "error": error, "resume": resume, "entry": self.entry, "overrides": self.overrides,
                 "wall_seconds": round(self.earlier + time.monotonic() - self.began, 3), "step": None,
                 "metrics": {}, "quality": {}, "quality_protocol_id": None, "quality_protocol": None, **_recorded,
                 "started": self.started, "updated": datetime.now().astimezone().isoformat(timespec="seconds")}
        try:
            write_file(self.path, json.dumps(state, indent=2, default=str))
        except UserError:
            if not best_effort:
                raise


def finished_before() -> tuple[Path, dict] | None:
    """The status file of the job Hydra is running and its content, if it says the job finished (a sweep run
    again into its folder); None otherwise, outside a Hydra job, or off rank 0."""
    if not HydraConfig.initialized() or rank_zero_only.rank != 0:
        return None
    folder = Path(HydraConfig.get().runtime.output_dir)
    state = read_status(folder)
    return (folder / FILENAME, state) if state and state.get("status") == "finished" else None


def job_overrides() -> list[str]:
    """The job's own command-line overrides (under -m, the sweep's choice for this job), ckpt_path left out."""
    return [o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path=")]


def check_same_job() -> None:
    """Under -m, a job folder that holds a job with other overrides (a sweep run again with another command, or an
    unseeded sampler proposing other trials) is refused: its status and checkpoints are another job's."""
    if not HydraConfig.initialized() or rank_zero_only.rank != 0:
        return
    folder = Path(HydraConfig.get().runtime.output_dir)
    before = (read_status(folder) or {}).get("overrides")
    if before is None or sorted(before) == sorted(job_overrides()):  # a sweeper may list them in another order
        return
    hydra = HydraConfig.get()
    raise UserError(f"job {hydra.job.num}'s folder {folder} holds a job run with other overrides "
                    f"({' '.join(before) or 'none'}) than this one ({' '.join(job_overrides()) or 'none'}); a sweep "
                    "resumes only when run again with the same command (for Optuna with a seeded sampler, "
                    "hydra.sweeper.sampler.seed); use a new hydra.sweep.dir")


def one_line(err: BaseException) -> str:
    """A UserError's message as it is; anything else as 'Type: first line'."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return first if isinstance(err, UserError) else f"{type(err).__name__}: {first}".rstrip(": ")


def read_status(run_dir) -> dict | None:
    """A run directory's status.json, or None if it has none (or an unreadable one)."""
    path = Path(run_dir) / FILENAME
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None
