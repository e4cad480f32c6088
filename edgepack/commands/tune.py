"""``edgepack tune BUNDLE [--profile NAME]``: a thin wrapper over ``python -m runtime_shim tune``.

The search itself lives in the shim (``runtime_shim/tune.py``) because it must run on the device,
where only onnxruntime, tokenizers and numpy are installed; this command runs the same code here and
takes the thread ceiling from a device profile when one is named.
"""

from __future__ import annotations

import argparse
import sys


def register(sub) -> argparse.ArgumentParser:
    # The shim's own parser, so both commands take the same options; edgepack adds --profile.
    from runtime_shim import tune as shim_tune

    p = shim_tune.register(sub)
    p.add_argument("--profile", default=None, metavar="NAME",
                   help="a device profile (edgepack profiles): its physical cores cap the thread search")
    return p


def run(args: argparse.Namespace) -> int:
    from edgepack.errors import EdgepackError
    from runtime_shim import BundleError
    from runtime_shim import tune as shim_tune

    if args.profile:
        from edgepack import profiles, targets

        prof = profiles.load(args.profile)
        cores = shim_tune.physical_cores()
        warning = targets.host_warning(targets.load(prof.target))
        if warning:
            print(f"{warning.replace('bundle built for', 'profile ' + repr(prof.name) + ' is for')} "
                  "(tune on the device itself for its figures)", file=sys.stderr)
        if args.max_threads is None:
            args.max_threads = min(prof.physical_cores, cores)
            if prof.physical_cores > cores:
                print(f"note: profile '{prof.name}' has {prof.physical_cores} physical cores, this CPU {cores}: "
                      f"searching 1..{cores}", file=sys.stderr)
        elif args.max_threads > prof.physical_cores:
            raise EdgepackError(f"--max-threads {args.max_threads} is above profile '{prof.name}''s "
                                f"{prof.physical_cores} physical cores; pass at most {prof.physical_cores}")
    try:
        return shim_tune.run(args)
    except BundleError as e:
        raise EdgepackError(str(e)) from None
