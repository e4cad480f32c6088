"""The answer inside the graph: a bundle's model outputs its single-query answer (top probability and label,
float64), the shim reads it, and it is the answer the logits give; a bundle from before it still loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from edgepack.stages.bundle.answer import ANSWER, add_answer, check_answer, remove_answer
from runtime_shim import OnnxPipeline
from runtime_shim.manifest import update_manifest

TEXTS = ["what is my checking balance", "set an alarm for seven", "tell me a joke about cats", "hi", "",
         "zzzz qqqq", "balance " * 200, "¿qué hora es?"]


def test_the_bundle_carries_the_answer_and_its_check(tiny_bundle: Path):
    outputs = [o.name for o in onnx.load(tiny_bundle / "model.quant.onnx").graph.output]
    assert outputs == ["logits", ANSWER]  # logits first: older runtimes and Optimum read them as before
    assert json.loads((tiny_bundle / "runtime.json").read_text())["answer"] == ANSWER
    check = json.loads((tiny_bundle / "manifest.json").read_text())["metrics"]["answer_check"]
    assert check["rows"] > 0 and check["max_prob_diff"] < 1e-12


@pytest.mark.parametrize("threshold", [None, 0.0, 0.5, 1.0])
def test_the_answer_is_the_logits_answer(tiny_bundle: Path, tmp_path: Path, threshold):
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    if threshold is not None:
        labels = json.loads((bundle / "labels.json").read_text())
        (bundle / "labels.json").write_text(json.dumps({**labels, "oos_threshold": threshold}))
        update_manifest(bundle)
    fast = OnnxPipeline(bundle, overrides={"session_api": "c"})
    logits = OnnxPipeline(bundle, overrides={"session_api": "c", "answer": None})
    assert fast._run_one is not None and logits._run_one is None
    for text in TEXTS * 2:  # twice: the first run of a length, then its bound buffers
        for apply in (True, False):
            a, b = fast(text, apply_threshold=apply)[0], logits(text, apply_threshold=apply)[0]
            assert a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-12, (text, a, b)


def test_a_bundle_from_before_the_answer_loads_and_answers_alike(tiny_bundle: Path, tmp_path: Path):
    old = Path(shutil.copytree(tiny_bundle, tmp_path / "old"))
    remove_answer(old / "model.quant.onnx", old / "model.quant.onnx")
    runtime = json.loads((old / "runtime.json").read_text())
    (old / "runtime.json").write_text(json.dumps({k: v for k, v in runtime.items() if k != "answer"}))
    update_manifest(old)
    assert [o.name for o in onnx.load(old / "model.quant.onnx").graph.output] == ["logits"]
    before, now = OnnxPipeline(old), OnnxPipeline(tiny_bundle)
    assert before.answer_name is None and now.answer_name == ANSWER
    for text in TEXTS:
        a, b = before(text)[0], now(text)[0]
        assert a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-12
    # and the answer added again is the bundle's own graph
    add_answer(old / "model.quant.onnx", tmp_path / "again.onnx")
    assert onnx.load(tmp_path / "again.onnx").graph == onnx.load(tiny_bundle / "model.quant.onnx").graph


def test_the_check_refuses_an_answer_that_is_not_the_logits(tiny_bundle: Path, tmp_path: Path):
    model = onnx.load(tiny_bundle / "model.quant.onnx")
    top = next(n for n in model.graph.node if n.op_type == "TopK")
    top.attribute.append(onnx.helper.make_attribute("largest", 0))  # the least likely label
    onnx.save(model, tmp_path / "wrong.onnx")
    pipe = OnnxPipeline(tiny_bundle, verify=False)
    with pytest.raises(ValueError, match="the answer output says label"):
        check_answer(tmp_path / "wrong.onnx", [pipe.encode(["what is my checking balance", "set an alarm", "hi"])])


def test_run_rows_reads_floats_only_after_run_one_kept_a_double_output(tiny_bundle: Path):
    from runtime_shim import BundleError
    from runtime_shim.session import make_session

    sess = make_session(tiny_bundle / "model.quant.onnx", {"session_api": "c"})
    ids = [2, 5, 6, 3]
    top, label = sess.run_one(ids, ANSWER)
    assert sess.run_one(ids, ANSWER) == [top, label] and 0.0 < top <= 1.0 and label == int(label)
    with pytest.raises(BundleError, match=r"output 'answer' came back as tensor\(double\) \[1, 2\]"):
        sess.run_rows([ids], 0, ANSWER)  # its kept double buffer is not read as floats
    assert len(sess.run_one(ids, "logits")) == len(sess.run_rows([ids], 0, "logits")[0])


def test_a_model_put_in_by_overrides_is_read_by_its_logits(tiny_bundle: Path, tmp_path: Path):
    """runtime.json's answer names an output of the bundle's model: a model an override puts in its place
    (the build's fp32 comparison, a quantize variant) is read by its logits unless the override names one."""
    plain = remove_answer(tiny_bundle / "model.quant.onnx", tmp_path / "plain.onnx")
    pipe = OnnxPipeline(tiny_bundle, overrides={"model": str(plain)})
    a, b = pipe("set an alarm for seven")[0], OnnxPipeline(tiny_bundle)("set an alarm for seven")[0]
    assert pipe.answer_name is None and a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-12
    with pytest.raises(Exception, match="declares no such output"):
        OnnxPipeline(tiny_bundle, overrides={"model": str(plain), "answer": ANSWER})
