"""Pruning on CLINC150 with the shared MiniLM-L6 teacher: the figures of docs/results.md, "Pruning".

    nice -n 5 python benchmarks/prune_clinc150.py vocab --work /tmp/prune-bench
    nice -n 5 python benchmarks/prune_clinc150.py small --work /tmp/prune-bench --param-budget 3880000

``vocab``: vocabulary trimming alone on the teacher (no training): embedding size before/after, test
accuracy and agreement with the untrimmed teacher.

``small``: teacher -> keep 2 layers -> trim vocabulary and positions -> structured pruning to a
parameter budget -> recovery distillation from the teacher (optionally with unstructured sparsity),
then ONNX export (TorchScript exporter) and ORT dynamic int8 (QInt8 weights, per channel): size of
``model.quant.onnx`` (and gzipped), test accuracy raw and with the out-of-scope threshold calibrated
on validation, single-query latency (1 intra-op thread, tokenize + run).

Every result goes to WORK/<name>.json; the lines printed are docs/results.md's table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path

import numpy as np  # noqa: E402
from _shared import DATA, TEACHER  # offline settings, this checkout on sys.path, ../shared


def load_data(teacher: Path, source: Path):
    from edgepack.config import DataConfig
    from edgepack.data import load_dataset
    from edgepack.training.student import read_id2label

    return load_dataset(DataConfig(source=str(source)), read_id2label(teacher))


def run_vocab(args) -> dict:
    from edgepack import stages
    from edgepack.config import PruneConfig
    from edgepack.stages import prune
    from edgepack.stages.prune import read_steps

    data = load_data(args.teacher, args.data)
    out = args.work / f"vocab-top{args.keep_top}"
    t0 = time.time()
    prune.run(PruneConfig(trim_vocab=True, keep_top=args.keep_top, recover=False), args.teacher, out,
              stages.Context(data=data, cache=args.work / "cache"))
    steps = read_steps(out)
    before, after = steps[0], steps[-1]
    return {
        "embedding_before": [before["vocab_size"], before["embedding_params"] // before["vocab_size"]],
        "embedding_after": [after["vocab_size"], after["embedding_params"] // after["vocab_size"]],
        "embedding_reduction": round(1 - after["embedding_params"] / before["embedding_params"], 4),
        "test_accuracy_before": before["test_accuracy"], "test_accuracy_after": after["test_accuracy"],
        "test_accuracy_calibrated_before": before["test_accuracy_calibrated"],
        "test_accuracy_calibrated_after": after["test_accuracy_calibrated"],
        "test_agreement": after["test_agreement_with_input"],
        "wall_time_s": round(time.time() - t0, 1),
    }


def export_int8(model_dir: Path, out: Path, max_length: int = 64) -> tuple[Path, Path]:
    """fp32 ONNX with the TorchScript exporter, then ORT dynamic int8 (QInt8 weights, per channel)."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from tokenizers import Tokenizer

    from edgepack.modeling import load_classifier
    from edgepack.stages.prune.structured import encode

    out.mkdir(parents=True, exist_ok=True)
    model = load_classifier(model_dir, attn_implementation="eager").eval()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    enc = encode(tok, ["edgepack export sample", "a second, longer sample sentence for the trace"], max_length)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    fp32 = out / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(model, tuple(enc[n] for n in names), str(fp32), input_names=names, output_names=["logits"],
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    quant = out / "model.quant.onnx"
    quantize_dynamic(str(fp32), str(quant), weight_type=QuantType.QInt8, per_channel=True)
    return fp32, quant


def ort_logits(path: Path, tok_path: Path, texts, max_length: int = 64, batch: int = 64) -> np.ndarray:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from edgepack.stages.prune.structured import encode

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(str(tok_path))
    order = np.argsort([len(t) for t in texts])
    out = None
    for i in range(0, len(texts), batch):
        idx = order[i:i + batch]
        enc = encode(tok, [texts[j] for j in idx], max_length)
        logits = sess.run(["logits"], {k: v.numpy() for k, v in enc.items()})[0]
        if out is None:
            out = np.zeros((len(texts), logits.shape[1]), np.float32)
        out[idx] = logits
    return out


def latency_ms(path: Path, tok_path: Path, texts, n: int = 300, warmup: int = 50) -> dict:
    """Single query, end to end (tokenize + run + softmax), one intra-op thread."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(str(tok_path))
    tok.no_padding()
    times = []
    for i in range(warmup + n):
        text = texts[i % len(texts)]
        t = time.perf_counter_ns()
        e = tok.encode(text)
        ids = np.asarray([e.ids], np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        z = sess.run(["logits"], feed)[0][0]
        p = np.exp(z - z.max())
        p /= p.sum()
        if i >= warmup:
            times.append((time.perf_counter_ns() - t) / 1e6)
    times.sort()
    return {"n": n, "p50": round(statistics.median(times), 3), "p90": round(times[int(0.9 * n)], 3),
            "p99": round(times[int(0.99 * n)], 3)}


def measure_onnx(path: Path, tok_path: Path, data) -> dict:
    from edgepack.metrics import apply_threshold, calibrate_threshold, softmax

    val, test = data["validation"], data["test"]
    pv = softmax(ort_logits(path, tok_path, val.texts).astype(np.float64))
    pt = softmax(ort_logits(path, tok_path, test.texts).astype(np.float64))
    th = calibrate_threshold(pv, val.labels, data.oos_id)
    cal = apply_threshold(pt, data.oos_id, th)
    oos = test.labels == data.oos_id
    return {
        "bytes": path.stat().st_size,
        "gzip_bytes": len(gzip.compress(path.read_bytes(), 9)),
        "val_accuracy": round(float((pv.argmax(1) == val.labels).mean()), 4),
        "test_accuracy": round(float((pt.argmax(1) == test.labels).mean()), 4),
        "oos_threshold": round(th, 4),
        "test_accuracy_calibrated": round(float((cal == test.labels).mean()), 4),
        "test_in_scope_accuracy_calibrated": round(float((cal[~oos] == test.labels[~oos]).mean()), 4),
        "test_oos_recall_calibrated": round(float((cal[oos] == data.oos_id).mean()), 4),
        "latency_ms": latency_ms(path, tok_path, test.texts),
    }


def run_small(args) -> dict:
    from edgepack import stages
    from edgepack.config import RECOVERY, PruneConfig
    from edgepack.stages import prune
    from edgepack.stages.prune import read_steps

    data = load_data(args.teacher, args.data)
    name = args.name or "small"
    out = args.work / name
    cfg = PruneConfig(keep_layers=tuple(args.layers), max_positions=64, keep_chars=args.keep_chars, param_budget=args.param_budget,
                      heads_per_layer=tuple(args.heads_per_layer), ffn_size=args.ffn_size,
                      recovery=RECOVERY.replace(epochs=args.epochs, learning_rate=args.learning_rate, alpha=args.alpha,
                                                temperature=args.temperature),
                      sparsity=args.sparsity, sparsity_target=args.sparsity_target,
                      importance_rows=args.importance_rows)
    t0 = time.time()
    if not (out / "stage.json").is_file() or args.force:
        prune.run(cfg, args.teacher, out, stages.Context(data=data, cache=args.work / "cache"), progress=args.progress)
    prune_s = time.time() - t0
    t1 = time.time()
    fp32, quant = export_int8(out, args.work / f"{name}-onnx")
    export_s = time.time() - t1
    result = {"config": cfg.to_dict(), "steps": [{k: v for k, v in s.items() if k not in ("head_importance",)}
                                                 for s in read_steps(out)],
              "prune_wall_time_s": round(prune_s, 1), "export_quantize_wall_time_s": round(export_s, 1),
              "int8": measure_onnx(quant, out / "tokenizer.json", data)}
    result["fp32"] = {"bytes": fp32.stat().st_size, "gzip_bytes": len(gzip.compress(fp32.read_bytes(), 9)),
                      "latency_ms": latency_ms(fp32, out / "tokenizer.json", data["test"].texts)}
    return result


def run_sparse(args) -> dict:
    """What unstructured sparsity buys at deployment: one-shot magnitude masks (no recovery, so the
    accuracy is not the point) on a pruned model, then the same export/int8 path. Bytes on disk,
    gzip bytes and single-query latency against the dense model."""
    import shutil

    from edgepack.modeling import load_classifier, save_model
    from edgepack.stages.prune.sparsity import MagnitudePruningCallback, measure_sparsity

    data = load_data(args.teacher, args.data)
    src = args.work / (args.name or "small")
    out: dict = {}
    for s in (0.0, 0.5, 0.8):
        model = load_classifier(src).eval()
        if s:
            cb = MagnitudePruningCallback(s)
            cb.setup(model, 1)
            cb.finish()
        d = args.work / f"sparse-{int(s * 100)}"
        shutil.rmtree(d, ignore_errors=True)
        save_model(model, d)
        shutil.copy2(src / "tokenizer.json", d / "tokenizer.json")
        _, quant = export_int8(d, d / "onnx")
        m = measure_onnx(quant, d / "tokenizer.json", data)
        out[f"sparsity_{s:.1f}"] = {"sparsity_reached": round(measure_sparsity(model), 4), "bytes": m["bytes"],
                                    "gzip_bytes": m["gzip_bytes"], "latency_ms": m["latency_ms"],
                                    "test_accuracy_calibrated": m["test_accuracy_calibrated"]}
    return out


def run_teacher_int8(args) -> dict:
    """The unpruned teacher through the same export/quantize/measure path, for side-by-side latency."""
    data = load_data(args.teacher, args.data)
    fp32, quant = export_int8(args.teacher, args.work / "teacher-onnx")
    return {"int8": measure_onnx(quant, args.teacher / "tokenizer.json", data)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("vocab", "small", "sparse", "teacher"))
    p.add_argument("--work", type=Path, default=Path("/tmp/prune-bench"))
    p.add_argument("--teacher", type=Path, default=TEACHER)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--name", default=None)
    p.add_argument("--keep-top", type=int, default=0)
    p.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")] if s != "all" else [], default=[0, 5])
    p.add_argument("--keep-chars", default="all")
    p.add_argument("--param-budget", type=int, default=None)
    p.add_argument("--heads-per-layer", type=lambda s: [int(x) for x in s.split(",")], default=[])
    p.add_argument("--ffn-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--importance-rows", type=int, default=2048)
    p.add_argument("--sparsity", default="none")
    p.add_argument("--sparsity-target", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result = {"vocab": run_vocab, "small": run_small, "sparse": run_sparse,
              "teacher": run_teacher_int8}[args.what](args)
    result["total_wall_time_s"] = round(time.time() - t0, 1)
    name = args.name or args.what
    if args.what in ("vocab", "sparse"):
        name = f"{args.what}-{args.name or 'default'}-top{args.keep_top}"
    (args.work / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
