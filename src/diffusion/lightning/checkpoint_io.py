"""Checkpoints that are never half-written.

`AtomicCheckpointIO` writes each checkpoint to a temporary file beside its destination, fsyncs it and
renames it onto the final name: a full disk or a crash leaves the previous checkpoint there whole.
(Lightning's own writer stages the file in the system temp directory, which may lie on another disk,
and then copies it under the final name, so a copy that fails part-way leaves a truncated checkpoint.)

`BackgroundCheckpointIO` runs those writes in a thread (training.async_checkpoints=true), so that a step
waits for a copy of the checkpoint's tensors only, not for the file system. It is Lightning's
AsyncCheckpointIO, which (since lightning 2.5.4, PR #21079) clones every tensor on the caller's thread
before handing the checkpoint to its writer: the next optimizer step, which changes the weights in place,
cannot reach the file being written. Added here: removals wait behind the writes queued before them (a
checkpoint is never removed before a newer one is whole), at most two writes wait at a time (each holds a
copy of the checkpoint), and `wait()`, which a signal's save calls before the process says it is saved.
"""

import contextlib
import errno
import os
import uuid
from collections import deque
from concurrent.futures import Future
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

from diffusion.errors import UserError
from diffusion.files import FIXES, fsync_dir, write_durably


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file in the destination's directory, fsync, then os.replace onto it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote stores: fsspec's own way
        path = Path(path)
        buffer = BytesIO()
        torch.save(checkpoint, buffer)  # serialize first: a pickling bug is not a disk problem
        existed = path.is_file()
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_durably(tmp, buffer.getbuffer())
            os.replace(tmp, path)
        except OSError as err:
            with contextlib.suppress(OSError):  # the write error below is the one to report
                tmp.unlink()
            raise UserError(_write_error(path, err, existed)) from err
        _fsync_dir(path)


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """AtomicCheckpointIO's writes in one background thread, in the order they were asked for."""

    max_pending = 2  # writes queued or running; a third save waits for the oldest (memory: one copy each)

    def __init__(self):
        super().__init__(AtomicCheckpointIO())
        self._pending: deque[Future] = deque()

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        while len(self._pending) >= self.max_pending:
            self._pending.popleft().result()
        super().save_checkpoint(*args, **kwargs)  # clones the tensors here, then queues the write
        self._pending.append(self._executor.submit(lambda: None))  # done when that write is

    def remove_checkpoint(self, path) -> None:
        self._ensure_setup()
        self._executor.submit(self._remove, path)

    def _remove(self, path) -> None:
        try:
            self.checkpoint_io.remove_checkpoint(path)
        except BaseException as err:  # raised on the caller's thread at the next save, wait or teardown
            self._error = err

    def wait(self) -> None:
        """Return once every write and removal asked for so far is done; raise the first one's error."""
        if self._executor is not None:
            self._executor.submit(lambda: None).result()
        self._pending.clear()
        if self._error:
            raise self._error

    def teardown(self) -> None:
        self._pending.clear()
        super().teardown()


def wait_for_checkpoints(trainer) -> None:
    """Block until the trainer's checkpoints asked for so far are on disk (a no-op for synchronous writes)."""
    if isinstance(trainer.strategy.checkpoint_io, BackgroundCheckpointIO):
        trainer.strategy.checkpoint_io.wait()


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable; filesystems that cannot fsync a directory are let be."""
    try:
        fsync_dir(path)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise UserError(f"checkpoint {path} was written but its directory could not be synced ({err.strerror}); "
                            f"check that disk, then resume with ckpt_path={path}") from err


def _write_error(path: Path, err: OSError, existed: bool) -> str:
    """One line: the path, the OS error, what is left on disk, and how to go on."""
    fix = FIXES.get(err.errno, "check that disk")
    last = path.parent / "last.ckpt"
    resume = path if existed else (last if last.is_file() else None)
    state = "the previous checkpoint there is intact" if existed else "no partial file was left"
    go_on = f"resume with ckpt_path={resume}" if resume is not None else "start again"
    return (f"could not write checkpoint {path} ({err.strerror or err}); {state}; {fix}, or set "
            f"callbacks.checkpoint.dirpath=<a directory with room> and {go_on}")
