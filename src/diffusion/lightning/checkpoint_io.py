"""Checkpoints that are never half-written.

`AtomicCheckpointIO` writes each checkpoint to a temporary file beside its destination, fsyncs it and
renames it onto the final name: a full disk or a crash leaves the previous checkpoint there whole.
(Lightning's own writer stages the file in the system temp directory, which may lie on another disk,
and then copies it under the final name, so a copy that fails part-way leaves a truncated checkpoint.)
"""

import contextlib
import errno
import os
import uuid
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

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
