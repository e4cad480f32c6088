"""``fleet bench`` and ``fleet tune``: the shim's own ``bench``/``tune`` run on each device, the JSON
pulled back, and each device checked against the build-time figures of the manifest.

The build-time reference is ``manifest.json``'s ``metrics.eval`` (accuracy and predictions on the
bundle's own ``eval.jsonl``, written by ``edgepack pack``); a device runs the same harness on the
same rows, so the two are comparable row for row. An older bundle without it falls back to the
manifest's test-split accuracy (other rows: a looser comparison, said so in the report) and to
predictions computed on this machine for agreement.

Regression check: the device's accuracy may be at most ``tolerance`` points below the build-time
figure. Emulated devices (a ``command_prefix``) run the harness with one timed query and no memory
probe: they report accuracy, not latency, and their latency and memory budgets are not applied.
"""

from __future__ import annotations

import json
import posixpath
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from runtime_shim.cpu import target_warning
from runtime_shim.exitcodes import ExitCode
from runtime_shim.manifest import write_json_atomic

from . import QUIET, DeviceError
from .deploy import LocalBundle, deploy_one, keys_args
from .progress import grouped
from .runtime import require_runtime
from .session import Outcome, Session, target_check

FORMAT = "edgepack-fleet/1"
DEFAULT_TOLERANCE = 1.0  # accuracy points a device may lose against the build-time figure
_EMULATED_SKIP = ("p95_latency_ms", "peak_memory_mb")


def reference(bundle: LocalBundle) -> dict[str, Any]:
    """Build-time accuracy and predictions on the eval slice (``metrics.eval``), else the fallbacks."""
    if bundle._reference is not None:
        return bundle._reference
    metrics = bundle.manifest.get("metrics") or {}
    ev = metrics.get("eval") if isinstance(metrics, Mapping) else None
    test = metrics.get("test") if isinstance(metrics, Mapping) else None
    ref: dict[str, Any] = {}
    if isinstance(ev, Mapping) and isinstance(ev.get("accuracy"), (int, float)):
        ref = {"accuracy": float(ev["accuracy"]), "basis": f"eval slice at build time ({ev.get('rows')} rows, "
               "manifest metrics.eval)", "predictions": ev.get("predictions"), "predictions_from": "build time"}
    elif isinstance(test, Mapping) and isinstance(test.get("accuracy"), (int, float)):
        ref = {"accuracy": float(test["accuracy"]),
               "basis": f"test split at build time ({metrics.get('test_rows')} rows; the device measures the "
                        "eval slice, a sample of it: repack for a row-for-row reference)"}
    if not ref.get("predictions"):
        ref.update(_host_predictions(bundle, keep_accuracy=bool(ref)))
    bundle._reference = ref
    return ref


def _host_predictions(bundle: LocalBundle, keep_accuracy: bool) -> dict[str, Any]:
    import runtime_shim
    from runtime_shim.bench import run_benchmark
    from runtime_shim.datafiles import read_labelled

    texts, gold = read_labelled(bundle.path / "eval.jsonl")
    r = run_benchmark(runtime_shim.OnnxPipeline(bundle.path), texts, gold, warmup=0, runs=1, batch_sizes=(1,),
                      rss_argv=[], throughput_batches=1)
    out: dict[str, Any] = {"predictions": r["predictions"], "predictions_from": "this machine (the manifest has "
                                                                                 "no build-time predictions)"}
    if not keep_accuracy:
        out.update(accuracy=r["accuracy"], basis="this machine (the manifest has no build-time accuracy)")
    return out


async def ensure_deployed(session: Session, bundle: LocalBundle, *, setup: bool, log: Callable[[str], None]) -> str:
    """The directory of ``bundle`` on the device, deploying it first when it is not current there
    (or when ``setup`` asks for the runtime to be installed)."""
    root = session.root(bundle.name)
    state = await session.layout("state", root)
    if state["current"] != bundle.release or setup:
        if state["current"] != bundle.release:
            session.progress.state(f"{bundle.name} {bundle.release} is not current there: deploying it first")
        await deploy_one(session, bundle, setup=setup, log=log)
    else:
        require_runtime(session, setup=False)
    return posixpath.join(root, "current")


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


_COUNTED = re.compile(r"^progress: (?P<label>[a-z][a-z ]*?) (?P<n>\d+)/(?P<total>\d+)(?: (?P<unit>\w+))?$")


def progress_reader(session: Session, what: str) -> Callable[[str], None]:
    """Turn the runtime's ``progress: ...`` lines on stderr into ``session.progress`` states and counters
    (``progress: queries 50/250`` is a counter; any other line a state); other lines are ignored."""
    now: dict[str, Any] = {"label": None, "n": 0, "advance": None}

    def on_line(line: str) -> None:
        line = line.strip()
        m = _COUNTED.match(line)
        if m:
            if now["label"] != m["label"]:
                advance = session.progress.counter(f"{what}: {m['label']}", int(m["total"]), m["unit"] or m["label"])
                now.update(label=m["label"], n=0, advance=advance)
            now["advance"](int(m["n"]) - now["n"])
            now["n"] = int(m["n"])
        elif line.startswith(("progress: ", "[tune] ")):
            now.update(label=None)
            session.progress.end_counter()
            session.progress.state(f"{what}: {line.partition(' ')[2]}")

    return on_line


