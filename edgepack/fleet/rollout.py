"""Staged rollouts: a bundle to a group of devices, a canary first, then growing waves, each wave
deployed, benchmarked there and gated on the model's own figures before the next one starts.

    plan = plan_waves(devices, canary="1", rate=2.0)     # [[canary], [2 devices], [4 devices], ...]
    result = rollout(bundle, plan, out_dir, runs=200, warmup=50, tolerance=1.0)

The shape follows AWS IoT Jobs' rollout configuration (a base rate multiplied by an increment factor,
1 to 5, after each step) and Mender's phased deployments (a fixed device list taken when the deployment
starts, a first phase of N devices or a percentage, the rest in later phases). What differs is the
abort rule: AWS aborts on a percentage of failed executions after a minimum number, Mender on the
operator's judgement; here one device outside the gate stops the rollout, because a model that loses
accuracy or misses a budget on one CPU will do so on every device like it.

The gate, per device of a wave (``fleet.bench.device_record``): deployed and benchmarked, accuracy at
most ``tolerance`` points below the bundle's build-time figure (``manifest.json`` ``metrics.eval``),
and every budget of the device's profile met (p95 latency, peak memory, bundle size; an emulated
device's latency and memory are not its own and are not judged). A failed gate stops the rollout and
rolls every device the rollout switched back to the release it ran before (``deploy.rollback_one``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from runtime_shim.exitcodes import ExitCode
from runtime_shim.manifest import write_json_atomic

from . import QUIET, DeviceError
from .bench import bench_one, device_record, fleet_document, reference
from .deploy import LocalBundle, deploy_one, rollback_one
from .inventory import Device
from .progress import FleetProgress
from .session import Outcome, Session, run_shown

FORMAT = "edgepack-rollout/1"
MAX_RATE = 5.0  # AWS IoT Jobs' incrementFactor range is 1..5: a wave at most five times the one before


def canary_size(spec: str, n: int) -> int:
    """``N`` devices or ``P%`` of ``n`` (rounded up, at least one), at most ``n``.

    Examples:
        >>> canary_size("1", 20), canary_size("10%", 20), canary_size("10%", 3), canary_size("50", 3)
        (1, 2, 1, 3)
    """
    from ..errors import EdgepackError

    text = str(spec).strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 < pct <= 100:
                raise ValueError
            return max(1, min(n, math.ceil(n * pct / 100)))
        count = int(text)
        if count < 1:
            raise ValueError
        return min(n, count)
    except ValueError:
        raise EdgepackError(
            f"--canary {spec!r}: pass a number of devices (1 or more) or a percentage (e.g. 10%)"
        ) from None


def canary_order(devices: Sequence[Device]) -> list[Device]:
    """One device of each profile first (inventory order), then the rest: the earliest waves see every
    kind of device the group holds.

    Example:
        >>> pi, x86 = (dict(profile=p, transport="local") for p in ("pi", "x86"))
        >>> [d.name for d in canary_order([Device("a", **pi), Device("b", **pi), Device("c", **x86)])]
        ['a', 'c', 'b']
    """
    first: dict[str, Device] = {}
    for d in devices:
        first.setdefault(d.profile, d)
    return [*first.values(), *(d for d in devices if first[d.profile] is not d)]


def plan_waves(devices: Sequence[Device], *, canary: str = "1", rate: float = 2.0) -> list[list[Device]]:
    """The waves: the canary (``canary_size``), then each wave ``rate`` times the one before (rounded
    up), the last one what is left.

    Example:
        >>> [len(w) for w in plan_waves([Device(f"d{i}", "pi", "local") for i in range(20)], canary="1", rate=2)]
        [1, 2, 4, 8, 5]
    """
    from ..errors import EdgepackError

    if not 1.0 <= rate <= MAX_RATE:
        raise EdgepackError(
            f"--rate {rate:g}: pass a factor from 1 (waves of the canary's size) to {MAX_RATE:g} "
            "(each wave that many times the one before)"
        )
    if not devices:
        raise EdgepackError("the rollout has no devices; check --to")
    ordered = canary_order(devices)
    size = canary_size(canary, len(ordered))
    waves, start = [], 0
    while start < len(ordered):
        waves.append(ordered[start : start + size])
        start += size
        size = max(size, math.ceil(size * rate))
    return waves


@dataclasses.dataclass
class Stop:
    """What stopped a rollout: one device and one figure."""

    device: str
    figure: str  # "accuracy", a budget's name (p95_latency_ms, peak_memory_mb, ...), "deploy" or "bench"
    line: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def gate(rec: dict[str, Any]) -> list[Stop]:
    """The reasons one device's record fails the gate (empty: it passes)."""
    name = rec["device"]
    if rec.get("status") == "failed":
        return [Stop(name, rec.get("stage") or "deploy", rec.get("error") or "failed")]
    stops = []
    reg = rec.get("regression") or {}
    if reg.get("ok") is False:
        stops.append(
            Stop(
                name,
                "accuracy",
                f"accuracy {100 * reg['device_accuracy']:.2f}% is {reg['drop_points']:.2f} "
                f"points below the build-time {100 * reg['build_accuracy']:.2f}% "
                f"(tolerance {reg['tolerance_points']:g})",
            )
        )
    for b in rec.get("budgets") or []:
        if b.get("ok") is False:
            stops.append(
                Stop(name, b["budget"], f"profile '{rec.get('profile')}' budget missed: {b['line']}")
            )
    return stops


