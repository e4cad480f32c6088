"""``edgepack pack``: a classifier directory (or an ONNX export of one) -> a verified bundle.

    export (fp32 ONNX, parity against PyTorch) -> quantize (the target's int8 settings, accuracy gate
    against fp32) -> bundle (out-of-scope threshold, eval slice, shim, manifest)

The three stages run into a work directory beside ``out`` (removed after), and the bundle stage
replaces ``out`` atomically when complete; nothing is written when a check fails.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from edgepack.config import DataConfig, ExportConfig, PackConfig
from edgepack.console import Log, Progress
from edgepack.data import LabelledData, load_dataset
from edgepack.errors import EdgepackError
from edgepack.modeling import read_model_info
from edgepack.records import claimed_output


def pack(cfg: PackConfig, model_dir: Path, data_cfg: DataConfig, out: Path, *, export_cfg: ExportConfig | None = None,
         force: bool = False, data: LabelledData | None = None, log: Log | None = None) -> dict[str, Any]:
    """Build the bundle at ``out`` and return its manifest. ``out`` is replaced only when the new
    bundle is complete (and only with ``force``)."""
    from edgepack import stages
    from edgepack.stages import bundle, export, quantize

    log = log or Progress("pack")
    model_dir, out = Path(model_dir), Path(out)
    export_cfg = export_cfg or ExportConfig()
    if not model_dir.is_dir():
        raise EdgepackError(f"{model_dir}: no such directory; pass a Hugging Face classifier directory")
    with claimed_output(out, replace=force, inputs=(model_dir,)):
        info = read_model_info(model_dir)
        export.source_kind(model_dir)
        target = quantize.target_for(cfg.quantize)
        if target.quantize.embedding_bits == 4:
            export_cfg = export_cfg.replace(embedding="gather")  # 4-bit blocks need a plain Gather on the table
        data = data or load_dataset(data_cfg, dict(enumerate(info.label_names)))
        ctx = stages.Context(data=data, data_config=data_cfg, log=log)
        log(f"[pack] {model_dir} -> {out} (target {target.name}; {len(data['train'])}/{len(data['validation'])}/"
            f"{len(data['test'])} rows)")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".edgepack-pack-", dir=out.parent) as work_s:
            work = Path(work_s)
            exported = export.run(export_cfg, model_dir, work / "export", ctx)
            m = exported.metrics
            if m.get("unreachable_trimmed"):
                trim = m["unreachable_trimmed"]
                log(f"[pack] unreachable rows trimmed (exact): vocabulary {trim['vocab_before']} -> {trim['vocab_after']}, "
                    f"positions {trim['positions_before']} -> {trim['positions_after']}")
            if m.get("parity_max_abs_diff") is not None:
                log(f"[pack] exported fp32 ONNX ({m['writer']} writer, {m['onnx_bytes'] / 1e6:.1f} MB), "
                    f"max |logit diff| vs PyTorch {m['parity_max_abs_diff']:.1e}")
            # "auto" becomes the detected target's name; a name or a target file (--target my.toml) stays as given
            qcfg = cfg.quantize.replace(target=target.name) if cfg.quantize.target == "auto" else cfg.quantize
            quantized = quantize.run(qcfg, exported.out, work / "quantize", ctx)
            record = bundle.run(cfg.bundle.replace(archive=False), quantized.out, out, ctx)
        if cfg.bundle.archive:
            from edgepack.bundle_files import archive

            log(f"[pack] archive written: {archive(out)}")
        return dict(record.record["manifest"])
