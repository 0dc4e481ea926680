"""File handling every layer shares: a new file written whole and fsynced, a rename made durable, a folder proved
writable."""

import os
import uuid
from pathlib import Path


def write_durably(path: Path, data: bytes | memoryview) -> None:
    """Write all of data to a new file (mode as the umask allows, like open()) and fsync it."""
    data = memoryview(data)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync the folder holding `path`, making a rename into it durable (raises OSError; EINVAL or ENOTSUP from a
    filesystem that cannot sync a folder is the caller's to let be)."""
    fd = os.open(Path(path).parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def probe_writable(folder: Path) -> Path:
    """Create the folder if needed and write and remove a probe file in it (raises OSError); returns the folder."""
    folder = Path(folder).expanduser()
    probe = folder / f".write-probe-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b"ok")
    probe.unlink()
    return folder
