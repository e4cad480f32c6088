"""A lying model: logits or an answer output that are not what the model declares. Both sessions refuse the
run with one line naming the model, instead of reading past ONNX Runtime's buffer (the C API session read
by the declared shape), answering from a wrong-sized row or indexing the labels with whatever the answer
output says."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from runtime_shim import BundleError, OnnxPipeline, capi
from runtime_shim.manifest import update_manifest

pytestmark = pytest.mark.skipif(capi.library() is None, reason="this onnxruntime wheel has no C library")
ROOT = Path(__file__).resolve().parents[2]


def lying_model(path: Path, declared: int, elem: int = TensorProto.FLOAT) -> Path:
    """logits = [sum of ids, sum of mask] per row: two values, declared as ``declared``. The width goes
    through a Reshape by a shape computed at run time, so ONNX Runtime cannot infer it and keeps the claim."""
    nodes = [helper.make_node("Cast", ["input_ids"], ["idf"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["idf", "axes"], ["a"], keepdims=1),
             helper.make_node("ReduceSum", ["mf", "axes"], ["b"], keepdims=1),
             helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
             helper.make_node("Shape", ["c"], ["shape"]),
             helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("Cast", ["r"], ["logits"], to=elem)]
    graph = helper.make_graph(
        nodes, "lying",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("logits", elem, ["batch", declared])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _with_model(tiny_bundle: Path, tmp_path: Path, **kwargs) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    labels = len(OnnxPipeline(tiny_bundle, verify=False).label_names)
    lying_model(bundle / "model.quant.onnx", labels, **kwargs)
    # The lying model has logits only, as bundles before the answer output: every call reads them.
    runtime = json.loads((bundle / "runtime.json").read_text())
    (bundle / "runtime.json").write_text(json.dumps({k: v for k, v in runtime.items() if k != "answer"}))
    update_manifest(bundle)  # the checksums hold: the lie is in the model, not in the bundle's files
    return bundle


def lying_answer(path: Path, labels: int, answer: list[float], declared: int = 2,
                 elem: int = TensorProto.DOUBLE) -> Path:
    """Honest-looking logits (zeros) and an ``answer`` output that is the constant ``answer`` per row
    (broadcast to the batch), declared ``elem`` [batch, ``declared``] (``lying_model``'s Reshape keeps the
    claim)."""
    nodes = [helper.make_node("Cast", ["input_ids"], ["idf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["idf", "axes"], ["s"], keepdims=1),  # [batch, 1]
             helper.make_node("Mul", ["s", "zeros"], ["logits"]),  # [batch, labels] zeros
             helper.make_node("Cast", ["s", ], ["sd"], to=TensorProto.DOUBLE),
             helper.make_node("Mul", ["sd", "zero_d"], ["z"]),  # [batch, 1] zeros
             helper.make_node("Add", ["z", "const"], ["a"]),  # [batch, len(answer)]
             helper.make_node("Shape", ["a"], ["shape"]),  # a shape known at run time only: ORT keeps the claim
             helper.make_node("Reshape", ["a", "shape"], ["r"]),
             helper.make_node("Cast", ["r"], ["answer"], to=elem)]
    graph = helper.make_graph(
        nodes, "lying_answer",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", labels]),
         helper.make_tensor_value_info("answer", elem, ["batch", declared])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
                     helper.make_tensor("zeros", TensorProto.FLOAT, [1, labels], [0.0] * labels),
                     helper.make_tensor("zero_d", TensorProto.DOUBLE, [], [0.0]),
                     helper.make_tensor("const", TensorProto.DOUBLE, [1, len(answer)], answer)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _with_answer(tiny_bundle: Path, tmp_path: Path, answer: list[float], **kwargs) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    assert json.loads((bundle / "runtime.json").read_text())["answer"] == "answer"  # edgepack's bundles name it
    labels = len(OnnxPipeline(tiny_bundle, verify=False).label_names)
    lying_answer(bundle / "model.quant.onnx", labels, answer, **kwargs)
    update_manifest(bundle)
    return bundle


@pytest.mark.parametrize("answer", [[0.9, 1e6], [0.9, -1.0], [0.9, 1.5], [float("nan"), 1.0], [1.5, 1.0],
                                    [0.9, float("inf")], [0.9, float("nan")]])
def test_an_answer_that_is_no_label_or_no_probability_is_refused(tiny_bundle: Path, tmp_path: Path, answer):
    """The answer's id indexes the labels: an id out of range, fractional or NaN, or a probability outside
    [0, 1], is refused on every single query, not looked up (IndexError) or answered."""
    pipe = OnnxPipeline(_with_answer(tiny_bundle, tmp_path, answer))
    for text in ("what is my balance", "what is my balance", "hi"):  # a first run, its bound buffers, another length
        with pytest.raises(BundleError, match=r"model\.quant\.onnx: output 'answer' answered label .* does not "
                                              r"compute what it declares"):
            pipe(text)
    assert pipe(["hi", "what is my balance"])[0]["label"] == pipe.label_names[0]  # lists read the (zero) logits


def test_an_honest_answer_is_read(tiny_bundle: Path, tmp_path: Path):
    pipe = OnnxPipeline(_with_answer(tiny_bundle, tmp_path, [0.75, 2.0]))
    assert pipe("what is my balance", apply_threshold=False) == [{"label": pipe.label_names[2], "score": 0.75}]


@pytest.mark.parametrize("kwargs, needle", [
    ({"declared": 3}, "declares tensor(double) ["),
    ({"elem": TensorProto.FLOAT}, "declares tensor(float) ["),
])
def test_an_answer_declared_otherwise_is_refused_at_load(tiny_bundle: Path, tmp_path: Path, kwargs, needle):
    with pytest.raises(BundleError, match=r"runtime\.json: answer='answer' names a model output, but "
                                          rf"model\.quant\.onnx {re.escape(needle)}.*\]: expected tensor\(double\)"):
        OnnxPipeline(_with_answer(tiny_bundle, tmp_path, [0.5, 1.0], **kwargs))


def test_an_answer_larger_than_declared_is_refused_on_the_run(tiny_bundle: Path, tmp_path: Path):
    """Declared [batch, 2], computed [batch, 3]: the C API session checks the first run of each length and
    hands ORT a buffer of the declared size after it, which ORT refuses to overfill."""
    pipe = OnnxPipeline(_with_answer(tiny_bundle, tmp_path, [0.5, 1.0, 7.0]))
    for text in ("what is my balance", "hi"):
        with pytest.raises(BundleError, match=r"output 'answer' came back as tensor\(double\) \[1, 3\] for 1 row"):
            pipe(text)


@pytest.mark.parametrize("api", ["c", "python"])
def test_logits_smaller_than_declared_are_refused(tiny_bundle: Path, tmp_path: Path, api: str):
    pipe = OnnxPipeline(_with_model(tiny_bundle, tmp_path), overrides={"session_api": api})
    for call in (lambda: pipe("what is my balance"), lambda: pipe(["what is my balance", "hi"]),
                 lambda: pipe(["hi", "a longer text than that"], top_k=2), lambda: pipe.predict(["hi"])):
        with pytest.raises(BundleError, match=r"model\.quant\.onnx: .*does not compute what it declares"):
            call()


def test_the_command_line_says_it_in_one_line(tiny_bundle: Path, tmp_path: Path):
    bundle = _with_model(tiny_bundle, tmp_path)
    for texts in (["hi"], ["hi", "what is my balance"]):
        proc = subprocess.run([sys.executable, "-m", "runtime_shim", "predict", str(bundle), *texts],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "does not compute what it declares" in lines[0], proc.stderr


def test_a_shape_that_follows_the_values_is_refused_too(tmp_path: Path):
    """logits = [0, 1, ..., first id - 1]: the first row of a length is checked before its buffers are
    kept; a later row of that length with another width is refused by ORT, and named."""
    from runtime_shim.session import make_session

    nodes = [helper.make_node("Gather", ["input_ids", "zero"], ["row"], axis=0),
             helper.make_node("Gather", ["row", "zero"], ["first"], axis=0),
             helper.make_node("Range", ["zero", "first", "one"], ["r"]),
             helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["rf", "axes"], ["logits"])]
    graph = helper.make_graph(
        nodes, "follows",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])],
        initializer=[helper.make_tensor("zero", TensorProto.INT64, [], [0]),
                     helper.make_tensor("one", TensorProto.INT64, [], [1]),
                     helper.make_tensor("axes", TensorProto.INT64, [1], [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "f.onnx")
    sess = make_session(tmp_path / "f.onnx", {"session_api": "c", "log_severity_level": 4})
    assert [list(sess.run_rows([[5, 9, 9]])[0]) for _ in range(2)] == [[0, 1, 2, 3, 4]] * 2
    with pytest.raises(BundleError, match=r"came back as tensor\(float\) \[1, 3\] for 1 row\(s\)"):
        sess.run_rows([[3, 9, 9]])
    with pytest.raises(BundleError, match=r"\[1, 8\] for 1 row\(s\)"):
        sess.run_rows([[8, 9]])


def test_a_large_declared_head_does_not_crash_the_process(tmp_path: Path):
    """Read by its declared width (2**24 floats a row), a batch's output overran ORT's 16-byte buffer:
    a segmentation fault, so the run happens in a child process."""
    model = lying_model(tmp_path / "m.onnx", 1 << 24)
    code = textwrap.dedent(f"""
        from runtime_shim import BundleError
        from runtime_shim.session import make_session
        sess = make_session({str(model)!r}, {{"session_api": "c"}})
        for rows in ([[1, 2, 3], [4, 5]], [[1, 2, 3]]):
            try:
                sess.run_rows(rows)
            except BundleError as e:
                print("refused:", e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all("[16777216]" not in x and "does not compute what it declares" in x for x in lines[:1])
    assert "came back as tensor(float) [2, 2] for 2 row(s)" in lines[0] and "[1, 2] for 1 row(s)" in lines[1]


@pytest.mark.parametrize("api", ["c", "python"])
def test_logits_of_another_type_are_refused_at_load(tiny_bundle: Path, tmp_path: Path, api: str):
    bundle = _with_model(tiny_bundle, tmp_path, elem=TensorProto.DOUBLE)
    with pytest.raises(BundleError, match=r"model\.quant\.onnx: declares 'logits' as tensor\(double\)"):
        OnnxPipeline(bundle, overrides={"session_api": api})


def test_the_c_session_checks_the_type_of_every_run(tmp_path: Path):
    from runtime_shim.session import make_session

    sess = make_session(lying_model(tmp_path / "d.onnx", 2, elem=TensorProto.DOUBLE), {"session_api": "c"})
    for rows in ([[1, 2]], [[1, 2], [3]]):
        with pytest.raises(BundleError, match=r"d\.onnx: output 'logits' came back as tensor\(double\)"):
            sess.run_rows(rows)
