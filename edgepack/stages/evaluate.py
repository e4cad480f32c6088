"""The evaluate stage: a bundle -> its measurements, its budgets and its report.

Benchmarks the bundle on the held-out split beside the teacher and the build's earlier models
(``ctx.compare``, in PyTorch), checks the profile's budgets and writes the report into a copy of the
bundle (``out/bundle``), with ``results.json`` and ``summary.json`` (the budget failures) beside it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgepack.config import EvaluateConfig
from edgepack.records import staging_dir, write_json_atomic, write_stage_record
from edgepack.stages import StageRecord


def check_on_target_kernels(bundle: Path, target: str, log) -> dict[str, Any] | None:
    """When the profile's target is not this CPU's, the bundle's accuracy on the target's int8 kernels
    under QEMU (``edgepack.emulate``): ``None`` when this CPU is the target; ``{"checked": False, ...}``
    with the reason (and the install command) when no emulator can run it here."""
    from edgepack import emulate, targets

    host = targets.detect().name
    if host == target:
        return None
    ok, why = emulate.available(target)
    if not ok:
        log(f"[evaluate] this CPU is a {host}, the profile's target a {target}: accuracy on its kernels not "
            f"checked ({why}); latency, memory and threads here are this CPU's")
        return {"checked": False, "target": target, "host_target": host, "why": why}
    log(f"[evaluate] this CPU is a {host}, the profile's target a {target}: checking accuracy on its kernels "
        f"under emulation ({why}); latency is not measured there")
    result = emulate.check_bundle(bundle, target, log=log)
    log(f"[evaluate] {emulate.summary(result)}")
    return {"checked": True, "host_target": host, **result}


def teacher_drop(teacher, bundle, val, label_names) -> dict[str, float]:
    """The budget against the teacher: validation accuracy of both under their own calibrated
    out-of-scope thresholds (the same rule; plain accuracy without an out-of-scope label), and the
    points the bundle is below the teacher."""
    from edgepack.metrics import accuracy_points

    t, b = accuracy_points(teacher, val, label_names), accuracy_points(bundle, val, label_names)
    return {"teacher_validation_accuracy": t, "validation_accuracy": b, "teacher_drop": t - b}


def run(cfg: EvaluateConfig, src: Path, out: Path, ctx) -> StageRecord:
    """The stage: ``src`` (a tuned bundle) -> ``out`` (``bundle/`` with its report, the results); the
    report's title, domains and the search's frontier come from ``ctx``."""
    from edgepack.torch_backend import threads_kept

    with threads_kept():  # the PyTorch rows are timed at one thread; the caller's torch keeps its own
        return _run(cfg, src, out, ctx)


def _run(cfg: EvaluateConfig, src: Path, out: Path, ctx) -> StageRecord:
    import time

    from edgepack import profiles
    from edgepack.data import stratified_slice
    from edgepack.records import hash_tree
    from edgepack.report import attach_eval_data, host_notes, write_report
    from edgepack.torch_backend import TorchBackend
    from runtime_shim import OnnxPipeline
    from runtime_shim.bench import format_table, run_benchmark
    from runtime_shim.manifest import update_manifest

    started = time.time()
    data, profile, log = ctx.data, ctx.profile, ctx.log
    domains, frontier = ctx.domains, ctx.frontier
    split = data[cfg.split]
    if cfg.limit:
        split = stratified_slice(split, cfg.limit, seed=ctx.data_config.seed)
    texts, gold = split.texts, [data.label_names[i] for i in split.labels]
    val = data["validation"]
    rows: list[dict[str, Any]] = []
    reference = None
    candidates: list[tuple[str, Any]] = []
    teacher = None  # the teacher's backend, for the budget against it (on validation)
    if cfg.compare:
        for name, path in ctx.compare:
            if path.is_dir() and (path / "config.json").is_file():
                tb = TorchBackend(path, threads=1, oos_label=data.oos_label, name=name, max_length=ctx.max_length)
                tb.calibrate(val.texts, val.labels)
                candidates.append((name, tb))
                if ctx.teacher is not None and Path(path).resolve() == Path(ctx.teacher).resolve():
                    teacher = tb
    with staging_dir(out, force=True) as tmp:
        shutil.copytree(src, tmp / "bundle", ignore=shutil.ignore_patterns("__pycache__"))
        pipe = OnnxPipeline(tmp / "bundle")
        pipe.name = "bundle (ORT int8)"
        candidates.append((pipe.name, pipe))
        for i, (name, backend) in enumerate(candidates):
            log(f"[evaluate] {name}: {len(texts)} rows, {cfg.warmup} warm-up + {cfg.runs} timed queries")
            res = run_benchmark(backend, texts, gold, reference=reference, warmup=cfg.warmup, runs=cfg.runs,
                                rss_argv=getattr(backend, "rss_argv", None))
            res["name"] = name
            if i == 0 and cfg.compare:
                reference = res.get("predictions")
                res["baseline"] = True
            rows.append(res)
        rows[-1]["final"] = True
        rows[-1]["path"] = str(src)
        rows[-1]["build_metrics"] = json.loads((src / "manifest.json").read_text()).get("metrics")
        if teacher is None and ctx.teacher is not None and getattr(profile.budgets, "max_teacher_drop", None) is not None:
            teacher = TorchBackend(ctx.teacher, threads=1, oos_label=data.oos_label, max_length=ctx.max_length)
            teacher.calibrate(val.texts, val.labels)  # the budget needs it even when the report compares nothing
        if teacher is not None:
            from edgepack.metrics import drop_words

            rows[-1].update(teacher_drop(teacher, pipe, val, data.label_names))
            log(f"[evaluate] validation accuracy: teacher {rows[-1]['teacher_validation_accuracy']:.2f}%, bundle "
                f"{rows[-1]['validation_accuracy']:.2f}% ({drop_words(rows[-1]['teacher_drop'])})")
        log("\n" + format_table(rows))
        checks = profiles.budget_report(profile, rows[-1])
        failures = [c.line() for c in checks if not c.ok]
        for c in checks:
            log(f"[evaluate] budget {c.line()}: {'pass' if c.ok else 'FAIL'}")
        attach_eval_data(rows, texts, gold)
        write_report(tmp / "bundle", rows, title=ctx.title or f"edgepack build for {profile.name}",
                     budgets=checks, domains=domains, notes=host_notes(rows), frontier=frontier)
        emulated = check_on_target_kernels(tmp / "bundle", profile.target, log)
        if emulated is not None:
            write_json_atomic(tmp / "emulated.json", emulated)
            update_manifest(tmp / "bundle", emulated=emulated)
        update_manifest(tmp / "bundle", verified={
            "split": cfg.split, "rows": len(texts), "profile": profile.name,
            "budgets": [{"budget": c.budget, "limit": c.limit, "value": c.value, "ok": c.ok} for c in checks],
            "accuracy": rows[-1].get("accuracy"), "accuracy_raw": rows[-1].get("accuracy_raw"),
            "latency_ms": rows[-1].get("latency_ms")})
        slim = [{k: v for k, v in r.items() if k not in ("predictions", "gold", "texts")} for r in rows]
        write_json_atomic(tmp / "results.json", slim)
        if frontier:
            write_json_atomic(tmp / "frontier.json", frontier)
        write_json_atomic(tmp / "summary.json", {"profile": profile.name, "rows": slim, "budget_failures": failures,
                                                 **({"emulated": emulated} if emulated else {})})
        write_stage_record(tmp, stage="evaluate", config=cfg.to_dict(), input_hash=hash_tree(src),
                           metrics={"budget_failures": failures, "rows": len(texts)}, started=started)
    return StageRecord.read(out)
