"""Accuracy decisions with their uncertainty (``edgepack.metrics``: paired bootstrap, McNemar, the budget
verdict, the shape choice, the rows a carved validation split needs) and the rule that stops a shape
that cannot reach its target (``edgepack.training.reach``), on a real Trainer."""

from __future__ import annotations

import numpy as np
import pytest

from edgepack.metrics import budget_verdict, choose_shape, mcnemar, paired_bootstrap, rows_for_budget
from edgepack.training.reach import Reach, ReachCallback, project, projection_error, reach


def _pair(n: int, both: int, a_only: int, b_only: int) -> tuple[np.ndarray, np.ndarray]:
    """Correctness rows of two models: ``both`` right for both, ``a_only``/``b_only`` right for one."""
    a = np.zeros(n, bool)
    b = np.zeros(n, bool)
    a[:both] = b[:both] = True
    a[both:both + a_only] = True
    b[both + a_only:both + a_only + b_only] = True
    return a, b


# ------------------------------------------------------------------------------------------- intervals


def test_paired_bootstrap_interval_is_the_paired_one_and_seeded():
    # 3,100 rows, the models disagree on 200 of them, a ahead by 40: a 1.29-point lead.
    a, b = _pair(3100, 2700, 120, 80)
    r = paired_bootstrap(a, b)
    assert r["diff"] == pytest.approx(100 * 40 / 3100)
    assert r["low"] < r["diff"] < r["high"]
    # The paired standard error is sqrt(discordant) / n: the 95% interval is about +-1.96 of it.
    se = 100 * np.sqrt(200 - 40 ** 2 / 3100) / 3100
    assert r["high"] - r["low"] == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert paired_bootstrap(a, b) == r  # the same rows give the same interval
    # Rows both models get right or wrong do not widen it: the same disagreement among more agreeing rows
    # gives the same interval in counts.
    assert paired_bootstrap(*_pair(3100, 0, 120, 80))["high"] == pytest.approx(r["high"], abs=0.15)


