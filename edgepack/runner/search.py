"""The candidates of ``edgepack build``: the fastest bundle within the budget against the teacher.

Every build goes through :func:`search`. A recipe without ``[search] shapes`` is a search of one: its
own shape, built in the build directory itself and chosen without measuring. Otherwise the recipe's ``[search] shapes`` are student shapes (depth, heads, FFN width, embedding bits). They are
tried cheap first: by default each is first built untrained and timed on this CPU (the cost model,
``runner.probe``: fastest first, the recipe's order kept within the timing spread); ``order =
"declared"`` tries them as written. Each is built into ``BUILD/candidates/<name>/`` by the same chain as
the build (distill -> prune -> export -> quantize -> bundle, through its own ledger, so a rerun
resumes and candidates of one depth share their distilled student), then measured on validation:
accuracy under its calibrated out-of-scope threshold against the teacher's under the same rule
(plain accuracy when the data has no out-of-scope label), row by row, and end-to-end single-query
latency on this CPU. Each accuracy comparison is paired on the same validation rows
(``edgepack.metrics``): a shape's drop below the teacher has a paired-bootstrap interval at
``[search] confidence``, and it is inside ``max_drop`` when the whole interval is ("inside on the
point estimate, not significant" when only the point estimate is). The search stops at the first shape
inside (after ``explore`` more shapes, to draw more of the frontier); a shape that misses by more than
twice the budget skips the shapes that differ from it only in embedding bits (the refinements of a
shape that cannot get there).

All built candidates are then timed again, interleaved (``latency_rounds`` rounds, so a slow spell
of the machine falls on every candidate alike), and ``metrics.choose_shape`` chooses: the fastest by
``[search] objective`` (p50, mean or p95) of the shapes inside the budget, significant ones first, a
faster one winning only by a lead larger than its timing spread. No shape inside: of the shapes
McNemar's test cannot tell from the most accurate, the fastest is published, and the build's evaluate
stage fails its ``max_teacher_drop`` budget.
``BUILD/search/frontier.json`` holds every candidate; ``--pick NAME`` publishes another built one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgepack import shapes
from edgepack.config import BuildConfig
from edgepack.console import Log
from edgepack.errors import EdgepackError
from edgepack.records import hash_config, write_json_atomic
from edgepack.runner import cascade, probe
from edgepack.runner.chain import CANDIDATE, chain, run_links
from edgepack.runner.ledger import Ledger
from edgepack.shapes import parse_shape, shape_name


@dataclasses.dataclass
class Candidate:
    shape: str
    name: str
    dir: Path
    validation_accuracy: float | None = None
    teacher_drop: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    mean_ms: float | None = None  # a cascade's mean carries its fallback's share; its p50 does not
    noise_ms: float | None = None  # the spread of the round medians; of the round means and p95s below
    noise_mean_ms: float | None = None
    noise_p95_ms: float | None = None
    # The cost model (edgepack.runner.probe): the untrained graph's p50 when ordering, and the probe's
    # p50 and relative error timed beside the trained bundle afterwards.
    predicted_p50_ms: float | None = None
    predicted_noise_ms: float | None = None
    probe_p50_ms: float | None = None
    probe_error: float | None = None
    bundle_bytes: int | None = None
    bundle: Path | None = None  # the output of its chain's last link (bundle, or cascade with a fallback)
    # A cascade (fallback=teacher): the share of validation texts its first model sends on, so its p50 is
    # the first model's and its p95 the fallback's when the share is above 5%.
    sent_on: float | None = None
    inside: bool | None = None  # on the point estimate, as the build's max_teacher_drop budget checks it
    # The paired interval of teacher_drop (validation rows, SearchResult.confidence) and what it says of
    # the budget (metrics.budget_verdict: "inside", "inside, not significant", "outside", ...).
    drop_low: float | None = None
    drop_high: float | None = None
    verdict: str | None = None
    verdict_text: str | None = None
    correct: str | None = None  # per validation row, "1" right / "0" wrong, in the split's order
    reach: dict[str, Any] | None = None  # the reach rule's verdict when it stopped this shape's training
    status: str = "not built"  # built | stopped: cannot reach | skipped (why) | not built
    seconds: float = 0.0
    why: dict[str, str] = dataclasses.field(default_factory=dict)  # stage -> why it ran or was skipped

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dir"], d["bundle"] = str(self.dir), str(self.bundle) if self.bundle else None
        return d


@dataclasses.dataclass
class SearchResult:
    teacher_accuracy: float
    max_drop: float | None
    candidates: list[Candidate]
    chosen: Candidate
    why: str
    cpu: str
    order: str = "declared"
    latency_model: dict[str, Any] | None = None  # probe.error_summary over the built shapes
    searched: bool = True  # False: the recipe's one shape, chosen without measuring
    objective: str = "p95"  # the latency the choice compares (SearchConfig.objective)
    confidence: float = 0.95  # of the budget's intervals and of McNemar's test between shapes
    teacher_correct: str | None = None  # the teacher's per-row results on the same validation rows

    def frontier(self) -> dict[str, Any] | None:
        """What the report shows of the search (None for the recipe's one shape)."""
        return self.to_dict() if self.searched else None

    def frontier_key(self) -> list | None:
        """The frontier's part of the evaluate stage's ledger key: it reruns when the candidates or the
        choice or the rule that made it change, not when only their re-measured latencies wobble."""
        if not self.searched:
            return None
        return ([(c.name, c.status, c.validation_accuracy, c.verdict) for c in self.candidates]
                + [self.chosen.name, self.objective, self.confidence])

    def to_dict(self) -> dict[str, Any]:
        return {"teacher_validation_accuracy": self.teacher_accuracy, "max_drop": self.max_drop,
                "objective": self.objective, "confidence": self.confidence,
                "chosen": self.chosen.name, "why": self.why, "cpu": self.cpu, "order": self.order,
                "latency_model": self.latency_model, "teacher_correct": self.teacher_correct,
                "candidates": [c.to_dict() for c in self.candidates]}


def teacher_accuracy(ctx, root: Path, src_hash: str, log: Log) -> tuple[float, np.ndarray]:
    """The teacher's validation accuracy under its calibrated threshold and its per-row results,
    cached per teacher and data."""
    from edgepack.metrics import correct_rows
    from edgepack.torch_backend import TorchBackend, threads_kept

    cache = root / "search" / "teacher.json"
    key = hash_config({"teacher_and_data": src_hash, "max_length": ctx.max_length})
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key and "correct" in saved:
            return float(saved["accuracy"]), _rows(saved["correct"])
    val = ctx.data["validation"]
    with threads_kept():
        tb = TorchBackend(ctx.teacher, threads=1, oos_label=ctx.data.oos_label, max_length=ctx.max_length)
        tb.calibrate(val.texts, val.labels)
        correct = correct_rows(tb, val, ctx.data.label_names)
    acc = 100.0 * float(correct.mean())
    write_json_atomic(cache, {"key": key, "accuracy": acc, "correct": _bits(correct)})
    log(f"[search] teacher: {acc:.2f}% on {len(val.texts)} validation rows")
    return acc, correct


def _bits(correct: np.ndarray) -> str:
    return "".join("1" if x else "0" for x in correct)


def _rows(bits: str) -> np.ndarray:
    return np.frombuffer(bits.encode("ascii"), dtype=np.uint8) == ord("1")


def search(cfg: BuildConfig, ctx, root: Path, src: Path, src_hash: str, *, log: Log, ledger: Ledger) -> SearchResult:
    """Build the candidates, measure them, choose; a search of shapes writes ``root/search/frontier.json``.
    ``ledger``: the build directory's own, for the recipe's one shape (built in ``root``)."""
    from edgepack import profiles, targets
    from edgepack.metrics import VERDICT_TEXT, budget_verdict, correct_rows
    from runtime_shim import OnnxPipeline

    s = cfg.search
    val = ctx.data["validation"]
    budget = s.max_drop
    # --fallback teacher ([cascade] fallback): every shape is a cascade, and is named as one
    wanted = [shape + (f" fallback={cfg.cascade.fallback}" if cfg.cascade.fallback and "fallback" not in parse_shape(shape)
                       else "") for shape in cfg.shapes()]
    cands = [Candidate(shape, shape_name(shape), root / "candidates" / shape_name(shape)) for shape in wanted]
    configs = {c.name: shapes.apply(_from_recipe(cfg, parse_shape(c.shape).get("recipe")), c.shape) for c in cands}
    if not cands:
        cands, configs = [Candidate("", "recipe", root)], {"recipe": cfg}
    searched = bool(wanted)
    dirs = [c.dir for c in cands] + [root]
    if s.pick is not None and s.pick not in {c.name for c in cands}:
        raise EdgepackError(f"--pick {s.pick}: not a shape of this search; shapes: {', '.join(c.name for c in cands)}")
    known: dict[str, Any] = {}

    def teacher_acc() -> float:
        if "teacher" not in known:
            known["teacher"], known["teacher_correct"] = teacher_accuracy(ctx, root, src_hash, log)
        return known["teacher"]

    probes: dict[str, Path] = {}
    if probe.wanted(s, len(cands)):
        log(f"[search] cost model: {len(cands)} shapes built untrained (the teacher's weights cut to each) and "
            f"timed on this CPU, {s.latency_rounds} interleaved rounds of {s.latency_runs} single queries")
        probes = probe.build_probes(configs, ctx, root, src, src_hash)
        predicted = probe.time_dirs(probes, val.texts, runs=s.latency_runs, rounds=s.latency_rounds)
        for c in cands:
            c.predicted_p50_ms, c.predicted_noise_ms = predicted[c.name]["p50_ms"], predicted[c.name]["noise_ms"]
        by_name = {c.name: c for c in cands}
        cands = [by_name[n] for n in probe.order([c.name for c in cands], predicted)]
        log("[search] order, fastest untrained graph first: " + ", ".join(
            f"{c.name} {c.predicted_p50_ms:.3f} ms" for c in cands))
    inside_seen, after_inside, missed_far = False, 0, []
    fallback: Path | None = None  # the teacher's int8 bundle, made for the first cascade candidate
    # With a budget, each shape's training stops as soon as its validation curve cannot reach the
    # teacher's accuracy less the budget (edgepack.training.reach: the same points, the same rule).
    target = round(teacher_acc() - budget, 4) if searched and budget is not None else None
    if searched:
        log(f"[search] {len(cands)} shapes, cheap first; budget: "
            + (f"at most {budget:g} points below the teacher's {teacher_acc():.2f}% (validation); a shape whose "
               f"training cannot reach {target:.2f}% is stopped there" if budget is not None
               else "none (--max-drop not set): the first shape is kept"))

    def links_of(c: Candidate) -> list:
        nonlocal fallback
        ccfg = configs[c.name]
        # A cascade trains its student to the end: not the one a plain shape of the same student stopped.
        full = ccfg.cascade.fallback and any(o.status == STOPPED and configs[o.name].distill == ccfg.distill
                                             for o in cands)
        if ccfg.cascade.fallback:
            if fallback is None:
                fallback = cascade.fallback_bundle(cfg, ctx, root, src, src_hash, log=log)
            ccfg = cascade.with_fallback(ccfg, fallback, teacher_accuracy=teacher_acc() if budget is not None else None,
                                         max_drop=budget)
        return chain(ccfg, ctx.profile, CANDIDATE, reach=None if full else target)

    def build(c: Candidate, i: int, links: list, *, stop: bool) -> Path:
        """``c``'s chain through its ledger; ``stop``: the reach rule may end it after the training."""
        run_ledger = ledger if c.dir == ledger.root else Ledger(
            c.dir, log, total=len(links), prefix=f"{c.name} {i + 1}/{len(cands)}", share=dirs)
        cctx = dataclasses.replace(ctx, reach={"target": target, "name": c.name, "log": lambda m: log(f"[search] {m}")}
                                   ) if stop else ctx
        t0 = time.time()
        out, _ = run_links(links, run_ledger, cctx, src, src_hash, until=_stopped if stop else None)
        c.why.update(run_ledger.why)
        c.seconds = round(c.seconds + time.time() - t0, 1)
        return out

    def measure(c: Candidate) -> None:
        pipe = OnnxPipeline(c.bundle)
        if pipe.fallback is not None:
            c.sent_on = ((pipe.manifest.get("metrics") or {}).get("cascade") or {}).get("sent_on_validation")
        correct = correct_rows(pipe, val, ctx.data.label_names)
        c.validation_accuracy, c.correct = 100.0 * float(correct.mean()), _bits(correct)
        c.teacher_drop = teacher_acc() - c.validation_accuracy
        v = budget_verdict(known["teacher_correct"], correct, budget, confidence=s.confidence)
        c.drop_low, c.drop_high, c.verdict = round(v["low"], 4), round(v["high"], 4), str(v["verdict"])
        c.verdict_text, c.inside = VERDICT_TEXT[c.verdict], bool(v["inside_point"])
        c.bundle_bytes = sum(f.stat().st_size for f in c.bundle.rglob("*") if f.is_file())
        log(f"[search] {c.name}: {c.validation_accuracy:.2f}% on validation, {_drop(c, s.confidence)}"
            + (f"; budget {budget:g} points: {c.verdict_text}" if budget is not None else ""))

    for i, c in enumerate(cands):
        shape = parse_shape(c.shape) if c.shape else {}
        if s.pick is None and inside_seen and after_inside >= s.explore:
            c.status = "skipped (a cheaper shape is inside the budget)"
            continue
        base = {k: v for k, v in shape.items() if k != "embedding_bits"}
        if s.pick is None and any(base == m for m in missed_far) and "embedding_bits" in shape:
            c.status = "skipped (the same shape missed by more than twice the budget)"
            continue
        links = links_of(c)
        if s.pick is not None and c.name != s.pick and not (c.dir / links[-1].name / "manifest.json").is_file():
            c.status = "not built"
            continue
        # A cascade can be inside a budget its student alone cannot reach (the teacher answers for it).
        stop = target is not None and s.pick is None and not configs[c.name].cascade.fallback
        out = build(c, i, links, stop=stop)
        c.reach = _stopped(out) if stop else None
        if c.reach is not None:
            c.status, c.why["search"] = STOPPED, _reach_text(c.reach)
            log(f"[search] {c.name}: {STOPPED} ({_reach_text(c.reach)}): not carried on to its other stages")
            continue
        c.bundle, c.status = out, "built"
        if not searched:
            break
        measure(c)
        if c.verdict == "inside":  # the search stops on a shape the interval puts inside, not on a lucky one
            after_inside += 1 if inside_seen else 0
            inside_seen = True
        elif inside_seen:
            after_inside += 1
        if budget is not None and c.teacher_drop > 2 * budget:
            missed_far.append(base)
    if not searched:
        return SearchResult(known.get("teacher", float("nan")), budget, cands, cands[0], "the recipe's one shape",
                            cpu="", searched=False, objective=s.objective, confidence=s.confidence)
    stopped = [c for c in cands if c.status == STOPPED]
    if stopped:
        best = max(stopped, key=lambda c: c.reach["projected"])
        log(f"[search] stopped early, cannot reach {target:.2f}%: " + ", ".join(
            f"{c.name} (at most {c.reach['projected']:.2f}%)" for c in stopped)
            + f"; the best reachable figure among them: {best.reach['projected']:.2f}% ({best.name})")
        if not any(c.status == "built" for c in cands):
            # Nothing can reach the budget: the most accurate student when stopped is carried on (no more
            # training) and published, and the build's budget check fails, as for a shape built to the end.
            best = max(stopped, key=lambda c: (c.reach["best"], -cands.index(c)))
            log(f"[search] no shape can reach {target:.2f}%: {best.name} (best {best.reach['best']:.2f}% when stopped) "
                "is carried on through its other stages and published; the build's budget check will fail")
            best.bundle = build(best, cands.index(best), links_of(best), stop=False)
            best.status, best.why["search"] = "built", f"{STOPPED}, carried on: no shape can reach the budget"
            measure(best)
    built = [c for c in cands if c.status == "built"]
    _time_candidates(built, probes, val.texts, runs=s.latency_runs, rounds=s.latency_rounds, log=log)
    chosen, why = _choose(built, s.pick, objective=s.objective, confidence=s.confidence)
    for c in built:
        log(f"[search] {c.name:<16} {c.validation_accuracy:6.2f}%  {_drop(c, s.confidence)}"
            + (f", {c.verdict_text}" if budget is not None else "")
            + f"  p50 {c.p50_ms:.3f} (±{c.noise_ms:.3f}) mean {c.mean_ms:.3f} p95 {c.p95_ms:.3f} ms"
            f"  {c.bundle_bytes / 1e6:5.2f} MB"
            + (f"  {c.sent_on:.0%} sent on" if c.sent_on is not None else "") + ("  <- chosen" if c is chosen else ""))
    log(f"[search] chose {chosen.name}: {why}")
    errors = [c.probe_error for c in built if c.probe_error is not None]
    model_error = probe.error_summary(errors)
    if model_error:
        log(f"[search] cost model error against the trained bundles: median {model_error['median_abs']:.0%}, "
            f"largest {model_error['max_abs']:.0%} ({model_error['shapes']} shapes)")
    result = SearchResult(teacher_acc(), budget, cands, chosen, why,
                          cpu=f"{targets.detect().name} ({profiles.host_profile().description})",
                          order="latency" if probes else "declared", latency_model=model_error,
                          objective=s.objective, confidence=s.confidence, teacher_correct=_bits(known["teacher_correct"]))
    write_json_atomic(root / "search" / "frontier.json", result.to_dict())
    return result


def _from_recipe(cfg: BuildConfig, name: str | None) -> BuildConfig:
    """``cfg`` with the keys recipe ``name``'s own file sets in its ``[distill]`` and ``[prune]`` tables
    (a shape's ``recipe=NAME``; not what that recipe inherits, so the build's data settings stay)."""
    if name is None:
        return cfg
    from edgepack import recipes

    data, path = recipes.read(name)
    try:
        return cfg.merged({k: data[k] for k in ("distill", "prune") if k in data}, where=str(path))
    except (TypeError, ValueError) as e:
        raise EdgepackError(str(e)) from None


def _time_candidates(built: list[Candidate], probes: dict[str, Path], texts, *, runs: int, rounds: int,
                     log: Log) -> None:
    """End-to-end single-query latency of every built candidate, interleaved in rounds, with its probe
    (when the cost model ran) in the same rounds, so the model's error is measured under one load."""
    if not built:
        return
    dirs = {c.name: c.bundle for c in built}
    dirs.update({f"probe {c.name}": probes[c.name] for c in built if c.name in probes})
    log(f"[search] timing {len(built)} candidates" + (" and their untrained probes" if len(dirs) > len(built) else "")
        + f": {rounds} interleaved rounds of {runs} single queries each")
    timing = probe.time_dirs(dirs, texts, runs=runs, rounds=rounds)
    for c in built:
        r = timing[c.name]
        c.p50_ms, c.p95_ms, c.mean_ms, c.noise_ms = r["p50_ms"], r["p95_ms"], r["mean_ms"], r["noise_ms"]
        c.noise_mean_ms, c.noise_p95_ms = r.get("noise_mean_ms"), r.get("noise_p95_ms")
        if f"probe {c.name}" in timing:
            c.probe_p50_ms = timing[f"probe {c.name}"]["p50_ms"]
            c.probe_error = round(c.probe_p50_ms / c.p50_ms - 1, 4)


STOPPED = "stopped: cannot reach"


def _stopped(stage_dir: Path) -> dict[str, Any] | None:
    """The reach rule's verdict when the training that wrote ``stage_dir`` was stopped by it (its
    ``stage.json``), with the epochs run; None otherwise."""
    record = Path(stage_dir) / "stage.json"
    if not record.is_file():
        return None
    reach = (json.loads(record.read_text()).get("metrics") or {}).get("reach") or {}
    if not reach.get("stopped"):
        return None
    return {**reach["stopped"], "epochs_run": reach["epochs_run"], "epochs_configured": reach["epochs"]}


def _reach_text(r: dict[str, Any]) -> str:
    return (f"after epoch {r['epoch']}/{r['epochs']}: best {r['best']:.2f}%, at most {r['projected']:.2f}% "
            f"reachable against {r['target']:.2f}%")


def _drop(c: Candidate, confidence: float) -> str:
    from edgepack.metrics import drop_words

    return drop_words(c.teacher_drop, c.drop_low, c.drop_high, confidence=confidence)


def _choose(built: list[Candidate], pick: str | None, *, objective: str = "p95",
            confidence: float = 0.95) -> tuple[Candidate, str]:
    """``--pick``'s shape, else ``metrics.choose_shape`` over the built ones: the fastest by
    ``objective`` of those inside the budget (significant ones first), a faster one winning only by
    more than its timing spread; none inside: the fastest of those McNemar cannot tell from the most
    accurate."""
    from edgepack.metrics import choose_shape

    if not built:
        raise EdgepackError("the search built no shape; check [search] shapes in the recipe")
    if pick is not None:
        return next(c for c in built if c.name == pick), "picked (--pick)"
    rows = [{"name": c.name, "p50_ms": c.p50_ms, "mean_ms": c.mean_ms, "p95_ms": c.p95_ms, "noise_ms": c.noise_ms,
             "noise_mean_ms": c.noise_mean_ms, "noise_p95_ms": c.noise_p95_ms,
             "correct": _rows(c.correct), "verdict": c.verdict} for c in built]
    name, why = choose_shape(rows, objective=objective, alpha=1 - confidence)
    return next(c for c in built if c.name == name), why
