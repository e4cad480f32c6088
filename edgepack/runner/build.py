"""``edgepack build``: teacher + data -> verified bundle, one resumable chain of stages.

    distill -> prune -> pack (export, quantize variants, check, calibrate, bundle) -> tune -> verify

Each stage writes ``BUILD/<stage>/`` through its own function (which writes the directory
atomically with its ``stage.json`` last). The build keeps a ledger, ``BUILD/ledger/<stage>.json``,
of the config hash and input hash each finished stage ran with; a rerun skips a stage only when both
match, so editing one stage's config redoes that stage and those after it, and killing the build at
any moment loses no finished stage. ``OUT`` is replaced only when the verified bundle is complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepack.config import BUILD_STAGES, BuildConfig
from edgepack.data import LabelledData, load_dataset
from edgepack.errors import BudgetError, EdgepackError
from edgepack.records import hash_config, hash_tree, staging_dir, write_json_atomic

Log = Callable[[str], None]


def _sha(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _record_hash(stage_dir: Path, name: str = "stage.json") -> str:
    """A stage's output identity: the hash of its record, which names its config, input and metrics."""
    p = stage_dir / name
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else hash_tree(stage_dir)


class Build:
    """The ledger and the stage runner of one build directory."""

    def __init__(self, root: Path, log: Log = print):
        self.root, self.log = Path(root), log
        self.ledger = self.root / "ledger"
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def stage(self, name: str, index: int, config: dict[str, Any], input_hash: str,
              run: Callable[[Path], None], *, total: int) -> Path:
        out = self.root / name
        key = {"stage": name, "config_hash": hash_config(config), "input_hash": input_hash}
        entry = self.ledger / f"{name}.json"
        prefix = f"[build {index}/{total}] {name}"
        if out.is_dir() and entry.is_file() and _same(json.loads(entry.read_text()), key):
            self.log(f"{prefix}: up to date (config and input unchanged), skipped")
            self.skipped.append(name)
            return out
        entry.unlink(missing_ok=True)  # the ledger never vouches for a stage that is being redone
        self.log(f"{prefix}: running")
        t0 = time.time()
        run(out)
        write_json_atomic(entry, {**key, "config": config, "seconds": round(time.time() - t0, 1),
                                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.log(f"{prefix}: done in {time.time() - t0:.0f} s")
        self.ran.append(name)
        return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == v for k, v in b.items())


def build(cfg: BuildConfig, *, force: bool = False, log: Log = print) -> dict[str, Any]:
    """Run (or resume) the build; returns a summary. Raises ``BudgetError`` after writing the bundle
    and its report when the profile's budgets are missed. Library warnings go to BUILD/build.log."""
    from edgepack.console import quiet

    root = Path(cfg.build_dir) if cfg.build_dir else Path(cfg.out or ".").with_name(Path(cfg.out or ".").name + ".build")
    with quiet(root / "build.log" if cfg.teacher and cfg.out else None):
        return _build(cfg, force=force, log=log)


def _build(cfg: BuildConfig, *, force: bool, log: Log) -> dict[str, Any]:
    from edgepack import profiles

    started = time.time()
    if not cfg.teacher or not cfg.out:
        raise EdgepackError("a build needs a teacher directory and --out BUNDLE (or teacher/out in the recipe)")
    teacher, out = Path(cfg.teacher), Path(cfg.out)
    if not teacher.is_dir():
        raise EdgepackError(f"{teacher}: no such directory; pass a fine-tuned Hugging Face classifier")
    root = Path(cfg.build_dir) if cfg.build_dir else out.with_name(out.name + ".build")
    profile = profiles.load(cfg.profile)
    if out.exists() and not force and not _built_here(out, root):
        raise EdgepackError(f"{out}: already exists and was not built by {root}; pass --force to replace it")
    _check_disk(out.parent, teacher)
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / "recipe.json", cfg.to_dict())
    (root / "recipe.toml").write_text(to_toml(cfg.to_dict()))

    from edgepack.stages.export import read_model_info

    info = read_model_info(teacher)
    data = load_dataset(cfg.data, dict(enumerate(info.label_names)))
    b = Build(root, log)
    stages = [s for s in BUILD_STAGES if s not in cfg.skip]
    total = len(stages)
    idx = iter(range(1, total + 1))
    cache = root / "cache"
    data_hash = _sha(hash_tree(teacher), data.fingerprint())
    log(f"[build] {teacher} -> {out} (profile {profile.name}, target {profile.target}; build directory {root})")

    model_dir, model_hash = teacher, data_hash
    if "distill" in stages:
        from edgepack.training.distillation import distill

        def run_distill(dest: Path) -> None:
            distill(cfg.distill, teacher, data, dest, cache_dir=cache, force=True, data_config=cfg.data.to_dict())

        model_dir = b.stage("distill", next(idx), {"distill": cfg.distill.to_dict(), "data": cfg.data.to_dict()},
                            data_hash, run_distill, total=total)
        model_hash = _record_hash(model_dir)
    if "prune" in stages:
        from edgepack.stages.prune import prune

        src = model_dir

        def run_prune(dest: Path) -> None:
            prune(cfg.prune, src, dest, data, teacher_dir=teacher, force=True, cache_dir=cache,
                  data_config=cfg.data.to_dict(), log=log)

        model_dir = b.stage("prune", next(idx), {"prune": cfg.prune.to_dict()}, model_hash, run_prune, total=total)
        model_hash = _record_hash(model_dir)

    from edgepack.runner.pack import pack

    pack_cfg = cfg.pack if cfg.pack.target != "auto" else cfg.pack.replace(target=profile.target)
    packed_from = model_dir

    def run_pack(dest: Path) -> None:
        pack(pack_cfg.replace(archive=False), packed_from, cfg.data, dest, export_cfg=cfg.export, force=True,
             data=data, log=log)

    bundle = b.stage("pack", next(idx), {"pack": pack_cfg.to_dict(), "export": cfg.export.to_dict()}, model_hash,
                     run_pack, total=total)
    bundle_hash = _record_hash(bundle, "manifest.json")

    tuned = bundle
    if "tune" in stages:
        def run_tune(dest: Path) -> None:
            tune_bundle(bundle, dest, profile, cfg, data, log=log)

        tuned = b.stage("tune", next(idx), {"profile": profile.to_dict(), "runs": cfg.verify.tune_runs,
                                            "gap_ms": cfg.verify.tune_gap_ms}, bundle_hash, run_tune, total=total)

    def run_verify(dest: Path) -> None:
        verify(cfg, tuned, dest, profile, data, teacher=teacher,
               models=[("student (PyTorch)", root / "distill"), ("pruned (PyTorch)", root / "prune")], log=log)

    verified = b.stage("verify", next(idx), {"verify": cfg.verify.to_dict(), "profile": profile.to_dict(),
                                             "domains": cfg.domains},
                       _record_hash(tuned, "manifest.json"), run_verify, total=total)
    summary = json.loads((verified / "summary.json").read_text())
    _publish(verified / "bundle", out, root, force=True)
    if cfg.pack.archive:
        from edgepack.stages.bundle.files import archive

        log(f"[build] archive written: {archive(out)}")
    for name in ("report.html", "report.md"):
        shutil.copy2(verified / "bundle" / name, root / name)
    summary.update(ran=b.ran, skipped=b.skipped, wall_time_s=round(time.time() - started, 1))
    write_json_atomic(root / "summary.json", summary)
    log(f"[build] bundle: {out}   report: {root / 'report.html'}   ({summary['wall_time_s']:.0f} s; "
        f"ran {', '.join(b.ran) or 'nothing'}; up to date: {', '.join(b.skipped) or 'nothing'})")
    if summary["budget_failures"]:
        raise BudgetError(f"profile {profile.name}: missed {'; '.join(summary['budget_failures'])} "
                          f"(bundle and report written: {out})")
    return summary


