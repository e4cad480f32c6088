"""Which int8 settings keep the shared teacher's answers on each target's kernels? Measured on this
machine natively and under QEMU emulation (``edgepack.emulate``).

For the CLINC150 teacher (``../shared/models/clinc150-minilm-l6``) this script exports fp32 ONNX once
per writer (``fused``: edgepack's fused-operator graph, what ``edgepack pack`` writes by default;
``torch``: a plain ``torch.onnx.export`` graph, unfused), quantizes it with ``edgepack.stages.quantize``
over the grid

    weight type (U8S8 = qint8 weights, U8U8 = quint8) x per-tensor/per-channel x 8-bit/7-bit weights
    (reduce_range), and on x86 U8S8 also with ``session.x64quantprecision=1``

and runs every model through the bundle shim (``runtime_shim``) natively and on each emulated target.
For each it reports label agreement with the fp32 model of the same graph on validation (same CPU)
and raw (argmax, no threshold) test accuracy against fp32's. Emulation is slow, so emulated runs
take a stratified subset (``--val-rows``, ``--test-rows``); native runs take the full splits and the
same subset (to compare with the emulated answers row for row).

    nice python benchmarks/emulated_targets.py --work /tmp/emu-targets                 # everything
    python benchmarks/emulated_targets.py --work /tmp/emu-targets --platforms host      # native only
    python benchmarks/emulated_targets.py --work /tmp/emu-targets --report-only         # re-render

Every prediction file is kept in WORK/predictions (reruns skip what is there), results go to
WORK/results.json and the Markdown table to WORK/emulated_targets.md (``--markdown`` to write it
elsewhere too). Needs ``qemu-user-static`` for x86-64-avx2 and ``edgepack emulate setup arm64`` for
the arm64 targets; a platform that is not available is skipped with the reason.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

from _shared import DATA, TEACHER  # offline settings, this checkout on sys.path, ../shared

# ../shared beside the checkout (or beside the worktrees' directory)
WEIGHTS = {"u8s8": "qint8", "u8u8": "quint8"}
BAR_AGREEMENT = 0.99  # the bar: agreement with fp32 on validation
BAR_DROP_POINTS = 0.3  # the bar: raw test accuracy within 0.3 points of fp32


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------ models


def variant_name(export: str, weights: str, per_channel: bool, reduce_range: bool, x64qp: bool = False) -> str:
    """``fused-u8s8-pc-8bit`` (+``-x64qp``): graph, weight type, scales, weight bits, session option."""
    return (f"{export}-{weights}-{'pc' if per_channel else 'pt'}-{'7bit' if reduce_range else '8bit'}"
            + ("-x64qp" if x64qp else ""))


def prepare(args, data) -> dict[str, dict]:
    """Export, quantize and lay out a bundle-like directory per graph; return the models by name:
    ``{"export", "base" (the directory the shim loads), "path", "session_config", "fp32"}``."""
    from edgepack import bundle_files
    from edgepack.config import ExportConfig, QuantSettings
    from edgepack.modeling import ModelInfo, read_model_info
    from edgepack.stages.export import export_onnx
    from edgepack.stages.quantize.formats import quantize_model

    info0 = read_model_info(args.teacher)
    models: dict[str, dict] = {}
    for export in args.exports:
        out = args.work / f"export-{export}"
        if not (out / "stage.json").is_file():
            log(f"[models] exporting the teacher to fp32 ONNX ({export} writer)")
            export_onnx(ExportConfig(writer=export), args.teacher, out, data["validation"].texts)
        rec = json.loads((out / "stage.json").read_text())
        info = ModelInfo(**{**info0.to_dict(), "input_names": tuple(rec["metrics"]["input_names"])})
        base = args.work / f"base-{export}"
        base.mkdir(parents=True, exist_ok=True)
        (base / "tokenizer.json").write_bytes((out / "tokenizer.json").read_bytes())
        bundle_files.write_labels(base, list(data.label_names), data.oos_label, None)
        runtime = bundle_files.default_runtime("model.onnx", max_length=ExportConfig().max_length,
                                               inputs=info.input_names, pad_id=bundle_files.pad_id(base / "tokenizer.json"))
        (base / "runtime.json").write_text(json.dumps(runtime, indent=2))
        models[f"{export}-fp32"] = {"export": export, "base": base, "path": out / "model.onnx", "session_config": {},
                                    "fp32": True}
        for weights, per_channel, reduce_range in itertools.product(WEIGHTS, (False, True), (False, True)):
            name = variant_name(export, weights, per_channel, reduce_range)
            path = args.work / "quant" / f"{name}.onnx"
            if not path.is_file():
                log(f"[models] quantizing {name}")
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.onnx")
                quantize_model(QuantSettings(weight_type=WEIGHTS[weights], per_channel=per_channel,
                                              reduce_range=reduce_range), out / "model.onnx", tmp, info=info)
                os.replace(tmp, path)
            spec = {"export": export, "base": base, "path": path, "session_config": {}, "fp32": False,
                    "weights": weights, "per_channel": per_channel, "reduce_range": reduce_range, "x64qp": False}
            models[name] = spec
            if weights == "u8s8":
                models[name + "-x64qp"] = {**spec, "session_config": {"session.x64quantprecision": "1"},
                                           "x64qp": True}
    return models


# ------------------------------------------------------------------------------------------- runs

# Emulated runs are slow (a teacher query takes ~0.5-1.5 s under QEMU on a shared 2-core machine,
# fp32 ~3x that: QEMU emulates floating point in software), so each target runs the models that
# decide its defaults; the host runs everything.
EMULATED_MODELS = {
    "x86-64-avx2": ("fused-u8s8-pt-7bit", "fused-u8s8-pt-8bit", "fused-u8s8-pc-7bit", "fused-u8s8-pc-8bit",
                    "fused-u8s8-pc-8bit-x64qp", "fused-u8u8-pc-8bit"),
    "arm64": ("fused-u8s8-pc-8bit", "fused-u8s8-pt-8bit", "fused-u8u8-pc-8bit", "fused-u8s8-pc-7bit"),
}


def exact_twin(name: str) -> str:
    """The host model whose int8 GEMMs are exact like ARM64's s32 kernels: U8S8 with
    ``session.x64quantprecision=1``, U8U8 as it is (AVX2 widens u8 to s16 and sums in s32)."""
    return name + "-x64qp" if "-u8s8-" in name and not name.endswith("-x64qp") else name


def splits(args, data) -> dict[str, tuple[list[str], list[int]]]:
    """The rows: full validation and test, their stratified subsets for emulated runs, and the first
    rows of the validation subset for the emulated fp32 check."""
    from edgepack.data import stratified_slice

    val, test = data["validation"], data["test"]
    sv, st = stratified_slice(val, args.val_rows, seed=0), stratified_slice(test, args.test_rows, seed=0)
    nf = min(args.fp32_rows, len(sv))
    return {"val": (val.texts, val.labels.tolist()), "test": (test.texts, test.labels.tolist()),
            "val-sub": (sv.texts, sv.labels.tolist()), "test-sub": (st.texts, st.labels.tolist()),
            "fp32-sub": (sv.texts[:nf], sv.labels[:nf].tolist())}


def split_file(split: str, rows) -> str:
    """Prediction file stem of a split: subsets carry their size (``val-sub200``), so another
    ``--val-rows`` never reads a stale file."""
    return split if split in ("val", "test") else f"{split}{len(rows[split][1])}"


def wanted(plat: str, name: str, spec: dict, args) -> bool:
    if plat == "host":
        return True
    if spec["export"] not in args.emulate_exports:
        return False
    if spec.get("x64qp") and plat.startswith("arm64"):
        return False  # an x86-only session option
    if spec["fp32"]:
        return True
    chosen = args.emulated_models or EMULATED_MODELS.get(plat, EMULATED_MODELS["arm64"])
    return name in chosen


def run_all(args, models, rows) -> None:
    from edgepack import emulate

    for plat in args.platforms:
        if plat != "host":
            ok, why = emulate.available(plat, root=args.root)
            if not ok:
                log(f"[run] {plat}: skipped ({why})")
                continue
            log(f"[run] {plat}: {why}")
        split_names = ("val", "test", "val-sub", "test-sub", "fp32-sub") if plat == "host" else (
            "fp32-sub", "val-sub", "test-sub")
        for split in split_names:
            texts, _ = rows[split]
            stem = split_file(split, rows)
            todo = []
            for n, spec in models.items():
                if not wanted(plat, n, spec, args) or (args.work / "predictions" / plat / f"{n}.{stem}.json").is_file():
                    continue
                # emulated: fp32 only on the small fp32 check, int8 on the subsets; host: everything
                # on every split, fp32 also on the fp32 check
                if (plat != "host" and (split == "fp32-sub") != spec["fp32"]) or (
                        plat == "host" and split == "fp32-sub" and not spec["fp32"]):
                    continue
                todo.append((n, spec))
            # One process per graph: each model is loaded with the graph's tokenizer and labels.
            for export in args.exports:
                batch = [(n, s) for n, s in todo if s["export"] == export]
                for start in range(0, len(batch), args.models_per_process):
                    chunk = batch[start:start + args.models_per_process]
                    t0 = time.time()
                    out = emulate.predictions(
                        None if plat == "host" else plat, chunk[0][1]["base"], texts,
                        [{"name": n, "overrides": {"model": str(s["path"]), "session_config": s["session_config"]}}
                         for n, s in chunk], root=args.root, log=log)
                    for n, _ in chunk:
                        dest = args.work / "predictions" / plat / f"{n}.{stem}.json"
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        entry = {**out["models"][n], "cpu": {k: out.get(k) for k in ("machine", "arch", "versions")},
                                 "emulated": out.get("emulated"), "rows": len(texts)}
                        tmp = dest.with_suffix(".tmp")
                        tmp.write_text(json.dumps(entry))
                        os.replace(tmp, dest)
                    log(f"[run] {plat} {stem}: {', '.join(n for n, _ in chunk)} in {time.time() - t0:.0f} s")


def host_latency(args, models, rows) -> dict[str, dict]:
    """Single-query model time on this CPU (native: emulated time means nothing), in interleaved
    rounds so load from other processes falls on every model alike; the median of the rounds' p50s
    and their spread. Cached in WORK/latency.json."""
    import statistics

    from runtime_shim.bench import time_single_queries
    from runtime_shim.pipeline import OnnxPipeline

    path = args.work / "latency.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    names = [n for n in models if n not in cached]
    if not names or args.latency_rounds < 1:
        return cached
    texts = rows["test-sub"][0]
    pipes = {n: OnnxPipeline(models[n]["base"], verify=False, overrides={
        "model": str(models[n]["path"]), "session_config": models[n]["session_config"], "intra_op_num_threads": 1})
        for n in names}
    p50s: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.latency_rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            p50s[n].append(time_single_queries(pipes[n], texts, warmup=20, runs=args.latency_runs)["model_ms"]["p50"])
        log(f"[latency] round {r + 1}/{args.latency_rounds} done")
    for n in names:
        cached[n] = {"model_p50_ms": statistics.median(p50s[n]), "min_ms": min(p50s[n]), "max_ms": max(p50s[n]),
                     "rounds": len(p50s[n]), "runs": args.latency_runs, "load_average": os.getloadavg()[0]}
    path.write_text(json.dumps(cached, indent=2))
    return cached


# ---------------------------------------------------------------------------------------- results


def load_pred(args, plat: str, name: str, split: str, rows) -> dict | None:
    path = args.work / "predictions" / plat / f"{name}.{split_file(split, rows)}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _same(a: dict, b: dict) -> float:
    import numpy as np

    return float((np.asarray(a["ids"]) == np.asarray(b["ids"])).mean())


def _acc(p: dict, gold) -> float:
    import numpy as np

    return float((np.asarray(p["ids"]) == np.asarray(gold)).mean())


def _row(plat: str, name: str, spec: dict, v: dict, t: dict, fv: dict, ft: dict, rows, vs: str, ts: str) -> dict:
    row = {"platform": plat, "model": name, **{k: spec.get(k) for k in
                                              ("export", "weights", "per_channel", "reduce_range", "x64qp")},
           "fp32": spec["fp32"], "val_rows": len(rows[vs][1]), "test_rows": len(rows[ts][1]),
           "agreement_fp32_val": _same(v, fv), "val_accuracy_raw": _acc(v, rows[vs][1]),
           "test_accuracy_raw": _acc(t, rows[ts][1]), "test_accuracy_raw_fp32": _acc(ft, rows[ts][1])}
    row["test_drop_points"] = 100 * (row["test_accuracy_raw_fp32"] - row["test_accuracy_raw"])
    row["meets_bar"] = row["agreement_fp32_val"] >= BAR_AGREEMENT and row["test_drop_points"] <= BAR_DROP_POINTS
    row["versions"] = (v.get("cpu") or {}).get("versions")
    return row


def results(args, models, rows, latency=None) -> list[dict]:
    """One row per (platform, model).

    - host: the full splits, against this CPU's fp32 (with its native single-query time);
    - an emulated target: its subsets, against the host's fp32 on the same rows (QEMU's software
      floating point makes emulated fp32 ~3x slower than int8; the ``fp32-sub`` rows check that the
      two fp32 runs agree), and how often it gives the host's answers (same model, same rows); on
      arm64 also against the host's exact-kernel twin (``exact_twin``);
    - ``arm64 (host, exact kernels)``: the twins on the full splits, which stand for arm64 when the
      emulated rows give the same answers.
    """
    out = []
    for plat in args.platforms:
        for name, spec in models.items():
            if not wanted(plat, name, spec, args):
                continue
            f32 = f"{spec['export']}-fp32"
            if plat == "host":
                v, t = load_pred(args, plat, name, "val", rows), load_pred(args, plat, name, "test", rows)
                fv, ft = load_pred(args, plat, f32, "val", rows), load_pred(args, plat, f32, "test", rows)
                if None in (v, t, fv, ft):
                    continue
                row = _row(plat, name, spec, v, t, fv, ft, rows, "val", "test")
                if latency and name in latency:
                    row["host_model_p50_ms"] = latency[name]["model_p50_ms"]
                    row["host_model_p50_spread_ms"] = [latency[name]["min_ms"], latency[name]["max_ms"]]
                row["host_load_average"] = latency[name].get("load_average")
                out.append(row)
                continue
            if spec["fp32"]:
                e, h = load_pred(args, plat, name, "fp32-sub", rows), load_pred(args, "host", name, "fp32-sub", rows)
                if e is not None and h is not None:
                    out.append({"platform": plat, "model": name, "fp32": True, "export": spec["export"],
                                "rows": len(e["ids"]), "agreement_host_same_rows": _same(e, h),
                                "emulated": e.get("emulated"), "versions": (e.get("cpu") or {}).get("versions")})
                continue
            v, t = load_pred(args, plat, name, "val-sub", rows), load_pred(args, plat, name, "test-sub", rows)
            fv, ft = load_pred(args, "host", f32, "val-sub", rows), load_pred(args, "host", f32, "test-sub", rows)
            hv, ht = load_pred(args, "host", name, "val-sub", rows), load_pred(args, "host", name, "test-sub", rows)
            if None in (v, t, fv, ft, hv, ht):
                continue
            row = _row(plat, name, spec, v, t, fv, ft, rows, "val-sub", "test-sub")
            n_v, n_t = len(v["ids"]), len(t["ids"])
            row["agreement_host_same_rows"] = (_same(v, hv) * n_v + _same(t, ht) * n_t) / (n_v + n_t)
            twin = exact_twin(name)
            tv, tt = load_pred(args, "host", twin, "val-sub", rows), load_pred(args, "host", twin, "test-sub", rows)
            if plat.startswith("arm64") and tv is not None and tt is not None:
                row["exact_twin"] = twin
                row["agreement_twin_same_rows"] = (_same(v, tv) * n_v + _same(t, tt) * n_t) / (n_v + n_t)
            row["emulated"] = v.get("emulated")
            out.append(row)
    arm = [r for r in out if r["platform"].startswith("arm64") and "exact_twin" in r]
    for r in arm:
        host = next((h for h in out if h["platform"] == "host" and h["model"] == r["exact_twin"]), None)
        if host is not None:
            out.append({**host, "platform": f"{r['platform']} (host, exact kernels)", "model": r["model"],
                        "exact_twin": r["exact_twin"], "agreement_twin_same_rows": r["agreement_twin_same_rows"],
                        "twin_rows": r["val_rows"] + r["test_rows"]})
    return out


def _pct(x, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def markdown(args, table: list[dict], rows) -> str:
    from edgepack import emulate

    qemu = emulate.qemu_binary(emulate.resolve("x86-64-avx2"))
    flags = _host_flags()
    lines = [
        "# Int8 settings on each target's kernels (measured, `benchmarks/emulated_targets.py`)",
        "",
        f"- Date: {time.strftime('%Y-%m-%d')}; host CPU: {emulate.cpu_model_name()} ({platform.machine()}, "
        f"{'AVX2' if 'avx2' in flags else 'no AVX2'}, {'VNNI' if {'avx512_vnni', 'avx_vnni'} & flags else 'no VNNI'}, "
        f"{'AVX-512' if 'avx512f' in flags else 'no AVX-512'}); QEMU {emulate.qemu_version(qemu) if qemu else '-'}.",
        f"- Model: {args.teacher.name} (the shared CLINC150 teacher), max 64 tokens; data: CLINC150 `data_oos_plus.json`.",
        f"- Host rows: the full validation ({len(rows['val'][1])}) and test ({len(rows['test'][1])}) splits. "
        f"Emulated rows: stratified subsets of {len(rows['val-sub'][1])} validation and {len(rows['test-sub'][1])} "
        f"test rows, fp32 checked on {len(rows['fp32-sub'][1])} (a teacher query takes ~1 s under QEMU here).",
        "- Agreement: int8 argmax label = fp32 argmax label of the same graph, validation (emulated rows: against "
        "the host's fp32 on the same rows). Test accuracy is raw (argmax, no out-of-scope threshold). The bar "
        ": agreement >= 99% and a raw test drop <= 0.3 points.",
        "- Names: graph (`fused`: edgepack's fused-operator export, `pack`'s default; `torch`: plain "
        "torch.onnx.export, unfused) - weights (`u8s8`: qint8, `u8u8`: quint8) - scales (`pt` per-tensor, "
        "`pc` per-channel) - weight bits (`7bit` = reduce_range) - `x64qp`: session.x64quantprecision=1.",
        "",
        "Reproduce (as root; `qemu-user-static` from Debian, QEMU 7.2 in bookworm):",
        "",
        "```",
        "apt-get install qemu-user-static binfmt-support debootstrap",
        "edgepack emulate setup arm64            # the arm64 root: ~10 min debootstrap + ~6 min wheels",
        "nice python benchmarks/emulated_targets.py --work /tmp/emu-targets --markdown docs/emulated_targets.md",
        "edgepack emulate accuracy BUNDLE --target x86-64-avx2     # or arm64: one bundle on its eval.jsonl",
        "```",
        "",
    ]
    versions = next((r.get("versions") for r in table if r.get("versions")), None)
    if versions:
        lines.insert(3, f"- onnxruntime {versions.get('onnxruntime')}, numpy {versions.get('numpy')}, "
                        f"Python {versions.get('python')} (host).")
    plats = list(dict.fromkeys(r["platform"] for r in table))
    for plat in plats:
        prow = [r for r in table if r["platform"] == plat]
        derived = "(host, exact kernels)" in plat
        emulated = plat != "host" and not derived
        if plat == "host":
            how = "natively on this CPU (full splits)"
        elif derived:
            how = ("the host's exact-kernel twins on the full splits (U8S8 with x64quantprecision=1, U8U8 as is); "
                   "they stand for arm64 as far as the last column shows")
        else:
            how = (prow[0].get("emulated") or {}).get("how", plat) + " (subsets)"
        lines += [f"## {plat}: {how}", ""]
        f32 = [r for r in prow if r.get("fp32") and "agreement_fp32_val" not in r]
        for r in f32:
            lines += [f"fp32 (`{r['model']}`) emulated vs the host's fp32: {_pct(r['agreement_host_same_rows'])} the "
                      f"same labels on {r['rows']} rows.", ""]
        prow = [r for r in prow if "agreement_fp32_val" in r]
        if not prow:
            continue
        timed = plat == "host" and any("host_model_p50_ms" in r for r in prow)
        if timed:
            lines += [f"Model time: one query, one intra-op thread, the median of {args.latency_rounds} interleaved "
                      f"rounds of {args.latency_runs} queries (the rounds' range in brackets). Other processes "
                      f"shared the machine (load average {_load(prow)} after timing): only "
                      "differences beyond the ranges count.", ""]
        head = ["model", "agreement with fp32 (val)", "val acc raw", "test acc raw", "vs fp32 (points)", "bar"]
        if timed:
            head.append("model p50 here, ms (spread of rounds)")
        if emulated:
            head.append("same answers as host")
            if plat.startswith("arm64"):
                head.append("same as host exact twin")
        if derived:
            head = ["model", "host twin", *head[1:], "same answers as emulated (rows)"]
        lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for r in sorted(prow, key=lambda r: (not r["fp32"], r["export"], -r["agreement_fp32_val"])):
            cells = [f"`{r['model']}`", _pct(r["agreement_fp32_val"]), _pct(r["val_accuracy_raw"]),
                     _pct(r["test_accuracy_raw"]), "-" if r["fp32"] else f"{round(-r['test_drop_points'], 2) + 0.0:+.2f}",
                     "" if r["fp32"] else ("yes" if r["meets_bar"] else "no")]
            if timed:
                lat = r.get("host_model_p50_ms")
                cells.append("-" if lat is None else
                             f"{lat:.2f} ({r['host_model_p50_spread_ms'][0]:.2f}-{r['host_model_p50_spread_ms'][1]:.2f})")
            if emulated:
                cells.append(_pct(r.get("agreement_host_same_rows")))
                if plat.startswith("arm64"):
                    cells.append(_pct(r.get("agreement_twin_same_rows")))
            if derived:
                cells = [cells[0], f"`{r['exact_twin']}`", *cells[1:],
                         f"{_pct(r.get('agreement_twin_same_rows'))} ({r.get('twin_rows')})"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _load(rows: list[dict]) -> str:
    loads = [r["host_load_average"] for r in rows if r.get("host_load_average") is not None]
    return f"{max(loads):.1f}" if loads else "not recorded"


def _host_flags() -> set[str]:
    from runtime_shim.cpu import cpu_flags

    return cpu_flags()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/edgepack-emulated-targets"))
    p.add_argument("--teacher", type=Path, default=TEACHER)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--platforms", default="host,x86-64-avx2,arm64",
                   help="host and/or emulated targets (edgepack.emulate.EMULATED), comma-separated")
    p.add_argument("--exports", default="fused,torch", help="fp32 graphs to quantize: fused, torch")
    p.add_argument("--emulate-exports", default="fused", help="graphs also run under emulation (default: fused)")
    p.add_argument("--val-rows", type=int, default=200, help="validation rows for emulated runs (stratified)")
    p.add_argument("--test-rows", type=int, default=200, help="test rows for emulated runs (stratified)")
    p.add_argument("--fp32-rows", type=int, default=40, help="validation rows the emulated fp32 model runs on")
    p.add_argument("--emulated-models", default=None,
                   help="int8 models to run under emulation, comma-separated (default: EMULATED_MODELS per target)")
    p.add_argument("--models-per-process", type=int, default=4)
    p.add_argument("--root", type=Path, default=None, help="the arm64 root (default: edgepack.emulate.arm64_root())")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    p.add_argument("--latency-rounds", type=int, default=5,
                   help="interleaved rounds of native single-query timing per model (0: none)")
    p.add_argument("--latency-runs", type=int, default=100, help="timed queries per model and round")
    p.add_argument("--report-only", action="store_true", help="render what WORK/predictions holds")
    args = p.parse_args(argv)
    if not args.teacher.is_dir() or not args.data.is_file():
        log(f"skipped: {args.teacher} or {args.data} is absent")
        return 0
    args.platforms = [x for x in args.platforms.split(",") if x]
    args.exports = [x for x in args.exports.split(",") if x]
    args.emulate_exports = [x for x in args.emulate_exports.split(",") if x]
    args.emulated_models = [x for x in (args.emulated_models or "").split(",") if x] or None
    args.work.mkdir(parents=True, exist_ok=True)

    from edgepack.config import DataConfig
    from edgepack.data import load_dataset
    from edgepack.modeling import read_model_info

    info = read_model_info(args.teacher)
    data = load_dataset(DataConfig(source=str(args.data)), dict(enumerate(info.label_names)))
    rows = splits(args, data)
    models = prepare(args, data)
    latency = None
    if not args.report_only:
        run_all(args, models, rows)
        if "host" in args.platforms:
            latency = host_latency(args, models, rows)
    elif (args.work / "latency.json").is_file():
        latency = json.loads((args.work / "latency.json").read_text())
    table = results(args, models, rows, latency)
    from runtime_shim.manifest import write_json_atomic

    write_json_atomic(args.work / "results.json", table)
    md = markdown(args, table, rows)
    (args.work / "emulated_targets.md").write_text(md + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
