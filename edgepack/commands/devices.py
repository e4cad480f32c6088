"""``edgepack devices [--check | --setup | --trust-key FILE]``: list the inventory (``devices.toml``);
with ``--check``, connect to each device in parallel and report what is there: reachable, Python, the
runtime packages, the CPU as read on the device, the target edgepack detects from it and whether the
profile says the same. ``--setup`` installs this machine's runtime and the inventory's trusted keys
into each device's runtime directory; ``--trust-key`` adds one public key there (the only ways a
device's keys change)."""

from __future__ import annotations

import argparse


def add_inventory_args(p: argparse.ArgumentParser, *, to: bool = True) -> None:
    """Options every fleet command shares."""
    p.add_argument("--inventory", default=None, metavar="FILE",
                   help="the device inventory (default: $EDGEPACK_DEVICES, else ./devices.toml)")
    if to:
        p.add_argument("--to", default="all", metavar="NAME[,NAME]|all", help="which devices (default: all)")
    p.add_argument("--trust-new-host", action="store_true",
                   help="record the host key of a device not yet in known_hosts (its fingerprint is printed); "
                        "a changed key is refused regardless")
    p.add_argument("--jobs", type=int, default=8, metavar="N", help="devices worked on at once (default: 8)")


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("devices", help="list the devices of devices.toml; --check connects to each",
                       description="List the inventory. With --check, connect to every device (in parallel) and "
                                   "report Python, onnxruntime/tokenizers/numpy, the CPU read on the device, the "
                                   "detected target and whether it matches the device's profile.")
    p.add_argument("--check", action="store_true", help="connect to each device and report what is there")
    p.add_argument("--json", default=None, metavar="OUT", help="with --check: also write the findings as JSON")
    p.add_argument("--setup", action="store_true",
                   help="install this machine's runtime (edgepack-runtime and its packages) and the inventory's "
                        "trusted_keys into each device's runtime_dir")
    p.add_argument("--trust-key", default=None, metavar="FILE",
                   help="add this public key (.pub, from `edgepack keys new`) to each device's trusted keys")
    add_inventory_args(p)
    return p


def _identifying_flags() -> set[str]:
    from .. import targets

    return {f for t in targets.all_targets() for f in (*t.requires_flags, *t.any_flags)}