def _failed(session: Session, bundle: LocalBundle, what: str, done: Any) -> DeviceError:
    from .deploy import disk_full, no_space

    reason = done.last_error()
    if no_space(f"{reason} {done.stderr[-2000:]}"):
        return DeviceError(disk_full(session, bundle, what, current=bundle.release))
    return DeviceError(f"{session.device.name}: {what} failed on the device: {reason}")


async def bench_one(session: Session, bundle: LocalBundle, out_dir: Path, *, runs: int = 200, warmup: int = 50,
                    setup: bool = False, service: bool = False, log: Callable[[str], None] = QUIET) -> dict[str, Any]:
    """Run ``python -m runtime_shim bench --json`` on the device; return its result (pulled back).
    ``service``: through the device's running model service (``bench --service``), as an application
    on the device classifies."""
    if service and not session.device.service:
        raise DeviceError(f"{session.device.name}: --service, but the inventory names no service for it "
                          "(service = \"NAME\")")
    current = await ensure_deployed(session, bundle, setup=setup, log=log)
    remote = posixpath.join(session.root(bundle.name), "results", f"bench-{bundle.release}-{_stamp()}.json")
    args = ["bench", current, "--json", remote, "--progress", *keys_args(session)]
    if service:
        from .service import status_file

        args += ["--service", status_file(session)]
    if session.device.emulated:  # the emulator's timings mean nothing: one query, no memory probe
        args += ["--runs", "1", "--warmup", "0", "--no-rss", "--batch-sizes", "1"]
    else:
        args += ["--runs", str(runs), "--warmup", str(warmup)]
    session.progress.state("benchmarking")
    done = await session.runtime(*args, timeout=7200, on_line=progress_reader(session, "benchmarking"))
    session.progress.end_counter()
    if done.returncode != 0:
        raise _failed(session, bundle, "benchmarking", done)
    session.progress.state("pulling the result back")
    local = out_dir / "devices" / session.device.name / "bench.json"
    await session.transport.get(remote, local)
    result = json.loads(local.read_text())
    # The shim's result, stamped with what it measured: which bundle (manifest digest), on which device.
    result["fleet"] = {"device": session.device.name, "manifest_digest": bundle.digest, "release": bundle.release,
                       "remote_result": remote, "emulated": session.device.emulated, "through_service": service}
    write_json_atomic(local, result)
    return result


async def tune_one(session: Session, bundle: LocalBundle, out_dir: Path, *, extra: list[str],
                   setup: bool = False, log: Callable[[str], None] = QUIET) -> dict[str, Any]:
    """Run ``python -m runtime_shim tune --json`` on the device: the installed runtime keeps a winner as the
    device's own settings for this bundle, in its state beside the release (``runtime_shim.tuned``)."""
    if session.device.emulated:
        return {"skipped": "emulated: the emulator's timings are not the device's; tune on the device itself"}
    current = await ensure_deployed(session, bundle, setup=setup, log=log)
    remote = posixpath.join(session.root(bundle.name), "results", f"tune-{bundle.release}-{_stamp()}.json")
    session.progress.state("tuning")
    done = await session.runtime("tune", current, "--json", remote, *extra, timeout=7200,
                                 on_line=progress_reader(session, "tuning"))
    if done.returncode != 0:
        raise _failed(session, bundle, "tuning", done)
    local = out_dir / "devices" / session.device.name / "tune.json"
    await session.transport.get(remote, local)
    result = json.loads(local.read_text())
    result["fleet"] = {"device": session.device.name, "manifest_digest": bundle.digest, "release": bundle.release,
                       "dry_run": "--dry-run" in extra}
    result["stdout"] = done.stdout.strip().splitlines()[-3:]
    write_json_atomic(local, result)
    return result


# ------------------------------------------------------------------------------------------ records


def _base(o: Outcome, bundle: LocalBundle) -> dict[str, Any]:
    d = o.device
    rec: dict[str, Any] = {"device": d.name, "manifest_digest": bundle.digest, "release": bundle.release,
                           "bundle": bundle.name, "profile": d.profile, "transport": d.transport,
                           "address": d.address, "emulated": d.emulated, "seconds": round(o.seconds, 1)}
    if o.info:
        rec["cpu"] = {k: o.info.get(k) for k in ("arch", "physical_cores", "cpus", "machine")}
        rec["python"] = o.info.get("python")
        rec["packages"] = o.info.get("packages")
    return rec


