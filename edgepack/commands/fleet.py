"""``edgepack fleet bench|tune|compare``: measure a bundle on every device and report across them.

    edgepack fleet bench BUNDLE [--to NAMES|all] [--out DIR] [--tolerance 1.0]
    edgepack fleet tune BUNDLE [--to ...] [--dry-run]
    edgepack fleet compare A B          (two fleet.json files or their directories)

``bench`` deploys the bundle where it is not current, runs ``python -m runtime_shim bench`` on each
device, pulls the JSON back and writes ``fleet.html``, ``fleet.md``, ``fleet.json`` and ``fleet.png``.
Exit code: 0 every device passed; 3 a device lost more than ``--tolerance`` points against the
build-time accuracy or missed a budget of its profile; 4 some devices could not be measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .devices import add_inventory_args


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("fleet", help="bench or tune a bundle on every device; one report across devices",
                       description="Run the shim's bench or tune on each device of devices.toml and report "
                                   "across devices; compare two result sets.")
    fs = p.add_subparsers(dest="fleet_command", metavar="COMMAND")
    b = fs.add_parser("bench", help="benchmark BUNDLE on each device and write the fleet report",
                      description="Deploy BUNDLE where it is not current, run `python -m runtime_shim bench` "
                                  "on each device, and write fleet.html/.md/.json/.png.")
    b.add_argument("bundle", metavar="BUNDLE")
    b.add_argument("--out", default=None, metavar="DIR",
                   help="where the report goes (default: fleet-results/<bundle>-<digest>)")
    b.add_argument("--tolerance", type=float, default=1.0, metavar="POINTS",
                   help="accuracy points a device may lose against the build-time figure (default: 1.0)")
    b.add_argument("--runs", type=int, default=200, help="timed single queries per device (default: 200)")
    b.add_argument("--warmup", type=int, default=50, help="untimed queries first (default: 50)")
    b.add_argument("--setup", action="store_true", help="install this machine's runtime on the devices first (as deploy)")
    b.add_argument("--name", default=None, help="the bundle's name on the devices (as for deploy)")
    b.add_argument("--service", action="store_true",
                   help="time through each device's running model service (inventory service = \"NAME\"), as an "
                        "application there classifies")
    add_inventory_args(b)
    t = fs.add_parser("tune", help="run the shim's tune on each device; a winner is kept there, beside the release",
                      description="Run `python -m runtime_shim tune` on each device (emulated devices are skipped): "
                                  "every candidate against the device's current settings and ORT's defaults; one "
                                  "faster on a figure and slower on none is kept as that device's settings for this "
                                  "bundle, in its runtime state (the bundle's files are not changed).")
    t.add_argument("bundle", metavar="BUNDLE")
    t.add_argument("--out", default=None, metavar="DIR", help="where tune.json and tune.md go")
    t.add_argument("--runs", type=int, default=None, help="timed queries per candidate (shim default: 200)")
    t.add_argument("--rounds", type=int, default=None, help="interleaved blocks per candidate (shim default: 4)")
    t.add_argument("--dry-run", action="store_true", help="measure only; change nothing on the devices")
    t.add_argument("--setup", action="store_true", help="install this machine's runtime on the devices first (as deploy)")
    t.add_argument("--name", default=None, help="the bundle's name on the devices (as for deploy)")
    add_inventory_args(t)
    c = fs.add_parser("compare", help="compare two fleet bench result sets device by device")
    c.add_argument("a", metavar="A", help="fleet.json (or its directory)")
    c.add_argument("b", metavar="B", help="fleet.json (or its directory)")
    p.set_defaults(_parser=p)
    return p


def run(args: argparse.Namespace) -> int:
    from ..errors import ExitCode

    if args.fleet_command == "compare":
        from ..fleet.compare import compare, load_doc

        print(compare(load_doc(args.a), load_doc(args.b)))
        return ExitCode.OK
    if args.fleet_command not in ("bench", "tune"):
        args._parser.print_help()
        return ExitCode.USAGE
    return _bench(args) if args.fleet_command == "bench" else _tune(args)


def _setup(args: argparse.Namespace):
    from ..errors import EdgepackError
    from ..fleet.deploy import check_before_upload, load_bundle
    from ..fleet.inventory import load_inventory

    if getattr(args, "runs", None) is not None and args.runs < 1:
        raise EdgepackError(f"--runs {args.runs}: pass at least 1")
    inv = load_inventory(args.inventory)
    devices = inv.select(args.to)
    bundle = load_bundle(args.bundle, args.name)
    check_before_upload(bundle, devices)
    out = Path(args.out) if args.out else Path("fleet-results") / f"{bundle.name}-{bundle.release}"
    return devices, bundle, out


def _run(what: str, devices, job, args: argparse.Namespace):
    from ..fleet.session import run_shown

    return run_shown(what, devices, job, jobs=args.jobs, trust_new_host=args.trust_new_host)


def _bench(args: argparse.Namespace) -> int:
    from ..errors import EdgepackError
    from ..fleet.bench import bench_one, device_record, fleet_document, reference, summary_lines
    from ..fleet.report import write_report

    if args.tolerance < 0:
        raise EdgepackError(f"--tolerance {args.tolerance}: pass a number of accuracy points >= 0")
    devices, bundle, out = _setup(args)
    reference(bundle)  # before the devices start: a fallback computes on this machine

    async def job(session, log):
        return await bench_one(session, bundle, out, runs=args.runs, warmup=args.warmup, setup=args.setup,
                               service=args.service, log=log)

    outcomes = _run("fleet bench", devices, job, args)
    records = [device_record(o, bundle, tolerance=args.tolerance) for o in outcomes]
    doc = fleet_document("bench", bundle, records, tolerance=args.tolerance)
    paths = write_report(out, doc)
    for r in records:
        if r["status"] != "failed":
            lat = r.get("latency_ms") or {}
            speed = (f"p50 {lat['p50']:.3f} ms, mean {lat['mean']:.3f} ms, p95 {lat['p95']:.3f} ms" if lat
                     else "emulated: accuracy only")
            print(f"{r['device']}: accuracy {100 * r['accuracy']:.2f}% "
                  f"(build {100 * (r['regression']['build_accuracy'] or 0):.2f}%), "
                  f"agreement {100 * (r.get('agreement') or 0):.1f}%, {speed} [{r['status']}]")
    for line in summary_lines(doc):
        print(line)
    print(f"wrote {paths['html']} (and {', '.join(p.name for k, p in paths.items() if k != 'html')})")
    return doc["summary"]["exit_code"]


def _tune(args: argparse.Namespace) -> int:
    from runtime_shim.manifest import write_json_atomic

    from ..fleet.bench import _base, fleet_document, summary_lines, tune_one
    from ..fleet.compare import tune_markdown

    devices, bundle, out = _setup(args)
    extra = [*(["--runs", str(args.runs)] if args.runs else []), *(["--rounds", str(args.rounds)] if args.rounds else []),
             *(["--dry-run"] if args.dry_run else [])]

    async def job(session, log):
        return await tune_one(session, bundle, out, extra=extra, setup=args.setup, log=log)

    outcomes = _run("fleet tune", devices, job, args)
    records = []
    for o in outcomes:
        rec = _base(o, bundle)
        rec.update({"status": "ok", "tune": o.value} if o.ok else {"status": "failed", "error": o.error})
        records.append(rec)
    doc = fleet_document("tune", bundle, records)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "tune.json", doc)
    (out / "tune.md").write_text(tune_markdown(doc))
    for r in records:
        t = r.get("tune") or {}
        if t.get("skipped"):
            print(f"{r['device']}: skipped ({t['skipped']})")
        elif r["status"] == "ok" and t.get("winner") == "current":
            print(f"{r['device']}: winner current: no candidate was faster without being slower on a figure; "
                  "its settings stay")
        elif r["status"] == "ok":
            ratios = t.get("ratios") or {}
            print(f"{r['device']}: winner {t.get('winner')} (p50 x{ratios.get('b2b_p50', 1):.2f} back to back, "
                  f"x{ratios.get('gap_p50', 1):.2f} gapped, p95 x{ratios.get('b2b_p95', 1):.2f} / "
                  f"x{ratios.get('gap_p95', 1):.2f} of its current settings)"
                  + ("; dry run: nothing changed" if args.dry_run else "; kept there for this bundle"))
    for line in summary_lines(doc):
        print(line)
    print(f"wrote {out / 'tune.md'} and {out / 'tune.json'}")
    return doc["summary"]["exit_code"]
