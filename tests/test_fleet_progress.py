"""The fleet's progress: a line per device state, an overall count with an ETA from the devices
finished, counter bars only for the devices working now (no sshd needed)."""

from __future__ import annotations

import io

from edgepack.fleet.progress import FleetProgress, grouped


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_lines_and_an_honest_eta_without_a_terminal():
    out, clock = io.StringIO(), Clock()
    p = FleetProgress("deploy", ["a", "b", "c", "d"], file=out, tty=False, clock=clock)
    p.state("a", "connecting to a.lan")
    p.state("a", "connecting to a.lan")  # a repeat is not a new line
    advance = p.counter("a", "uploading", 20_000_000, "B")
    clock.t = 5.0
    advance(5_000_000)  # under 10 s since the start: no counter line yet
    clock.t = 12.0
    advance(5_000_000)
    clock.t = 30.0
    p.finish("a", True, "done (30.0 s)")
    p.finish("b", False, "b: unreachable (connection refused)")
    lines = out.getvalue().splitlines()
    assert lines == [
        "deploy: 4 device(s)",
        "a: connecting to a.lan",
        "a: uploading (20.0 MB)",
        "a: uploading 10.0 MB/20.0 MB",
        "a: done (30.0 s)",
        "deploy: 1/4 devices done (1 ok, 0 failed), 0 running, 30s, about 1m30s left",
        "b: FAILED: b: unreachable (connection refused)",
        "deploy: 2/4 devices done (1 ok, 1 failed), 0 running, 30s, about 30s left",
    ]


def test_a_terminal_shows_bars_only_for_devices_working_now():
    out = io.StringIO()
    p = FleetProgress("fleet bench", [f"d{i}" for i in range(20)], file=out, tty=True)
    advance = p.counter("d0", "benchmarking: queries", 250, "queries")
    advance(50)
    assert list(p._bars) == ["d0"]  # one device working: one counter bar, none for the 19 queued
    p.finish("d0", True, "done (3.0 s)")
    assert not p._bars
    p.close()
    text = out.getvalue()
    assert "fleet bench: 1/20 devices" in text and "1 ok, 0 failed" in text and "d0: done (3.0 s)" in text


def test_the_same_warning_from_many_devices_is_one_line():
    lines = grouped(
        [(f"edge-{i:02d}", "built for x86-64-vnni, this CPU lacks avx512_vnni") for i in range(50)]
    )
    assert lines == [
        "edge-00, edge-01, edge-02, edge-03, edge-04, edge-05, edge-06, edge-07 and 42 more "
        "(50 devices): built for x86-64-vnni, this CPU lacks avx512_vnni"
    ]
