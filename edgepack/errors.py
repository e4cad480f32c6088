"""One error type for everything a user can fix: its message is one line naming the thing and the fix."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1  # an unexpected failure (a bug): a traceback is printed
    USAGE = 2  # bad input: the message says what to change
    BUDGET = 3  # the work finished but a profile's budget or an accuracy gate was missed
    INTERRUPTED = 130


class EdgepackError(Exception):
    """Bad input or a refused result. ``str(err)`` is a single line for the console."""

    exit_code = ExitCode.USAGE

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


class BudgetError(EdgepackError):
    """A gate was missed (accuracy drop, a profile budget). The output, if any, is kept."""

    exit_code = ExitCode.BUDGET
