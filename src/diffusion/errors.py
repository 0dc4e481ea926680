"""The one exception type for mistakes a user can fix (bad config, missing data, wrong checkpoint).

Its message is a single line: what is wrong, the value seen, and the fix. Entry points print it and
exit non-zero without a traceback; HYDRA_FULL_ERROR=1 shows the whole trace.
"""


class UserError(ValueError):
    """A problem in the user's input, with a one-line message naming the value and the fix."""


class Interrupted(Exception):
    """A run stopped by a signal after saving a checkpoint; entry points exit with `exit_code`."""

    def __init__(self, message: str, exit_code: int, checkpoint: str | None):
        super().__init__(message)
        self.exit_code, self.checkpoint = exit_code, checkpoint
