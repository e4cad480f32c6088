"""``edgepack pack``: a classifier directory (or an ONNX export of one) -> a verified bundle.

    export (fp32 ONNX, parity against PyTorch) -> quantize (the target's int8 settings, accuracy gate
    against fp32) -> bundle (out-of-scope threshold, eval slice, shim, manifest)

The build's pack chain (``runner.chain.PACK``) through a ledger in a work directory beside ``out``
(removed after); the bundle replaces ``out`` atomically when complete; nothing is written when a
check fails.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from edgepack.config import BuildConfig, DataConfig, ExportConfig, PackConfig
from edgepack.console import Log, Progress
from edgepack.data import LabelledData, load_dataset
from edgepack.errors import EdgepackError
from edgepack.modeling import read_model_info
from edgepack.records import claimed_output, hash_tree, staging_dir
from edgepack.runner.chain import PACK, chain, run_links
from edgepack.runner.ledger import Ledger


def pack(cfg: PackConfig, model_dir: Path, data_cfg: DataConfig, out: Path, *, export_cfg: ExportConfig | None = None,
         force: bool = False, data: LabelledData | None = None, log: Log | None = None) -> dict[str, Any]:
    """Build the bundle at ``out`` and return its manifest. ``out`` is replaced only when the new
    bundle is complete (and only with ``force``)."""
    import json

    from edgepack import stages
    from edgepack.stages import export, quantize

    log = log or Progress("pack")
    model_dir, out = Path(model_dir), Path(out)
    if not model_dir.is_dir():
        raise EdgepackError(f"{model_dir}: no such directory; pass a Hugging Face classifier directory")
    with claimed_output(out, replace=force, inputs=(model_dir,)):
        info = read_model_info(model_dir)
        export.source_kind(model_dir)
        target = quantize.target_for(cfg.quantize)
        data = data or load_dataset(data_cfg, dict(enumerate(info.label_names)))
        ctx = stages.Context(data=data, data_config=data_cfg, log=log)
        log(f"[pack] {model_dir} -> {out} (target {target.name}; {len(data['train'])}/{len(data['validation'])}/"
            f"{len(data['test'])} rows)")
        # "auto" becomes the detected target's name; a name or a target file (--target my.toml) stays as given
        qcfg = cfg.quantize.replace(target=target.name) if cfg.quantize.target == "auto" else cfg.quantize
        links = chain(BuildConfig(data=data_cfg, export=export_cfg or ExportConfig(), quantize=qcfg, bundle=cfg.bundle),
                      None, PACK)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".edgepack-pack-", dir=out.parent) as work_s:
            work = Path(work_s)
            ledger = Ledger(work, log, total=len(links), prefix="pack")
            bundle, _ = run_links(links, ledger, ctx, model_dir, hash_tree(model_dir))
            m = json.loads((work / links[0].name / "stage.json").read_text()).get("metrics", {})
            if m.get("unreachable_trimmed"):
                trim = m["unreachable_trimmed"]
                log(f"[pack] unreachable rows trimmed (exact): vocabulary {trim['vocab_before']} -> {trim['vocab_after']}, "
                    f"positions {trim['positions_before']} -> {trim['positions_after']}")
            if m.get("parity_max_abs_diff") is not None:
                log(f"[pack] exported fp32 ONNX ({m['writer']} writer, {m['onnx_bytes'] / 1e6:.1f} MB), "
                    f"max |logit diff| vs PyTorch {m['parity_max_abs_diff']:.1e}")
            with staging_dir(out, force=True) as tmp:
                os.replace(bundle, tmp)  # onto the empty staging directory: a rename, then into place
            manifest = json.loads((out / "manifest.json").read_text())
        if cfg.bundle.archive:
            from edgepack.bundle_files import archive

            log(f"[pack] archive written: {archive(out)}")
        return manifest
