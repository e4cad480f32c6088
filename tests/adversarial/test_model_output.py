"""A lying model: logits that are not what the model declares. Both sessions refuse the run with one line
naming the model, instead of reading past ONNX Runtime's buffer (the C API session read by the declared
shape) or answering from a wrong-sized row."""

from __future__ import annotations

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
    update_manifest(bundle)  # the checksums hold: the lie is in the model, not in the bundle's files
    return bundle


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
