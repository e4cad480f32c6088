"""What a fleet command is doing, from its first second: one line per device as its state changes
(connecting, uploading, verifying, benchmarking, done, failed: why) and one overall bar with the
counts and an ETA from the devices finished so far.

On a terminal (the progress stream is a tty) the overall bar is tqdm's, at the bottom, with a counter
bar (bytes, queries) for each device working now and none for the devices queued or finished. In a log
or CI the same state lines are printed plain, counters at most every ``LINE_EVERY`` seconds per device,
and a count line each time a device finishes.

    outcomes = session.run_shown("deploy", devices, job)   # shows FleetProgress("deploy", names) meanwhile;
                                                           # jobs call session.progress.state(...)
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

LINE_EVERY = 10.0  # seconds between two counter lines of one device when no terminal shows bars


def _duration(seconds: float) -> str:
    """``1m05s``-style.

    Examples:
        >>> _duration(65.2), _duration(3.4), _duration(3720)
        ('1m05s', '3s', '1h02m')
    """
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class FleetProgress:
    """Progress of one fleet command over ``names`` (the devices, in the order given)."""

    def __init__(
        self,
        what: str,
        names: Sequence[str],
        *,
        file: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.what, self.names = what, list(names)
        self.file = file if file is not None else sys.stderr
        self.tty = bool(getattr(self.file, "isatty", lambda: False)()) if tty is None else tty
        self.clock, self.started = clock, clock()
        self.states: dict[str, str] = dict.fromkeys(self.names, "queued")
        self.ok = self.failed = 0
        self._bars: dict[str, Any] = {}
        self._last_line: dict[str, float] = {}
        self._lock = threading.Lock()  # a local copy reports its bytes from a worker thread
        self._overall = None
        if self.tty:
            from tqdm import tqdm

            # smoothing=0: the rate (and the ETA) is devices finished over time elapsed, not the last burst.
            self._overall = tqdm(
                total=len(self.names),
                desc=what,
                unit="device",
                file=self.file,
                smoothing=0,
                dynamic_ncols=True,
                position=0,
                leave=True,
                bar_format="{desc}: {n_fmt}/{total_fmt} devices |{bar}| [{elapsed}<{remaining}{postfix}]",
            )
            self._set_postfix()
        else:
            self._print(f"{what}: {len(self.names)} device(s)")

    def device(self, name: str) -> DeviceProgress:
        return DeviceProgress(self, name)

    # ------------------------------------------------------------------------------------- events

    def state(self, name: str, text: str) -> None:
        """A device's new state, as one line (repeats of the same state are dropped)."""
        with self._lock:
            if self.states.get(name) == text:
                return
            self.states[name] = text
            self._set_postfix()
        self._print(f"{name}: {text}")

    def counter(self, name: str, label: str, total: int, unit: str = "") -> Callable[[int], None]:
        """A counter for work a device does now (bytes of an upload, timed queries); returns ``advance(n)``.
        Replaces the device's previous counter; ``finish`` or the next counter removes it."""
        self.end_counter(name)
        self.state(name, f"{label} ({_amount(total, unit)})")
        if self.tty:
            from tqdm import tqdm

            with self._lock:
                self._bars[name] = tqdm(
                    total=total,
                    desc=f"  {name}: {label}",
                    unit=unit or "it",
                    unit_scale=unit == "B",
                    file=self.file,
                    leave=False,
                    dynamic_ncols=True,
                    mininterval=0.5,
                )
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            bar = self._bars.get(name)
            if bar is not None:
                bar.update(n)
                return
            now = self.clock()
            if now - self._last_line.get(name, self.started) >= LINE_EVERY:
                self._last_line[name] = now
                shown = (
                    f"{_amount(done[0], unit)}/{_amount(total, unit)}"
                    if unit == "B"
                    else f"{done[0]}/{total} {unit}".rstrip()
                )
                self._print(f"{name}: {label} {shown}")

        return advance

    def end_counter(self, name: str) -> None:
        with self._lock:
            bar = self._bars.pop(name, None)
        if bar is not None:
            bar.close()

    def finish(self, name: str, ok: bool, text: str) -> None:
        """The device is done (``ok``) or failed (``text`` says why)."""
        self.end_counter(name)
        with self._lock:
            self.ok += ok
            self.failed += not ok
        self.state(name, text if ok else f"FAILED: {text}")
        if self._overall is not None:
            self._overall.update(1)
        else:
            self._print(self.summary())

    def log(self, line: str) -> None:
        """A message of a job's own (``--setup``'s, a new host key's), printed like the state lines."""
        self._print(line)

    def summary(self) -> str:
        """``deploy: 3/20 devices done (2 ok, 1 failed), 8 running, 41s, about 3m10s left``."""
        n = self.ok + self.failed
        running = sum(1 for s in self.states.values() if s not in ("queued",) and not _final(s))
        elapsed = self.clock() - self.started
        eta = (
            f", about {_duration(elapsed / n * (len(self.names) - n))} left"
            if 0 < n < len(self.names)
            else ""
        )
        return (
            f"{self.what}: {n}/{len(self.names)} devices done ({self.ok} ok, {self.failed} failed), "
            f"{running} running, {_duration(elapsed)}{eta}"
        )

    def close(self) -> None:
        for name in list(self._bars):
            self.end_counter(name)
        if self._overall is not None:
            self._overall.close()
            self._overall = None

    # ------------------------------------------------------------------------------------ output

    def _set_postfix(self) -> None:
        if self._overall is not None:
            running = sum(1 for s in self.states.values() if s != "queued" and not _final(s))
            self._overall.set_postfix_str(
                f"{self.ok} ok, {self.failed} failed, {running} running", refresh=True
            )

    def _print(self, line: str) -> None:
        if self._overall is not None:
            from tqdm import tqdm

            tqdm.write(line, file=self.file)
        else:
            print(line, file=self.file, flush=True)