def run(args: argparse.Namespace) -> int:
    from ..errors import ExitCode
    from ..fleet.inventory import format_devices, load_inventory

    inv = load_inventory(args.inventory)
    devices = inv.select(args.to)
    if args.setup or args.trust_key:
        return _provision(args, devices)
    if not args.check:
        print(format_devices(devices))
        return ExitCode.OK

    from ..fleet.session import run_shown

    async def check(session, log):
        if session.python_too_old():
            return {"too_old": session.python_too_old()}
        return {**session.target_check(), "missing": session.missing_packages(), "python_used": session.python[-1],
                "too_old": None}

    outcomes = run_shown("devices --check", devices, check, jobs=args.jobs, trust_new_host=args.trust_new_host,
                         allow_old_python=True)
    known = _identifying_flags()
    rows = [("device", "reachable", "python", "onnxruntime", "tokenizers", "numpy", "arch", "cores", "isa flags",
             "detected", "profile target", "match")]
    notes, found, mismatches = [], [], []
    for o in outcomes:
        d = o.device
        if not o.ok:
            reached = bool(o.info) or "unreachable (" not in str(o.error)
            rows.append((d.name, "yes" if reached else "no", *["-"] * 10))
            notes.append(f"{'FAILED' if reached else 'UNREACHABLE'} {o.error}")
            found.append({"device": d.name, "reachable": reached, "error": o.error})
            continue
        info, v = o.info, o.value
        if v.get("too_old"):  # it answered: reachable, and refused for its Python
            rows.append((d.name, "yes", _python_cell(d, info), *["-"] * 9))
            notes.append(v["too_old"])
            found.append({"device": d.name, "reachable": True, **info, **v})
            continue
        pk = info.get("packages") or {}
        flags = sorted(set(info.get("flags") or ()) & known)
        rows.append((d.name, "yes", _python_cell(d, info), pk.get("onnxruntime") or "MISSING",
                     pk.get("tokenizers") or "MISSING", pk.get("numpy") or "MISSING", str(info.get("arch")),
                     str(info.get("physical_cores")), " ".join(flags) or "-", v.get("detected_target") or "-",
                     v.get("profile_target") or "-", "yes" if v.get("target_match") else "NO"))
        if not info.get("runtime_python"):
            notes.append(f"{d.name}: no edgepack runtime in {info.get('runtime_dir')}: `edgepack devices --setup --to "
                         f"{d.name}` installs it (bundles are run only through it)")
        elif v["missing"]:
            notes.append(f"{d.name}: the runtime in {info.get('runtime_dir')} lacks {', '.join(v['missing'])}: "
                         f"`edgepack devices --setup --to {d.name}` installs them")
        if not v.get("target_match"):
            mismatches.append((d.name, f"the CPU reads as target '{v.get('detected_target')}' but profile "
                                       f"'{d.profile}' is for '{v.get('profile_target')}'; bundles built for the "
                                       "profile may lack kernels here (or the profile is wrong)"))
        if d.emulated:
            notes.append(f"{d.name}: emulated ({' '.join(d.command_prefix)}): flags "
                         f"{'from the inventory' if d.cpu_flags else 'as /proc/cpuinfo shows them (the host CPU)'}")
        found.append({"device": d.name, "reachable": True, **info, **v})
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    from ..fleet.progress import grouped

    for n in [*notes, *grouped(mismatches)]:
        print(n)
    down = [o.device.name for o in outcomes if not o.ok]
    print(f"devices: {len(outcomes) - len(down)}/{len(outcomes)} reachable"
          + (f"; unreachable: {', '.join(down)}" if down else ""))
    if args.json:
        from runtime_shim.manifest import write_json_atomic

        write_json_atomic(args.json, found)
    return ExitCode.PARTIAL if down else ExitCode.OK


def _provision(args: argparse.Namespace, devices) -> int:
    from pathlib import Path

    from ..errors import EdgepackError, ExitCode
    from ..fleet.runtime import install_keys, protection, require_runtime, setup_runtime, trusted_key_files
    from ..fleet.session import run_shown

    key = Path(args.trust_key).expanduser() if args.trust_key else None
    if key is not None:
        from ..fleet import DeviceError

        try:
            trusted_key_files("--trust-key", str(key))
        except DeviceError as e:
            raise EdgepackError(str(e)) from None

    async def job(session, log):
        if args.setup:
            session.progress.state("installing the runtime")
            await setup_runtime(session, log)
        else:
            require_runtime(session, setup=False)
        if key is not None:
            session.progress.state("adding the key")
            await install_keys(session, [key], log)
        return protection(session)

    outcomes = run_shown("devices --setup" if args.setup else "devices --trust-key", devices, job, jobs=args.jobs,
                         trust_new_host=args.trust_new_host)
    for o in outcomes:
        print(f"FAILED {o.error}" if not o.ok else _ready(o))
    failed = [o.device.name for o in outcomes if not o.ok]
    print(f"devices: {len(outcomes) - len(failed)}/{len(outcomes)} set up" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return ExitCode.PARTIAL if failed else ExitCode.OK


def _ready(o) -> str:
    """``a: runtime ready in /opt/edgepack-runtime: bundles run with its venv's Python 3.11.2, made from
    the inventory's python (/usr/bin/python3, 3.11.2)``: what --check shows next, and where it came from."""
    info = o.info
    return (f"{o.device.name}: runtime ready in {info.get('runtime_dir')}: bundles run with {info.get('runtime_python')} "
            f"(Python {info.get('python')}), a venv of the inventory's python ({o.device.python}, "
            f"{info.get('base_version') or info.get('python')})")


def _python_cell(device, info) -> str:
    """The inventory's python and its version (the installed runtime's venv is made from it)."""
    return f"{device.python} {info.get('base_version') or info.get('python')}"
