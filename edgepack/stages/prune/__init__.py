"""The ``prune`` stage: make a fine-tuned (or distilled) classifier physically smaller.

Steps, each measured (parameters, embedding size, heads and FFN per layer, validation and test
accuracy raw and with the calibrated out-of-scope threshold, agreement with the input model):

1. ``layers``: keep some encoder layers (``keep_layers``),
2. ``vocab``: trim the vocabulary to what the training split uses (``edgepack.vocab``),
3. ``structured``: remove the least important heads and FFN neurons (``edgepack.stages.prune.structured``),
4. ``recover``: a short distillation from the teacher (``edgepack.training.distillation``), optionally with
   magnitude or movement sparsity (``edgepack.stages.prune.sparsity``).

``run(cfg, src, out, ctx)`` reads only ``src`` (and the teacher, ``ctx.teacher``; ``src`` itself when
there is none), writes only ``out`` (atomically, ``stage.json`` last) and returns its record. Every target is checked against the
model before any slow step runs, so bad input fails in a second with nothing written.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.config import PruneConfig
from edgepack.data import LabelledData
from edgepack.errors import EdgepackError
from edgepack.modeling import load_classifier, save_model
from edgepack.records import hash_config, hash_tree, staging_dir, write_stage_record
from edgepack.stages import StageRecord
from edgepack.static_model import is_static

STAGE = "prune"


def _describe(model) -> dict[str, Any]:
    from edgepack.stages.prune import structured as st

    emb = model.get_input_embeddings().weight
    static = is_static(model)
    return {
        "parameters": st.count_params(model),
        "embedding_params": int(emb.numel()),
        "vocab_size": int(emb.shape[0]),
        "layers": 0 if static else len(st.layers(model)),
        "heads_per_layer": [] if static else st.heads_per_layer(model),
        "ffn_size": [] if static else st.ffn_sizes(model),
        "fp32_bytes": 4 * st.count_params(model),
    }


class _Evaluator:
    """Validation/test logits of each step, compared with the input model's and the teacher's."""

    def __init__(self, data: LabelledData, max_length: int, teacher_test: np.ndarray | None):
        self.data, self.max_length, self.teacher_test = data, max_length, teacher_test
        self.input_test: np.ndarray | None = None
        self.cached_input: np.ndarray | None = None  # validation + test logits of the unmodified input

    def __call__(self, model, tokenizer) -> dict[str, Any]:
        from edgepack.training.distillation import predict_logits, score

        val, test = self.data["validation"], self.data["test"]
        if self.input_test is None and self.cached_input is not None:
            lv, lt = self.cached_input[: len(val)], self.cached_input[len(val):]
        else:
            lv = predict_logits(model, tokenizer, val.texts, self.max_length)
            lt = predict_logits(model, tokenizer, test.texts, self.max_length)
        m = score(lv, val.labels, lt, test.labels, self.data.oos_id, teacher_test_logits=self.teacher_test)
        if self.input_test is None:
            self.input_test = lt
        m["test_agreement_with_input"] = round(float((lt.argmax(1) == self.input_test.argmax(1)).mean()), 6)
        return m


def _check_targets(cfg: PruneConfig, model) -> None:
    """Fail fast: run the structural edits on a throw-away copy with dummy importance."""
    from edgepack.stages.prune import structured as st

    probe = copy.deepcopy(model)
    if cfg.keep_layers:
        st.keep_layers(probe, cfg.keep_layers)
    if cfg.max_positions is not None:
        n = probe.base_model.embeddings.position_embeddings.num_embeddings
        if cfg.max_positions > n:
            raise EdgepackError(f"--max-positions {cfg.max_positions} is larger than the model's {n} positions")
    if cfg.heads_per_layer or cfg.ffn_size is not None:
        heads = st.heads_per_layer(probe)
        imp = np.zeros((len(heads), max(heads)))
        st.make_plan(probe, imp, [np.zeros(f) for f in st.ffn_sizes(probe)], heads=cfg.heads_per_layer,
                     ffn_size=cfg.ffn_size)
    del probe


def run(cfg: PruneConfig, src: Path, out: Path, ctx, *, progress: bool = False) -> StageRecord:
    """Prune the classifier in ``src`` into ``out``; the teacher (default: ``src``) guides recovery."""
    import torch
    from transformers import AutoTokenizer

    from edgepack import vocab
    from edgepack.stages.prune import structured as st
    from edgepack.stages.prune.sparsity import make_callback
    from edgepack.training.distillation import check_labels, prepare, run_once
    from edgepack.training.teacher_cache import teacher_outputs

    started = time.time()
    src, out = Path(src), Path(out)
    data, cache_dir, log, max_length = ctx.data, ctx.cache, ctx.log, ctx.max_length
    teacher_dir = Path(ctx.teacher) if ctx.teacher else src
    if not src.is_dir():
        raise EdgepackError(f"{src}: no such directory; pass a Hugging Face classifier directory")
    if cfg.max_positions is not None and cfg.max_positions < max_length:
        raise EdgepackError(f"--max-positions {cfg.max_positions} is below the {max_length} tokens a query may "
                            "have ([data] max_length / --max-length); keep at least that many")
    train = data.splits.get("train")
    if train is None or not len(train) or not any(t.strip() for t in train.texts):
        raise EdgepackError(f"{data.source}: the training corpus is empty; pruning needs training texts")
    for split in ("validation", "test"):
        if split not in data.splits or not len(data[split]):
            raise EdgepackError(f"{data.source}: no {split} rows; pruning measures every step on them")
    tok_json = vocab.read_tokenizer_json(src) if cfg.trim_vocab else None
    if not cfg.trim_vocab and not cfg.structured and cfg.sparsity == "none":
        raise EdgepackError("nothing to do: give --heads-per-layer, --ffn-size, --param-budget, --keep-layers, "
                            "--sparsity or leave vocabulary trimming on")
    torch.manual_seed(cfg.seed)
    try:
        model = load_classifier(src).eval()
    except (OSError, ValueError) as e:
        raise EdgepackError(f"{src}: cannot load as a sequence classifier ({str(e).splitlines()[0][:200]})") from None
    check_labels(model.config.id2label, data)
    if is_static(model):
        # No layers, heads, FFN or positions: what is left to prune is the table (nearly all of it).
        cfg = cfg.replace(keep_layers=(), heads_per_layer=(), heads_fraction=None, ffn_size=None, ffn_fraction=None,
                          param_budget=None, max_positions=None)
        log("[prune] static student: vocabulary and recovery only (no layers, heads or FFN to cut)")
    else:
        st.spec_for(model)
        cfg = cfg.resolved(st.ffn_sizes(model), st.heads_per_layer(model))
        _check_targets(cfg, model)
    if cfg.recover and cfg.recovery.qat:  # an unknown target fails here, before any training
        from edgepack.training.qat import resolve

        qat_scheme = resolve(cfg.recovery.qat_target, ctx.profile)
    tokenizer = AutoTokenizer.from_pretrained(src)
    input_hash = hash_tree(src)
    teacher_hash = hash_tree(teacher_dir)
    # The same texts and order as distillation's evaluation set, so both share one teacher cache entry.
    teacher_eval = teacher_outputs(teacher_dir, data["validation"].texts + data["test"].texts, cache_dir=cache_dir,
                                   max_length=max_length, teacher_hash=teacher_hash, progress=progress)["logits"]
    evaluate = _Evaluator(data, max_length, teacher_eval[len(data["validation"]):])
    if teacher_dir.resolve() == src.resolve():
        evaluate.cached_input = teacher_eval  # the input is the teacher: no need to run it again
    steps: list[dict[str, Any]] = []

    def record(name: str, t0: float, extra: Mapping[str, Any] | None = None) -> None:
        m = evaluate(model, tokenizer)
        step = {"step": name, **_describe(model), **m, **(dict(extra) if extra else {}),
                "wall_time_s": round(time.time() - t0, 1)}
        steps.append(step)
        log(_line(step))

    out.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(out, force=True) as tmp:
        t0 = time.time()
        record("input", t0)
        if cfg.keep_layers:
            t0 = time.time()
            st.keep_layers(model, cfg.keep_layers)
            record("layers", t0, {"kept_layers": list(cfg.keep_layers)})
        if tok_json is not None:
            t0 = time.time()
            new_json, report = vocab.trim_vocab(model, tok_json, train.texts, keep_top=cfg.keep_top,
                                               keep_chars=cfg.keep_chars, clusters=cfg.cluster_rest, seed=cfg.seed)
            if cfg.max_positions is not None:
                vocab.trim_positions(model, cfg.max_positions)
            vocab.save_tokenizer(src, tmp, new_json, model_max_length=cfg.max_positions)
            tokenizer = AutoTokenizer.from_pretrained(tmp)
            record("vocab", t0, report)
        else:
            tokenizer.save_pretrained(tmp)
        if cfg.heads_per_layer or cfg.ffn_size is not None or cfg.param_budget is not None:
            t0 = time.time()
            from tokenizers import Tokenizer

            rng = np.random.default_rng(cfg.seed)
            idx = np.sort(rng.choice(len(train), size=min(cfg.importance_rows, len(train)), replace=False))
            rows = train.take(idx)
            fast = Tokenizer.from_file(str(tmp / "tokenizer.json"))
            head_imp, ffn_imp = st.importance(model, fast, rows.texts, rows.labels, max_length=max_length)
            plan = st.make_plan(model, head_imp, ffn_imp, heads=cfg.heads_per_layer, ffn_size=cfg.ffn_size,
                                param_budget=cfg.param_budget)
            st.apply_plan(model, plan)
            record("structured", t0, {"importance_rows": len(rows), "head_importance": np.round(head_imp, 4).tolist(),
                                      "kept_heads": plan.heads})
        sparsity_report = None
        if cfg.recover:
            t0 = time.time()
            dcfg = cfg.recovery.replace(ablation=False, seed=cfg.seed)
            if dcfg.qat:
                dcfg = dcfg.replace(qat_target=qat_scheme.target)
            callback = make_callback(cfg.sparsity, cfg.sparsity_target)
            prep = prepare(dcfg, teacher_dir, data, student_model=model, student_tokenizer=tokenizer,
                           cache_dir=cache_dir, max_length=max_length, progress=progress)
            model, m = run_once(prep, dcfg, model=model, callbacks=[callback] if callback else (), progress=progress)
            model.eval()
            extra: dict[str, Any] = {"distill": dcfg.to_dict(), "best_epoch": m.get("best_epoch"),
                                     "train_rows": m.get("train_rows"), "qat": m.get("qat")}
            if callback is not None:
                sparsity_report = callback.report(model)
                extra["sparsity"] = sparsity_report
            record("recover", t0, extra)
        save_model(model, tmp)
        weights = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        first, last = steps[0], steps[-1]
        metrics = {
            "steps": steps,
            "parameters_before": first["parameters"], "parameters_after": last["parameters"],
            "embedding_params_before": first["embedding_params"], "embedding_params_after": last["embedding_params"],
            "test_accuracy_before": first["test_accuracy"], "test_accuracy_after": last["test_accuracy"],
            "test_accuracy_calibrated_before": first.get("test_accuracy_calibrated"),
            "test_accuracy_calibrated_after": last.get("test_accuracy_calibrated"),
            "weights_bytes": weights,
            # the int8 rounding the recovery trained with (edgepack.training.qat), or None
            "qat": next((s.get("qat") for s in steps if s["step"] == "recover"), None),
            **({"sparsity": sparsity_report} if sparsity_report else {}),
        }
        config = {"prune": cfg.to_dict(), "data": ctx.data_config.to_dict()}
        write_stage_record(tmp, stage=STAGE, config=config, input_hash=_input_hash(input_hash, teacher_hash, data),
                           metrics=metrics, started=started,
                           extra={"source": str(src), "teacher": str(teacher_dir), "config_key": hash_config(config)})
    log(f"[prune] wrote {out} ({weights / 1e6:.1f} MB of weights, {last['parameters']:,} parameters, "
        f"{time.time() - started:.0f} s)")
    return StageRecord.read(out)


def _input_hash(model_hash: str, teacher_hash: str, data: LabelledData) -> str:
    import hashlib

    return hashlib.sha256(f"{model_hash}\0{teacher_hash}\0{data.fingerprint()}".encode()).hexdigest()


def _line(step: Mapping[str, Any]) -> str:
    heads = step["heads_per_layer"]
    ffn = step["ffn_size"]
    cal = step.get("test_accuracy_calibrated")
    return (f"[prune] {step['step']:<10} params {step['parameters'] / 1e6:6.2f}M  embedding "
            f"{step['vocab_size']:>6} x {step['embedding_params'] // max(step['vocab_size'], 1)}  "
            f"layers {step['layers']}  heads {','.join(map(str, heads))}  ffn {','.join(map(str, sorted(set(ffn))))}  "
            f"test acc {step['test_accuracy']:.2%}" + (f" (calibrated {cal:.2%})" if cal is not None else "")
            + f"  agreement w/ input {step['test_agreement_with_input']:.2%}  {step['wall_time_s']:.0f}s")


def read_steps(out: Path) -> list[dict[str, Any]]:
    rec = json.loads((Path(out) / "stage.json").read_text())
    return rec["metrics"]["steps"]
