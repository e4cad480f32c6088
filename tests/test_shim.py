"""The on-device runtime (``runtime_shim``) on a packed tiny bundle: the pipeline's API, manifest
checks, session settings, the benchmark harness, the data readers, the command line, and that the
shim never imports torch or transformers."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import runtime_shim
from runtime_shim import BundleError, OnnxPipeline
from runtime_shim.__main__ import ExitCode, main
from runtime_shim.bench import _answer, accuracy_metrics, format_table, measure_peak_rss, run_benchmark
from runtime_shim.datafiles import DataError, read_labelled, read_reference, read_rows
from runtime_shim.manifest import bundle_files, read_manifest, update_manifest, verify, write_manifest
from runtime_shim.pipeline import softmax, thresholded, top_of_row
from runtime_shim.session import effective_settings, session_options

SHIM_DIR = Path(runtime_shim.__file__).resolve().parent
QUERIES = ["what is my checking balance", "set an alarm for 7 am", "who won the football game"]
HARNESS_KEYS = {
    "name", "n", "accuracy", "accuracy_raw", "in_scope_accuracy", "in_scope_accuracy_raw", "oos_recall",
    "oos_recall_raw", "agreement", "latency_ms", "tokenize_ms", "model_ms", "throughput_qps", "peak_rss_mb",
    "model_bytes", "bundle_bytes", "threads", "settings", "predictions",
}


@pytest.fixture(scope="module")
def pipe(tiny_bundle: Path) -> OnnxPipeline:
    return OnnxPipeline(tiny_bundle)


@pytest.fixture
def bundle_copy(tmp_path, tiny_bundle) -> Path:
    """A private copy to edit (the session fixture is shared by every test)."""
    dest = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------------------------------ pipeline


def test_call_like_a_hf_pipeline(pipe: OnnxPipeline, label_names):
    one = pipe(QUERIES[0])
    assert isinstance(one, list) and len(one) == 1 and set(one[0]) == {"label", "score"}
    assert one[0]["label"] in label_names and 0.0 < one[0]["score"] <= 1.0

    many = pipe(QUERIES)
    assert len(many) == 3 and all(isinstance(d, dict) for d in many)

    top = pipe(QUERIES[0], top_k=3)
    assert len(top) == 3 and all(isinstance(d, dict) for d in top)
    scores = [d["score"] for d in top]
    assert scores == sorted(scores, reverse=True) and len({d["label"] for d in top}) == 3

    tops = pipe(QUERIES, top_k=2)
    assert len(tops) == 3 and all(isinstance(x, list) and len(x) == 2 for x in tops)
    assert len(pipe(QUERIES[0], top_k=99)) == len(label_names)  # capped at the number of labels
    assert pipe([]) == []
    with pytest.raises(ValueError, match="top_k"):
        pipe(QUERIES[0], top_k=0)
    with pytest.raises(ValueError, match="None \\(every label\\)"):
        pipe(QUERIES[0], top_k="all")

    # top_k=None: every label, most probable first (transformers' meaning); "best" spells the default.
    every = pipe(QUERIES, top_k=None)
    assert [sorted(e["label"] for e in row) for row in every] == [sorted(label_names)] * 3
    assert all([e["score"] for e in row] == sorted((e["score"] for e in row), reverse=True) for row in every
               if row[0]["label"] != pipe.oos_label)  # a fired threshold puts oos first with the top score
    assert [row[0]["label"] for row in every] == [d["label"] for d in many]
    single = pipe(QUERIES[0], top_k=None)  # a string: one list of every label, as transformers answers
    assert isinstance(single, list) and len(single) == len(label_names) and isinstance(single[0], dict)
    assert pipe(QUERIES, top_k="best") == many
    assert pipe(QUERIES[0], top_k="best") == one


def test_pieces_agree_with_the_call(pipe: OnnxPipeline):
    enc = pipe.encode(QUERIES)
    assert list(enc) == [i.name for i in pipe.session.get_inputs()]
    types = {i.name: np.int32 if i.type == "tensor(int32)" else np.int64 for i in pipe.session.get_inputs()}
    assert all(a.dtype == types[n] and a.shape == enc["input_ids"].shape for n, a in enc.items())
    # padded to the longest text of the batch, with the mask marking the padding
    lengths = enc["attention_mask"].sum(axis=1)
    assert lengths.max() == enc["input_ids"].shape[1] and lengths.min() < lengths.max()
    if "token_type_ids" in enc:
        assert not enc["token_type_ids"].any()

    long = pipe.encode(["balance " * 500])
    assert long["input_ids"].shape == (1, pipe.max_length)

    logits = pipe.forward(enc)
    assert logits.shape == (3, len(pipe.label_names))
    ids, probs = pipe.predict(QUERIES)
    assert ids.tolist() == probs.argmax(axis=1).tolist()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    raw = pipe(QUERIES, apply_threshold=False)
    assert [d["label"] for d in raw] == [pipe.label_names[i] for i in ids]


@pytest.mark.parametrize("threshold", [None, 0.0, 0.5, 1.0])
def test_single_query_path_matches_the_batch_path(bundle_copy: Path, threshold):
    if threshold is not None:
        _edit_json(bundle_copy / "labels.json", oos_threshold=threshold)
        update_manifest(bundle_copy)
    pipe = OnnxPipeline(bundle_copy)
    for text in [*QUERIES, "", "zzzz qqqq", "balance " * 500]:
        for thr in (True, False):
            _, probs = pipe.predict([text])  # the general path, one text: same batch, same scores
            ids = pipe.label_ids(probs, apply_threshold=thr)
            want = {"label": pipe.label_names[int(ids[0])], "score": pytest.approx(float(probs.max()), abs=1e-12)}
            assert pipe(text, apply_threshold=thr) == [want]


def test_attributes(pipe: OnnxPipeline, tiny_bundle: Path, label_names):
    assert pipe.label_names == label_names
    assert pipe.oos_label == "oos" and 0.0 <= pipe.oos_threshold <= 1.0
    assert pipe.model_bytes == (tiny_bundle / "model.quant.onnx").stat().st_size
    assert pipe.bundle_bytes > pipe.model_bytes
    assert pipe.settings["intra_op_num_threads"] == json.loads((tiny_bundle / "runtime.json").read_text())[
        "intra_op_num_threads"]
    assert isinstance(pipe.name, str) and pipe.name
    assert pipe.rss_argv[-2:] == ["rss", str(tiny_bundle.resolve())]


def test_softmax_is_stable():
    p = softmax(np.array([[1000.0, 1000.0, -1000.0], [1e-3, 0.0, 0.0]]))
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p[0], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(p.sum(axis=1), 1.0)


def test_threshold_applied_and_documented_score(bundle_copy: Path):
    _edit_json(bundle_copy / "labels.json", oos_threshold=1.0)  # no answer of the tiny model is that sure: always out-of-scope
    update_manifest(bundle_copy)
    pipe = OnnxPipeline(bundle_copy)
    raw = pipe(QUERIES, apply_threshold=False)
    out = pipe(QUERIES)
    assert [d["label"] for d in out] == ["oos"] * 3
    assert [d["score"] for d in out] == pytest.approx([d["score"] for d in raw])  # the top probability

    # (one text alone: dynamic int8 scales activations per batch, so batch-mates nudge the scores)
    top = pipe(QUERIES[0], top_k=3)
    alone = pipe(QUERIES[0], apply_threshold=False)[0]
    assert top[0] == {"label": "oos", "score": pytest.approx(alone["score"])}
    assert [d["label"] for d in top].count("oos") == 1

    _edit_json(bundle_copy / "labels.json", oos_threshold=0.0)  # never fires
    update_manifest(bundle_copy)
    assert OnnxPipeline(bundle_copy)(QUERIES) == raw


def test_runtime_json_tolerance(bundle_copy: Path):
    """Unknown keys are ignored; a model without token_type_ids still gets what it declares."""
    _edit_json(bundle_copy / "runtime.json", future_key={"x": 1}, inputs=["input_ids", "attention_mask"])
    update_manifest(bundle_copy)
    pipe = OnnxPipeline(bundle_copy)
    assert pipe.settings["future_key"] == {"x": 1}
    assert pipe(QUERIES[0])[0]["label"] in pipe.label_names


def test_labels_must_match_the_model(bundle_copy: Path):
    labels = json.loads((bundle_copy / "labels.json").read_text())
    _edit_json(bundle_copy / "labels.json", labels=labels["labels"] + ["extra"])
    with pytest.raises(BundleError, match="labels.json names 6 labels"):
        OnnxPipeline(bundle_copy, verify=False)


# ------------------------------------------------------------------------------------------ manifest


def test_manifest_lists_every_file(tiny_bundle: Path):
    manifest = verify(tiny_bundle)
    assert manifest["format"] == "edgepack-bundle/1"
    assert set(manifest["files"]) == set(bundle_files(tiny_bundle))
    assert "manifest.json" not in manifest["files"]
    assert not any("__pycache__" in f for f in manifest["files"])


@pytest.mark.parametrize("damage", ["appended", "same_size", "missing", "no_manifest"])
def test_damaged_bundle_refused_naming_the_file(bundle_copy: Path, damage: str, capsys):
    target = {"appended": "labels.json", "same_size": "model.quant.onnx", "missing": "tokenizer.json",
              "no_manifest": "manifest.json"}[damage]
    path = bundle_copy / target
    if damage == "appended":
        path.write_text(path.read_text() + " ")
    elif damage == "same_size":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    with pytest.raises(BundleError, match=target) as err:
        OnnxPipeline(bundle_copy)
    assert "\n" not in str(err.value)
    if damage == "same_size":
        assert "sha256" in str(err.value)

    code = main(["predict", str(bundle_copy), "hello"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == ExitCode.USAGE == 2
    assert len(lines) == 1 and target in lines[0] and ("restore" in lines[0] or "pack" in lines[0])


def test_unlisted_files_ignored_and_update_keeps_fields(bundle_copy: Path):
    (bundle_copy / "results.json").write_text("{}")  # e.g. a bench --json saved beside the model
    verify(bundle_copy)
    before = read_manifest(bundle_copy)
    _edit_json(bundle_copy / "runtime.json", intra_op_num_threads=2)
    with pytest.raises(BundleError, match="runtime.json"):
        verify(bundle_copy)
    after = update_manifest(bundle_copy, tuned={"intra_op_num_threads": 2})
    assert after["versions"] == before["versions"] and after["tuned"] == {"intra_op_num_threads": 2}
    assert after["files"]["runtime.json"] != before["files"]["runtime.json"]
    assert "results.json" in after["files"]
    verify(bundle_copy)
    assert not [p for p in bundle_copy.iterdir() if p.name.startswith(".manifest.json")]  # no temp file left


def test_write_manifest_skips_pycache(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "pkg" / "__pycache__" / "m.pyc").write_bytes(b"x")
    (tmp_path / "pkg" / "m.py").write_text("x = 1\n")
    m = write_manifest(tmp_path, versions={"numpy": "2"}, files="ignored")
    assert sorted(m["files"]) == ["a.txt", "pkg/m.py"]
    assert m["files"]["a.txt"] == {"sha256": __import__("hashlib").sha256(b"a").hexdigest(), "bytes": 1}
    assert json.loads((tmp_path / "manifest.json").read_text()) == m


# ------------------------------------------------------------------------------------------- session


def test_session_settings_from_runtime_json(bundle_copy: Path):
    _edit_json(bundle_copy / "runtime.json", intra_op_num_threads=2, graph_optimization_level="basic",
               session_config={"session.intra_op.allow_spinning": "0"})
    update_manifest(bundle_copy)
    pipe = OnnxPipeline(bundle_copy, overrides={"session_api": "python"})
    so = pipe.session.get_session_options()
    assert so.intra_op_num_threads == 2
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert str(so.graph_optimization_level).endswith("ORT_ENABLE_BASIC")

    over = OnnxPipeline(bundle_copy, overrides={"intra_op_num_threads": 1, "session_api": "python"})
    assert over.session.get_session_options().intra_op_num_threads == 1
    assert over.settings["intra_op_num_threads"] == 1
    # The C API session (the default on Linux) is made from the same checked settings.
    c = OnnxPipeline(bundle_copy, overrides={"session_api": "c"}).session
    assert c.options["intra_op_num_threads"] == 2 and c.options["graph_optimization_level"] == 1
    assert c.options["session_config"]["session.intra_op.allow_spinning"] == "0"


def test_settings_merge_and_validation():
    s = effective_settings({"intra_op_num_threads": 1, "session_config": {"a": "1"}},
                           {"intra_op_num_threads": 3, "session_config": {"b": 0}})
    assert s["intra_op_num_threads"] == 3 and s["session_config"] == {"a": "1", "b": "0"}
    assert session_options({"execution_mode": "sequential"}).intra_op_num_threads == 1
    with pytest.raises(BundleError, match="graph_optimization_level.*disable, basic, extended, all"):
        session_options({"graph_optimization_level": "max"})
    with pytest.raises(BundleError, match="intra_op_num_threads"):
        session_options({"intra_op_num_threads": -1})


# ------------------------------------------------------------------------------------------- harness


class FixedBackend:
    """A backend whose logits are chosen per text: exact, stable numbers for the metrics."""

    name = "fixed"
    label_names = ["a", "b", "oos"]
    oos_label = "oos"
    oos_threshold = 0.5
    settings = {"intra_op_num_threads": 1}
    model_bytes = 10
    bundle_bytes = 20
    # text -> probabilities; argmax then threshold 0.5
    TABLE = {"a-sure": [0.9, 0.05, 0.05], "a-unsure": [0.4, 0.3, 0.3], "b-sure": [0.1, 0.8, 0.1],
             "oos-sure": [0.1, 0.1, 0.8], "oos-as-a": [0.45, 0.35, 0.2]}

    def encode(self, texts):
        return list(texts)

    def forward(self, encoded):
        return np.log(np.array([self.TABLE[t] for t in encoded]))


def test_harness_metrics_are_exact():
    texts = ["a-sure", "a-unsure", "b-sure", "oos-sure", "oos-as-a"]
    gold = ["a", "a", "b", "oos", "oos"]
    r = run_benchmark(FixedBackend(), texts, gold, reference=["a", "a", "b", "oos", "a"], warmup=2, runs=10,
                      batch_sizes=(1, 4), rss_argv=[], throughput_batches=2)
    # raw argmax: a, a, b, oos, a -> 4/5; with the threshold: a, oos, b, oos, oos -> 4/5
    assert r["predictions"] == ["a", "oos", "b", "oos", "oos"]
    assert r["accuracy"] == pytest.approx(0.8) and r["accuracy_raw"] == pytest.approx(0.8)
    assert r["in_scope_accuracy"] == pytest.approx(2 / 3) and r["in_scope_accuracy_raw"] == pytest.approx(1.0)
    assert r["oos_recall"] == pytest.approx(1.0) and r["oos_recall_raw"] == pytest.approx(0.5)
    assert r["agreement"] == pytest.approx(0.6)
    assert r["peak_rss_mb"] is None and set(r["throughput_qps"]) == {"1", "4"}
    assert r["session_api"] is None  # no ONNX Runtime session behind this backend
    assert accuracy_metrics(["a"], ["a"], None) == {"accuracy": 1.0, "in_scope_accuracy": None, "oos_recall": None}


def test_single_row_answer_matches_the_softmax_path():
    """The timing loop's one-query answer (top_of_row) is the batch rule's answer, threshold included."""
    rng = np.random.default_rng(0)
    names = [f"l{i}" for i in range(151)]
    for _ in range(200):
        logits = (rng.standard_normal((1, 151)) * rng.uniform(0.1, 8)).astype(np.float32)
        for oos_id, thr in ((None, None), (150, 0.05), (150, 0.32), (3, 0.9)):
            probs = softmax(logits)
            want = thresholded(probs.argmax(axis=-1), probs.max(axis=-1), oos_id, thr)
            assert _answer(logits, names, oos_id, thr) == [names[int(want[0])]]
            k, top = top_of_row(logits[0])
            assert k == int(probs.argmax()) and top == pytest.approx(float(probs.max()), abs=1e-12)


def test_harness_refuses_unknown_gold_labels():
    with pytest.raises(DataError, match="pizza"):
        run_benchmark(FixedBackend(), ["a-sure"], ["pizza"], warmup=0, runs=1, rss_argv=[])


def test_harness_on_the_bundle(pipe: OnnxPipeline, tiny_bundle: Path):
    texts, gold = read_labelled(tiny_bundle / "eval.jsonl")
    r = run_benchmark(pipe, texts, gold, warmup=5, runs=20, throughput_batches=3)
    assert HARNESS_KEYS <= set(r)
    assert r["n"] == len(texts) == len(r["predictions"])
    assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["accuracy_raw"] <= 1.0
    for key in ("latency_ms", "tokenize_ms", "model_ms"):
        stats = r[key]
        assert 0.0 < stats["p50"] <= stats["p95"] <= stats["p99"] and stats["n"] == 20
    assert r["tokenize_ms"]["p50"] + r["model_ms"]["p50"] <= r["latency_ms"]["p99"] * 1.5
    assert set(r["throughput_qps"]) == {"1", "32"} and all(q > 0 for q in r["throughput_qps"].values())
    assert r["peak_rss_mb"] is not None and 10 < r["peak_rss_mb"] < 4000, r.get("peak_rss_error")
    assert r["threads"] == pipe.settings["intra_op_num_threads"]
    assert r["session_api"] == ("c" if hasattr(pipe.session, "run_rows") else "python")
    assert r["model_bytes"] == pipe.model_bytes and r["bundle_bytes"] == pipe.bundle_bytes
    json.dumps(r)  # the --json output is plain JSON

    table = format_table([r, {**r, "name": "second"}])
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["model", "acc", "%"] and "qps@32" in lines[0]
    assert lines[0].index("p50 ms") < lines[0].index("mean ms") < lines[0].index("p95 ms")  # p50, mean and p95
    assert lines[2].startswith(r["name"]) and lines[3].startswith("second")
    assert len({len(line) for line in lines[:2]}) == 1  # fixed width


def test_peak_rss_is_the_fresh_process_not_its_parent(pipe: OnnxPipeline):
    """``ru_maxrss`` survives ``execve``: a probe started by a big parent (a bench with torch loaded)
    must still report its own peak."""
    big = np.ones(512 * 2**20 // 8)  # 512 MiB, touched: far above what the tiny bundle needs
    try:
        mb = measure_peak_rss(pipe.rss_argv)
    finally:
        del big
    assert 10 < mb < 400


# ---------------------------------------------------------------------------------------------- data


def test_read_data_formats(tmp_path, clinc_json, corpus):
    rows = corpus["test"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"q": t, "intent": lab}) for t, lab in rows) + "\n\n")
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("q,intent\n" + "\n".join(f'"{t}",{lab}' for t, lab in rows))
    for path in (jsonl, csv_file):
        texts, labels = read_labelled(path, text_column="q", label_column="intent")
        assert list(zip(texts, labels, strict=True)) == [tuple(r) for r in rows]

    texts, labels = read_labelled(clinc_json, split="test")
    assert sorted(zip(texts, labels, strict=True)) == sorted(tuple(r) for r in rows)  # oos_test folded in
    assert "oos" in labels
    assert len(read_labelled(clinc_json, split="validation")[0]) == len(corpus["val"])  # val == validation
    assert read_rows(jsonl, text_column="q", label_column="intent")[0] == tuple(rows[0])

    with pytest.raises(DataError, match="--text-column"):
        read_labelled(jsonl)
    with pytest.raises(DataError, match="no split 'dev2'"):
        read_labelled(clinc_json, split="dev2")
    with pytest.raises(DataError, match="no such file"):
        read_labelled(tmp_path / "nope.jsonl")


def test_read_reference(tmp_path):
    bench_json = tmp_path / "teacher.json"
    bench_json.write_text(json.dumps({"accuracy": 0.9, "predictions": ["a", "b"]}))
    assert read_reference(bench_json, n=2) == ["a", "b"]
    lines = tmp_path / "ref.jsonl"
    lines.write_text('{"prediction": "a"}\n{"label": "b"}\n')
    assert read_reference(lines) == ["a", "b"]
    with pytest.raises(DataError, match="2 reference labels for 3"):
        read_reference(bench_json, n=3)


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_predict(tiny_bundle: Path, capsys, label_names):
    assert main(["predict", str(tiny_bundle), QUERIES[0], QUERIES[1]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[0] in label_names and lines[0].endswith(QUERIES[0])

    assert main(["predict", str(tiny_bundle), QUERIES[0], "--top-k", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 2 and set(out[0]) == {"label", "score"}  # as pipe(text, top_k=2)
    assert main(["predict", str(tiny_bundle), QUERIES[0], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 1 and set(out[0]) == {"label", "score"}  # as pipe(text)
    assert main(["predict", str(tiny_bundle), *QUERIES, "--top-k", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 3 and all(len(x) == 2 for x in out)  # as pipe([...], top_k=2)


def test_cli_bench_json(tiny_bundle: Path, tmp_path, capsys):
    out = tmp_path / "r" / "bench.json"
    code = main(["bench", str(tiny_bundle), "--runs", "20", "--warmup", "5", "--no-rss", "--threads", "1",
                 "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("model") and str(out) in printed
    assert "at build time (manifest.json" in printed  # the packer's test accuracy, to compare with
    result = json.loads(out.read_text())
    assert HARNESS_KEYS <= set(result) and result["latency_ms"]["n"] == 20 and result["threads"] == 1
    assert result["data"].endswith("eval.jsonl")

    # the teacher-style reference: this run's own predictions agree with themselves
    code = main(["bench", str(tiny_bundle), "--runs", "20", "--warmup", "5", "--no-rss", "--reference", str(out),
                 "--json", str(out)])
    assert code == 0 and json.loads(out.read_text())["agreement"] == 1.0


def test_cli_bench_bad_data_one_line(tiny_bundle: Path, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "order a pizza", "label": "food"}\n')
    assert main(["bench", str(tiny_bundle), "--data", str(bad), "--runs", "5", "--no-rss"]) == ExitCode.USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "food" in err[0]


def test_cli_verify_and_rss(bundle_copy: Path, capsys):
    assert main(["verify", str(bundle_copy)]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["rss", str(bundle_copy)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["peak_rss_mb"] > 0
    # the memory probe of a run with --threads loads the bundle with the same override
    argv = OnnxPipeline(bundle_copy, overrides={"intra_op_num_threads": 2}).rss_argv
    assert argv[argv.index("--overrides") + 1] == '{"intra_op_num_threads": 2}'
    assert main(argv[argv.index("runtime_shim") + 1:]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["threads"] == 2
    _edit_json(bundle_copy / "runtime.json", intra_op_num_threads=2)
    assert main(["verify", str(bundle_copy)]) == ExitCode.USAGE
    assert "runtime.json" in capsys.readouterr().err
    assert main(["verify", str(bundle_copy), "--update"]) == 0
    assert main(["verify", str(bundle_copy)]) == 0


def test_cli_optional_command_hook(monkeypatch, tiny_bundle, capsys):
    """A later ``runtime_shim/tune.py`` with register/run becomes ``python -m runtime_shim tune``."""
    tune = types.ModuleType("runtime_shim.tune")

    def register(sub):
        p = sub.add_parser("tune")
        p.add_argument("bundle")
        return p

    tune.register = register
    tune.run = lambda args: print(f"tuned {args.bundle}") or 0
    monkeypatch.setitem(sys.modules, "runtime_shim.tune", tune)
    assert main(["tune", str(tiny_bundle)]) == 0
    assert capsys.readouterr().out.strip() == f"tuned {tiny_bundle}"


# ------------------------------------------------------------------------------------ import hygiene

ALLOWED = {"onnxruntime", "tokenizers", "numpy", "runtime_shim"}
# Imported inside a function, only when a signature is checked (tests/test_trust.py runs the shim without it).
LAZY = {"trust.py": {"cryptography"}}


def test_shim_sources_import_only_the_runtime():
    for path in sorted(SHIM_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        lazy = LAZY.get(path.name, set())
        for node in tree.body:  # module level: never a lazy one
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not {n.split(".")[0] for n in names} & lazy, f"{path.name} imports {names} at module level"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in ALLOWED | lazy or top in sys.stdlib_module_names, f"{path.name} imports {name}"


def test_bundled_shim_runs_without_torch(tiny_bundle: Path):
    """The bundle's own copy of the shim, run from the bundle directory, never loads torch or transformers."""
    code = (
        "import sys, json\n"
        "from runtime_shim.__main__ import main\n"
        "import runtime_shim, runtime_shim.bench, runtime_shim.datafiles\n"
        "assert main(['predict', '.', 'what is my balance']) == 0\n"
        "assert main(['bench', '.', '--runs', '5', '--warmup', '1', '--no-rss']) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'edgepack', 'sklearn'))\n"
        "print(json.dumps({'heavy': heavy, 'shim': runtime_shim.__file__}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tiny_bundle, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert Path(report["shim"]).resolve().parent == (tiny_bundle / "runtime_shim").resolve()


def test_timed_queries_sample_the_whole_split():
    """A labelled file sorted by label (CLINC150's test split starts with 1,000 out-of-scope queries)
    must not be timed on its first rows only: the harness takes every n // runs-th text first."""
    from runtime_shim.bench import spread_order, time_single_queries

    seen: list[str] = []

    class Recorder:
        label_names = ["a", "b"]
        oos_threshold = None

        def encode(self, texts):
            seen.extend(texts)
            return {}

        def forward(self, enc):
            return np.zeros((1, 2), dtype=np.float32)

    texts = [f"t{i}" for i in range(100)]
    time_single_queries(Recorder(), texts, warmup=0, runs=10)
    assert seen == [f"t{i}" for i in range(0, 100, 10)]
    assert sorted(spread_order(7, 3)) == list(range(7))  # a permutation: cycling covers every text
