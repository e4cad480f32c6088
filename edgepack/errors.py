"""One error type for everything a user can fix: its message is one line naming the thing and the fix."""

from __future__ import annotations

from runtime_shim.exitcodes import ExitCode

__all__ = ["BudgetError", "EdgepackError", "ExitCode"]


class EdgepackError(Exception):
    """Bad input or a refused result. ``str(err)`` is a single line for the console."""

    exit_code = ExitCode.USAGE

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


class BudgetError(EdgepackError):
    """A gate was missed (accuracy drop, a profile budget). The output, if any, is kept."""

    exit_code = ExitCode.BUDGET
