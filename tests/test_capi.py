"""The C API session (``runtime_shim.capi``): the same answers as ONNX Runtime's Python package on real
bundles and graphs, the same settings checks, threads, and the choice between the two."""

from __future__ import annotations

import json
import re
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from runtime_shim import BundleError, OnnxPipeline, capi
from runtime_shim import session as session_mod
from runtime_shim.csession import CSession

pytestmark = pytest.mark.skipif(capi.library() is None, reason="this onnxruntime wheel has no C library")

TEXTS = ["what is my balance", "set an alarm for 7 am please", "hi", "caf\u00e9 balance",
         "transfer fifty dollars from checking to savings right now"]


def _pair(bundle: Path) -> tuple[OnnxPipeline, OnnxPipeline]:
    c = OnnxPipeline(bundle, verify=False, overrides={"session_api": "c"})
    py = OnnxPipeline(bundle, verify=False, overrides={"session_api": "python"})
    assert isinstance(c.session, CSession) and isinstance(py.session, ort.InferenceSession)
    return c, py


def test_same_logits_and_answers_as_the_python_package(tiny_bundle: Path):
    c, py = _pair(tiny_bundle)
    assert [(i.name, i.type) for i in c.session.get_inputs()] == [(i.name, i.type) for i in py.session.get_inputs()]
    assert c.session.get_outputs()[0].shape[-1] == len(c.label_names)
    for batch in (TEXTS[:1], TEXTS):  # one unpadded row; rows padded to the longest
        enc = py.encode(batch)
        want = py.forward(enc)
        assert np.array_equal(c.forward(enc), want)  # numpy feeds through the C API: bit for bit
        rows = c.session.run_rows([c._ids(t) for t in batch], c.pad_id, c.output_name)
        assert np.array_equal(np.array([list(r) for r in rows], dtype=np.float32), want)
    # The serving calls: single texts, a list, top_k, the threshold off; the non-ASCII text goes
    # through tokenizers on both. Scores are float64 sums of the same float32 logits in another order
    # (math.fsum against numpy's pairwise sum): equal labels, scores within 1e-12.
    for text in TEXTS:
        _same(c(text), py(text))
        _same(c(text, apply_threshold=False), py(text, apply_threshold=False))
    _same(c(TEXTS), py(TEXTS))
    _same(c(TEXTS, batch_size=2), py(TEXTS, batch_size=2))
    assert c(TEXTS, top_k=3) == py(TEXTS, top_k=3)  # top_k takes the numpy path on both
    assert c([]) == py([]) == []


def _same(a: list[dict], b: list[dict]) -> None:
    assert [x["label"] for x in a] == [x["label"] for x in b]
    assert all(abs(x["score"] - y["score"]) < 1e-12 for x, y in zip(a, b, strict=True)), (a, b)


