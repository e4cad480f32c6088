"""``edgepack build``: teacher + data -> verified bundle, one resumable chain of stages.

    distill -> prune -> export -> quantize -> bundle [-> cascade] -> tune -> evaluate

A build is a search over candidates (``runner.search``): the recipe's one shape, or its ``[search]
shapes``; the chosen candidate's bundle then goes through the release links (tune, evaluate).

Each stage is ``edgepack.stages.<name>.run(cfg, src, out, ctx)`` writing ``BUILD/<stage>/``; the
ledger (``runner.ledger``) skips a stage whose config and input are unchanged, so changing only a
quantization setting reruns quantize and what follows, not export. ``OUT`` is replaced only when the
verified bundle is complete. Library warnings go to ``BUILD/build.log``; progress to the
``edgepack.<stage>`` loggers (``console.Progress``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from edgepack.config import BuildConfig
from edgepack.console import Log
from edgepack.data import load_dataset
from edgepack.errors import EdgepackError
from edgepack.records import claimed_output, hash_tree, staging_dir, write_json_atomic
from edgepack.runner.chain import CANDIDATE, RELEASE, chain, run_links
from edgepack.runner.ledger import Ledger, output_hash
from edgepack.runner.search import search


def _sha(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def build_root(cfg: BuildConfig) -> Path:
    out = Path(cfg.out)
    return Path(cfg.build_dir) if cfg.build_dir else out.with_name(out.name + ".build")


def build(cfg: BuildConfig, *, force: bool = False, log: Log | None = None) -> dict[str, Any]:
    """Run (or resume) the build; returns its summary (``BUILD/summary.json``). A missed budget is
    not an exception: the bundle and its report are written and ``summary["budget_failures"]`` names it."""
    from edgepack.console import Progress, capture

    log = log or Progress()
    if not cfg.teacher or not cfg.out:
        raise EdgepackError("a build needs a teacher directory and --out BUNDLE (or teacher/out in the recipe)")
    out, root = Path(cfg.out), build_root(cfg)
    from edgepack.modeling import resolve_teacher

    teacher, hub = resolve_teacher(cfg.teacher)
    with claimed_output(out, replace=force or _built_here(out, root), inputs=(teacher, root),
                        refusal=f"it was not built by {root}; pass --force to replace it"), capture(root / "build.log"):
        return _build(cfg, teacher, hub, log=log)


def _build(cfg: BuildConfig, teacher: Path, hub: dict[str, str] | None, *, log: Log) -> dict[str, Any]:
    from edgepack import profiles, stages
    from edgepack.modeling import read_model_info

    started = time.time()
    out = Path(cfg.out)
    root = build_root(cfg)
    profile = profiles.load(cfg.profile)
    _check_disk(out.parent, teacher)
    root.mkdir(parents=True, exist_ok=True)
    info = read_model_info(teacher)
    data = load_dataset(cfg.data, dict(enumerate(info.label_names)), min_validation_rows=_budget_rows(cfg))
    if "validation" in data.made_splits:
        log(_carved(cfg, data))
    cfg, lengths = _resolve_max_length(cfg, teacher, data)
    # The resolved recipe: a max_length chosen from the data is written as the number it became.
    write_json_atomic(root / "recipe.json", cfg.to_dict())
    if hub is not None:  # which snapshot of the hub model this build read
        write_json_atomic(root / "teacher.json", {**hub, "dir": str(teacher)})
    (root / "recipe.toml").write_text(cfg.to_toml(), encoding="utf-8")
    if cfg.search.max_drop is not None:  # --max-drop: the budget against the teacher, a profile budget
        profile = profile.replace(budgets=profile.budgets.replace(max_teacher_drop=cfg.search.max_drop))
    ctx = stages.Context(data=data, data_config=cfg.data, teacher=teacher, profile=profile, cache=root / "cache",
                         log=log, compare=_compare(teacher, root))
    log(f"[build] {teacher} -> {out} (profile {profile.name}, target {profile.target}; recipe "
        f"{cfg.recipe or 'none'}; build directory {root})")
    if profile.name == "host":
        log(f"[build] no --profile: using this machine's, {profile.description}")
    if lengths is not None:
        log(f"[build] max_length {lengths['max_length']} from the training texts ({lengths['percentile']:g}th "
            f"percentile of {lengths['texts']:,} token counts: {lengths['tokens_at_percentile']:g}; longest "
            f"{lengths['longest']}: {lengths['texts_truncated']} truncated)")

    src, src_hash = teacher, _sha(hash_tree(teacher), data.fingerprint())
    ctx = dataclasses.replace(ctx, title=f"edgepack build: {teacher.name} for {profile.name}",
                              domains=json.loads(Path(cfg.domains).read_text()) if cfg.domains else None)
    # One path: the candidates (the recipe's one shape, built here, or the search's shapes, each in
    # candidates/<name>/), then the release chain on the chosen one, numbered on from its stages.
    release = chain(cfg, profile, RELEASE)
    ledger = Ledger(root, log, total=len(release) + (0 if cfg.shapes() else len(chain(cfg, profile, CANDIDATE))))
    result = search(cfg, ctx, root, src, src_hash, log=log, ledger=ledger)
    chosen = result.chosen
    ctx = dataclasses.replace(ctx, compare=_compare(teacher, chosen.dir), frontier=result.frontier())
    last, _ = run_links(chain(cfg, profile, RELEASE, frontier=result.frontier_key()), ledger, ctx, chosen.bundle,
                        output_hash(chosen.bundle))
    summary = json.loads((last / "summary.json").read_text())
    if cfg.sign.enabled and not Path(cfg.sign.key).is_file():
        raise EdgepackError(f"{cfg.sign.key}: no such key file ([sign] key); make one with edgepack keys new --out DIR")
    _publish(last / "bundle", out, root, force=True, sign=cfg.sign if cfg.sign.enabled else None, log=log)
    if cfg.bundle.archive:
        from edgepack.bundle_files import archive

        log(f"[build] archive written: {archive(out)}")
    for name in ("report.html", "report.md"):
        shutil.copy2(last / "bundle" / name, root / name)
    if lengths is not None:
        summary["max_length"] = lengths
    summary.update(teacher=hub or {"dir": str(teacher)}, why=ledger.why, frontier=result.frontier(), bundle=str(out), build_dir=str(root), ran=ledger.ran, skipped=ledger.skipped,
                   wall_time_s=round(time.time() - started, 1))
    write_json_atomic(root / "summary.json", summary)
    log(f"[build] bundle: {out}   report: {root / 'report.html'}   ({summary['wall_time_s']:.0f} s; "
        f"ran {', '.join(ledger.ran) or 'nothing'}; up to date: {', '.join(ledger.skipped) or 'nothing'})")
    return summary


def _budget_rows(cfg: BuildConfig) -> int:
    """Validation rows the search's budget asks for (``metrics.rows_for_budget``), 0 without a budget."""
    from edgepack.metrics import rows_for_budget

    s = cfg.search
    return rows_for_budget(s.max_drop, confidence=s.confidence) if s.max_drop and cfg.shapes() else 0


