"""Cascades: a bundle whose texts under a confidence go to a second model inside it.

Two real tiny bundles with the same labels (differently trained models), put together by the real
cascade stage: every text is answered by the model the rule names (the fast one at or above
``below``, the fallback under it, under the fallback's out-of-scope threshold), on every path of the
shim; the manifest covers the fallback; bad settings are one line; ``below`` is chosen for the budget.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgepack import stages
from edgepack.config import CascadeConfig, DataConfig, PackConfig
from edgepack.data import load_dataset
from edgepack.stages import cascade
from runtime_shim import BundleError, OnnxPipeline
from runtime_shim.manifest import update_manifest


@pytest.fixture(scope="module")
def fast_bundle(tmp_path_factory, corpus, label_names, clinc_json) -> Path:
    """A second tiny model (one layer, fewer steps, another seed) packed like ``tiny_bundle``."""
    from tiny import make_tiny_classifier

    from edgepack.runner.pack import pack

    root = tmp_path_factory.mktemp("fast")
    texts = [t for t, _ in corpus["train"]]
    labels = [label_names.index(lab) for _, lab in corpus["train"]]
    model = make_tiny_classifier(root / "model", texts, labels, label_names, layers=1, steps=25, seed=3)
    out = root / "bundle"
    pack(PackConfig.of(target="auto", max_accuracy_drop=100.0, min_agreement=0.0, eval_rows=20), model,
         DataConfig(source=str(clinc_json)), out, log=lambda *a: None)
    return out


def _set_threshold(bundle: Path, threshold: float) -> None:
    labels = json.loads((bundle / "labels.json").read_text())
    labels["oos_threshold"] = threshold
    (bundle / "labels.json").write_text(json.dumps(labels))
    update_manifest(bundle)


@pytest.fixture(scope="module")
def made(tmp_path_factory, fast_bundle, tiny_bundle, clinc_json, corpus):
    """The cascade stage on copies whose thresholds are set so that both models answer some texts:
    ``below`` sits in the widest gap between the fast model's top probabilities in their middle half."""
    root = tmp_path_factory.mktemp("cascade")
    fast, slow = root / "fast", root / "slow"
    for src, dst in ((fast_bundle, fast), (tiny_bundle, slow)):
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    texts = [t for t, _ in corpus["test"]]
    # each text alone, as the single-text path the first test reads the rule from
    fast_pipe, slow_pipe = OnnxPipeline(fast), OnnxPipeline(slow)
    fast_tops = np.sort([fast_pipe(t, apply_threshold=False)[0]["score"] for t in texts])
    slow_tops = np.array([slow_pipe(t, apply_threshold=False)[0]["score"] for t in texts])
    del fast_pipe, slow_pipe
    middle = fast_tops[len(fast_tops) // 4: 3 * len(fast_tops) // 4 + 1]
    i = int(np.argmax(np.diff(middle)))
    below = round(float(middle[i] + middle[i + 1]) / 2, 6)
    _set_threshold(fast, 0.0)
    _set_threshold(slow, float(min(np.quantile(slow_tops, 0.25), below)))
    data = load_dataset(DataConfig(source=str(clinc_json)), dict(enumerate(OnnxPipeline(slow).label_names)))
    ctx = stages.Context(data=data, data_config=DataConfig(source=str(clinc_json)), log=lambda *a: None)
    out = root / "cascade"
    record = cascade.run(CascadeConfig(fallback="teacher", below=below, fallback_bundle=str(slow)), fast, out, ctx)
    return {"fast": fast, "slow": slow, "out": out, "below": below, "texts": texts, "record": record, "ctx": ctx}


def test_each_text_answered_by_the_model_the_rule_names(made):
    fast, slow, pipe = OnnxPipeline(made["fast"]), OnnxPipeline(made["slow"]), OnnxPipeline(made["out"])
    assert pipe.escalate_below == made["below"] and pipe.oos_threshold == slow.oos_threshold
    sent = kept = 0
    for text in made["texts"]:
        top = fast(text, apply_threshold=False)[0]
        expected = slow(text)[0] if top["score"] < made["below"] else top
        sent += top["score"] < made["below"]
        kept += top["score"] >= made["below"]
        assert pipe(text) == [expected]
        assert pipe(text, top_k=1)[0]["label"] == expected["label"]
    assert sent > 0 and kept > 0  # both models answered
    # a list goes the same way: the fast model's batches (whose padding can move a score a little, so the
    # rule is read from the fast model's own batched answers), then the fallback's for the texts sent on
    batched = fast(made["texts"], apply_threshold=False)
    assert pipe(made["texts"]) == [slow(t)[0] if b["score"] < made["below"] else b
                                   for t, b in zip(made["texts"], batched, strict=True)]
    # the numpy pieces too: predict's rows are the fallback's probabilities for the texts sent on
    ids, probs = pipe.predict(made["texts"][:8], batch_size=8)
    f_ids, f_probs = fast.predict(made["texts"][:8], batch_size=8)
    keep = f_probs.max(axis=1) >= made["below"]
    np.testing.assert_array_equal(probs[keep], f_probs[keep])
    # ... each answered alone (a fallback's answer does not depend on the texts sent on with it)
    alone = [slow.predict([t])[1][0] for t, k in zip(made["texts"][:8], keep, strict=True) if not k]
    if alone:
        np.testing.assert_array_equal(probs[~keep], np.stack(alone))


def test_stage_records_what_it_measured(made):
    m = made["record"].metrics
    pipe = OnnxPipeline(made["out"])
    assert m["cascade"]["below"] == made["below"] and 0 < m["cascade"]["sent_on_test"] < 1
    assert m["model_bytes"] == pipe.model_bytes == (made["fast"] / "model.quant.onnx").stat().st_size + (
        made["slow"] / "model.quant.onnx").stat().st_size
    # the eval slice's reference answers are the cascade's, as a device's bench computes them
    from runtime_shim.bench import run_benchmark
    from runtime_shim.datafiles import read_labelled

    texts, gold = read_labelled(made["out"] / "eval.jsonl")
    device = run_benchmark(pipe, texts, gold, warmup=0, runs=1, batch_sizes=(1,), rss_argv=[], throughput_batches=1)
    assert m["eval"]["predictions"] == device["predictions"]
    assert json.loads((made["out"] / "manifest.json").read_text())["cascade"]["below"] == made["below"]
    # the grid's accuracy at ``below`` is the bundle's, measured as the search and verify measure it
    from edgepack.metrics import accuracy_points

    data = made["ctx"].data
    assert accuracy_points(pipe, data["validation"], data.label_names) == pytest.approx(
        m["cascade"]["validation_accuracy_at_below"], abs=1e-3)
    assert m["validation"]["accuracy"] * 100 == pytest.approx(m["cascade"]["validation_accuracy_at_below"], abs=1e-3)


def test_manifest_covers_the_fallback(made, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(made["out"], copy)
    OnnxPipeline(copy)  # verified
    with (copy / "fallback" / "model.quant.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="fallback/model.quant.onnx"):
        OnnxPipeline(copy)


@pytest.mark.parametrize("cascade_setting, message", [
    ({"fallback": "fallback", "below": 1.5}, "not a probability"),
    ({"fallback": "../x", "below": 0.5}, "not a directory inside the bundle"),
    ({"fallback": "fallback", "below": -0.0001}, "not a probability"),
    ({"below": 0.5}, "cascade must be"),
])
def test_bad_cascade_settings_are_one_line(made, tmp_path, cascade_setting, message):
    copy = tmp_path / "b"
    shutil.copytree(made["out"], copy)
    runtime = json.loads((copy / "runtime.json").read_text())
    runtime["cascade"] = cascade_setting
    (copy / "runtime.json").write_text(json.dumps(runtime))
    with pytest.raises(BundleError, match=message) as e:
        OnnxPipeline(copy, verify=False)
    assert "runtime.json" in str(e.value) and "\n" not in str(e.value)


def test_below_under_a_threshold_refused(made, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(made["out"], copy)
    threshold = OnnxPipeline(made["slow"]).oos_threshold
    runtime = json.loads((copy / "runtime.json").read_text())
    runtime["cascade"]["below"] = threshold / 2
    (copy / "runtime.json").write_text(json.dumps(runtime))
    with pytest.raises(BundleError, match="under an out-of-scope threshold"):
        OnnxPipeline(copy, verify=False)
    with pytest.raises(Exception, match="set it to"):
        cascade.run(CascadeConfig(fallback="teacher", below=threshold / 2, fallback_bundle=str(made["slow"])),
                    made["fast"], tmp_path / "c", made["ctx"])


def test_below_is_the_fewest_sent_on_for_the_budget():
    # three texts: the fast model is right on the first only; the fallback on all three
    p_fast = np.array([[0.9, 0.1, 0.0], [0.7, 0.3, 0.0], [0.6, 0.4, 0.0]])
    p_slow = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.1, 0.9, 0.0]])
    labels = np.array([0, 1, 1])
    rows = cascade.points(p_fast, p_slow, labels, None, None, cascade.grid(0.5))
    assert cascade.choose_below(rows, 60.0) == 0.61  # sending the 0.6 text on reaches 2 of 3
    assert [r["sent_on"] for r in rows if r["below"] in (0.5, 0.61, 0.71)] == pytest.approx([0, 1 / 3, 2 / 3], abs=1e-4)
    assert cascade.choose_below(rows, 100.0) == 0.71
    assert cascade.choose_below(rows, None) == 0.71  # no budget: the most accurate
    # out of reach: the most accurate point, the lowest of equals
    rows = cascade.points(p_fast, p_slow[[0, 0, 0]], labels, None, None, cascade.grid(0.5))
    assert cascade.choose_below(rows, 100.0) == 0.5
    # with an out-of-scope class (id 2), the texts sent on are answered under the fallback's threshold:
    # at 0.85 the second text (fallback 0.8) becomes out of scope, which is its gold label
    rows = cascade.points(p_fast, p_slow, np.array([0, 2, 1]), 2, 0.85, [0.95])
    assert rows[0]["accuracy"] == pytest.approx(100.0) and rows[0]["sent_on"] == 1.0
    rows = cascade.points(p_fast, p_slow, np.array([0, 2, 1]), 2, None, [0.95])
    assert rows[0]["accuracy"] == pytest.approx(200 / 3, abs=1e-3)


@pytest.mark.slow
def test_one_shape_build_with_fallback_flag(tmp_path, tiny_model, clinc_json, capsys):
    """``edgepack build --fallback teacher`` without a search: the teacher's int8 bundle is made once
    (BUILD/fallback), the cascade stage runs after bundle and a rerun takes everything from the ledger."""
    from edgepack.cli import main
    from tests.test_build import write_recipe

    recipe = write_recipe(tmp_path / "r.toml", teacher=tiny_model, out=tmp_path / "bundle", data=clinc_json)
    assert main(["build", str(recipe), "--fallback", "teacher"]) == 0
    build = tmp_path / "bundle.build"
    assert (build / "fallback" / "bundle" / "manifest.json").is_file() and (build / "cascade" / "fallback").is_dir()
    pipe = OnnxPipeline(tmp_path / "bundle")
    assert pipe.fallback is not None
    assert pipe.fallback.label_names == pipe.label_names
    capsys.readouterr()
    assert main(["build", str(recipe), "--fallback", "teacher"]) == 0
    assert "ran nothing" in capsys.readouterr().out


def test_serving_a_cascade_loads_no_numpy(made, tmp_path):
    """The rss probe serves the cascade through pipe() (C API sessions), here with every text sent to the
    fallback (below 1.0): neither numpy nor the onnxruntime package gets imported, as for a one-model
    bundle (tests/test_memory.py)."""
    from tests.test_memory import NOT_LOADED_C, _modules_after

    copy = tmp_path / "b"
    shutil.copytree(made["out"], copy)
    runtime = json.loads((copy / "runtime.json").read_text())
    runtime["cascade"]["below"] = 1.0
    (copy / "runtime.json").write_text(json.dumps(runtime))
    update_manifest(copy)
    assert all(OnnxPipeline(copy)(t) == OnnxPipeline(made["slow"])(t) for t in made["texts"][:5])
    modules, out = _modules_after(["rss", str(copy)])
    report = json.loads(out.strip().splitlines()[0])
    assert report["session_api"] == "c" and report["numpy_loaded"] is False
    assert [m for m in NOT_LOADED_C if m in modules] == []
