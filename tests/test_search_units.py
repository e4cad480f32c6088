"""The shape search's pieces without a build: shapes, the choice rule, the frontier, the budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgepack import profiles
from edgepack.config import BuildConfig, SearchConfig
from edgepack.report.plots import frontier_points
from edgepack.runner.search import Candidate, _choose
from edgepack.shapes import apply, parse_shape, shape_name


def test_shapes_parse_name_and_apply():
    assert parse_shape("layers=2 heads=1/3 ffn=0.5 embedding_bits=4") == {
        "layers": 2, "heads": 1 / 3, "ffn": 0.5, "embedding_bits": 4}
    assert shape_name("layers=0") == "L0" and shape_name("layers=1 heads=1/3 ffn=1/2") == "L1-h0.33-f0.5"
    build = BuildConfig().merged({"distill": {"layers": [0, 5]}})
    c = apply(build, "layers=3 heads=1 ffn=1/2")
    assert (c.distill.num_layers, c.distill.layers, c.prune.heads_fraction, c.prune.ffn_fraction) == (3, (), 1.0, 0.5)
    assert c.quantize == build.quantize  # what the shape leaves out keeps the recipe's value


@pytest.mark.parametrize("bad", ["layers", "layer=1", "heads=2", "ffn=0", "layers=1.5", "heads=x", ""])
def test_bad_shapes_are_refused_with_the_shape_named(bad):
    with pytest.raises(ValueError, match="shape"):
        SearchConfig(shapes=(bad,))


def test_the_same_shape_twice_is_refused():
    with pytest.raises(ValueError, match="twice"):
        SearchConfig(shapes=("layers=1 heads=1/2", "heads=0.5 layers=1"))


def cand(name, wrong, p50, *, p95=None, noise=0.001, teacher_wrong=0, n=1000, max_drop=1.0):
    """A built candidate wrong on its first ``wrong`` of ``n`` validation rows (the teacher on its first
    ``teacher_wrong``), with its budget verdict made as the search makes it."""
    from edgepack.metrics import VERDICT_TEXT, budget_verdict
    from edgepack.runner.search import _bits

    correct, teacher = np.arange(n) >= wrong, np.arange(n) >= teacher_wrong
    v = budget_verdict(teacher, correct, max_drop)
    return Candidate(name, name, Path(name), validation_accuracy=100 * correct.mean(), teacher_drop=v["drop"],
                     p50_ms=p50, mean_ms=p50 * 1.1, p95_ms=p95 if p95 is not None else p50 * 1.5, noise_ms=noise,
                     drop_low=v["low"], drop_high=v["high"], verdict=v["verdict"], verdict_text=VERDICT_TEXT[v["verdict"]],
                     inside=v["inside_point"], correct=_bits(correct), status="built")


def test_choice_fastest_inside_by_a_real_lead():
    a, b, c = cand("a", 3, 0.050), cand("b", 1, 0.150), cand("c", 200, 0.010)
    assert (a.verdict, b.verdict, c.verdict) == ("inside", "inside", "outside")
    assert _choose([a, b, c], None)[0] is a  # c is faster but outside the budget
    close = cand("d", 4, 0.0495, p95=0.0745, noise=0.004)  # 1% faster than a, inside a's noise: not a lead
    assert _choose([a, close], None)[0] is a
    assert _choose([a, b], "b")[0] is b
    chosen, why = _choose([c], None)
    assert chosen is c and "no shape is inside" in why


def test_the_faster_of_two_indistinguishable_shapes_wins():
    """Both outside the budget, 0.3 points apart on 1,000 rows: McNemar cannot tell them apart (p >= 0.05),
    so the one three times faster wins over the more accurate one."""
    from edgepack.metrics import mcnemar
    from edgepack.runner.search import _rows

    slow, fast = cand("slow", 40, 0.9), cand("fast", 43, 0.3)
    assert mcnemar(_rows(fast.correct), _rows(slow.correct))["p_value"] >= 0.05
    chosen, why = _choose([slow, fast], None)
    assert chosen is fast and "McNemar" in why
    # a shape clearly less accurate (McNemar p < 0.05) is not taken for its speed
    assert _choose([slow, cand("worse", 90, 0.3)], None)[0] is slow


def test_inside_on_the_point_estimate_only_is_not_significant():
    """0.9 points under the teacher on 1,000 rows with a 1-point budget: the point estimate is inside, the
    interval is not, and the verdict, the table and the choice all say so."""
    from edgepack.report.analysis import frontier_rows

    shaky, sure = cand("shaky", 9, 0.1), cand("sure", 2, 0.5)
    assert shaky.inside and shaky.verdict == "inside, not significant" and shaky.drop_high > 1.0 > shaky.teacher_drop
    assert shaky.verdict_text == "inside on the point estimate, not significant"
    f = {"max_drop": 1.0, "chosen": "sure", "candidates": [shaky.to_dict(), sure.to_dict()]}
    rows = frontier_rows(f)
    assert "inside on the point estimate, not significant" in rows[0] and "inside the budget" in rows[1]
    assert f"({shaky.drop_low:+.2f} to {shaky.drop_high:+.2f})" in rows[0][4]
    chosen, why = _choose([shaky, sure], None)  # the slower one the interval puts inside wins
    assert chosen is sure and "significant" in why
    chosen, why = _choose([shaky], None)
    assert chosen is shaky and "point estimate, not significant" in why


def test_objective_changes_the_pick_when_p50_and_p95_disagree():
    steady, spiky = cand("steady", 2, 0.40, p95=0.45), cand("spiky", 2, 0.20, p95=0.90)
    assert _choose([steady, spiky], None, objective="p50")[0] is spiky
    assert _choose([steady, spiky], None, objective="p95")[0] is steady
    assert _choose([steady, spiky], None)[0] is steady  # p95 by default


def test_objective_is_checked():
    assert SearchConfig().objective == "p95"
    with pytest.raises(ValueError, match="search.objective='p99'.*p50, mean, p95"):
        SearchConfig(objective="p99")
    with pytest.raises(ValueError, match="search.confidence"):
        SearchConfig(confidence=1.0)


def test_frontier_keeps_only_the_unbeaten_by_the_objective():
    f = {"candidates": [c.to_dict() for c in (cand("a", 5, 0.05), cand("b", 10, 0.1), cand("c", 0, 0.2))]}
    assert [c["name"] for c in frontier_points(f)] == ["a", "c"]
    # by p50, a spiky shape is on the frontier; by p95 a steadier, more accurate one beats it
    f = {"objective": "p95", "candidates": [cand("spiky", 5, 0.05, p95=0.5).to_dict(), cand("steady", 0, 0.2, p95=0.3).to_dict()]}
    assert [c["name"] for c in frontier_points(f)] == ["steady"]
    assert [c["name"] for c in frontier_points({**f, "objective": "p50"})] == ["spiky", "steady"]


def test_a_carved_validation_split_takes_the_rows_the_budget_asks(tmp_path):
    import json

    from edgepack.config import DataConfig
    from edgepack.data import load_dataset

    rows = [{"text": f"text number {i}", "label": "ab"[i % 2]} for i in range(400)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(source=str(path), test_fraction=0.1, validation_fraction=0.1)
    assert len(load_dataset(cfg)["validation"]) == 36  # 10% of the 360 left after test
    assert len(load_dataset(cfg, min_validation_rows=100)["validation"]) == 100
    assert len(load_dataset(cfg, min_validation_rows=5000)["validation"]) == 180  # at most half of train


def test_teacher_budget_is_checked_only_when_set():
    p = profiles.load("edge-x86-2core")
    res = {"latency_ms": {"p95": 1.0}, "peak_rss_mb": 10, "bundle_bytes": 1_000_000, "accuracy_drop": 0.0,
           "teacher_drop": 1.2}
    assert "max_teacher_drop" not in {c.budget for c in profiles.budget_report(p, res)}
    strict = p.replace(budgets=p.budgets.replace(max_teacher_drop=0.5))
    check = next(c for c in profiles.budget_report(strict, res) if c.budget == "max_teacher_drop")
    assert not check.ok and check.value == 1.2
    del res["teacher_drop"]
    check = next(c for c in profiles.budget_report(strict, res) if c.budget == "max_teacher_drop")
    assert not check.ok and check.value is None  # not measured counts as missed


def test_a_shape_may_start_from_a_recipe():
    from edgepack.runner.search import _from_recipe

    assert shape_name("recipe=two-layer ffn=1/2") == "two-layer-f0.5"
    cfg = _from_recipe(BuildConfig(), "two-layer")
    c = apply(cfg, "recipe=two-layer ffn=1/2")
    assert c.distill.num_layers == 2 and c.prune.heads_fraction == 1.0 and c.prune.ffn_fraction == 0.5
    static = _from_recipe(BuildConfig(), "static")  # its own keys only: not the clinc150 recipe it starts from
    assert static.distill.num_layers == 0 and not static.prune.recover and static.prune.keep_chars == "all"
    from edgepack.errors import EdgepackError

    with pytest.raises(EdgepackError, match="unknown recipe"):
        _from_recipe(BuildConfig(), "no-such-recipe")


def test_cost_model_order_moves_a_shape_ahead_only_by_a_lead_beyond_the_noise():
    from edgepack.runner.probe import order

    def t(**p50):
        return {n: {"p50_ms": v, "noise_ms": 0.05} for n, v in p50.items()}

    # beyond the noise: fastest first
    assert order(["a", "b", "c"], t(a=0.9, b=0.3, c=0.6)) == ["b", "c", "a"]
    # within the noise: the recipe's order stands, however the timings fell
    assert order(["a", "b"], t(a=0.32, b=0.30)) == ["a", "b"]
    assert order(["a", "b"], t(a=0.30, b=0.32)) == ["a", "b"]
    # a chain of near-ties (a~b, b~c, but c well ahead of a) still yields one order with c before a
    # a chain of near-ties (a~b, b~c) with c clearly ahead of a: c before a, b (tied with both) by the recipe
    assert order(["a", "b", "c"], t(a=0.40, b=0.36, c=0.32)) == ["b", "c", "a"]


def test_search_order_is_checked():
    from edgepack.config import SearchConfig

    assert SearchConfig().order == "latency"
    with pytest.raises(ValueError, match="search.order"):
        SearchConfig(order="fastest")


def test_a_build_recovers_only_what_pruning_cut():
    """A shape that keeps every head and the whole FFN is not re-trained after vocabulary trimming (a
    recovery would restart training a converged student); one that cuts anything is."""
    from edgepack.runner.chain import chain

    base = BuildConfig(teacher="t", out="o")
    search = SearchConfig(shapes=("layers=3 heads=1 ffn=1", "layers=1 heads=1/3 ffn=1/2", "layers=3 heads=1 ffn=1/2"))
    recover = {}
    for shape in search.shapes:
        links = {link.name: link.cfg for link in chain(apply(base, shape), profiles.load("host"))}
        recover[shape] = links["prune"].recover
    assert recover == {"layers=3 heads=1 ffn=1": False, "layers=1 heads=1/3 ffn=1/2": True,
                       "layers=3 heads=1 ffn=1/2": True}
    sparse = base.replace(prune=base.prune.replace(sparsity="magnitude", sparsity_target=0.5))
    assert {link.name: link.cfg for link in chain(sparse, profiles.load("host"))}["prune"].recover


def test_a_search_without_a_budget_keeps_its_ledger_keys():
    """Without a budget nothing of the reach rule reaches the chain: the distill link's key is what it
    was (earlier builds resume); with one, its target is in the key (a stopped student is not reused for
    another budget)."""
    from edgepack.runner.chain import CANDIDATE, chain

    cfg = BuildConfig(teacher="t", out="o")
    assert chain(cfg, profiles.load("host"), CANDIDATE)[0].key == {}
    assert chain(cfg, profiles.load("host"), CANDIDATE, reach=94.1)[0].key == {"reach": 94.1}


def test_the_quantize_gate_decides_at_the_search_confidence():
    """A build judges int8 against fp32 at [search] confidence (one level for all its decisions); at the
    default the quantize link's ledger key is what it was (earlier builds resume); a [quantize]
    confidence set by hand stays."""
    from edgepack.runner.chain import chain

    def quant(cfg):
        return next(link.cfg for link in chain(cfg, profiles.load("host")) if link.name == "quantize")

    base = BuildConfig(teacher="t", out="o")
    assert quant(base).confidence == 0.95 and "confidence" not in quant(base).key_dict()
    at_90 = base.replace(search=base.search.replace(confidence=0.9))
    assert quant(at_90).confidence == 0.9 and quant(at_90).key_dict()["confidence"] == 0.9
    own = at_90.replace(quantize=base.quantize.replace(confidence=0.8))
    assert quant(own).confidence == 0.8


def test_the_quantize_variants_are_ranked_by_the_search_objective():
    """A build ranks quantization variants by [search] objective (the figure shapes are chosen by); at
    the default the quantize link's ledger key is what it was; a [quantize] objective set by hand stays."""
    from edgepack.config import LATENCY_OBJECTIVES, QuantizeConfig
    from edgepack.metrics import LATENCY_OBJECTIVES as METRICS_OBJECTIVES
    from edgepack.runner.chain import chain

    def quant(cfg):
        return next(link.cfg for link in chain(cfg, profiles.load("host")) if link.name == "quantize")

    base = BuildConfig(teacher="t", out="o")
    assert QuantizeConfig().objective == base.search.objective == "p95" and LATENCY_OBJECTIVES == METRICS_OBJECTIVES
    assert quant(base).objective == "p95" and "objective" not in quant(base).key_dict()
    by_p50 = base.replace(search=base.search.replace(objective="p50"))
    assert quant(by_p50).objective == "p50" and quant(by_p50).key_dict()["objective"] == "p50"
    own = by_p50.replace(quantize=base.quantize.replace(objective="mean"))
    assert quant(own).objective == "mean" and quant(own).to_dict()["objective"] == "mean"
    with pytest.raises(ValueError, match="objective='p99' is not valid; choose one of: p50, mean, p95"):
        QuantizeConfig(objective="p99")
