"""Metrics of the build side: accuracy, in-scope accuracy, out-of-scope recall and agreement (the
device runtime's own functions, :mod:`runtime_shim.metrics`, so build records and device reports
compute them the same way), and the out-of-scope threshold.

Out-of-scope threshold: answer the out-of-scope label when the top softmax probability is below a
threshold chosen on validation.

Intent classifiers trained with a few hundred out-of-scope examples (CLINC150 has 250 against
15,000 in-scope) under-predict that class; low confidence is a better out-of-scope signal than the
class itself. On CLINC150 a threshold moves every model's test accuracy up by points (docs/results.md).
"""

from __future__ import annotations

from math import comb
from statistics import NormalDist

import numpy as np

from runtime_shim.metrics import agreement, label_metrics
from runtime_shim.pipeline import softmax, thresholded

# softmax, label_metrics and agreement: the runtime's, re-exported
__all__ = ["accuracy_points", "correct_rows", "accuracy_report", "agreement", "evaluate", "apply_threshold", "calibrate_threshold", "label_metrics",
           "softmax", "paired_bootstrap", "mcnemar", "budget_verdict", "choose_shape", "rows_for_budget", "LATENCY_OBJECTIVES",
           "VERDICT_TEXT", "drop_words", "noise_key", "leads"]


def evaluate(pipe, split) -> np.ndarray:
    """Softmax probabilities of a pipeline (``runtime_shim.OnnxPipeline`` or any benchmark backend) on
    ``split``, in the split's order, batched exactly as the benchmark harness batches them (so the
    stages' and bench's accuracies agree)."""
    from runtime_shim.bench import predict_probs

    return predict_probs(pipe, split.texts)


def accuracy_points(backend, split, label_names) -> float:
    """Accuracy in points of a backend (``OnnxPipeline``, ``TorchBackend``) on ``split`` under the
    backend's own out-of-scope threshold (``oos_threshold``, calibrated on validation; plain accuracy
    when the labels have no out-of-scope class): the one number the teacher budget compares."""
    return 100.0 * float(correct_rows(backend, split, label_names).mean())


def correct_rows(backend, split, label_names) -> np.ndarray:
    """Whether ``backend`` answers each row of ``split`` right, under the rule ``accuracy_points``
    uses: the per-row results that paired comparisons (``budget_verdict``, ``mcnemar``) need."""
    oos = getattr(backend, "oos_label", None)
    oos_id = list(label_names).index(oos) if oos in list(label_names) else None
    probs = evaluate(backend, split)
    pred = probs.argmax(axis=1) if oos_id is None else apply_threshold(probs, oos_id, getattr(backend, "oos_threshold", None))
    return np.asarray(pred) == np.asarray(split.labels)


def accuracy_report(probs: np.ndarray, labels: np.ndarray, oos_id: int | None, threshold: float | None) -> dict[str, float | None]:
    """``accuracy_raw`` (argmax), and with an out-of-scope class ``accuracy``, ``in_scope_accuracy`` and
    ``oos_recall`` under ``threshold`` plus ``oos_recall_raw``; without one ``accuracy`` is the raw one.

    >>> accuracy_report(np.array([[0.9, 0.1], [0.55, 0.45]]), np.array([0, 1]), 1, 0.6)["oos_recall"]
    1.0
    """
    raw = probs.argmax(axis=1)
    out: dict[str, float | None] = {"accuracy_raw": label_metrics(raw, labels, None)["accuracy"]}
    if oos_id is None:
        out["accuracy"] = out["accuracy_raw"]
        return out
    m = label_metrics(apply_threshold(probs, oos_id, threshold), labels, oos_id)
    out.update({"accuracy": m["accuracy"], "in_scope_accuracy": m["in_scope_accuracy"], "oos_recall": m["oos_recall"],
                "oos_recall_raw": label_metrics(raw, labels, oos_id)["oos_recall"]})
    return out


def apply_threshold(probs: np.ndarray, oos_id: int, threshold: float | None) -> np.ndarray:
    """Argmax predictions, with rows whose top probability is below ``threshold`` set to ``oos_id``.

    >>> apply_threshold(np.array([[0.9, 0.1], [0.55, 0.45]]), oos_id=1, threshold=0.6).tolist()
    [0, 1]
    """
    return thresholded(probs.argmax(axis=1), probs.max(axis=1), oos_id, threshold)


RULES = ("one-se", "max", "grid")
GRID_STEP = 0.02


