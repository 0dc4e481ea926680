"""One training run per run directory: <run dir>/run.lock, taken before anything is written there.

The lock is a small JSON file: the holder's pid, host, process start time, start date and SLURM job id.
It appears whole or not at all (written aside, then hard-linked into place, which fails if a lock is there),
its holder refreshes its modification time every HEARTBEAT_S seconds, and removes it at exit: after the
run, an error, or Ctrl-C or SIGTERM during training (which it turns into a checkpoint and a clean exit).
`train.py` takes it in a Hydra callback when the run starts, before Hydra writes .hydra/ and its log
there; train() takes it too (the same lock, if held already), for multirun jobs and direct callers. A
second run into a directory whose lock is live stops in one line (exit 2), naming the holder and the fix.

A lock left behind (a run killed by SIGKILL, or by SIGTERM before training began; a machine that went down)
is replaced, with a note on stderr, when
- it is from this host and its pid is gone, or now belongs to a process started at another time;
- it is from another host and names this SLURM job: a requeued job (SLURM ends a job before restarting it,
  and the run directory is keyed on the job id, so the requeued job must resume there);
- it is from another host and was not refreshed for STALE_AFTER_S seconds (10 minutes).
Under DDP only global rank 0 takes it: the other ranks run the same job in the same directory.
"""

import atexit
import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from diffusion.errors import UserError
from diffusion.lightning.callbacks.interrupt import slurm_job_id
from diffusion.run.jobs.console import fail

LOCK_NAME = "run.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
_held: dict[Path, dict] = {}  # run directory -> the record of the lock this process holds there
_guard = threading.Lock()
_heartbeat: list[threading.Thread] = []  # the one thread that refreshes them


def is_global_rank_zero() -> bool:
    """Whether this process is rank 0 of its job (or not a distributed process), from the launchers' variables."""
    return all(os.environ.get(key, "0") == "0" for key in RANK_VARIABLES)


def acquire(run_dir: str | Path) -> Path | None:
    """Take `run_dir`'s lock (kept if this process holds it already); None on ranks other than 0.

    Raises a one-line UserError while another live run holds it; replaces a stale one, with a note on stderr.
    """
    if not is_global_rank_zero():
        return None
    run_dir = Path(run_dir).resolve()
    path = run_dir / LOCK_NAME
    if run_dir in _held:
        return path
    run_dir.mkdir(parents=True, exist_ok=True)
    record = _record()
    for _ in range(5):  # another starter may take or drop a stale lock between two of these steps
        if _create(path, record):
            with _guard:
                _held[run_dir] = record
            _start_heartbeat()
            return path
        text = _read(path)
        if text is None:
            continue  # released meanwhile
        holder = _parse(text)
        why = stale_because(holder, path)
        if why is None:
            raise UserError(_in_use_message(run_dir, holder, path))
        print(f"note: replacing the lock of pid {holder.get('pid')} on {holder.get('host')} in {run_dir} ({why})",
              file=sys.stderr, flush=True)
        _remove_stale(path, text)
    raise UserError(f"could not take the lock {path}: other runs keep taking it; use another hydra.run.dir")


def release(run_dir: str | Path) -> None:
    """Remove `run_dir`'s lock if this process holds it (and the file is still its own).

    A forked child (a data-loader worker) inherits the parent's record but never releases the parent's lock.
    """
    run_dir = Path(run_dir).resolve()
    with _guard:
        record = _held.pop(run_dir, None)
    path = run_dir / LOCK_NAME
    if record is None or record["pid"] != os.getpid():
        return
    if _parse(_read(path) or "{}").get("token") == record["token"]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def hold(run_dir: str | Path):
    """The lock of `run_dir` for the duration of the block (train() runs inside one)."""
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)


