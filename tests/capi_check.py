"""The C API session against ONNX Runtime's Python package, run inside a given interpreter (the installed
onnxruntime, or a second venv holding the oldest one the runtime supports): ``tests/test_capi.py`` runs it
and asserts on the JSON it prints. Needs onnxruntime, tokenizers, numpy and the repository's runtime_shim.

    python tests/capi_check.py REPO BUNDLE GRAPHS_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, sys.argv[1])

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from runtime_shim import BundleError, OnnxPipeline, capi, session  # noqa: E402
from runtime_shim.csession import CSession  # noqa: E402

bundle, graphs, out_dir = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
TEXTS = [
    "what is my balance",
    "set an alarm for 7 am please",
    "hi",
    "caf\u00e9 balance",
    "transfer fifty dollars from checking to savings right now",
]
# Settings that reach every OrtApi entry the shim binds: both arena and pattern switches, the parallel
# executor, each graph level, a session config entry, no disabled optimizer.
VARIANTS = {
    "defaults": {},
    "arena and pattern off": {"enable_cpu_mem_arena": False, "enable_mem_pattern": False},
    "arena and pattern on": {"enable_cpu_mem_arena": True, "enable_mem_pattern": True},
    "parallel, 2 threads": {
        "execution_mode": "parallel",
        "inter_op_num_threads": 2,
        "intra_op_num_threads": 2,
    },
    "graph disable": {"graph_optimization_level": "disable"},
    "graph basic": {"graph_optimization_level": "basic"},
    "graph extended": {"graph_optimization_level": "extended"},
    "config entry, nothing disabled": {
        "session_config": {"session.intra_op.allow_spinning": "0"},
        "disabled_optimizers": [],
        "log_severity_level": 4,
    },
}


def logits(pipe: OnnxPipeline) -> list:
    return [pipe.forward(pipe.encode(batch)).tolist() for batch in (TEXTS[:1], TEXTS)]


def main() -> dict:
    api = capi.library()
    result: dict = {"onnxruntime": ort.__version__, "capi": api.version if api else None, "variants": {}}
    for name, settings in VARIANTS.items():
        c = OnnxPipeline(bundle, verify=False, overrides={**settings, "session_api": "c"})
        py = OnnxPipeline(bundle, verify=False, overrides={**settings, "session_api": "python"})
        assert isinstance(c.session, CSession) and isinstance(py.session, ort.InferenceSession)
        a, b = logits(c), logits(py)
        result["variants"][name] = {
            "max_diff": max(
                float(np.abs(np.array(x) - np.array(y)).max()) for x, y in zip(a, b, strict=True)
            ),
            "labels_c": [d["label"] for d in c(TEXTS)],
            "labels_python": [d["label"] for d in py(TEXTS)],
            "rows_c": [
                list(r) for r in c.session.run_rows([c._ids(t) for t in TEXTS], c.pad_id, c.output_name)
            ],
            "rows_python": b[1],
        }
    # "layout" (ORT >= 1.22): both APIs accept it or both refuse it, in one line.
    layout = {}
    for api_name in ("c", "python"):
        try:
            OnnxPipeline(
                bundle,
                verify=False,
                overrides={"graph_optimization_level": "layout", "session_api": api_name},
            )
            layout[api_name] = "ok"
        except BundleError as e:
            layout[api_name] = str(e)
    result["layout"] = layout
    # SetOptimizedModelFilePath: the graph ORT runs, written by the C API session, loads and agrees.
    opt = out_dir / "optimized.onnx"
    options = {**session.checked_options({}), "optimized_model_filepath": str(opt)}
    CSession(bundle / "model.quant.onnx", options)
    py = OnnxPipeline(bundle, verify=False, overrides={"session_api": "python"})
    reread = ort.InferenceSession(str(opt), providers=["CPUExecutionProvider"])
    enc = py.encode(TEXTS)
    feed = {i.name: enc[i.name] for i in reread.get_inputs()}
    result["optimized_file_max_diff"] = float(np.abs(reread.run(None, feed)[0] - py.forward(enc)).max())
    # Token id rows padded on the right, int32 and int64 inputs, a static and a per-run output width.
    rows = [[5, 7], [1, 2, 3, 4], [9]]
    result["sums"] = {
        p.stem: [list(r) for r in session.make_session(p, {"session_api": "c"}).run_rows(rows, pad_id=100)]
        for p in sorted(graphs.glob("*.onnx"))
    }
    # The function table: the version through the base, an error message through a refused call.
    try:
        api.out("CreateSession", api.env, b"/nonexistent/model.onnx", api.out("CreateSessionOptions"))
        result["refused"] = None
    except capi.OrtError as e:
        result["refused"] = str(e)
    OnnxPipeline(bundle)  # verified, as a device loads it
    return result


if __name__ == "__main__":
    # The version check: a bundle built with a newer onnxruntime warns once in this process of many loads.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = main()
    out["warnings"] = [
        f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, session.BundleWarning)
    ]
    print(json.dumps(out))