def _carved(cfg: BuildConfig, data: Any) -> str:
    """The log line of a validation split carved from train: how many rows, and against the budget."""
    n, need = len(data["validation"]), _budget_rows(cfg)
    line = f"[build] {cfg.data.source} has no validation split: {n:,} rows carved from train"
    if not need:
        return line + f" ([data] validation_fraction {cfg.data.validation_fraction:g})"
    budget = f"a {cfg.search.max_drop:g}-point budget at {cfg.search.confidence:.0%} confidence"
    if n >= need:
        return line + f", the {need:,} that {budget} needs or more"
    return (line + f", fewer than the {need:,} that {budget} needs: train has {len(data['train']) + n:,} rows and "
            f"at most half goes to validation, so expect verdicts \"not significant\"; give a validation split "
            f"or a wider --max-drop")


def _compare(teacher: Path, stages_dir: Path) -> tuple[tuple[str, Path], ...]:
    """What evaluate measures beside the bundle: the teacher, and the student and pruned model of the
    build directory (or search candidate) that made it."""
    return (("teacher (PyTorch)", teacher), ("student (PyTorch)", stages_dir / "distill"),
            ("pruned (PyTorch)", stages_dir / "prune"))


def _resolve_max_length(cfg: BuildConfig, teacher: Path, data: Any) -> tuple[BuildConfig, dict | None]:
    """``[data] max_length = 0``: the number the training texts call for (``data.length_from_counts``
    over their token counts with the teacher's tokenizer), so no stage sees 0; else ``cfg`` as given."""
    if cfg.data.max_length:
        return cfg, None
    from transformers import AutoTokenizer

    from edgepack.data import length_from_counts

    tok = AutoTokenizer.from_pretrained(teacher)
    counts = [len(ids) for ids in tok(list(data["train"].texts), truncation=False)["input_ids"]]
    lengths = length_from_counts(counts, cfg.data.length_percentile, limit=_position_limit(teacher, tok))
    return cfg.replace(data=cfg.data.replace(max_length=lengths["max_length"])), lengths


def _position_limit(teacher: Path, tok: Any) -> int:
    """The most tokens the teacher can take: its absolute positions (RoBERTa's start after the pad
    id), else the tokenizer's model_max_length, within DataConfig's 4096."""
    config = json.loads((teacher / "config.json").read_text(encoding="utf-8"))
    limit = 4096
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and positions > 0:
        offset = (config.get("pad_token_id") or 0) + 1 if config.get("model_type") in ("roberta", "xlm-roberta") else 0
        limit = min(limit, positions - offset)
    model_max = getattr(tok, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < limit:
        limit = model_max
    return max(8, limit)


def _publish(src: Path, out: Path, root: Path, *, force: bool, log: Log, sign=None) -> None:
    """Copy the verified bundle to ``out`` atomically, tagged with the build directory that made it,
    and signed there (``[sign] key``) before it is renamed into place: a device never sees the new
    bundle unsigned."""
    with staging_dir(out, force=force) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        if sign is not None:
            from edgepack.signing import sign_bundle

            sig = sign_bundle(tmp, Path(sign.key), name=sign.name or out.name)
            log(f"[build] signed: {out / sig.name} ({sign.key})")
    # Which bundle this build directory made (kept outside the bundle: a file the manifest does not
    # list is refused by a device that checks signatures).
    (root / "published").write_text(str(out.resolve()) + "\n")


def _built_here(out: Path, root: Path) -> bool:
    tag = root / "published"
    return tag.is_file() and tag.read_text().strip() == str(out.resolve())


def _check_disk(where: Path, teacher: Path) -> None:
    """Refuse up front when the output file system cannot hold a build: roughly four copies of the
    teacher (student, pruned model, fp32 ONNX, bundles) plus caches."""
    where = where if where.exists() else Path.cwd()
    need = 4 * sum(f.stat().st_size for f in teacher.rglob("*") if f.is_file()) + (200 << 20)
    free = shutil.disk_usage(where).free
    if free < need:
        raise EdgepackError(f"{where}: {free / 1e6:.0f} MB free, a build of {teacher.name} needs about "
                            f"{need / 1e6:.0f} MB; free space or pass --build-dir/--out on another disk")