def stale_because(holder: dict, path: Path) -> str | None:
    """Why the lock's holder can no longer be running, or None while it may be."""
    pid, host = holder.get("pid"), holder.get("host")
    if host == socket.gethostname() and isinstance(pid, int) and pid > 0:
        state = _process(pid)
        if state is None:
            return f"pid {pid} is no longer running"
        if holder.get("pid_start") and state[1] and holder["pid_start"] != state[1]:
            return f"pid {pid} now belongs to another process"
        return None
    job = slurm_job_id()
    if job is not None and holder.get("slurm_job_id") == job:
        return f"SLURM job {job} was requeued"
    age = time.time() - path.stat().st_mtime
    if age > STALE_AFTER_S:
        return f"not refreshed for {age / 60:.0f} minutes"
    return None


def _in_use_message(run_dir: Path, holder: dict, path: Path) -> str:
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
    message = (f"run directory {run_dir} is in use by another training run ({who}); use another hydra.run.dir, "
               "or wait until that run ends")
    if holder.get("host") != socket.gethostname():
        message += (f" (its host refreshes {path} every {HEARTBEAT_S:.0f} s; a lock left alone for "
                    f"{STALE_AFTER_S / 60:.0f} minutes is replaced; if that run is gone, delete {path})")
    return message


def _record() -> dict:
    state = _process(os.getpid())
    return {"pid": os.getpid(), "host": socket.gethostname(), "pid_start": state[1] if state else None,
            "started": datetime.now().astimezone().isoformat(timespec="seconds"), "slurm_job_id": slurm_job_id(),
            "token": uuid.uuid4().hex}


def _process(pid: int) -> tuple[str, str | None] | None:
    """(state, start time in clock ticks since boot) of a running pid, None if it is gone or a zombie.

    The start time (Linux /proc/<pid>/stat, field 22) tells a pid reused by a later process apart.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # another user's process: alive
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return "?", None  # no /proc (macOS): alive, start unknown
    return None if fields[0] == "Z" else (fields[0], fields[19])


def _create(path: Path, record: dict) -> bool:
    """Create the lock with this record unless one exists: written aside, then hard-linked into place."""
    tmp = path.with_name(f".{path.name}.{record['token']}")
    tmp.write_text(json.dumps(record) + "\n")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: an exclusive create instead
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record) + "\n")
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _parse(text: str) -> dict:
    with contextlib.suppress(ValueError):
        record = json.loads(text)
        if isinstance(record, dict):
            return record
    return {}  # unreadable: judged by its age alone


def _remove_stale(path: Path, seen: str) -> None:
    """Move the stale lock aside and delete it, unless another starter replaced it meanwhile (then put it back)."""
    aside = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if aside.read_text() != seen:  # a live lock, taken after we read the stale one
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    aside.unlink()


def refresh_held() -> None:
    """Touch every lock this process holds: its modification time says the holder is alive."""
    with _guard:
        held = list(_held)
    for run_dir in held:
        with contextlib.suppress(OSError):  # a passing hiccup of the filesystem: the next beat retries
            os.utime(run_dir / LOCK_NAME)


def _refresh_forever() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        refresh_held()


def _start_heartbeat() -> None:
    """One daemon thread per process refreshes every held lock; held locks are released at exit."""
    if not _heartbeat:
        _heartbeat.append(threading.Thread(target=_refresh_forever, name="run-lock-heartbeat", daemon=True))
        _heartbeat[0].start()
        atexit.register(lambda: [release(run_dir) for run_dir in list(_held)])


class RunLockCallback(Callback):
    """Hydra callback (conf/hydra/default.yaml): the run directory's lock before Hydra writes anything there."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:
            HydraConfig.instance().set_config(config)  # for ${hydra:...} in hydra.run.dir, as run_job does next
            run_dir = OmegaConf.select(config, "hydra.run.dir", throw_on_missing=True)
        except Exception:  # an unusual hydra.run.dir: train() takes the lock instead, a moment later
            return
        self._acquire(run_dir)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        self._acquire(config.hydra.runtime.output_dir)  # a multirun job (kept if on_run_start took it)

    def on_job_end(self, config: DictConfig, **kwargs) -> None:
        release(config.hydra.runtime.output_dir)

    @staticmethod
    def _acquire(run_dir: str) -> None:
        try:
            acquire(run_dir)
        except UserError as err:
            fail(str(err))
