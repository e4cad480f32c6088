"""Quantization-aware training against post-training quantization, from one build's student.

From a finished build directory (its ``recipe.json``, ``distill/`` and ``prune/``): the prune stage's
recovery is rerun with ``qat`` on for each target (the same recipe, seed and start: the distilled
student), then the build's own pruned model (PTQ) and each QAT model are exported and quantized
with each target's plain settings (``targets/*.toml``, no variants) and bundled. Every bundle is
scored natively on the full validation and test splits (fp32 export and int8 through the shim, one
intra-op thread, batches of 32), arm64 bundles also with the host's exact-kernel twin
(``session.x64quantprecision=1``) and under QEMU (``edgepack.emulate``) on stratified subsets.

Agreement: int8 argmax = the same model's fp32 argmax on validation. Calibrated: the out-of-scope
threshold chosen on validation with the metrics' one-SE rule, per model (fp32 and int8 alike).

    python benchmarks/qat_clinc150.py --build RUN.build --work /tmp/qat --emulate-rows 600 --json qat.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np


def _probs(ids, top, n_labels):
    """A probability matrix with the given argmax and top probability (all the threshold rule reads)."""
    ids, top = np.asarray(ids), np.asarray(top, dtype=np.float64)
    p = np.repeat(((1.0 - top) / max(n_labels - 1, 1))[:, None], n_labels, axis=1)
    p[np.arange(len(ids)), ids] = top
    return p


def _score(run, n_val, val_labels, test_labels, oos_id, n_labels, fp32=None):
    from edgepack.metrics import apply_threshold, calibrate_threshold

    ids, top = np.asarray(run["ids"]), np.asarray(run["top"])
    pv, pt = _probs(ids[:n_val], top[:n_val], n_labels), _probs(ids[n_val:], top[n_val:], n_labels)
    th = calibrate_threshold(pv, val_labels, oos_id)
    out = {"val_accuracy": float((ids[:n_val] == val_labels).mean()),
           "test_accuracy": float((ids[n_val:] == test_labels).mean()),
           "test_accuracy_calibrated": float((apply_threshold(pt, oos_id, th) == test_labels).mean()),
           "threshold": float(th)}
    if fp32 is not None:
        f = np.asarray(fp32["ids"])
        out["val_agreement_with_fp32"] = float((ids[:n_val] == f[:n_val]).mean())
        out["test_agreement_with_fp32"] = float((ids[n_val:] == f[n_val:]).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", type=Path, required=True, help="a finished build directory (read only)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--targets", nargs="+", default=["x86-64-avx2", "arm64"])
    ap.add_argument("--emulate-rows", type=int, default=600, help="validation + test rows under QEMU (0: none)")
    ap.add_argument("--qat-targets", nargs="*", default=None,
                    help="targets to train a QAT recovery for (default: --targets)")
    ap.add_argument("--models", nargs="*", default=None, help="models to measure: ptq, qat-TARGET (default: all)")
    ap.add_argument("--start", type=Path, default=None,
                    help="the model the recoveries start from (default: BUILD/distill)")
    ap.add_argument("--keep-layers", default=None, metavar="I,J", help="override [prune] keep_layers")
    ap.add_argument("--epochs", type=int, default=None, help="override the recovery's epochs")
    ap.add_argument("--ptq-rerun", action="store_true",
                    help="train the PTQ model here too (the same recovery without qat) instead of BUILD/prune")
    ap.add_argument("--train-only", action="store_true", help="train, measure nothing")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the training (0: torch's choice)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from edgepack import stages
    from edgepack.config import BuildConfig
    from edgepack.data import load_dataset, stratified_slice
    from edgepack.emulate import predictions
    from edgepack.modeling import read_model_info
    from edgepack.stages import bundle, export, prune, quantize

    cfg = BuildConfig.from_dict(json.loads((args.build / "recipe.json").read_text()))
    teacher = Path(cfg.teacher)
    info = read_model_info(teacher)
    data = load_dataset(cfg.data, dict(enumerate(info.label_names)))
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / "cache"
    if not cache.exists() and (args.build / "cache").is_dir():
        shutil.copytree(args.build / "cache", cache)  # the teacher's outputs: the same texts as the build's
    ctx = stages.Context(data=data, data_config=cfg.data, teacher=teacher, cache=cache, log=print)
    val, test = data["validation"], data["test"]
    texts = list(val.texts) + list(test.texts)
    n_val, oos_id, n_labels = len(val), data.oos_id, len(info.label_names)
    result = {"build": args.build.name, "models": {}}
    if args.json and args.json.is_file():
        result = json.loads(args.json.read_text())

    start = args.start or args.build / "distill"
    base = cfg.prune
    if args.keep_layers is not None:
        base = base.replace(keep_layers=tuple(int(i) for i in args.keep_layers.split(",")))
    if args.epochs is not None:
        base = base.replace(recovery=base.recovery.replace(epochs=args.epochs))

    def train(out: Path, pcfg) -> Path:
        if not (out / "stage.json").is_file():
            t0 = time.time()
            prune.run(pcfg, start, out, ctx)
            print(f"[qat] {out.name}: recovery in {time.time() - t0:.0f} s")
        return out

    models = {}
    models["ptq"] = train(args.work / "prune-ptq", base) if args.ptq_rerun else args.build / "prune"
    for target in args.targets if args.qat_targets is None else args.qat_targets:
        models[f"qat-{target}"] = train(args.work / f"prune-qat-{target}",
                                        base.replace(recovery=base.recovery.replace(qat=True, qat_target=target)))
    if args.train_only:
        return

    for name, model_dir in models.items():
        if args.models is not None and name not in args.models:
            continue
        rec = result["models"].setdefault(name, {"pytorch": json.loads((model_dir / "stage.json").read_text())
                                                 ["metrics"]["steps"][-1]})
        exported = args.work / name / "export"
        if not (exported / "stage.json").is_file():
            export.run(cfg.export, model_dir, exported, ctx)
        for target in args.targets:
            key = f"on-{target}"
            if key in rec:
                continue
            qdir, bdir = args.work / name / f"quantize-{target}", args.work / name / f"bundle-{target}"
            if not (bdir / "manifest.json").is_file():
                # No gate: it measures on this CPU's kernels (an arm64 bundle gated on AVX2's saturating
                # ones); this script measures every bundle on its own target's kernels instead.
                q = quantize.run(cfg.quantize.replace(target=target, variants=False, min_agreement=0.0,
                                                      max_accuracy_drop=100.0), exported, qdir, ctx)
                bundle.run(cfg.bundle.replace(archive=False), q.out, bdir, ctx)
            runs = [{"name": "int8", "overrides": {}},
                    {"name": "fp32", "overrides": {"model": str((exported / "model.onnx").resolve())}}]
            if target.startswith("arm64"):
                runs.append({"name": "int8-exact-twin", "overrides": {"session_config": {"session.x64quantprecision": "1"}}})
            host = predictions(None, bdir, texts, models=runs, log=print)["models"]
            entry = {"host_" + k: _score(v, n_val, val.labels, test.labels, oos_id, n_labels,
                                         None if k == "fp32" else host["fp32"]) for k, v in host.items()}
            if target.startswith("arm64") and args.emulate_rows:
                half = args.emulate_rows // 2
                vs, ts = stratified_slice(val, half, seed=0), stratified_slice(test, half, seed=0)
                sub = list(vs.texts) + list(ts.texts)
                idx = {t: i for i, t in enumerate(texts)}
                emu = predictions(target, bdir, sub, models=[runs[0]])["models"]["int8"]
                fp = {"ids": [host["fp32"]["ids"][idx[t]] for t in sub], "top": [host["fp32"]["top"][idx[t]] for t in sub]}
                # the twin on the same rows in the same batches (dynamic ranges are per batch)
                twin = predictions(None, bdir, sub, models=[runs[2]])["models"]["int8-exact-twin"]
                same = float(np.mean(np.asarray(emu["ids"]) == np.asarray(twin["ids"])))
                entry["emulated_int8"] = {**_score(emu, len(vs), vs.labels, ts.labels, oos_id, n_labels, fp),
                                          "rows": len(sub), "same_labels_as_exact_twin": same}
                entry["emulated_fp32_same_rows"] = _score(fp, len(vs), vs.labels, ts.labels, oos_id, n_labels)
            rec[key] = entry
            if args.json:
                args.json.write_text(json.dumps(result, indent=1))
            print(f"[qat] {name} on {target}: " + json.dumps({k: {m: round(v, 4) for m, v in e.items()
                                                                   if isinstance(v, float)} for k, e in entry.items()}))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
