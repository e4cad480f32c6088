"""What reaches the user's console, and what goes to the log file instead.

The console shows edgepack's own progress lines, progress bars and results. Library chatter goes to
the log: Python warnings, ``transformers``/``optuna`` log records, the Trainer's raw metric dicts and
ONNX Runtime's native warnings (``CleanUnusedInitializersAndNodeArgs`` and friends, which its C++
logger writes straight to file descriptor 2, in colour). ``--verbose`` sends all of it to the console
as well.

    >>> with quiet(Path("build/build.log"), verbose=False):   # doctest: +SKIP
    ...     run_the_build()
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

LOGGER = "edgepack"
_LIBRARIES = ("transformers", "optuna", "onnxruntime", "datasets", "torch", "py.warnings", "accelerate")


def log() -> logging.Logger:
    """edgepack's logger for lines that belong in the log file, not on the console."""
    return logging.getLogger(LOGGER)


def set_verbose(verbose: bool) -> None:
    """Turn on (or off) library output on the console for the rest of the process."""
    os.environ["EDGEPACK_VERBOSE"] = "1" if verbose else ""


def verbose() -> bool:
    return bool(os.environ.get("EDGEPACK_VERBOSE"))


def _quiet_libraries() -> None:
    try:
        import transformers

        transformers.logging.set_verbosity_warning()
        transformers.logging.disable_default_handler()
        transformers.logging.enable_propagation()
    except ImportError:
        pass


def _to_log(show):
    """A ``warnings.showwarning`` that sends library warnings to the log and keeps edgepack's own
    warnings for the user (a bundle on a CPU without its target's flags) on the console."""
    from runtime_shim.cpu import CpuTargetWarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CpuTargetWarning):
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
def quiet(log_file: Path | None, *, verbose_console: bool | None = None) -> Iterator[None]:
    """Within the block, library warnings and native stderr go to ``log_file`` (appended), not the console.

    Python-level ``sys.stderr`` (progress bars, edgepack's own messages) keeps pointing at the
    console; only what native code writes to descriptor 2 is diverted. Blocks nest: an inner block's
    file receives what is written inside it, the outer one's gets its Python log records too.
    """
    if log_file is None:
        yield
        return
    loud = verbose() if verbose_console is None else verbose_console
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handlers: list[logging.Handler] = [handler]
    if loud:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handlers.append(console)
    old_level = root.level
    for h in handlers:
        root.addHandler(h)
    root.setLevel(logging.INFO)
    log().setLevel(logging.INFO)
    for name in _LIBRARIES:
        logging.getLogger(name).setLevel(logging.INFO if loud else logging.WARNING)
    _quiet_libraries()
    was_diverted = _diverted["on"]
    divert = not loud and (was_diverted or _stderr_is_fd2())
    saved_fd, old_stderr = None, sys.stderr
    with warnings.catch_warnings():
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


def trainer_log_callbacks():
    """``transformers`` callbacks whose per-epoch metric dicts go to the log file: a progress bar that
    does not print them between its bars (for runs with progress), and a silent logger (for runs
    without, where the stock ``PrinterCallback`` would print every dict raw)."""
    from transformers.trainer_callback import ProgressCallback, TrainerCallback

    def record(state, logs) -> dict | None:
        if not (state.is_world_process_zero and logs):
            return None
        logs = {k: v for k, v in logs.items() if k != "total_flos"}
        log().info("trainer: %s", logs)
        return logs

    class LoggedProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = record(state, logs)
            if logs and verbose() and self.training_bar is not None:
                self.training_bar.write(str(logs))

    class LoggedOnly(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = record(state, logs)
            if logs and verbose():
                print(logs)

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
