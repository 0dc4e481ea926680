"""What a run prints: what matters (progress, where it writes, the grid, the quality line), not library noise;
and how a mistake ends it (`fail`: one line on stderr, exit 2; HYDRA_FULL_ERROR=1 keeps tracebacks).

Silenced, each for a stated reason:
- Lightning's advertisement for its own cloud logger ("💡 Tip: ... litlogger"), printed by every Trainer;
- torch 2.14's deprecation of `isinstance(treespec, LeafSpec)`, raised inside Lightning's own code at every
  fit (nothing a user of this project can act on).
Warnings a user can act on are left alone.
"""

import logging
import os
import sys
import warnings

NOISE = ("💡 Tip:",)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(NOISE)


def quiet_console() -> None:
    """Filter the noise above from Lightning's loggers and their handlers, and from warnings."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    noise = _DropNoise()
    for name in ("", "lightning", "lightning.pytorch", "lightning.fabric", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(noise)
        for handler in logger.handlers:
            if not any(isinstance(f, _DropNoise) for f in handler.filters):
                handler.addFilter(noise)


def full_errors() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def fail(message: str) -> None:
    """Print one line to stderr and exit with status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
