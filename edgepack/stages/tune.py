"""The tune stage: a bundle -> the same bundle with its thread settings measured on this CPU.

When this CPU has the profile's target flags, ``runtime_shim.tune`` times the thread candidates on
validation texts (interleaved, back to back and with gaps) and writes the winner into
``runtime.json``; otherwise the profile's thread defaults go there and the manifest says they were not
measured (run ``edgepack tune`` on the device, or ``edgepack fleet tune``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgepack.config import TuneConfig
from edgepack.records import staging_dir, write_json_atomic
from edgepack.stages import StageRecord


def run(cfg: TuneConfig, src: Path, out: Path, ctx) -> StageRecord:
    """The stage: ``src`` (a bundle) -> ``out`` (a tuned copy; its manifest's ``tuned`` says how)."""
    from edgepack.targets import cpu_flags
    from edgepack.targets import load as load_target
    from runtime_shim import OnnxPipeline
    from runtime_shim.manifest import update_manifest
    from runtime_shim.tune import physical_cores, tune, write_winner

    profile, log = ctx.profile, ctx.log
    arch, flags = cpu_flags()
    target = load_target(profile.target)
    with staging_dir(out, force=True) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        if target.matches(arch, flags):
            cores = min(profile.physical_cores, physical_cores())
            texts = ctx.data["validation"].texts[:cfg.texts]
            result = tune(OnnxPipeline(tmp), texts, max_threads=cores, runs=cfg.runs,
                          warmup=min(50, cfg.runs), gap_ms=cfg.gap_ms, log=log)
            log(result.table())
            write_winner(tmp, result)
        else:
            missing = ", ".join(target.missing_flags(flags)) or arch
            log(f"[tune] this CPU is not a {target.name} ({missing} missing): using profile {profile.name}'s "
                "thread defaults; run `edgepack tune` on the device")
            runtime = json.loads((tmp / "runtime.json").read_text())
            runtime.update(profile.threads.runtime_settings())
            write_json_atomic(tmp / "runtime.json", runtime)
            update_manifest(tmp, tuned={"winner": "profile defaults", "settings": profile.threads.runtime_settings(),
                                        "measured": False})
    return StageRecord.read(out)
