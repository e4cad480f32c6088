"""The exit status of every command, ``edgepack`` and ``python -m runtime_shim`` alike: one table.

It lives in the device runtime because the runtime cannot import edgepack; edgepack imports it.
Standard library only.

- 1 is what Python itself exits with on an uncaught exception, so a bug can never look like bad input.
- 2 is what argparse exits with on a bad flag, so every refusal a user can fix shares it.
- 3 and 4 tell a script "the work ran" apart from "it was refused": a build that misses a budget
  still writes its bundle and report, and a fleet command keeps what the devices that answered did.
- 130 is 128 + SIGINT, the shells' own code for Ctrl-C.

Examples:
    >>> int(ExitCode.BUDGET), ExitCode(4).name
    (3, 'PARTIAL')
    >>> print(epilog([ExitCode.OK, ExitCode.USAGE]))
    exit status:
      0    success
      2    bad or refused input (a flag, a file, a bundle failing its checks): one line names it and the fix
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence


class ExitCode(enum.IntEnum):
    """Exit codes of every command; ``MEANING`` says each in a line."""

    OK = 0
    ERROR = 1
    USAGE = 2
    BUDGET = 3
    PARTIAL = 4
    INTERRUPTED = 130


MEANING: Mapping[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.ERROR: "an unexpected failure (a bug): a traceback is printed",
    ExitCode.USAGE: "bad or refused input (a flag, a file, a bundle failing its checks): one line names it and the fix",
    ExitCode.BUDGET: "the work ran but missed a budget or gate (accuracy, latency, size, a device's regression)",
    ExitCode.PARTIAL: "some devices failed or could not be reached; the others completed",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C); finished work is kept",
}

# What any command can exit with; BUDGET and PARTIAL only where a command says so.
COMMON: tuple[ExitCode, ...] = (ExitCode.OK, ExitCode.ERROR, ExitCode.USAGE, ExitCode.INTERRUPTED)
HEADING = "exit status:"


def epilog(codes: Iterable[ExitCode] = COMMON, *, who: Mapping[ExitCode, Sequence[str]] | None = None) -> str:
    """The exit-status table for a ``--help`` epilog: ``codes`` in order, each with its meaning and, with
    ``who``, the commands that can return it."""
    lines = [HEADING]
    for code in sorted(set(codes)):
        names = (who or {}).get(code)
        lines.append(f"  {int(code):<4} {MEANING[code]}")
        if names:
            lines.append(f"       from: {', '.join(names)}")
    return "\n".join(lines)


def os_error_line(e: OSError) -> str:
    """One line for an ``OSError`` on a path (not a directory, no permission, disk full): the path the
    system refused is the user's to fix, so a command reports it and exits ``USAGE``, not with a traceback.

    Examples:
        >>> os_error_line(NotADirectoryError(20, "Not a directory", "out/x"))
        'out/x: Not a directory; check the path, its permissions and the free space'
    """
    return f"{e.filename}: {e.strerror or e}; check the path, its permissions and the free space"


class KeepTable:
    """A mixin for ``argparse.HelpFormatter``: the exit-status epilog keeps its lines; other text wraps."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(HEADING):
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)  # type: ignore[misc]