def test_bad_pairs_are_refused_with_one_line():
    with pytest.raises(ValueError, match="equal"):
        paired_bootstrap([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="correctness"):
        paired_bootstrap([0.3, 0.9], [1, 0])  # probabilities, not per-row results
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([1, 0], [1, 1], confidence=95)


def test_mcnemar_exact_p_values():
    assert mcnemar(*_pair(100, 90, 5, 5))["p_value"] == 1.0
    # 10 discordant rows all one way: 2 / 2^10
    assert mcnemar(*_pair(100, 80, 10, 0))["p_value"] == pytest.approx(2 / 1024)
    # scipy's binomtest agrees on an uneven split
    stats = pytest.importorskip("scipy.stats")
    r = mcnemar(*_pair(3100, 2800, 61, 39))
    assert r["p_value"] == pytest.approx(stats.binomtest(39, 100, 0.5).pvalue)


# ------------------------------------------------------------------------------------------- budget


def test_budget_verdict_says_when_the_interval_decides():
    teacher = np.ones(3100, bool)
    # 0.5 points below on 3,100 rows: the whole interval is under a 1-point budget
    v = budget_verdict(teacher, np.r_[np.ones(3084, bool), np.zeros(16, bool)], 1.0)
    assert v["verdict"] == "inside" and v["significant"] and v["high"] <= 1.0
    # 0.9 points below: inside on the point estimate only
    v = budget_verdict(teacher, np.r_[np.ones(3072, bool), np.zeros(28, bool)], 1.0)
    assert v["verdict"] == "inside, not significant" and v["inside_point"] and not v["significant"]
    assert v["low"] < v["drop"] <= 1.0 < v["high"]
    # 1.1 points below: outside, not significant; 2 points below: outside
    v = budget_verdict(teacher, np.r_[np.ones(3066, bool), np.zeros(34, bool)], 1.0)
    assert v["verdict"] == "outside, not significant"
    assert budget_verdict(teacher, np.r_[np.ones(3038, bool), np.zeros(62, bool)], 1.0)["verdict"] == "outside"
    assert budget_verdict(teacher, teacher, None)["verdict"] == "inside"  # no budget: nothing to miss


def _row(name, p50, mean, p95, correct, verdict, noise=0.0):
    return {"name": name, "p50_ms": p50, "mean_ms": mean, "p95_ms": p95, "noise_ms": noise, "noise_mean_ms": noise,
            "noise_p95_ms": noise, "correct": correct, "verdict": verdict}


def test_the_faster_of_two_indistinguishable_shapes_is_chosen():
    """Neither inside the budget; the slow shape is 0.26 points more accurate on 3,100 rows, which
    McNemar cannot tell from chance: the fast one is published. Before this rule the more accurate
    shape was taken whatever its lead."""
    fast_ok, slow_ok = _pair(3100, 2850, 12, 20)
    assert mcnemar(fast_ok, slow_ok)["p_value"] > 0.05
    fast = _row("static", 0.06, 0.07, 0.11, fast_ok, "outside")
    slow = _row("layers=3", 1.3, 1.4, 2.2, slow_ok, "outside")
    name, why = choose_shape([slow, fast])
    assert name == "static" and "McNemar" in why
    # A lead the rows can tell (60 discordant rows all the slow shape's) keeps the more accurate shape.
    fast_bad, slow_good = _pair(3100, 2800, 0, 60)
    assert choose_shape([_row("static", 0.06, 0.07, 0.11, fast_bad, "outside"),
                         _row("layers=3", 1.3, 1.4, 2.2, slow_good, "outside")])[0] == "layers=3"


def test_significance_ranks_before_speed_and_the_objective_decides():
    ok = np.ones(100, bool)
    a = _row("a", 0.10, 0.50, 3.0, ok, "inside, not significant")
    b = _row("b", 0.30, 0.32, 0.40, ok, "inside")
    assert choose_shape([a, b])[0] == "b"  # only b's interval is inside
    a["verdict"] = "inside"
    assert choose_shape([a, b], objective="p50")[0] == "a"
    assert choose_shape([a, b], objective="mean")[0] == "b"
    assert choose_shape([a, b])[0] == "b"  # the default objective: p95, what a service level sees
    with pytest.raises(ValueError, match="p50, mean, p95"):
        choose_shape([a, b], objective="p99")


def test_a_lead_inside_the_noise_is_no_lead():
    ok, less = np.ones(100, bool), np.r_[np.ones(99, bool), False]
    a = _row("a", 0.100, 0.1, 0.100, less, "inside", noise=0.02)
    b = _row("b", 0.110, 0.1, 0.110, ok, "inside", noise=0.02)
    assert choose_shape([a, b])[0] == "b"  # 10 us faster under 20 us of noise: the more accurate wins


def test_rows_for_budget():
    assert rows_for_budget(1.0) == 3074
    assert rows_for_budget(0.5) == pytest.approx(4 * rows_for_budget(1.0), rel=0.01)
    assert rows_for_budget(1.0, discordance=0.04) < rows_for_budget(1.0)
    with pytest.raises(ValueError, match="positive"):
        rows_for_budget(0)


# ------------------------------------------------------------------------------------------- reach


def test_projection_is_optimistic_on_a_saturating_curve():
    curve = [80.0, 86.0, 89.0, 90.5, 91.2, 91.5, 91.6]
    errors = projection_error(curve, curve[-1], slack=0.0)
    assert max(errors) <= 0  # never below where the curve ended
    # Against 94.1 (slack 0.5): after epoch 5, 91.2 + 2 * 1.5 + 0.5 = 94.7 can still get there; after
    # epoch 6, 91.5 + 0.7 + 0.5 = 92.7 cannot.
    verdicts = [reach(curve[:k], len(curve), 94.1).reachable for k in range(1, len(curve) + 1)]
    assert verdicts == [True, True, True, True, True, False, False]
    assert project([90.0], 5) == 100.0  # one point gives no slope: anything is possible


def test_projection_is_an_accuracy():
    """A steep early curve projects past 100 points uncapped; the rule says at most 100% reachable."""
    r = reach([60.0, 80.0], 10, target=94.1)
    assert r.projected == 100.0 and r.reachable
    assert "at most 100.00% reachable" in r.message("static")


def test_reach_message_names_the_shape_and_the_figures():
    r = reach([88.0, 90.0, 90.6, 90.9], 5, target=94.1)
    assert isinstance(r, Reach) and not r.reachable
    assert r.message("layers=1") == ("layers=1 is out: cannot reach 94.10% (after epoch 4/5: best 90.90%, "
                                     "at most 92.00% reachable)")


@pytest.mark.slow
def test_reach_callback_stops_a_real_trainer_early(tiny_model, clinc_json, tmp_path):
    """A target no projection can reach (1000%: an accuracy is at most 100 points) stops the training
    after the first evaluation and says so at once."""
    from edgepack.config import DataConfig, DistillConfig
    from edgepack.data import load_dataset
    from edgepack.training.distillation import prepare, train_student
    from edgepack.training.student import read_id2label

    data = load_dataset(DataConfig(source=str(clinc_json)), read_id2label(tiny_model))
    cfg = DistillConfig(num_layers=1, epochs=6, learning_rate=3e-3, batch_size=16, augment=0)
    prep = prepare(cfg, tiny_model, data, cache_dir=tmp_path / "cache", progress=False)
    said: list[str] = []
    stop = ReachCallback(target=1000.0, name="layers=1", log=said.append)
    trainer = train_student(cfg, prep.fresh_student(), prep.tokenizer, prep.trainset, data["validation"],
                            oos_id=data.oos_id, callbacks=[stop], progress=False)
    assert stop.stopped is not None and stop.stopped.epoch == 1
    assert len(stop.curve) == 1 and said == [stop.stopped.message("layers=1")]
    assert round(trainer.state.epoch) == 1  # not the configured 6
    # Without the callback the same training runs every epoch (the test would pass by accident otherwise).
    full = train_student(cfg.replace(epochs=3), prep.fresh_student(), prep.tokenizer, prep.trainset,
                         data["validation"], oos_id=data.oos_id, progress=False)
    assert round(full.state.epoch) == 3


def test_a_lead_must_beat_the_noise_of_the_objectives_own_figure():
    """By p95, a 0.3 ms lead beats the p50 noise (0.05) but not the spread of the round p95s (0.5): a tie,
    and the more accurate shape wins; by p50 the same rows give the faster one."""
    y = np.ones(3100, bool)
    quick = dict(name="quick", p50_ms=1.0, mean_ms=1.2, p95_ms=2.0, noise_ms=0.05, noise_mean_ms=0.1,
                 noise_p95_ms=0.5, correct=np.r_[y[:3050], ~y[:50]], verdict="inside")
    sure = dict(name="sure", p50_ms=1.2, mean_ms=1.4, p95_ms=2.3, noise_ms=0.05, noise_mean_ms=0.1,
                noise_p95_ms=0.5, correct=np.r_[y[:3060], ~y[:40]], verdict="inside")
    assert choose_shape([quick, sure], objective="p95")[0] == "sure"
    assert choose_shape([quick, sure], objective="p50")[0] == "quick"
    assert choose_shape([quick, sure], objective="mean")[0] == "quick"
