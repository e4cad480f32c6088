"""The distill stage: a smaller student from the teacher, trained on its soft targets.

``run(cfg, src, out, ctx)``: ``src`` is the teacher; the student is built from its layers (or from
``cfg.student``), trained with ``alpha * CE + (1 - alpha) * T^2 * KL`` against the teacher's cached
logits (``edgepack.training``: the trainer, the teacher cache, the student builder, the Optuna search),
and written to ``out`` with its ``stage.json``; with ``cfg.ablation`` the same student is also
trained on labels only and recorded beside it.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgepack.config import DistillConfig
from edgepack.records import hash_tree, staging_dir, write_stage_record
from edgepack.stages import StageRecord
from edgepack.static_model import is_static
from edgepack.training.distillation import prepare, run_once, score
from edgepack.training.search import check_storage, redact, run_search


def run(cfg: DistillConfig, src: Path, out: Path, ctx, *, student_model=None, student_tokenizer=None,
        callbacks: Iterable[Any] = (), progress: bool = True) -> StageRecord:
    """The stage: train a student of the teacher ``src`` on ``ctx.data`` and write it to ``out``
    (a Hugging Face classifier directory with the teacher's ``id2label``, its tokenizer and
    ``stage.json``), replacing ``out`` atomically.

    ``student_model`` (with ``student_tokenizer``; the teacher's tokenizer by default) distils into an
    already-built model; ``callbacks`` are passed to the Trainer of the final run, and with
    ``ctx.reach`` (the shape search's budget) the reach rule's, which stops it as soon as its validation
    curve cannot get to ``ctx.reach["target"]`` points (recorded as ``metrics["reach"]``). With
    ``cfg.search_trials`` an Optuna study picks alpha, T, epochs and lr first
    (``edgepack.training.search``); with ``cfg.ablation`` the same student is also trained on labels only.
    """
    started = time.time()
    if cfg.search_trials and cfg.storage:
        check_storage(cfg.storage)  # a wrong URL is said now, not after the teacher's pass over the data
    if cfg.qat:  # resolved (and an unknown target refused) before any training
        from edgepack.training.qat import resolve

        cfg = cfg.replace(qat_target=resolve(cfg.qat_target, ctx.profile).target)
    teacher_dir, out, data, cache_dir = Path(src), Path(out), ctx.data, ctx.cache
    max_length = ctx.max_length
    prep = prepare(cfg, teacher_dir, data, student_model=student_model, student_tokenizer=student_tokenizer,
                   cache_dir=cache_dir, max_length=max_length, progress=progress)
    teacher_metrics = score(prep.teacher_val, data["validation"].labels, prep.teacher_test, data["test"].labels,
                            data.oos_id)
    extra: dict[str, Any] = {"teacher": {"dir": str(teacher_dir), "hash": prep.teacher_hash, **teacher_metrics}}
    search_db = None
    final_cfg = cfg
    if cfg.search_trials:
        result = run_search(prep, out=out, progress=progress)
        final_cfg = result.best_config
        search_db = result.db_path
        extra["search"] = result.record()
        if student_model is None and not cfg.student and (final_cfg.num_layers, final_cfg.layers) != (cfg.num_layers, cfg.layers):
            prep = prepare(final_cfg, teacher_dir, data, cache_dir=cache_dir, max_length=max_length, progress=progress)
    ablation_init = copy.deepcopy(student_model) if (cfg.ablation and student_model is not None) else None
    stop = None
    if ctx.reach is not None:
        from edgepack.training.reach import ReachCallback

        stop = ReachCallback(ctx.reach["target"], name=ctx.reach.get("name", "student"), log=ctx.reach.get("log"),
                             metric="eval_cal_accuracy" if data.oos_id is not None else "eval_accuracy")
        callbacks = [*callbacks, stop]
    model, metrics = run_once(prep, final_cfg, model=student_model, callbacks=callbacks, progress=progress)
    if stop is not None:
        metrics["reach"] = {"target": round(float(stop.target), 4), "epochs": final_cfg.epochs,
                            "epochs_run": len(stop.curve), "curve": [round(x, 4) for x in stop.curve],
                            "stopped": stop.stopped.to_dict() if stop.stopped else None}
    metrics["train_wall_time_s"] = metrics.pop("wall_time_s")
    if cfg.ablation:
        _, abl = run_once(prep, final_cfg.replace(alpha=1.0, augment=0, hidden_weight=0.0, attention_weight=0.0), model=ablation_init,
                          progress=progress)
        extra["ablation"] = {"alpha": 1.0, **abl}
        if "test_accuracy_calibrated" in metrics:
            metrics["gain_over_ablation_calibrated"] = round(
                metrics["test_accuracy_calibrated"] - abl["test_accuracy_calibrated"], 6)
        metrics["gain_over_ablation"] = round(metrics["test_accuracy"] - abl["test_accuracy"], 6)
    layers = getattr(model.config, "edgepack_teacher_layers", None)
    extra["student"] = {
        "source": "model" if student_model is not None else (
            cfg.student or ("static: the teacher's word table" if is_static(model) else "teacher layers")),
        "teacher_layers": layers,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "final_config": _recorded(final_cfg),
    }
    input_hash = _input_hash(prep.teacher_hash, data.fingerprint(), cfg.student)
    config = {"distill": _recorded(cfg), "data": ctx.data_config.to_dict()}
    with staging_dir(out, force=True) as tmp:
        _save(model, prep.tokenizer, tmp)
        if search_db is not None and Path(search_db).is_file():
            shutil.copy2(search_db, tmp / "search.db")
        write_stage_record(tmp, stage="distill", config=config, input_hash=input_hash, metrics=metrics,
                           started=started, extra=extra)
    if search_db is not None and Path(search_db).is_file() and Path(search_db).parent == out.parent:
        Path(search_db).unlink(missing_ok=True)  # the study now lives in OUT/search.db
    return StageRecord.read(out)


def untrained(cfg: DistillConfig, src: Path, out: Path, ctx) -> StageRecord:
    """The student ``cfg`` describes, untrained: the teacher ``src``'s layers kept (or its word table,
    for the static student), written to ``out`` as the stage writes a trained one. Its graph costs what
    the trained student's will, so the shape search times it before training anything
    (``edgepack.runner.probe``)."""
    from edgepack.training.distillation import build_student

    started = time.time()
    model, tokenizer, _ = build_student(cfg, Path(src))
    config = {"distill": _recorded(cfg), "data": ctx.data_config.to_dict()}
    with staging_dir(Path(out), force=True) as tmp:
        _save(model, tokenizer, tmp)
        write_stage_record(tmp, stage="distill", config=config, input_hash=hash_tree(src),
                           metrics={"trained": False, "parameters": int(sum(p.numel() for p in model.parameters()))},
                           started=started,
                           extra={"student": {"teacher_layers": getattr(model.config, "edgepack_teacher_layers", None)}})
    return StageRecord.read(out)


def _save(model, tokenizer, tmp: Path) -> None:
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # Keep the source's tokenizer.json as it is: re-serialising drops tokens that share an id
    # (a vocabulary folded by prune --cluster-rest).
    src_tok = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "tokenizer.json"
    if src_tok.is_file():
        shutil.copy2(src_tok, tmp / "tokenizer.json")


def _recorded(cfg: DistillConfig) -> dict[str, Any]:
    """The config as recorded (and hashed): a storage URL's password never reaches stage.json."""
    d = cfg.to_dict()
    if d.get("storage"):
        d["storage"] = redact(d["storage"])
    return d


def _input_hash(teacher_hash: str, data_fp: str, student_dir: str | None) -> str:
    h = hashlib.sha256(f"{teacher_hash}\0{data_fp}".encode())
    if student_dir:
        h.update(hash_tree(Path(student_dir)).encode())
    return h.hexdigest()