def _final(state: str) -> bool:
    return state.startswith(("done", "FAILED", "interrupted", "not started"))


def _amount(n: int, unit: str) -> str:
    if unit == "B":
        return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"
    return f"{n} {unit}".strip()


def grouped(pairs: Sequence[tuple[str, str]], *, prefix: str = "") -> list[str]:
    """One line per distinct message, naming the devices it is about (the same warning from fifty
    devices is one line, not fifty).

    Examples:
        >>> grouped([("a", "slow"), ("b", "slow"), ("c", "fast")])
        ['a, b: slow', 'c: fast']
        >>> grouped([(f"d{i}", "no VNNI") for i in range(12)])
        ['d0, d1, d2, d3, d4, d5, d6, d7 and 4 more (12 devices): no VNNI']
    """
    by_text: dict[str, list[str]] = {}
    for name, text in pairs:
        by_text.setdefault(text, []).append(name)
    out = []
    for text, names in by_text.items():
        who = (
            ", ".join(names)
            if len(names) <= 8
            else f"{', '.join(names[:8])} and {len(names) - 8} more ({len(names)} devices)"
        )
        out.append(f"{who}: {prefix}{text}")
    return out


class DeviceProgress:
    """One device's view of a ``FleetProgress`` (``session.progress``); ``NO_PROGRESS`` does nothing."""

    def __init__(self, fleet: FleetProgress | None, name: str):
        self.fleet, self.name = fleet, name
        self.last = "queued"
        self.cleanup: str | None = None  # what an interrupted job undid, for the line Ctrl-C prints

    def state(self, text: str) -> None:
        self.last = text
        if self.fleet is not None:
            self.fleet.state(self.name, text)

    def counter(self, label: str, total: int, unit: str = "") -> Callable[[int], None]:
        self.last = label
        if self.fleet is None:
            return lambda n: None
        return self.fleet.counter(self.name, label, total, unit)

    def end_counter(self) -> None:
        if self.fleet is not None:
            self.fleet.end_counter(self.name)
