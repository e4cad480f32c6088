"""What reaches the user's console, and what goes to the log file instead.

edgepack is a library first: its progress lines are INFO records of the named loggers
``edgepack.<stage>`` (``Progress``), lines meant only for a log file are DEBUG records of
``edgepack``, and a library call never sets the root logger or prints. ``capture`` (around a build)
copies library chatter into the build's log file and restores every logger it touched.

The command line is the one place that owns the process: ``session`` prints edgepack's progress on
stdout and sends library chatter to the log: Python warnings, ``transformers``/``optuna`` log records,
the Trainer's raw metric dicts and ONNX Runtime's native warnings (``CleanUnusedInitializersAndNodeArgs``
and friends, which its C++ logger writes straight to file descriptor 2, in colour). ``--verbose`` sends
all of it to the console as well. Everything is restored when the block ends.

    >>> with session(Path("build/build.log"), verbose=False):   # doctest: +SKIP
    ...     run_the_build()
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

LOGGER = "edgepack"
_LIBRARIES = ("transformers", "optuna", "onnxruntime", "datasets", "torch", "py.warnings", "accelerate")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

Log = Callable[[str], None]  # one progress line


def log() -> logging.Logger:
    """edgepack's logger for lines that belong in the log file, not on the console (log at DEBUG)."""
    return logging.getLogger(LOGGER)


class Progress:
    """A ``Log``: each line an INFO record of ``edgepack.<stage>``, and passed to ``callback`` if one
    was given (a library caller's way to see progress without configuring logging).

    >>> lines = []
    >>> Progress("build", lines.append)("[build] started")
    >>> lines
    ['[build] started']
    """

    def __init__(self, stage: str = "build", callback: Log | None = None):
        self.name, self.callback = stage, callback
        self.logger = logging.getLogger(f"{LOGGER}.{stage}")

    def __call__(self, line: str) -> None:
        self.logger.info(line)
        if self.callback is not None:
            self.callback(line)

    def stage(self, name: str) -> Progress:
        """The same destination, as stage ``name``'s logger."""
        return Progress(name, self.callback)


def for_stage(log: Log, name: str) -> Log:
    """``log`` as stage ``name``'s (a plain callable stays as it is)."""
    return log.stage(name) if isinstance(log, Progress) else log


@contextlib.contextmanager
def _saved_loggers(names) -> Iterator[list[logging.Logger]]:
    """Loggers whose handlers, level and propagation the block may change, restored after it."""
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers]
    try:
        yield loggers
    finally:
        for lg, (handlers, level, propagate, disabled) in zip(loggers, saved, strict=True):
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled


@contextlib.contextmanager
def capture(log_file: Path | None) -> Iterator[None]:
    """Within the block, library log records and Python warnings (as ``py.warnings`` records) go to
    ``log_file`` (appended; ``None``: only where the caller's own logging sends them), and edgepack's
    own records too as far as the caller's logging lets them through. Every logger and ``warnings``
    setting it touches is restored after; the root logger is not touched.

    ``transformers`` prints its warnings through a handler of its own: replaced by the file for the
    block, so a library build prints nothing its caller did not ask for.
    """
    handler: logging.Handler = logging.NullHandler()
    # Under the command line the root logger may already write this file (console.quiet): once is enough.
    taken = {getattr(h, "baseFilename", None) for h in logging.getLogger().handlers}
    if log_file is not None and str(Path(log_file).resolve()) not in taken:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter(_FORMAT))
    with _saved_loggers((LOGGER, *_LIBRARIES)) as loggers, warnings.catch_warnings():
        for lg in loggers:
            if lg.name in ("transformers", "py.warnings"):
                lg.handlers[:] = []
                lg.propagate = True
            lg.addHandler(handler)
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.showwarning = _to_log(warnings.showwarning)
        try:
            yield
        finally:
            handler.close()


@contextlib.contextmanager
def hushed_root(*, below: int = logging.ERROR, where: str = "") -> Iterator[None]:
    """Drop the records below ``below`` that code logs straight on the root logger (``logging.info``)
    from a file under ``where``, for the block. ONNX Runtime's quantizer does so; ``logging.warning``
    on a root without handlers would also install one (``basicConfig``): a stand-in handler prevents
    that. Both are removed after, so the root logger is as it was."""
    root = logging.getLogger()

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= below or where not in record.pathname

    null = logging.NullHandler() if not root.handlers else None
    root.addFilter(keep)
    if null is not None:
        root.addHandler(null)
    try:
        yield
    finally:
        root.removeFilter(keep)
        if null is not None:
            root.removeHandler(null)


