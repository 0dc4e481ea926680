"""Checkpoints that are never half-written.

`AtomicCheckpointIO` writes each checkpoint to a temporary file beside its destination, fsyncs it and
renames it onto the final name: a full disk or a crash leaves the previous checkpoint there whole.
(Lightning's own writer stages the file in the system temp directory, which may lie on another disk,
and then copies it under the final name, so a copy that fails part-way leaves a truncated checkpoint.)

`BackgroundCheckpointIO` runs those writes in a thread (training.async_checkpoints=true), so that a step
does not wait for the file system. It is Lightning's AsyncCheckpointIO, which (since lightning 2.5.4,
PR #21079) clones every tensor on the caller's thread before handing the checkpoint to its writer, so that
the next optimizer step, which changes the weights in place, cannot reach the file being written. On a GPU
that clone is a device-to-device copy (milliseconds); in host memory it is the checkpoint's whole size,
seconds for the paper's CIFAR-10 model (0.86 GB). So the large host tensors (weights, EMA, Adam's moments)
are copied by the writer's thread instead, while the next step's forward and backward run, and
`CheckpointCopies` makes the step wait for that copy just before anything may change them: before the
optimizer step, before a validation (which swaps the EMA weights in), at the end of training. Each copied
tensor's version counter is compared there with the one it had at the save: a tensor changed in place
before its copy was taken (a wait point missed) is never written; the save fails in one line instead. (The
counter sees changes made through torch's in-place ops, the optimizer's among them, not writes through
`.data` such as Lightning's EMA swap: that one is covered by its wait point alone.)
Added as well: removals wait behind the writes queued before them (a checkpoint is never removed before a
newer one is whole), at most two writes wait at a time (each holds a copy of the checkpoint), and `wait()`,
which a signal's save calls before the process says it is saved.
"""

import contextlib
import errno
import os
import threading
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

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


@dataclass(eq=False)
class _Later:
    """Where a tensor the writer's thread copies stands in the checkpoint until it is copied."""

    index: int


@dataclass(eq=False)
class _Save:
    """One background save: the tensors its thread copies, their version counters at the save, and its state."""

    path: Any
    tensors: list[Tensor]
    versions: list[int]
    copied: threading.Event = field(default_factory=threading.Event)
    checked: threading.Event = field(default_factory=threading.Event)
    intact: bool = False
    future: Future | None = None


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """AtomicCheckpointIO's writes in one background thread, in the order they were asked for; the large host
    tensors copied there too, checked at `settle()` (see the module docstring)."""

    max_pending = 2  # writes queued or running; a third save waits for the oldest (memory: one copy each)
    copy_later_numel = 2**16  # host tensors this large are copied by the writer's thread; smaller ones at once

    def __init__(self):
        super().__init__(AtomicCheckpointIO())
        self._saves: deque[_Save] = deque()  # not yet written, oldest first
        self._unchecked: deque[_Save] = deque()  # copied (or being copied) but not yet checked

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        self._ensure_setup()
        self._raise_error()
        while len(self._saves) >= self.max_pending:
            self.settle()
            self._saves.popleft().future.result()
        later: list[Tensor] = []

        def snapshot(t: Tensor):
            if t.device.type == "cpu" and t.numel() >= self.copy_later_numel:
                later.append(t.detach())
                return _Later(len(later) - 1)
            return t.detach().clone()  # small ones, and device tensors (a device-side copy is fast)

        frozen = apply_to_collection(checkpoint, Tensor, snapshot)
        save = _Save(path, later, [t._version for t in later])
        save.future = self._executor.submit(self._copy_and_write, save, frozen, storage_options)
        self._saves.append(save)
        self._unchecked.append(save)

    def _copy_and_write(self, save: _Save, frozen: dict, storage_options: Any) -> None:
        """On the writer's thread: copy the large tensors, wait until the training thread has checked that none
        changed before the copy, then write (or drop the save if one did, or if the training thread is gone)."""
        try:
            copies = [t.clone() for t in save.tensors]
        except BaseException as err:  # out of memory, say: nothing is written, the error reaches settle()
            self._error = err
            return
        finally:
            save.copied.set()
        while not save.checked.wait(0.1):
            if not threading.main_thread().is_alive():  # the process is exiting without a check: write nothing
                return
        if not save.intact:
            return
        try:
            self.checkpoint_io.save_checkpoint(apply_to_collection(frozen, _Later, lambda later: copies[later.index]),
                                               save.path, storage_options)
        except BaseException as err:  # raised on the training thread at the next save, settle, wait or teardown
            self._error = err

    def settle(self) -> None:
        """Wait until every save's large tensors are copied, and check that none changed before its copy; the
        training thread calls this before anything may change them. A changed one: that save is not written."""
        while self._unchecked:
            save = self._unchecked.popleft()
            save.copied.wait()
            changed = [t for t, v in zip(save.tensors, save.versions, strict=True) if t._version != v]
            save.intact = not changed
            save.checked.set()
            if changed:
                shape = tuple(changed[0].shape)
                raise UserError(f"checkpoint {save.path} was not written: {len(changed)} of its tensors (the first of "
                                f"shape {shape}) changed before the background copy was taken; set "
                                "training.async_checkpoints=false to write checkpoints on the training thread")
        self._raise_error()

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
        self.settle()
        if self._executor is not None:
            self._executor.submit(lambda: None).result()
        self._saves.clear()
        self._raise_error()

    def teardown(self) -> None:
        try:
            self.settle()
        finally:
            self._saves.clear()
            super().teardown()

    def _raise_error(self) -> None:
        if self._error:
            error, self._error = self._error, None
            raise error


class CheckpointCopies(L.Callback):
    """Makes the training thread wait for a background save's copies (`BackgroundCheckpointIO.settle`) before
    anything changes the tensors they copy: the optimizer step, a validation's EMA swap, the end of training.
    Put it first among the callbacks, so that it runs before any other callback's hook at those points."""

    def __init__(self, io: BackgroundCheckpointIO):
        self.io = io

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.io.settle()

    def on_validation_start(self, trainer, pl_module) -> None:
        self.io.settle()

    def on_train_end(self, trainer, pl_module) -> None:
        self.io.settle()


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