async def _deploy_and_bench(
    session: Session,
    bundle: LocalBundle,
    out_dir: Path,
    *,
    runs: int,
    warmup: int,
    setup: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Deploy, then bench; what was live before is kept so a failed gate can return to it. A bench that
    fails after the switch is reported in the value (the device was touched), not raised."""
    root = session.root(bundle.name)
    before = await session.layout("state", root)
    deployed = await deploy_one(session, bundle, setup=setup, log=log)
    out: dict[str, Any] = {"before": before.get("current"), "deploy": deployed}
    try:
        out["bench"] = await bench_one(session, bundle, out_dir, runs=runs, warmup=warmup, log=log)
    except DeviceError as e:
        out["bench_error"] = str(e)
    return out


def _touched(value: dict[str, Any] | None) -> bool:
    return bool(value) and value["deploy"]["action"] != "already current"


async def _restore(session: Session, bundle: LocalBundle, before: str | None) -> dict[str, Any]:
    """Point the device back at ``before`` (the release it ran when the rollout reached it)."""
    name = session.device.name
    state = await session.layout("state", session.root(bundle.name))
    if state["current"] != bundle.release:
        return {
            "device": name,
            "action": f"left alone: it runs {state['current']} now, not this rollout's release",
        }
    if not before:
        raise DeviceError(
            f"{name}: ran no release of {bundle.name} before the rollout, so there is none to return "
            f"to; {bundle.release} stays live there"
        )
    if state["previous"] != before:
        raise DeviceError(
            f"{name}: its previous release is {state['previous']}, not {before} (what it ran before); "
            f"run `edgepack deploy` of that bundle to it"
        )
    return await rollback_one(session, bundle.name)


@dataclasses.dataclass
class RolloutResult:
    waves: list[dict[str, Any]]
    records: list[dict[str, Any]]  # fleet bench records of every device the rollout reached
    stops: list[Stop]
    rolled_back: list[dict[str, Any]]
    exit_code: int

    @property
    def completed(self) -> bool:
        return not self.stops


def rollout(
    bundle: LocalBundle,
    waves: Sequence[Sequence[Device]],
    out_dir: Path,
    *,
    runs: int = 200,
    warmup: int = 50,
    tolerance: float = 1.0,
    setup: bool = False,
    jobs: int = 8,
    trust_new_host: bool = False,
    log: Callable[[str], None] = QUIET,
    progress: Callable[[str, list[str]], FleetProgress] | None = None,
) -> RolloutResult:
    """Run the waves in order; stop at the first wave with a device outside the gate and roll back
    every device the rollout switched. Writes ``rollout.json`` and the fleet report into ``out_dir``.
    ``progress`` (``FleetProgress`` or a function like it): each wave and the rollback show every
    device's state as it changes, and ``log`` goes through it."""

    def run(what: str, devices: Sequence[Device], job) -> list[Outcome]:
        return run_shown(what, devices, job, jobs=jobs, trust_new_host=trust_new_host, progress=progress, log=log)

    reference(bundle)  # before any device: a fallback computes on this machine
    done: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    touched: list[tuple[Device, str | None]] = []
    stops: list[Stop] = []
    failed_device = False
    started = time.monotonic()

    async def job(session: Session, say: Callable[[str], None]) -> dict[str, Any]:
        return await _deploy_and_bench(session, bundle, out_dir, runs=runs, warmup=warmup, setup=setup, log=say)

    for i, wave in enumerate(waves, 1):
        label = "canary" if i == 1 else f"wave {i}/{len(waves)}"
        log(f"rollout: {label}: {len(wave)} device(s): {', '.join(d.name for d in wave)}")
        outcomes = run(f"rollout {label}", wave, job)
        wave_recs = []
        for o in outcomes:
            value = o.value if o.ok else None
            if _touched(value):
                touched.append((o.device, value["before"]))
            if not o.ok:
                rec = device_record(o, bundle, tolerance=tolerance)
                rec["stage"] = "deploy"
                failed_device = True
            elif "bench_error" in value:
                rec = device_record(
                    Outcome(o.device, False, error=value["bench_error"], seconds=o.seconds, info=o.info),
                    bundle,
                    tolerance=tolerance,
                )
                rec["stage"] = "bench"
                failed_device = True
            else:
                rec = device_record(
                    Outcome(o.device, True, value["bench"], seconds=o.seconds, info=o.info),
                    bundle,
                    tolerance=tolerance,
                )
            if value:
                rec["deploy"] = {k: value["deploy"].get(k) for k in ("action", "current", "previous")}
                rec["before"] = value["before"]
            wave_recs.append(rec)
        records += wave_recs
        wave_stops = [s for rec in wave_recs for s in gate(rec)]
        for rec in wave_recs:
            mark = "STOP" if gate(rec) else "pass"
            log(f"rollout: {label}: {rec['device']}: {mark} ({_figures(rec)})")
        done.append(
            {
                "wave": i,
                "label": label,
                "devices": [d.name for d in wave],
                "passed": not wave_stops,
                "seconds": round(sum(r.get("seconds") or 0 for r in wave_recs), 1),
            }
        )
        if wave_stops:
            stops = wave_stops
            break
    rolled_back: list[dict[str, Any]] = []
    if stops and touched:
        before = {d.name: b for d, b in touched}
        log(f"rollout: stopped at {done[-1]['label']}: rolling back {', '.join(before)}")

        async def undo(session: Session, _log) -> dict[str, Any]:
            return await _restore(session, bundle, before[session.device.name])

        for o in run("rollback", [d for d, _ in touched], undo):
            rolled_back.append(
                {
                    "device": o.device.name,
                    "ok": o.ok,
                    "before": before[o.device.name],
                    **(
                        {"action": o.value["action"], "current": o.value.get("current")}
                        if o.ok
                        else {"error": o.error}
                    ),
                }
            )
    code = ExitCode.OK if not stops else ExitCode.PARTIAL if failed_device else ExitCode.BUDGET
    if any(not r["ok"] for r in rolled_back):
        code = ExitCode.PARTIAL
    result = RolloutResult(done, records, stops, rolled_back, int(code))
    _write(out_dir, bundle, waves, result, tolerance, seconds=time.monotonic() - started)
    return result


def _figures(rec: dict[str, Any]) -> str:
    if rec.get("status") == "failed":
        return rec.get("error") or "failed"
    parts = []
    if isinstance(rec.get("accuracy"), (int, float)):
        parts.append(f"accuracy {100 * rec['accuracy']:.2f}%")
    lat = rec.get("latency_ms") or {}
    if lat:
        parts.append(f"p50 {lat['p50']:.3f} ms, mean {lat['mean']:.3f} ms, p95 {lat['p95']:.3f} ms")
    if rec.get("peak_rss_mb"):
        parts.append(f"peak {rec['peak_rss_mb']:.0f} MB")
    if rec.get("emulated"):
        parts.append("emulated: accuracy only")
    return ", ".join(parts)


def _write(
    out_dir: Path,
    bundle: LocalBundle,
    waves: Sequence[Sequence[Device]],
    result: RolloutResult,
    tolerance: float,
    *,
    seconds: float,
) -> None:
    from .report import write_report

    doc = fleet_document("bench", bundle, result.records, tolerance=tolerance)
    doc["rollout"] = {
        "format": FORMAT,
        "planned": [[d.name for d in w] for w in waves],
        "waves": result.waves,
        "completed": result.completed,
        "stopped_by": [s.to_dict() for s in result.stops],
        "rolled_back": result.rolled_back,
        "exit_code": result.exit_code,
        "seconds": round(seconds, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report(out_dir, doc)
    write_json_atomic(out_dir / "rollout.json", doc["rollout"] | {"bundle": doc["bundle"]})


def summary_lines(result: RolloutResult, n_devices: int) -> list[str]:
    """What the console says at the end: the stop (device and figure), each rollback, the verdict."""
    out = [f"STOPPED {s.device}: {s.figure}: {s.line}" for s in result.stops]
    for r in result.rolled_back:
        out.append(
            f"rolled back {r['device']}: {r['action']}, current {r['current']}"
            if r["ok"]
            else f"ROLLBACK FAILED {r['error']}"
        )
    reached = sum(len(w["devices"]) for w in result.waves)
    if result.completed:
        out.append(
            f"rollout: {reached}/{n_devices} devices in {len(result.waves)} wave(s), every gate passed (exit 0)"
        )
    else:
        out.append(
            f"rollout: stopped at {result.waves[-1]['label']} ({reached}/{n_devices} devices reached; "
            f"{n_devices - reached} never touched), exit {result.exit_code}"
        )
    return out
