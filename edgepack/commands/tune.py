"""``edgepack tune BUNDLE [--profile NAME]``: a thin wrapper over ``python -m runtime_shim tune``.

The search itself lives in the shim (``runtime_shim/tune.py``) because it must run on the device,
where only onnxruntime, tokenizers and numpy are installed; this command runs the same code here and
takes the thread ceiling from a device profile when one is named.
"""

from __future__ import annotations

import argparse
import sys


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("tune", help="measure thread settings on this device and write the fastest to runtime.json",
                       description="Search intra-op threads (1..physical cores), spinning, graph optimisation level "
                                   "(and x64quantprecision on x86 without VNNI), back to back and with gaps between "
                                   "queries, against ONNX Runtime's defaults in the same run; write the winner into "
                                   "the bundle's runtime.json and re-hash its manifest. On a device without edgepack: "
                                   "python -m runtime_shim tune BUNDLE.")
    p.add_argument("bundle", metavar="BUNDLE", help="the bundle directory")
    p.add_argument("--profile", default=None, metavar="NAME",
                   help="a device profile (edgepack profiles): its physical cores cap the thread search")
    p.add_argument("--max-threads", type=int, default=None, metavar="N",
                   help="search 1..N intra-op threads (default: physical cores of this CPU or the profile)")
    p.add_argument("--runs", type=int, default=200, help="timed queries per candidate and mode (default: 200)")
    p.add_argument("--warmup", type=int, default=50, help="untimed queries per candidate first (default: 50)")
    p.add_argument("--gap-ms", type=float, default=20.0, help="pause between gapped queries (default: 20)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved blocks per candidate (default: 4)")
    p.add_argument("--tolerance", type=float, default=0.0, metavar="PCT",
                   help="accept a winner up to PCT%% worse than ORT's defaults on any of p50/p95 back to back and "
                        "gapped (default 0: no worse on any)")
    p.add_argument("--data", default=None, help="query texts (default: the bundle's eval.jsonl)")
    p.add_argument("--dry-run", action="store_true", help="print the table, leave the bundle unchanged")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the full result as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum check of the bundle's files")
    return p


def run(args: argparse.Namespace) -> int:
    from runtime_shim import BundleError
    from runtime_shim import tune as shim_tune

    from ..errors import EdgepackError

    cores = shim_tune.physical_cores()
    max_threads = args.max_threads
    if args.profile:
        from .. import profiles, targets

        prof = profiles.load(args.profile)
        warning = targets.host_warning(targets.load(prof.target))
        if warning:
            print(f"{warning.replace('bundle built for', 'profile ' + repr(prof.name) + ' is for')} "
                  "(tune on the device itself for its figures)", file=sys.stderr)
        if max_threads is None:
            max_threads = min(prof.physical_cores, cores)
            if prof.physical_cores > cores:
                print(f"note: profile '{prof.name}' has {prof.physical_cores} physical cores, this CPU {cores}: "
                      f"searching 1..{cores}", file=sys.stderr)
        elif max_threads > prof.physical_cores:
            raise EdgepackError(f"--max-threads {max_threads} is above profile '{prof.name}''s "
                                f"{prof.physical_cores} physical cores; pass at most {prof.physical_cores}")
    argv = [str(args.bundle), "--runs", str(args.runs), "--warmup", str(args.warmup), "--gap-ms", str(args.gap_ms),
            "--rounds", str(args.rounds), "--tolerance", str(args.tolerance)]
    if max_threads is not None:
        argv += ["--max-threads", str(max_threads)]
    for flag, value in (("--data", args.data), ("--json", args.json)):
        if value:
            argv += [flag, str(value)]
    argv += [f for f, on in (("--dry-run", args.dry_run), ("--no-verify", args.no_verify)) if on]
    parser = argparse.ArgumentParser(prog="edgepack tune")
    shim_tune.register(parser.add_subparsers(dest="command"))
    try:
        return shim_tune.run(parser.parse_args(["tune", *argv]))
    except BundleError as e:
        raise EdgepackError(str(e)) from None
