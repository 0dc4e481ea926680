"""File handling every layer shares: every output written whole or not at all (`written_whole`, the one way a
file or folder is written), a failed write as one line naming the path (`cannot_write`), a new file written whole
and fsynced, a rename made durable, a folder proved writable."""

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from diffusion.errors import UserError

FIXES = {
    errno.ENOSPC: "free space on that disk",
    errno.EDQUOT: "free space within your disk quota",
    errno.EFBIG: "raise the file-size limit (ulimit -f) or use a filesystem that allows larger files",
    errno.EACCES: "make that folder writable",
    errno.EPERM: "make that folder writable",
    errno.EROFS: "that disk is read-only; write elsewhere",
}


def blocking_file(path: Path) -> Path | None:
    """The first folder on the way to `path` that is a file (a path under a file), or None."""
    for parent in reversed(Path(path).parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def cannot_write(path: Path, err: OSError, fix: str | None = None) -> str:
    """One line: the path that could not be written, why, and what to do."""
    above = blocking_file(path)
    if above is not None:
        return f"cannot write {path}: {above} is a file, not a folder; choose a folder, or move that file away"
    if isinstance(err, IsADirectoryError) or (Path(path).is_dir() and err.errno == errno.EEXIST):
        return f"cannot write {path}: a folder is there; choose another name, or remove that folder"
    return f"cannot write {path} ({err.strerror or err}); {fix or FIXES.get(err.errno, 'check that disk')}"


@contextlib.contextmanager
def written_whole(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Write a file or folder whole or not at all: the block writes the temporary path yielded (beside `path`,
    same suffix, so writers that go by the suffix still do), which is then renamed onto `path` (durable: the
    rename fsynced too). A block that fails, or is stopped by a signal, leaves nothing under `path` and no
    temporary; an OSError (disk full, quota, file-size limit, a path under a file, permissions) is raised as a
    one-line UserError naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if path.is_dir() and tmp.is_dir():
            path.rmdir()  # an empty folder may be replaced; one with files in it raises here
        os.replace(tmp, path)
        if durable:
            with contextlib.suppress(OSError):  # some filesystems cannot sync a folder; the file is whole anyway
                fsync_dir(path)
    except OSError as err:
        raise UserError(cannot_write(path, err)) from err
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()


def write_file(path: str | os.PathLike, data: bytes | memoryview | str, durable: bool = False) -> Path:
    """`data` (str as UTF-8) as the file `path`, whole or not at all (see written_whole); durable: fsynced."""
    data = data.encode() if isinstance(data, str) else data
    with written_whole(path, durable) as tmp:
        if durable:
            write_durably(tmp, data)
        else:
            tmp.write_bytes(data)
    return Path(path)


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
