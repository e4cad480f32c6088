"""``edgepack`` command line: ``main(argv) -> int``.

Each command lives in ``edgepack/commands/<name>.py`` with ``register(subparsers)`` (argparse only)
and ``run(args) -> int``. Heavy imports (torch, transformers, onnxruntime) happen inside ``run`` so
``edgepack --help`` stays instant. Errors a user can fix are ``EdgepackError``: one line on stderr
and a non-zero exit code from ``ExitCode``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from edgepack import __version__
from edgepack.errors import EdgepackError, ExitCode
from runtime_shim import exitcodes

# Order is the order of --help: the pipeline first, then the tools around it.
COMMANDS = ("build", "demo", "finetune", "distill", "prune", "pack", "quantize", "tune", "bench", "verify", "report",
            "devices", "deploy", "rollout", "fleet", "runtime", "keys", "sign", "emulate", "targets", "profiles", "recipes")


# Commands that can exit with more than ``exitcodes.COMMON`` (0, 1, 2, 130): a gate or budget missed
# with the output kept, some devices failed with the others done. A test makes each one happen.
EXIT_CODES = {"build": (ExitCode.BUDGET,), "demo": (ExitCode.BUDGET,), "pack": (ExitCode.BUDGET,),
              "quantize": (ExitCode.BUDGET,), "bench": (ExitCode.BUDGET,), "devices": (ExitCode.PARTIAL,),
              "deploy": (ExitCode.PARTIAL,), "rollout": (ExitCode.BUDGET, ExitCode.PARTIAL),
              "fleet": (ExitCode.BUDGET, ExitCode.PARTIAL)}


class _Formatter(exitcodes.KeepTable, argparse.HelpFormatter):
    """argparse's formatter, with the exit-status table of the epilog kept as a table."""


def exit_codes(command: str) -> tuple[ExitCode, ...]:
    """The exit codes ``edgepack COMMAND`` can return (its ``--help`` epilog lists them)."""
    return (*exitcodes.COMMON, *EXIT_CODES.get(command, ()))


def _with_epilog(parser: argparse.ArgumentParser, codes: tuple[ExitCode, ...]) -> None:
    parser.formatter_class, parser.epilog = _Formatter, exitcodes.epilog(codes)
    for action in parser._actions:  # nested subcommands (emulate setup, fleet bench) say the same
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _with_epilog(sub, codes)


def _load(name: str):
    # Every name in COMMANDS is a module of edgepack.commands (a test holds it): no silent skipping.
    return importlib.import_module(f"edgepack.commands.{name}")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgepack",
        description="Turn a fine-tuned transformer text classifier into a small, fast, verified bundle for edge CPUs.",
        formatter_class=_Formatter,
        epilog=exitcodes.epilog(ExitCode, who={code: [c for c in COMMANDS if code in EXIT_CODES.get(c, ())]
                                               for code in (ExitCode.BUDGET, ExitCode.PARTIAL)}),
    )
    parser.add_argument("--version", action="version", version=f"edgepack {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _load(name)
        p = module.register(sub)
        p.add_argument("-v", "--verbose", action="store_true",
                       help="also show library warnings and training logs on the console (always in the log file)")
        p.set_defaults(_run=module.run)
        _with_epilog(p, exit_codes(name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return ExitCode.USAGE
    from edgepack.console import session
    from runtime_shim.cpu import one_line_warnings

    one_line_warnings()  # a bundle loaded on a CPU without its target's flags: one console line
    try:
        with session(log_path(args.command), verbose=args.verbose):
            return int(args._run(args) or ExitCode.OK)
    except EdgepackError as e:
        print(f"edgepack {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        staged = args.command not in ("deploy", "devices", "fleet")  # those stop before they change a device
        print(f"edgepack {args.command}: interrupted" + ("; finished stages are kept, rerun to resume" if staged else ""),
              file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:  # output piped into `head`: stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # what is still buffered goes nowhere
        return ExitCode.OK
    except OSError as e:
        if e.filename is None:
            raise
        print(f"edgepack {args.command}: error: {exitcodes.os_error_line(e)}", file=sys.stderr)
        return ExitCode.USAGE


def log_path(command: str) -> Path:
    """Where a command's library warnings go (a build also writes BUILD/build.log)."""
    return Path(os.environ.get("EDGEPACK_LOG_DIR") or Path.home() / ".cache" / "edgepack" / "logs") / f"{command}.log"


def console() -> None:
    sys.exit(main())