def device_record(o: Outcome, bundle: LocalBundle, *, tolerance: float) -> dict[str, Any]:
    """One row of the fleet report: the device's figures, its checks and its status."""
    from .. import profiles
    from ..errors import EdgepackError

    rec = _base(o, bundle)
    if not o.ok:
        rec.update(status="failed", error=o.error)
        return rec
    r: dict[str, Any] = o.value
    ref = reference(bundle)
    arch, flags = str(o.info.get("arch")), set(o.info.get("flags") or ())
    rec.update(target_check(o.device, o.info))
    rec["target_warning"] = target_warning(bundle.manifest, arch, flags)
    for k in ("accuracy", "accuracy_raw", "in_scope_accuracy", "oos_recall", "n", "model_bytes", "bundle_bytes",
              "threads"):
        rec[k] = r.get(k)
    if not o.device.emulated:
        for k in ("latency_ms", "tokenize_ms", "model_ms", "throughput_qps", "peak_rss_mb"):
            rec[k] = r.get(k)
    rec["host"] = r.get("host")
    preds, ref_preds = r.get("predictions"), ref.get("predictions")
    if preds and ref_preds and len(preds) == len(ref_preds):
        same = sum(a == b for a, b in zip(preds, ref_preds, strict=True))
        rec["agreement"] = same / len(preds)
        rec["agreement_basis"] = ref.get("predictions_from")
        rec["changed"] = [i for i, (a, b) in enumerate(zip(preds, ref_preds, strict=True)) if a != b][:50]
    acc, build = r.get("accuracy"), ref.get("accuracy")
    reg: dict[str, Any] = {"tolerance_points": tolerance, "build_accuracy": build, "basis": ref.get("basis"),
                           "device_accuracy": acc}
    if isinstance(acc, (int, float)) and isinstance(build, (int, float)):
        reg["drop_points"] = round((build - acc) * 100, 4)
        reg["ok"] = reg["drop_points"] <= tolerance
    else:
        reg["ok"] = None
    rec["regression"] = reg
    try:
        checks = profiles.budget_report(profiles.load(o.device.profile), r)
        rec["budgets"] = [{"budget": c.budget, "limit": c.limit, "value": c.value,
                           "ok": None if o.device.emulated and c.budget in _EMULATED_SKIP else c.ok,
                           "line": c.line()} for c in checks]
    except EdgepackError as e:
        rec["budgets"], rec["budget_error"] = [], str(e)
    missed = [b["budget"] for b in rec["budgets"] if b["ok"] is False]
    rec["status"] = "regressed" if reg["ok"] is False else "budget" if missed else "ok"
    return rec


def fleet_document(kind: str, bundle: LocalBundle, records: list[dict[str, Any]], *,
                   tolerance: float | None = None) -> dict[str, Any]:
    """The whole result set (``fleet.json``), with its summary and exit code."""
    failed = [r["device"] for r in records if r.get("status") == "failed"]
    regressed = [r["device"] for r in records if r.get("status") == "regressed"]
    budget = [r["device"] for r in records if r.get("status") == "budget"]
    code = ExitCode.BUDGET if regressed or budget else ExitCode.PARTIAL if failed else ExitCode.OK
    doc: dict[str, Any] = {
        "format": FORMAT, "kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bundle": {"path": str(bundle.path), "name": bundle.name, "manifest_digest": bundle.digest,
                   "release": bundle.release, "target": (bundle.manifest.get("target") or {}).get("name"),
                   "model_bytes": (bundle.manifest.get("metrics") or {}).get("model_bytes")},
        "devices": records,
        "summary": {"devices": len(records), "ok": [r["device"] for r in records if r.get("status") == "ok"],
                    "failed": failed, "regressed": regressed, "budget_missed": budget, "exit_code": int(code)},
    }
    if kind == "bench":
        ref = reference(bundle)
        doc["bundle"]["build"] = {"accuracy": ref.get("accuracy"), "basis": ref.get("basis")}
        doc["tolerance_points"] = tolerance
    return doc


def summary_lines(doc: Mapping[str, Any]) -> list[str]:
    s = doc["summary"]
    out = []
    for r in doc["devices"]:
        if r.get("status") == "failed":
            out.append(f"FAILED {r['error']}")
        elif r.get("status") == "regressed":
            reg = r["regression"]
            out.append(f"REGRESSED {r['device']}: accuracy {100 * reg['device_accuracy']:.2f}% is "
                       f"{reg['drop_points']:.2f} points below the build-time {100 * reg['build_accuracy']:.2f}% "
                       f"(tolerance {reg['tolerance_points']:g}; {reg['basis']})")
        elif r.get("status") == "budget":
            lines = "; ".join(b["line"] for b in r.get("budgets", []) if b["ok"] is False)
            out.append(f"BUDGET {r['device']}: profile '{r['profile']}' missed: {lines}")
    out += grouped([(r["device"], r["target_warning"]) for r in doc["devices"] if r.get("target_warning")],
                   prefix="warning: ")
    n = s["devices"]
    done = n - len(s["failed"])
    verdict = {0: "all passed", 3: "gate failed", 4: "partial"}[s["exit_code"]]
    out.append(f"fleet: {done}/{n} devices measured, {len(s['ok'])} passed ({verdict}, exit {s['exit_code']})"
               if doc["kind"] == "bench" else f"fleet: {done}/{n} devices done ({verdict}, exit {s['exit_code']})")
    return out