def calibrate_threshold(probs: np.ndarray, labels: np.ndarray, oos_id: int, *,
                        target_recall: float | None = None, rule: str = "one-se") -> float:
    """The out-of-scope threshold for (``probs``, ``labels``), validation rows.

    ``rule="max"``: the threshold that maximises accuracy. ``rule="one-se"`` (default): the largest
    threshold whose accuracy is within one standard error, sqrt(a(1 - a)/n), of that maximum (Breiman's
    one-standard-error rule): thresholds that close are indistinguishable on ``n`` rows, and the
    largest of them guards against a validation split with fewer out-of-scope queries than real
    traffic (CLINC150: 3% of validation, 18% of test). On CLINC150 it gained every
    model measured up to a few points over "max" (docs/results.md); the rule was chosen after seeing
    those figures, so read the gain as optimistic.
    ``rule="grid"``: the smallest threshold of 0, 0.02, ..., 1 with the highest accuracy, the coarse
    search some earlier figures were measured with; kept to compare with them.
    ``target_recall``: instead, the smallest threshold whose out-of-scope recall reaches it.
    Returned as the midpoint between the two top probabilities it separates, so it does not sit
    exactly on a validation row.

    >>> p = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    >>> y = np.array([0, 0, 1, 1])  # every threshold in (0.6, 0.8] is right on all four rows
    >>> round(calibrate_threshold(p, y, oos_id=1, rule="max"), 2), round(calibrate_threshold(p, y, oos_id=1), 2)
    (0.65, 0.75)
    """
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}; choose one of: {', '.join(RULES)}")
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if rule == "grid" and target_recall is None:
        grid = np.round(np.arange(0.0, 1.0 + 1e-9, GRID_STEP), 6)
        accs = [(apply_threshold(probs, oos_id, t) == labels).mean() for t in grid]
        return float(grid[int(np.argmax(accs))])
    top = probs.max(axis=1)
    order = np.argsort(top, kind="stable")
    top_sorted = top[order]
    is_oos = (labels == oos_id)[order]
    raw_correct = (probs.argmax(axis=1) == labels)[order]
    # Threshold between sorted rows k-1 and k sends rows [0, k) to out-of-scope.
    oos_below = np.concatenate([[0], np.cumsum(is_oos)])
    raw_below = np.concatenate([[0], np.cumsum(raw_correct)])
    # Equal top probabilities cannot be separated: only cut where the value changes.
    cuts = np.concatenate([[0], np.flatnonzero(np.diff(top_sorted) > 0) + 1, [len(top_sorted)]])
    if target_recall is not None:
        n_oos = max(int(is_oos.sum()), 1)
        reach = cuts[oos_below[cuts] / n_oos >= target_recall]
        k = int(reach[0]) if len(reach) else int(cuts[-1])
    else:
        correct = oos_below[cuts] + (raw_below[-1] - raw_below[cuts])
        best = int(np.argmax(correct))
        if rule == "one-se":
            n = len(top_sorted)
            acc = correct[best] / n
            se = np.sqrt(acc * (1.0 - acc) / n)
            best = int(np.flatnonzero(correct / n >= acc - se - 1e-12)[-1])
        k = int(cuts[best])
    if k == 0:
        return 0.0
    if k == len(top_sorted):
        return float(np.nextafter(top_sorted[-1], np.inf))
    return float((top_sorted[k - 1] + top_sorted[k]) / 2)


# ------------------------------------------------------------------------------------------ decisions
# Every accuracy comparison a build makes is between two models' predictions on the same rows, so its
# uncertainty is that of a paired difference: rows both get right (or wrong) carry no information,
# and the interval's width is set by the rows they disagree on.

CONFIDENCE = 0.95
LATENCY_OBJECTIVES = ("p50", "mean", "p95")


def _correct(x) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype != bool and not np.isin(a, (0, 1)).all():
        raise ValueError("expected per-row correctness (booleans or 0/1), one per row")
    return a.astype(bool)


def paired_bootstrap(correct_a, correct_b, *, confidence: float = CONFIDENCE, n_boot: int = 4000,
                     seed: int = 0) -> dict[str, float | int | str]:
    """Accuracy of ``a`` minus accuracy of ``b``, in points, on the same rows, with a percentile interval
    from resampling the rows (the same resample for both models: a paired bootstrap). Seeded, so the
    same predictions give the same interval.

    >>> a = np.array([1] * 90 + [0] * 10)          # 90% right
    >>> b = np.array([1] * 80 + [0] * 20)          # 80% right, wrong wherever a is
    >>> r = paired_bootstrap(a, b)
    >>> round(r["diff"], 1), r["low"] > 0, r["n"]
    (10.0, True, 100)
    """
    a, b = _correct(correct_a), _correct(correct_b)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired predictions must be two equal, non-empty rows of results ({a.shape} vs {b.shape})")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r}: choose a level in (0, 1), e.g. 0.95")
    d = a.astype(np.int8) - b.astype(np.int8)  # +1, 0, -1 per row
    n = len(d)
    rng = np.random.default_rng(seed)
    # Only the discordant rows move the mean: resampling their counts is the whole bootstrap, and
    # costs n_boot multinomial draws instead of n_boot x n indices.
    counts = rng.multinomial(n, [np.mean(d == 1), np.mean(d == -1), np.mean(d == 0)], size=n_boot)
    diffs = 100.0 * (counts[:, 0] - counts[:, 1]) / n
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return {"diff": 100.0 * float(d.mean()), "low": float(low), "high": float(high), "confidence": confidence,
            "n": n, "discordant": int(np.count_nonzero(d)), "method": "paired bootstrap"}