def _sum_graph(path: Path, elem: int, width: int | str = 2) -> Path:
    """logits[b] = [sum of input_ids row, sum of attention_mask row]: shows what was fed, padding included."""
    nodes = [helper.make_node("Cast", ["input_ids"], ["idf"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["idf", "axes"], ["a"], keepdims=1),
             helper.make_node("ReduceSum", ["mf", "axes"], ["b"], keepdims=1),
             helper.make_node("Concat", ["a", "b"], ["logits"], axis=1)]
    graph = helper.make_graph(
        nodes, "sums",
        [helper.make_tensor_value_info(n, elem, ["batch", "seq"]) for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", width])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("width", [2, "n"])  # a static output width, and one ORT is asked for per run
@pytest.mark.parametrize("elem", [TensorProto.INT32, TensorProto.INT64])
def test_rows_padded_on_the_right(tmp_path: Path, elem: int, width: int | str):
    path = _sum_graph(tmp_path / "sums.onnx", elem, width)
    sess = session_mod.make_session(path, {"session_api": "c"})
    assert sess.get_inputs()[0].type == ("tensor(int32)" if elem == TensorProto.INT32 else "tensor(int64)")
    rows = [[5, 7], [1, 2, 3, 4], [9]]
    out = [list(r) for r in sess.run_rows(rows, pad_id=100)]
    assert out == [[12 + 200, 2], [10, 4], [9 + 300, 1]]  # pad id counted, mask 0 on the padding
    assert [list(sess.run_rows([r])[0]) for r in rows] == [[12, 2], [10, 4], [9, 1]]  # one row: no padding
    big = [[2**32]] if elem == TensorProto.INT64 else [[7]]  # int64 ids are not cut to 32 bits (2**32 -> 0)
    assert sess.run_rows(big)[0][0] == float(big[0][0])
    ids = np.array([[1, 2], [3, 4]], dtype=np.int64 if elem == TensorProto.INT64 else np.int32)
    got = sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    assert got.tolist() == [[3.0, 2.0], [7.0, 2.0]] and got.flags.writeable


def test_threads_share_one_session(tiny_bundle: Path):
    c, _ = _pair(tiny_bundle)
    want = {t: c(t) for t in TEXTS}
    want_batch = c(TEXTS)  # not the singles' scores: dynamic int8 scales activations over the batch
    bad: list[str] = []

    def work():
        for _ in range(30):
            for t in TEXTS:
                if c(t) != want[t]:
                    bad.append(t)
            if c(TEXTS) != want_batch:
                bad.append("batch")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert bad == []


def test_bad_inputs_name_the_file_or_the_key(tmp_path: Path):
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(BundleError, match=r"model\.onnx: onnxruntime .* \(C API\) cannot load it"):
        session_mod.make_session(junk, {"session_api": "c"})
    with pytest.raises(BundleError, match="session_api='fast' is not valid; choose one of: auto, c, python"):
        session_mod.make_session(junk, {"session_api": "fast"})
    with pytest.raises(BundleError, match="intra_op_num_threads"):
        session_mod.make_session(_sum_graph(tmp_path / "s.onnx", TensorProto.INT32),
                                 {"session_api": "c", "intra_op_num_threads": -1})


def test_auto_takes_the_c_api_on_linux_only(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    assert session_mod.use_c_api("auto") is capi.library()
    assert session_mod.use_c_api("python") is None
    monkeypatch.setattr(sys, "platform", "darwin")
    assert session_mod.use_c_api("auto") is None and session_mod.use_c_api("c") is capi.library()
    monkeypatch.setattr(capi, "library", lambda: None)
    with pytest.raises(BundleError, match="session_api='c' but the onnxruntime wheel's C library"):
        session_mod.use_c_api("c")


def test_the_function_table_is_the_one_in_the_header():
    """Positions in OrtApi checked through calls whose answers are known: the version string through the
    base, an error message through CreateStatus' neighbour (GetErrorMessage on a refused call), and the
    default allocator's pointer being stable across calls."""
    api = capi.library()
    assert api.version == ort.__version__
    with pytest.raises(capi.OrtError, match="load model|No such file|does not exist|Load model"):
        api.out("CreateSession", api.env, b"/nonexistent/model.onnx", api.out("CreateSessionOptions"))
    assert api.out("GetAllocatorWithDefaultOptions").value == api.out("GetAllocatorWithDefaultOptions").value
    assert json.dumps(capi.GRAPH_LEVELS) and capi.GRAPH_LEVELS["all"] == int(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)


def test_scores_without_numpy_match_numpys():
    """``top_of_list`` (the C API path's scoring, no numpy) against ``top_of_row`` on random rows and
    at exp's limits: the same label, the same top probability to 1e-13."""
    from runtime_shim.scores import top_of_list, top_of_row

    rng = np.random.default_rng(0)
    rows = [rng.normal(0, 4, 151).astype(np.float32) for _ in range(300)]
    rows += [np.array(r, dtype=np.float32) for r in ([1000.0, 999.0, -5.0], [-800.0, -801.0], [3.0, 3.0, 1.0],
                                                      [20.0, -760.0, 19.0])]
    for row in rows:
        k1, top1 = top_of_list(row.tolist())
        k2, top2 = top_of_row(row)
        assert k1 == k2 and abs(top1 - top2) < 1e-13, (row[:5], top1, top2)
    assert top_of_list([0.0, 2.0, 0.0], oos_id=2, threshold=0.9)[0] == 2


# --- the oldest onnxruntime the runtime supports, and the installed (newest) one --------------------

ROOT = Path(__file__).resolve().parents[1]


def oldest_onnxruntime() -> str:
    """The floor the runtime declares (``onnxruntime>=X`` in its requirements), as a full release."""
    from edgepack.runtime_dist import requirements

    req = next(r for r in requirements()[0] if r.startswith("onnxruntime"))
    floor = re.search(r">=\s*([\d.]+)", req).group(1)
    return floor + ".0" * (2 - floor.count("."))


@pytest.fixture(scope="module", params=["newest", "oldest"])
def ort_python(request) -> Path:
    """The installed onnxruntime (the newest: constraints-cpu.txt pins the latest release), or a cached
    second venv holding the oldest the runtime claims to support."""
    if request.param == "newest":
        return Path(sys.executable)
    from importlib import metadata

    from conftest import cached_venv

    version = oldest_onnxruntime()
    return cached_venv(f"onnxruntime-{version}", [f"onnxruntime=={version}", *(
        f"{name}=={metadata.version(name)}" for name in ("tokenizers", "numpy"))])


@pytest.mark.second_venv
def test_every_c_api_entry_on_the_oldest_and_newest_onnxruntime(ort_python, tiny_bundle, tmp_path):
    """tests/capi_check.py in each interpreter: every settings variant (both arena and memory-pattern
    switches, the parallel executor, each graph level, a config entry) gives the Python package's labels
    and logits, SetOptimizedModelFilePath writes the graph ORT runs, rows are padded as fed, "layout" is
    taken or refused alike by both APIs, and the bundle (built with the installed onnxruntime) warns once
    on an older one."""
    import subprocess

    from conftest import clean_env

    graphs = tmp_path / "graphs"
    graphs.mkdir()
    for elem, name in ((TensorProto.INT32, "int32"), (TensorProto.INT64, "int64")):
        for width in (2, "n"):
            _sum_graph(graphs / f"{name}-{width}.onnx", elem, width)
    proc = subprocess.run([str(ort_python), str(ROOT / "tests" / "capi_check.py"), str(ROOT), str(tiny_bundle),
                           str(graphs), str(tmp_path)], capture_output=True, text=True, timeout=900,
                          env=clean_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    oldest = ort_python != Path(sys.executable)
    assert r["capi"] == r["onnxruntime"] == (oldest_onnxruntime() if oldest else ort.__version__)
    for name, v in r["variants"].items():
        assert v["labels_c"] == v["labels_python"], name
        # One thread: the same kernels in the same order, bit for bit; two may sum in another order.
        assert v["max_diff"] <= (1e-5 if "2 threads" in name else 0.0), (name, v["max_diff"])
        assert np.allclose(np.array(v["rows_c"], dtype=np.float32), np.array(v["rows_python"], dtype=np.float32),
                           atol=1e-5 if "2 threads" in name else 0.0), name
    assert len(r["variants"]) == 8
    layout = r["layout"]
    assert (layout["c"] == "ok") == (layout["python"] == "ok"), layout
    if layout["python"] != "ok":
        assert all("layout" in m and r["onnxruntime"] in m for m in layout.values()), layout
    assert r["optimized_file_max_diff"] < 1e-4
    expected = {"2": [[12 + 200, 2], [10, 4], [9 + 300, 1]], "n": [[12 + 200, 2], [10, 4], [9 + 300, 1]]}
    assert r["sums"] == {f"{t}-{w}": expected[w] for t in ("int32", "int64") for w in ("2", "n")}
    assert re.search("load model|No such file|does not exist|Load model", r["refused"] or "")
    if oldest:
        built = json.loads((tiny_bundle / "manifest.json").read_text())["versions"]["onnxruntime"]
        assert r["warnings"] == [f"OrtVersionWarning: bundle built and measured with onnxruntime {built}, but this "
                                 f"is onnxruntime {r['onnxruntime']}: its answers and latency were not checked on "
                                 f"this version; install onnxruntime>={built} (the bundle's requirements.txt)"]
    else:
        assert r["warnings"] == []


def test_an_older_onnxruntime_than_the_builds_warns_once(tiny_bundle, tmp_path, monkeypatch):
    """A bundle whose manifest says it was built with a newer onnxruntime than this one (faked: 99.1.0):
    one OrtVersionWarning per process through either session API, one console line from the runtime's
    command line (exit 0: it still answers), and nothing for a build as old as this onnxruntime."""
    import shutil
    import subprocess
    import warnings

    from runtime_shim.manifest import update_manifest

    bundle = tmp_path / "newer"
    shutil.copytree(tiny_bundle, bundle, ignore=shutil.ignore_patterns("__pycache__"))
    versions = json.loads((bundle / "manifest.json").read_text())["versions"]
    update_manifest(bundle, versions={**versions, "onnxruntime": "99.1.0"})
    monkeypatch.setattr(session_mod, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        OnnxPipeline(bundle, overrides={"session_api": "c"})
        OnnxPipeline(bundle, overrides={"session_api": "python"})
    ours = [str(w.message) for w in caught if issubclass(w.category, session_mod.OrtVersionWarning)]
    assert ours == [f"bundle built and measured with onnxruntime 99.1.0, but this is onnxruntime {ort.__version__}: "
                    "its answers and latency were not checked on this version; install onnxruntime>=99.1.0 (the "
                    "bundle's requirements.txt)"]
    proc = subprocess.run([sys.executable, "-m", "runtime_shim", "predict", str(bundle), "what is my balance"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1, proc.stderr
    assert proc.stderr.splitlines() == [f"warning: {ours[0]}"]
    same = tmp_path / "same"
    shutil.copytree(tiny_bundle, same, ignore=shutil.ignore_patterns("__pycache__"))
    update_manifest(same, versions={**versions, "onnxruntime": ort.__version__.split("+")[0]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        OnnxPipeline(same)
    assert not [w for w in caught if issubclass(w.category, session_mod.OrtVersionWarning)]
