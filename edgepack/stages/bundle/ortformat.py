"""ONNX Runtime's ORT format: ``model.ort`` plus the ``required_operators.config`` that a minimal
ONNX Runtime build (``build.sh --minimal_build --include_ops_by_config``) needs, for phones and
small devices where the full runtime is too big.

The graph is optimised at the ``extended`` level before it is saved: those fusions (quantized
MatMul, LayerNorm, GELU) are the same on every CPU, while the ``all`` level adds layout transforms
(NCHWc) specific to the machine that saved the file. A minimal build cannot optimise at load time,
so what is saved is what runs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ORT_MODEL = "model.ort"
REQUIRED_OPERATORS = "required_operators.config"
LEVELS = ("basic", "extended")


def write_ort(onnx_path: Path, out_dir: Path, *, level: str = "extended") -> tuple[Path, Path]:
    """Write ``out_dir/model.ort`` and ``out_dir/required_operators.config`` from ``onnx_path``;
    return both paths. Each file is written beside its target and renamed into place.

    >>> write_ort(Path("bundle/model.quant.onnx"), Path("bundle"))  # doctest: +SKIP
    (PosixPath('bundle/model.ort'), PosixPath('bundle/required_operators.config'))
    """
    import logging

    import onnxruntime as ort
    from onnxruntime.tools.ort_format_model import create_config_from_models

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)

    if level not in LEVELS:
        raise ValueError(f"level={level!r} is not valid; choose one of: {', '.join(LEVELS)}")
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".edgepack-ort-", dir=out_dir) as tmp:
        tmp_model = Path(tmp) / ORT_MODEL
        so = ort.SessionOptions()
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if level == "extended"
                                       else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        so.optimized_model_filepath = str(tmp_model)
        so.add_session_config_entry("session.save_model_format", "ORT")
        so.log_severity_level = 3
        from runtime_shim.session import DEFAULTS

        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=DEFAULTS["disabled_optimizers"])
        tmp_config = Path(tmp) / REQUIRED_OPERATORS
        create_config_from_models([tmp_model], tmp_config, enable_type_reduction=False)
        # The generated header names the temporary path; keep the file stable across builds.
        lines = [f"# - {ORT_MODEL}" if ln.startswith("# - ") else ln for ln in tmp_config.read_text().splitlines()]
        tmp_config.write_text("\n".join(lines) + "\n")
        model_out, config_out = out_dir / ORT_MODEL, out_dir / REQUIRED_OPERATORS
        os.replace(tmp_model, model_out)
        os.replace(tmp_config, config_out)
    return model_out, config_out
