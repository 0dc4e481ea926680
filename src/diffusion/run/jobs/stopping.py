"""evaluate.py and figures.py on SIGTERM or Ctrl-C: stop at once, and say in one line what is on disk.

Neither command leaves anything half-done that a later run would trust (a PNG is written whole or not at all,
the report last), so they stop where the signal finds them, without a checkpoint to save or a step to finish.
"""

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from diffusion.errors import Interrupted


def written_since(directory: Path, since: float) -> list[Path]:
    """The results (PNG, Markdown, JSON) in `directory` written at or after `since` (a time.time()), by name.

    Not Hydra's log or the W&B folder beside them, nor a PNG still being written (a hidden temporary file)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in (".png", ".md", ".json")
                  and not p.name.startswith(".") and p.stat().st_mtime >= since)


@contextmanager
def stop_on_signals(what_is_written: Callable[[], str]) -> Iterator[None]:
    """Inside: SIGINT or SIGTERM raises Interrupted("stopped by <signal>; <what_is_written()>", 128 + signal)
    where the program is (entry points print it as one line and exit with that code). Outside: as before."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be installed there
        yield
        return

    def stop(signum, frame) -> None:
        for other in previous:  # a second Ctrl-C must not cut the message short
            signal.signal(other, signal.SIG_IGN)
        raise Interrupted(f"stopped by {signal.Signals(signum).name}; {what_is_written()}", 128 + signum, None)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
