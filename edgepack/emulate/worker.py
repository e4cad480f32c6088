"""Predictions of one bundle's shim for a list of models, as a script: ``python worker.py JOB.json``.

Runs inside the emulated CPU (QEMU user mode, or an arm64 root), where edgepack and torch are not
installed: it imports the bundle's own ``runtime_shim`` (from ``job["shim_parent"]``), numpy and the
standard library only. The host runs the same script natively for the reference predictions, so both
sides batch and score the rows with the same code (``runtime_shim.bench.predict_probs``).

JOB.json::

    {"bundle": DIR, "shim_parent": DIR, "texts": FILE (a JSON list), "out": FILE,
     "models": [{"name": "bundle", "overrides": {...}}, ...], "batch_size": 32}

The output holds, per model, the argmax label id and the top softmax probability of every row (what
accuracy, the out-of-scope threshold and agreement need), the CPU the process saw, the versions and
any warning the shim raised at load.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import warnings

CHUNK = 512  # rows per progress line: a multiple of the batch size, so the batches are predict_probs' own


def main(job_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    sys.path.insert(0, job["shim_parent"])
    import numpy as np
    import onnxruntime as ort

    from runtime_shim.bench import predict_probs
    from runtime_shim.cpu import cpu_flags
    from runtime_shim.pipeline import OnnxPipeline

    with open(job["texts"]) as f:
        texts = json.load(f)
    batch = int(job.get("batch_size", 32))
    chunk = max(batch, CHUNK // batch * batch)
    # predict_probs sorts rows by length (stable) and batches them; chunks of that order, each a
    # multiple of the batch size, give the same batches and so the same answers as one call.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    arch, flags = cpu_flags()
    out = {"machine": platform.machine(), "arch": arch, "flags": sorted(flags),
           "versions": {"python": platform.python_version(), "onnxruntime": ort.__version__,
                        "numpy": np.__version__},
           "rows": len(texts), "models": {}}
    started = time.time()
    for k, model in enumerate(job["models"]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = OnnxPipeline(job["bundle"], verify=False, overrides=model.get("overrides") or {})
        ids = np.zeros(len(texts), dtype=np.int64)
        top = np.zeros(len(texts), dtype=np.float64)
        t0 = time.time()
        for start in range(0, len(order), chunk):
            idx = order[start:start + chunk]
            probs = predict_probs(pipe, [texts[i] for i in idx], batch_size=batch)
            ids[idx], top[idx] = probs.argmax(axis=1), probs.max(axis=1)
            print(f"progress {model['name']} ({k + 1}/{len(job['models'])}): {min(start + chunk, len(order))}/"
                  f"{len(order)} rows, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        out["models"][model["name"]] = {"ids": ids.tolist(), "top": top.tolist(),
                                        "warnings": [str(w.message) for w in caught],
                                        "seconds": round(time.time() - t0, 2)}
        del pipe
    out["seconds"] = round(time.time() - started, 2)
    tmp = job["out"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, job["out"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
