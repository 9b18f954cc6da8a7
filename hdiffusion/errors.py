"""The errors users see: one line and a distinct exit code, never a traceback.

  0  done
  2  bad input: config, flag, data or checkpoint (UsageError); nothing was written. Fix the input.
 65  diverged: --max-nonfinite-steps non-finite steps in a row (DivergedError). Resume the last good checkpoint
     with a lower --lr.
 74  a file of the run could not be written: disk full, read-only (StorageError); the last checkpoint is intact.
     Free space, run the same command again.
 75  stopped by SIGTERM or SIGINT after saving a checkpoint (PREEMPTED_EXIT_CODE). Run the same command again.
"""

import argparse
from contextlib import contextmanager

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by a signal after saving a checkpoint; run again to resume


class RunError(Exception):
    """An expected failure the CLIs report as `error: <message>` on stderr, exiting with `exit_code`."""

    exit_code = 1


class UsageError(RunError):
    """Bad input from the user (config, flag, file). The CLIs print the message and exit with code 2.

    The message names the file, key or value at fault and what would be valid. It may hold several lines
    when several independent problems were found at once (config validation reports all of them).
    """

    exit_code = 2


class DivergedError(RunError):
    """The loss or the gradients were non-finite for --max-nonfinite-steps optimizer steps in a row."""

    exit_code = 65  # EX_DATAERR


class StorageError(RunError):
    """A file of the run could not be written (disk full, read-only folder); the last checkpoint is intact."""

    exit_code = 74  # EX_IOERR


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors as a UsageError: one line and exit code 2, like every other bad input."""

    def error(self, message):
        raise UsageError(message)


@contextmanager
def reported_as_storage_error(path, advice):
    """An OSError inside (disk full, read-only, not a folder) -> a one-line StorageError: "cannot write FILE:
    REASON; ADVICE". `advice` is a string, or a function that makes one (called only on failure)."""
    try:
        yield
    except OSError as error:
        advice = advice() if callable(advice) else advice
        raise StorageError(f"cannot write {error.filename or path}: {error.strerror or error}; {advice}") from None
