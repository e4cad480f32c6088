"""``edgepack deploy BUNDLE --to NAME[,NAME]|all [--setup] [--rename]`` and ``edgepack deploy --rollback NAME``.

Checks a signed_only device's bundle here against the inventory's keys before a byte is sent, then
copies it to each device in parallel, atomically: upload beside the releases, check it there with the
device's installed runtime (its own keys on a signed_only device), load it once, then switch
``current`` with a rename; the release it replaces stays as ``previous`` for ``--rollback``. See
``edgepack.fleet.deploy`` and ``edgepack.fleet.runtime``.
"""

from __future__ import annotations

import argparse

from .devices import add_inventory_args


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("deploy", help="copy a bundle to devices (atomic, verified there, previous kept)",
                       description="Deploy BUNDLE to the devices of devices.toml in parallel: upload beside the "
                                   "current release, verify every checksum on the device, switch atomically, keep "
                                   "the previous release. --rollback NAME restores the previous release.")
    p.add_argument("bundle", nargs="?", metavar="BUNDLE", help="the bundle directory (holding manifest.json)")
    p.add_argument("--rollback", default=None, metavar="NAME[,NAME]|all",
                   help="point these devices back at their previous release (no BUNDLE needed)")
    p.add_argument("--name", default=None,
                   help="the bundle's name on the device (default: the manifest's name, else the directory's)")
    p.add_argument("--setup", action="store_true",
                   help="install this machine's runtime (edgepack-runtime, with onnxruntime, tokenizers, numpy, and "
                        "cryptography on signed_only devices) and the inventory's trusted keys into the device's "
                        "runtime_dir first (as `edgepack devices --setup`)")
    p.add_argument("--rename", action="store_true",
                   help="put a bundle of another name into a slot that accepted a different one")
    add_inventory_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    from ..errors import EdgepackError
    from ..fleet.deploy import check_before_upload, deploy_one, load_bundle, rollback_one
    from ..fleet.inventory import load_inventory
    from ..fleet.session import run_shown

    inv = load_inventory(args.inventory)
    if args.rollback:
        if args.bundle:
            raise EdgepackError("--rollback takes device names, not a BUNDLE; drop BUNDLE")
        devices = inv.select(args.rollback)

        async def job(session, log):
            return await rollback_one(session, args.name, log=log)

        outcomes = run_shown("rollback", devices, job, jobs=args.jobs, trust_new_host=args.trust_new_host)
        for o in outcomes:
            if o.ok:
                v = o.value
                print(f"{o.device.name}: rolled back {v['bundle']}: current {v['current']}, previous {v['previous']}")
            else:
                print(f"FAILED {o.error}")
        return _verdict("rollback", outcomes)

    if not args.bundle:
        raise EdgepackError("deploy needs BUNDLE (a bundle directory) or --rollback NAME")
    bundle = load_bundle(args.bundle, args.name)
    devices = inv.select(args.to)
    check_before_upload(bundle, devices)
    async def job(session, log):
        return await deploy_one(session, bundle, setup=args.setup, rename=args.rename, log=log)

    outcomes = run_shown("deploy", devices, job, jobs=args.jobs, trust_new_host=args.trust_new_host)
    for o in outcomes:
        if o.ok:
            v = o.value
            sent = f"{v['bytes_sent'] / 1e6:.2f} MB sent" if v["bytes_sent"] else "nothing sent"
            checked = ("signature checked here and on the device" if v["signed"] else
                       "checksums only: the device has no trusted keys, so a rewritten bundle would pass")
            print(f"{o.device.name}: {v['action']} {bundle.name} {v['release']} ({sent}, {checked}, "
                  f"{v['seconds']:.1f} s); previous {v['previous'] or 'none'}")
        else:
            print(f"FAILED {o.error}")
    return _verdict("deploy", outcomes)


def _verdict(what: str, outcomes) -> int:
    from ..errors import ExitCode

    failed = [o.device.name for o in outcomes if not o.ok]
    if failed:
        print(f"{what}: {len(outcomes) - len(failed)}/{len(outcomes)} devices done; failed: {', '.join(failed)} "
              f"(partial, exit {int(ExitCode.PARTIAL)})")
        return ExitCode.PARTIAL
    print(f"{what}: {len(outcomes)}/{len(outcomes)} devices done")
    return ExitCode.OK