def mcnemar(correct_a, correct_b) -> dict[str, float | int | str]:
    """McNemar's exact test that two models are equally accurate on the same rows: ``a_only`` rows only
    ``a`` gets right, ``b_only`` the reverse, and the two-sided binomial p-value of that split (rows both
    get right or wrong say nothing about which is better).

    >>> r = mcnemar([1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0, 1])
    >>> r["a_only"], r["b_only"], r["p_value"]
    (1, 1, 1.0)
    >>> mcnemar([1] * 20, [0] * 20)["p_value"] < 1e-5
    True
    """
    a, b = _correct(correct_a), _correct(correct_b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired predictions must be two equal rows of results ({a.shape} vs {b.shape})")
    a_only, b_only = int(np.count_nonzero(a & ~b)), int(np.count_nonzero(~a & b))
    k, m = min(a_only, b_only), a_only + b_only
    # Exact: P(X <= k) for X ~ Binomial(m, 1/2), doubled (Python's integers keep comb exact).
    tail = sum(comb(m, i) for i in range(k + 1)) / 2 ** m if m else 1.0
    return {"a_only": a_only, "b_only": b_only, "p_value": min(1.0, 2.0 * tail), "method": "McNemar exact"}


def budget_verdict(teacher_correct, shape_correct, max_drop: float | None, *, confidence: float = CONFIDENCE,
                   seed: int = 0) -> dict[str, object]:
    """How far a shape is below the teacher on the same rows (``drop``, points, with its paired-bootstrap
    interval ``low``..``high``) and what that says about the budget ``max_drop``:

    - ``inside``: the whole interval is at or under the budget;
    - ``outside``: the whole interval is above it;
    - ``inside, not significant`` / ``outside, not significant``: the point estimate's side, while the
      interval straddles the budget (more validation rows would be needed to tell).

    ``inside_point`` is the point estimate's answer, ``significant`` whether the interval agrees.

    >>> t = np.ones(1000, bool)
    >>> budget_verdict(t, np.r_[np.ones(995, bool), np.zeros(5, bool)], 1.0)["verdict"]
    'inside'
    >>> budget_verdict(t, np.r_[np.ones(990, bool), np.zeros(10, bool)], 1.0)["verdict"]
    'inside, not significant'
    """
    r = paired_bootstrap(teacher_correct, shape_correct, confidence=confidence, seed=seed)
    out: dict[str, object] = {"drop": r["diff"], "low": r["low"], "high": r["high"], "confidence": confidence,
                              "n": r["n"], "method": r["method"], "max_drop": max_drop}
    if max_drop is None:
        out.update(verdict="inside", inside_point=True, significant=True)
        return out
    inside_point = r["diff"] <= max_drop + 1e-9
    significant = r["high"] <= max_drop + 1e-9 if inside_point else r["low"] > max_drop + 1e-9
    verdict = ("inside" if inside_point else "outside") + ("" if significant else ", not significant")
    out.update(verdict=verdict, inside_point=inside_point, significant=significant)
    return out


# How a verdict reads in the log, the report and frontier.json's ``verdict_text``.
VERDICT_TEXT = {"inside": "inside the budget", "inside, not significant": "inside on the point estimate, not significant",
                "outside": "outside the budget", "outside, not significant": "outside on the point estimate, not significant"}


def drop_words(drop: float, low: float | None = None, high: float | None = None, *,
               confidence: float = CONFIDENCE, of: str = "the teacher") -> str:
    """A drop in points as words: "2.61 points below the teacher (95% interval of the drop 0.87 to 4.78)";
    a negative drop is "above". The interval stays signed (a drop below 0 is a gain).

    >>> drop_words(-0.3)
    '0.30 points above the teacher'
    """
    text = f"{abs(drop):.2f} points {'above' if drop < 0 else 'below'} {of}"
    if low is not None and high is not None:
        text += f" ({confidence:.0%} interval of the drop {low:.2f} to {high:.2f})"
    return text


def _latency(row, objective: str) -> float:
    return float(row[f"{objective}_ms"])


def noise_key(objective: str) -> str:
    """The field holding the noise of ``objective``'s figure: ``noise_ms`` (p50), ``noise_mean_ms``, ``noise_p95_ms``."""
    return "noise_ms" if objective == "p50" else f"noise_{objective}_ms"


def leads(x, y, objective: str, tie_pct: float) -> bool:
    """Whether ``x`` is faster than ``y`` by ``objective``'s figure by more than the noise: the larger
    of the two rows' spreads of that figure over the rounds (:func:`noise_key`), and ``tie_pct`` percent."""
    noise = noise_key(objective)
    margin = max(x.get(noise) or 0.0, y.get(noise) or 0.0, _latency(y, objective) * tie_pct / 100)
    return _latency(y, objective) - _latency(x, objective) > margin


def choose_shape(rows, *, objective: str = "p95", alpha: float = 1 - CONFIDENCE, tie_pct: float = 3.0) -> tuple[str, str]:
    """The shape to publish and why, from ``rows`` with ``name``, ``p50_ms``/``mean_ms``/``p95_ms``,
    the noise of the objective's figure (:func:`noise_key`: the spread of its round medians, means or
    p95s; optional), ``correct`` (per validation row) and
    ``verdict`` (``budget_verdict``'s).

    Shapes inside the budget with significance come first, then those inside on the point estimate;
    among them the fastest by ``objective`` wins, a faster one only by a lead larger than its noise and
    ``tie_pct`` percent (ties: the more accurate). With none inside, the most accurate is the
    reference, and every shape McNemar cannot tell from it (p >= ``alpha``) is as good: the fastest of
    those wins, since a faster shape whose accuracy the rows cannot tell apart costs nothing.

    >>> y = np.ones(400, bool)
    >>> a = dict(name="fast", p50_ms=0.1, mean_ms=0.1, p95_ms=0.2, correct=np.r_[y[:390], ~y[:10]], verdict="outside")
    >>> b = dict(name="slow", p50_ms=0.5, mean_ms=0.5, p95_ms=0.9, correct=np.r_[y[:392], ~y[:8]], verdict="outside")
    >>> choose_shape([a, b])[0]
    'fast'
    """
    if objective not in LATENCY_OBJECTIVES:
        raise ValueError(f"objective={objective!r}; choose one of: {', '.join(LATENCY_OBJECTIVES)}")
    rows = list(rows)
    if not rows:
        raise ValueError("no shapes to choose from")

    def acc(r) -> float:
        return float(np.mean(_correct(r["correct"])))

    def fastest(group) -> dict:
        front = [r for r in group if not any(leads(o, r, objective, tie_pct) for o in group if o is not r)] or group
        return min(front, key=lambda r: (-acc(r), _latency(r, objective), r["name"]))

    for tier, why in (("inside", "inside the budget (significant at the interval's confidence)"),
                      ("inside, not significant", "inside the budget on the point estimate, not significant")):
        group = [r for r in rows if r.get("verdict") == tier]
        if group:
            pick = fastest(group)
            return pick["name"], f"the fastest by {objective} of the shapes {why}"
    best = max(rows, key=lambda r: (acc(r), -_latency(r, objective)))
    tied = [r for r in rows if r is best or mcnemar(r["correct"], best["correct"])["p_value"] >= alpha]
    pick = fastest(tied)
    if pick is best:
        return pick["name"], "no shape is inside the budget: the most accurate one"
    return pick["name"], (f"no shape is inside the budget: the fastest by {objective} of those McNemar cannot tell "
                          f"from the most accurate ({best['name']}) at p >= {alpha:g}")


def rows_for_budget(max_drop: float, *, discordance: float = 0.08, confidence: float = CONFIDENCE) -> int:
    """Validation rows a carved split needs so that the paired interval of a shape's drop against the
    teacher is at most ``max_drop`` points wide on each side: n = z^2 * d / (max_drop / 100)^2, with
    ``d`` the share of rows the two models disagree on in correctness (``discordance``; about 0.06-0.10
    between CLINC150's teacher and its students). A budget of 1 point at 95% needs ~3,100 rows, of
    0.5 points four times that.

    >>> rows_for_budget(1.0)
    3074
    """
    if max_drop <= 0:
        raise ValueError(f"max_drop={max_drop!r}: a budget in points must be positive")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    return int(np.ceil(z * z * discordance / (max_drop / 100.0) ** 2))
