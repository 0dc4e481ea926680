"""Every entry point on SIGTERM or Ctrl-C: stop at once, and say in one line what is on disk.

No command leaves anything half-done that a later run would trust (every output is written whole or not at all,
diffusion.files.written_whole), so they stop where the signal finds them; training alone first finishes its step
and saves a checkpoint (lightning/callbacks/interrupt.py). From the first import (`end_on_signals`, which the
entry points install before their slow imports) a signal prints one line and exits with 128 + its number; inside
a job (`stop_on_signals`, which guard.py and evaluate.py and figures.py enter) it raises Interrupted, so that the
job's status.json records it.
"""

import os
import signal
import sys
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


INTACT = "no file was left half-written"
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def end_on_signals() -> None:
    """Until a job takes over: SIGINT or SIGTERM prints "error: stopped by <signal>; ..." and exits at once with
    128 + the signal (os._exit: an exception raised during the imports ends in a traceback, or aborts inside
    torch's C++ code, and nothing has been written yet). Only the installing process: a forked worker (a
    DataLoader's) keeps the default behaviour, so one line is printed, not one per process."""
    if threading.current_thread() is not threading.main_thread():
        return
    owner = os.getpid()

    def end(signum, frame) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        for other in SIGNALS:  # a second Ctrl-C must not cut the line short, nor the cleanup after it
            signal.signal(other, signal.SIG_IGN)
        print(f"error: stopped by {signal.Signals(signum).name}; {INTACT}", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    for signum in SIGNALS:
        signal.signal(signum, end)


@contextmanager
def stop_on_signals(what_is_written: Callable[[], str],
                    requeue: tuple[signal.Signals, Callable[[str, object], tuple[str, int]]] | None = None
                    ) -> Iterator[None]:
    """Inside: SIGINT or SIGTERM raises Interrupted("stopped by <signal>; <what_is_written()>", 128 + signal)
    where the program is (entry points print it as one line and exit with that code). `requeue` = (signal, how):
    that signal too stops it, and how(line, the signal's previous handler) requeues the job and gives the line and
    the exit code (evaluate.py under SLURM). Outside: as before."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be installed there
        yield
        return

    def stop(signum, frame) -> None:
        for other in previous:  # a second Ctrl-C must not cut the message short
            signal.signal(other, signal.SIG_IGN)
        line, code = f"stopped by {signal.Signals(signum).name}; {what_is_written()}", 128 + signum
        if requeue is not None and signum == requeue[0]:
            line, code = requeue[1](line, previous[signum])
        raise Interrupted(line, code, None)

    signals = (*SIGNALS, requeue[0]) if requeue is not None else SIGNALS
    previous = {signum: signal.signal(signum, stop) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
