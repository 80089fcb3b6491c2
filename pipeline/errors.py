"""The errors a user can cause, and the exit code each one means (the CLI's one rule).

Every *expected* failure is an :class:`AbvidError` whose message names the file or key at
fault and the fix; ``abvid`` prints that one line and exits with the error's ``exit_code``:

* :class:`UsageError` (exit 2): the command cannot start as given: a bad flag, config key
  or value, a missing input path, an output path that is a file, a checkpoint that is not
  one, a device that is not there, a size the model cannot take.
* :class:`JobError` (exit 3): the job started and could not finish: nothing usable was
  written, training diverged, too much of the data is unreadable.

Anything else that escapes a command is a bug: the CLI writes its traceback to a log file
and says so in one line (``tools/cli.py``). This module sits at the bottom of the import
graph (pipeline <- model <- train <- tools), so every layer raises the same types.
"""
from __future__ import annotations


class AbvidError(Exception):
    """Base of the expected failures; ``exit_code`` is what the CLI returns for it."""
    exit_code = 3


class UsageError(AbvidError, ValueError):
    """The command, its config or its inputs are wrong as given (exit 2)."""
    exit_code = 2


class JobError(AbvidError, RuntimeError):
    """The job ran and could not produce what it promised (exit 3)."""
    exit_code = 3