def _to_log(show):
    """A ``warnings.showwarning`` that sends library warnings to the log and keeps edgepack's own
    warnings for the user (a bundle on a CPU without its target's flags, or on an older onnxruntime) on
    the console."""
    from runtime_shim.cpu import BundleWarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, BundleWarning):
            return show(message, category, filename, lineno, file, line)
        logging.getLogger("py.warnings").warning(
            warnings.formatwarning(message, category, filename, lineno, line).rstrip())
        return None

    return showwarning


_diverted = {"on": False}  # is descriptor 2 pointing at a log file right now (an enclosing quiet())?


def _stderr_is_fd2() -> bool:
    try:
        sys.stderr.flush()
        return sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False  # a test's captured stream: leave descriptor 2 alone


@contextlib.contextmanager
def quiet(log_file: Path | None, *, verbose: bool = False) -> Iterator[None]:
    """Within the block, library warnings and native stderr go to ``log_file`` (appended), not the console.

    Python-level ``sys.stderr`` (progress bars, edgepack's own messages) keeps pointing at the
    console; only what native code writes to descriptor 2 is diverted. Blocks nest: an inner block's
    file receives what is written inside it, the outer one's gets its Python log records too.
    """
    if log_file is None:
        yield
        return
    loud = verbose
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handlers: list[logging.Handler] = [handler]
    if loud:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        console.addFilter(lambda r: not r.name.startswith(LOGGER))  # session() prints edgepack's own
        handlers.append(console)
    old_level = root.level
    for h in handlers:
        root.addHandler(h)
    root.setLevel(logging.INFO)
    was_diverted = _diverted["on"]
    divert = not loud and (was_diverted or _stderr_is_fd2())
    saved_fd, old_stderr = None, sys.stderr
    with _saved_loggers((LOGGER, *_LIBRARIES)) as loggers, warnings.catch_warnings():
        for lg in loggers:
            lg.setLevel(logging.DEBUG if lg.name == LOGGER else logging.INFO if loud else logging.WARNING)
            if lg.name == "transformers":  # its own stderr handler: the records go to ours instead
                lg.handlers[:] = []
                lg.propagate = True
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.showwarning = _to_log(warnings.showwarning)
        try:
            if divert:
                saved_fd = os.dup(2)
                with open(log_file, "ab", buffering=0) as f:
                    os.dup2(f.fileno(), 2)
                if not was_diverted:
                    # Python's own stderr stays on the console through a copy of the old descriptor.
                    sys.stderr = open(os.dup(saved_fd), "w", buffering=1, encoding="utf-8",  # noqa: SIM115
                                      errors="replace")
                _diverted["on"] = True
            yield
        finally:
            if saved_fd is not None:
                if sys.stderr is not old_stderr:
                    with contextlib.suppress(Exception):
                        sys.stderr.close()
                    sys.stderr = old_stderr
                os.dup2(saved_fd, 2)
                os.close(saved_fd)
                _diverted["on"] = was_diverted
            for h in handlers:
                root.removeHandler(h)
            handler.close()
            root.setLevel(old_level)


@contextlib.contextmanager
def session(log_file: Path | None, *, verbose: bool = False) -> Iterator[None]:
    """The command line's console: edgepack's progress lines on stdout (its DEBUG lines too with
    ``verbose``), library chatter to ``log_file`` (``quiet``); everything restored after."""
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    out.setLevel(logging.DEBUG if verbose else logging.INFO)
    with _saved_loggers((LOGGER,)) as (lg,):
        lg.addHandler(out)
        with quiet(log_file, verbose=verbose):
            yield


def trainer_log_callbacks():
    """``transformers`` callbacks whose per-epoch metric dicts go to the log file: a progress bar that
    does not print them between its bars (for runs with progress), and a silent logger (for runs
    without, where the stock ``PrinterCallback`` would print every dict raw)."""
    from transformers.trainer_callback import ProgressCallback, TrainerCallback

    def record(state, logs) -> None:
        if state.is_world_process_zero and logs:
            log().debug("trainer: %s", {k: v for k, v in logs.items() if k != "total_flos"})

    class LoggedProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            record(state, logs)

    class LoggedOnly(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            record(state, logs)

    return LoggedProgress, LoggedOnly


def quiet_trainer(trainer) -> None:
    """Swap the Trainer's stock progress or printer callback for one that logs its metric dicts."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    progress, only = trainer_log_callbacks()
    cbs = trainer.callback_handler.callbacks
    had_bar = any(isinstance(cb, ProgressCallback) for cb in cbs)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(progress if had_bar else only)
