"""``edgepack rollout BUNDLE --to GROUP [--canary N|P%] [--rate FACTOR]``: a staged rollout.

Deploys BUNDLE to a canary set of the group, benchmarks it there (``fleet bench``) and goes on in
waves, each ``--rate`` times the one before, only while every device stays inside the bundle's
build-time accuracy (``--tolerance`` points) and its profile's budgets. A failed gate stops the
rollout and rolls the devices it switched back to their previous release; the report names the
device and the figure. See ``edgepack.fleet.rollout``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .devices import add_inventory_args


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "rollout",
        help="deploy a bundle to a group in gated waves: canary first, stop and roll back on a regression",
        description="Deploy BUNDLE to a canary set of the devices --to names, benchmark it there, "
        "and continue in growing waves only while every device keeps the bundle's "
        "build-time accuracy (within --tolerance) and its profile's budgets; a failed "
        "gate stops the rollout and rolls back the devices it switched.",
    )
    p.add_argument("bundle", metavar="BUNDLE", help="the bundle directory (holding manifest.json)")
    add_inventory_args(p, to=False)
    p.add_argument(
        "--to",
        required=True,
        metavar="GROUP[,GROUP]|all",
        help="the devices: inventory groups (groups = [...] in devices.toml), device names, or all",
    )
    p.add_argument(
        "--canary",
        default="1",
        metavar="N|P%",
        help="the first wave: N devices or P%% of the group, rounded up (default: 1); one device of "
        "each profile goes first",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=2.0,
        metavar="FACTOR",
        help="each later wave is FACTOR times the one before, 1 to 5 (default: 2)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=1.0,
        metavar="POINTS",
        help="accuracy points a device may lose against the build-time figure (default: 1.0)",
    )
    p.add_argument("--runs", type=int, default=200, help="timed single queries per device (default: 200)")
    p.add_argument("--warmup", type=int, default=50, help="untimed queries first (default: 50)")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where rollout.json and the fleet report go (default: fleet-results/<bundle>-<digest>-rollout)",
    )
    p.add_argument("--plan", action="store_true", help="print the waves and stop; nothing is deployed")
    p.add_argument(
        "--setup", action="store_true", help="install this machine's runtime on the devices first (as deploy)"
    )
    p.add_argument("--name", default=None, help="the bundle's name on the devices (as for deploy)")
    return p


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..errors import EdgepackError, ExitCode
    from ..fleet.deploy import check_before_upload, load_bundle
    from ..fleet.inventory import load_inventory
    from ..fleet.progress import FleetProgress
    from ..fleet.rollout import plan_waves, rollout, summary_lines

    if args.tolerance < 0 or args.runs < 1 or args.warmup < 0:
        raise EdgepackError(
            f"--tolerance {args.tolerance:g} --runs {args.runs} --warmup {args.warmup}: pass a "
            "tolerance >= 0, at least 1 run and a warmup >= 0"
        )
    devices = load_inventory(args.inventory).select(args.to)
    bundle = load_bundle(args.bundle, args.name)
    waves = plan_waves(devices, canary=args.canary, rate=args.rate)
    for i, wave in enumerate(waves, 1):
        print(f"{'canary' if i == 1 else f'wave {i}/{len(waves)}'}: {', '.join(d.name for d in wave)}")
    if args.plan:
        return ExitCode.OK
    check_before_upload(bundle, devices)
    out = Path(args.out) if args.out else Path("fleet-results") / f"{bundle.name}-{bundle.release}-rollout"
    result = rollout(
        bundle,
        waves,
        out,
        runs=args.runs,
        warmup=args.warmup,
        tolerance=args.tolerance,
        setup=args.setup,
        jobs=args.jobs,
        trust_new_host=args.trust_new_host,
        log=tqdm.write,
        progress=FleetProgress,
    )
    for line in summary_lines(result, len(devices)):
        print(line)
    print(f"wrote {out / 'rollout.json'} and {out / 'fleet.html'}")
    return result.exit_code