def tune_bundle(bundle: Path, dest: Path, profile, cfg: BuildConfig, data: LabelledData, *, log: Log) -> None:
    """Copy the bundle and set its threads: measured here when this CPU matches the profile's target,
    else the profile's defaults."""
    from runtime_shim import OnnxPipeline
    from runtime_shim.manifest import update_manifest
    from runtime_shim.tune import physical_cores, tune, write_winner

    from edgepack.targets import cpu_flags
    from edgepack.targets import load as load_target

    arch, flags = cpu_flags()
    target = load_target(profile.target)
    with staging_dir(dest, force=True) as tmp:
        shutil.copytree(bundle, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        if target.matches(arch, flags):
            cores = min(profile.physical_cores, physical_cores())
            texts = data["validation"].texts[:200]
            result = tune(OnnxPipeline(tmp), texts, max_threads=cores, runs=cfg.verify.tune_runs,
                          warmup=min(50, cfg.verify.tune_runs), gap_ms=cfg.verify.tune_gap_ms, log=log)
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


def verify(cfg: BuildConfig, bundle: Path, dest: Path, profile, data: LabelledData, *, teacher: Path,
           models: list[tuple[str, Path]], log: Log) -> None:
    """Benchmark the bundle on the held-out split beside the teacher (and the intermediate models),
    check the profile's budgets, and write the report into the bundle."""
    from runtime_shim import OnnxPipeline
    from runtime_shim.bench import format_table, run_benchmark
    from runtime_shim.manifest import update_manifest

    from edgepack import profiles
    from edgepack.data import stratified_slice
    from edgepack.report import attach_eval_data, host_notes, write_report
    from edgepack.torch_backend import TorchBackend

    v = cfg.verify
    split = data[v.split]
    if v.limit:
        split = stratified_slice(split, v.limit, seed=cfg.data.seed)
    texts, gold = split.texts, [data.label_names[i] for i in split.labels]
    val = data["validation"]
    rows: list[dict[str, Any]] = []
    reference = None
    candidates: list[tuple[str, Any]] = []
    if v.compare:
        for name, path in [("teacher (PyTorch)", teacher), *models]:
            if path.is_dir() and (path / "config.json").is_file():
                tb = TorchBackend(path, threads=1, oos_label=data.oos_label, name=name,
                                  max_length=cfg.export.max_length)
                tb.calibrate(val.texts, val.labels)
                candidates.append((name, tb))
    with staging_dir(dest, force=True) as tmp:
        shutil.copytree(bundle, tmp / "bundle", ignore=shutil.ignore_patterns("__pycache__"))
        pipe = OnnxPipeline(tmp / "bundle")
        pipe.name = "bundle (ORT int8)"
        candidates.append((pipe.name, pipe))
        for i, (name, backend) in enumerate(candidates):
            log(f"[verify] {name}: {len(texts)} rows, {v.warmup} warm-up + {v.runs} timed queries")
            res = run_benchmark(backend, texts, gold, reference=reference, warmup=v.warmup, runs=v.runs,
                                rss_argv=getattr(backend, "rss_argv", None))
            res["name"] = name
            if i == 0 and v.compare:
                reference = res.get("predictions")
                res["baseline"] = True
            rows.append(res)
        rows[-1]["final"] = True
        rows[-1]["path"] = str(bundle)
        rows[-1]["build_metrics"] = json.loads((bundle / "manifest.json").read_text()).get("metrics")
        log("\n" + format_table(rows))
        checks = profiles.budget_report(profile, rows[-1])
        failures = [c.line() for c in checks if not c.ok]
        for c in checks:
            log(f"[verify] budget {c.line()}: {'pass' if c.ok else 'FAIL'}")
        attach_eval_data(rows, texts, gold)
        domains = json.loads(Path(cfg.domains).read_text()) if cfg.domains else None
        write_report(tmp / "bundle", rows, title=f"edgepack build: {Path(cfg.teacher).name} for {profile.name}",
                     budgets=checks, domains=domains, notes=host_notes(rows))
        update_manifest(tmp / "bundle", verified={
            "split": v.split, "rows": len(texts), "profile": profile.name,
            "budgets": [{"budget": c.budget, "limit": c.limit, "value": c.value, "ok": c.ok} for c in checks],
            "accuracy": rows[-1].get("accuracy"), "accuracy_raw": rows[-1].get("accuracy_raw"),
            "latency_ms": rows[-1].get("latency_ms")})
        slim = [{k: val for k, val in r.items() if k not in ("predictions", "gold", "texts")} for r in rows]
        write_json_atomic(tmp / "results.json", slim)
        write_json_atomic(tmp / "summary.json", {"profile": profile.name, "rows": slim, "budget_failures": failures})


def _publish(src: Path, out: Path, root: Path, *, force: bool) -> None:
    """Copy the verified bundle to ``out`` atomically, tagged with the build directory that made it."""
    with staging_dir(out, force=force) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        (tmp / ".edgepack-build").write_text(str(root.resolve()) + "\n")


def _built_here(out: Path, root: Path) -> bool:
    tag = out / ".edgepack-build"
    return tag.is_file() and tag.read_text().strip() == str(root.resolve())


def _check_disk(where: Path, teacher: Path) -> None:
    """Refuse up front when the output file system cannot hold a build: roughly four copies of the
    teacher (student, pruned model, fp32 ONNX, bundles) plus caches."""
    where = where if where.exists() else Path.cwd()
    need = 4 * sum(f.stat().st_size for f in teacher.rglob("*") if f.is_file()) + (200 << 20)
    free = shutil.disk_usage(where).free
    if free < need:
        raise EdgepackError(f"{where}: {free / 1e6:.0f} MB free, a build of {teacher.name} needs about "
                            f"{need / 1e6:.0f} MB; free space or pass --build-dir/--out on another disk")


def to_toml(d: dict[str, Any]) -> str:
    """The resolved recipe as TOML (scalars first, then one table per nested config)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(str(k))} = {value(x)}" for k, x in v.items()) + "}"
        return json.dumps(str(v))

    lines = [f"{k} = {value(v)}" for k, v in d.items() if not isinstance(v, dict) and v is not None]
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {value(vv)}" for kk, vv in v.items() if vv is not None]
    return "\n".join(lines) + "\n"
