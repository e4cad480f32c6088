"""The shape search's pieces without a build: shapes, the choice rule, the frontier, the budget."""

from __future__ import annotations

from pathlib import Path

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


def cand(name, acc, p50, noise=0.001, inside=True):
    return Candidate(name, name, Path(name), validation_accuracy=acc, teacher_drop=90 - acc, p50_ms=p50,
                     noise_ms=noise, inside=inside, status="built")


def test_choice_fastest_inside_by_a_real_lead_else_more_accurate():
    a, b, c = cand("a", 89.5, 0.050), cand("b", 89.9, 0.150), cand("c", 80.0, 0.010, inside=False)
    assert _choose([a, b, c], None)[0] is a  # c is faster but outside the budget
    close = cand("d", 89.0, 0.0495, noise=0.004)  # 1% faster than a, inside a's noise: not a lead
    assert _choose([a, close], None)[0] is a
    assert _choose([a, b], "b")[0] is b
    chosen, why = _choose([c], None)
    assert chosen is c and "no shape is inside" in why


def test_frontier_keeps_only_the_unbeaten():
    f = {"candidates": [c.to_dict() for c in (cand("a", 89.5, 0.05), cand("b", 89.0, 0.1), cand("c", 90.5, 0.2))]}
    assert [c["name"] for c in frontier_points(f)] == ["a", "c"]


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
