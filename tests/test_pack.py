"""edgepack pack on a tiny real model: export parity, quantized nodes, the bundle's files and
manifest, the accuracy gate, the out-of-scope threshold and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgepack.cli import main
from edgepack.config import DataConfig, ExportConfig
from edgepack.errors import ExitCode

BUNDLE_FILES = {"model.quant.onnx", "tokenizer.json", "labels.json", "runtime.json", "manifest.json", "eval.jsonl",
                "requirements.txt", "config.json"}


def test_bundle_layout_and_manifest(tiny_bundle: Path):
    names = {p.name for p in tiny_bundle.iterdir()}
    assert BUNDLE_FILES <= names and "runtime_shim" in names
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    files = manifest["files"]
    on_disk = {p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*")
               if p.is_file() and p.name != "manifest.json" and "__pycache__" not in p.parts}
    assert set(files) == on_disk
    assert "runtime_shim/pipeline.py" in files
    assert files["model.quant.onnx"]["bytes"] == (tiny_bundle / "model.quant.onnx").stat().st_size
    assert manifest["metrics"]["parity_max_abs_diff"] < 1e-3
    assert manifest["versions"]["onnxruntime"]
    assert manifest["target"]["name"]
    req = (tiny_bundle / "requirements.txt").read_text().split()
    assert [r.split(">=")[0] for r in req] == ["onnxruntime", "tokenizers", "numpy"]


def test_labels_mark_out_of_scope_with_threshold(tiny_bundle: Path, label_names):
    labels = json.loads((tiny_bundle / "labels.json").read_text())
    assert labels["labels"] == label_names
    assert labels["oos_label"] == "oos"
    assert 0.0 <= labels["oos_threshold"] <= 1.0


def test_int8_quantized_matmuls(tiny_bundle: Path):
    from edgepack.stages.quantize.formats import count_ops

    ops = count_ops(tiny_bundle / "model.quant.onnx")
    # The fused writer: per layer one Attention (Q, K, V in one weight) and three weight MatMuls (attention
    # output, FFN in, FFN out), plus pooler and classifier; every one of them int8.
    assert ops.get("QAttention", 0) == 2 and "Attention" not in ops
    assert ops.get("MatMulInteger", 0) == 2 * 3 + 2
    assert "MatMul" not in ops
    assert ops.get("QEmbedLayerNormalization", 0) == 1
    # Add + LayerNormalization on purpose: ORT's SkipLayerNormalization kernel is slower on CPU.
    assert "SkipLayerNormalization" not in ops and ops.get("LayerNormalization", 0) == 4


def test_export_parity_and_dynamic_axes(tmp_path, tiny_model, corpus):
    import onnx

    from edgepack.stages.export import export_onnx

    texts = [t for t, _ in corpus["val"]]
    rec = export_onnx(ExportConfig(), tiny_model, tmp_path / "export", texts)
    assert rec["metrics"]["parity_max_abs_diff"] < 1e-4
    assert set(rec) >= {"stage", "config", "config_hash", "input_hash", "metrics", "versions", "wall_time_s"}
    graph = onnx.load(str(tmp_path / "export" / "model.onnx")).graph
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]


def test_accuracy_gate_refuses_and_writes_nothing(tmp_path, tiny_model, clinc_json, monkeypatch, capsys):
    import edgepack.stages.quantize as pack_mod

    real = pack_mod.evaluate
    calls = {"n": 0}

    def wrecked_int8(pipe, split, **kw):  # the second call evaluates the int8 model: make it wrong
        calls["n"] += 1
        probs = real(pipe, split, **kw)
        return np.roll(probs, 1, axis=1) if calls["n"] == 2 else probs

    monkeypatch.setattr(pack_mod, "evaluate", wrecked_int8)
    out = tmp_path / "bundle"
    code = main(["pack", str(tiny_model), "--data", str(clinc_json), "--out", str(out), "--max-accuracy-drop", "1"])
    err = capsys.readouterr().err
    assert code == ExitCode.BUDGET
    assert "--max-accuracy-drop" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_agreement_gate_sees_flips_the_accuracy_gate_does_not(tmp_path, tiny_model, clinc_json, monkeypatch, capsys):
    import edgepack.stages.quantize as quantize_mod

    real = quantize_mod.evaluate
    calls = {"n": 0}

    def flipped_int8(pipe, split, **kw):  # int8 answers one row differently: accuracy moves little
        calls["n"] += 1
        probs = real(pipe, split, **kw)
        if calls["n"] == 2:
            probs = probs.copy()
            probs[0] = np.roll(probs[0], 1)
        return probs

    monkeypatch.setattr(quantize_mod, "evaluate", flipped_int8)
    out = tmp_path / "bundle"
    code = main(["pack", str(tiny_model), "--data", str(clinc_json), "--out", str(out), "--max-accuracy-drop", "100",
                 "--min-agreement", "1.0"])
    err = capsys.readouterr().err
    assert code == ExitCode.BUDGET and "--min-agreement" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_existing_output_refused_unless_force(tmp_path, tiny_bundle, tiny_model, clinc_json, capsys):
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    before = (out / "manifest.json").read_bytes()
    code = main(["pack", str(tiny_model), "--data", str(clinc_json), "--out", str(out)])
    assert code == ExitCode.USAGE and "--force" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == before


def test_pack_cli_writer_torch_bundles_the_exported_graph(tmp_path, tiny_model, clinc_json, capsys):
    from edgepack.stages.quantize.formats import count_ops
    from runtime_shim import OnnxPipeline

    out = tmp_path / "torch-writer"
    code = main(["pack", str(tiny_model), "--data", str(clinc_json), "--out", str(out), "--writer", "torch",
                 "--max-accuracy-drop", "100", "--min-agreement", "0"])
    assert code == 0, capsys.readouterr().err
    assert "torch writer" in capsys.readouterr().out
    assert "QAttention" not in count_ops(out / "model.quant.onnx")  # the exported graph as it is, unfused
    pipe = OnnxPipeline(out)
    assert "token_type_ids" in pipe.input_names and pipe("what is my balance")[0]["label"]


@pytest.mark.parametrize("case", ["unknown_label", "no_id2label", "not_classifier", "empty_data", "missing_dir"])
def test_bad_input_one_line(case, tmp_path, tiny_model, clinc_json, capsys):
    model, data = tiny_model, clinc_json
    if case == "unknown_label":
        rows = json.loads(clinc_json.read_text())
        rows["train"].append(["order a pizza", "food_order"])
        data = tmp_path / "bad.json"
        data.write_text(json.dumps(rows))
    elif case in ("no_id2label", "not_classifier"):
        model = tmp_path / "model"
        shutil.copytree(tiny_model, model)
        cfg = json.loads((model / "config.json").read_text())
        if case == "no_id2label":
            cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(len(cfg["id2label"]))}
        else:
            cfg["architectures"] = ["BertModel"]
        (model / "config.json").write_text(json.dumps(cfg))
    elif case == "empty_data":
        data = tmp_path / "empty.jsonl"
        data.write_text("")
    else:
        model = tmp_path / "nope"
    out = tmp_path / "out"
    code = main(["pack", str(model), "--data", str(data), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == ExitCode.USAGE, err
    assert len(err.splitlines()) == 1 and err.startswith("edgepack pack: error:")
    assert not out.exists()
    expected = {"unknown_label": "food_order", "no_id2label": "id2label", "not_classifier": "BertModel",
                "empty_data": "empty", "missing_dir": "nope"}[case]
    assert expected in err


def test_non_classifier_onnx_refused(tmp_path, tiny_model, clinc_json, capsys):
    import onnx
    from onnx import TensorProto, helper

    model = tmp_path / "onnxdir"
    model.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy2(tiny_model / name, model / name)
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    graph = helper.make_graph([helper.make_node("Relu", ["pixels"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(model / "model.onnx"))
    code = main(["pack", str(model), "--data", str(clinc_json), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE and "input_ids" in err


def test_pack_from_onnx_export_dir(tmp_path, tiny_model, clinc_json, corpus):
    """A user who exported elsewhere enters at pack with model.onnx + tokenizer.json + config.json."""
    from edgepack.stages.export import export_onnx

    export_onnx(ExportConfig(), tiny_model, tmp_path / "exported", [t for t, _ in corpus["val"]])
    out = tmp_path / "bundle"
    code = main(["pack", str(tmp_path / "exported"), "--data", str(clinc_json), "--out", str(out),
                 "--max-accuracy-drop", "100", "--min-agreement", "0", "--archive"])
    assert code == 0
    assert (out / "model.quant.onnx").is_file()
    assert (tmp_path / "bundle.tar.gz").stat().st_size > 1000


def test_dataset_formats_bind_labels(tmp_path, corpus, label_names):
    """JSONL and CSV read through `datasets`, labels bound to the model's ids, missing splits made."""
    from edgepack.data import load_dataset

    rows = [r for split in corpus.values() for r in split]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"q": t, "intent": lab}) for t, lab in rows))
    csv = tmp_path / "d.csv"
    csv.write_text("q,intent\n" + "\n".join(f'"{t}",{lab}' for t, lab in rows))
    id2label = dict(enumerate(label_names))
    for path in (jsonl, csv):
        d = load_dataset(DataConfig(source=str(path), text_column="q", label_column="intent"), id2label)
        assert set(d.splits) == {"train", "validation", "test"} and set(d.made_splits) == {"validation", "test"}
        assert sum(len(s) for s in d.splits.values()) == len(rows)
        assert d.oos_label == "oos"
        # stratified: every label appears in the carved-out test split
        assert set(d["test"].labels.tolist()) == set(range(len(label_names)))
        again = load_dataset(DataConfig(source=str(path), text_column="q", label_column="intent"), id2label)
        assert again["test"].texts == d["test"].texts  # seeded


def test_calibrated_threshold_maximises_accuracy():
    from edgepack.metrics import apply_threshold, calibrate_threshold, softmax

    rng = np.random.default_rng(1)
    probs = softmax(rng.normal(size=(300, 6)) * 2)
    labels = rng.integers(0, 6, 300)
    t = calibrate_threshold(probs, labels, oos_id=5, rule="max")
    grid = np.linspace(0, 1, 2001)
    accs = np.array([(apply_threshold(probs, 5, c) == labels).mean() for c in grid])
    assert (apply_threshold(probs, 5, t) == labels).mean() == pytest.approx(accs.max(), abs=1e-9)
    # one-se (the default): the largest threshold within one standard error of the best accuracy
    se = np.sqrt(accs.max() * (1 - accs.max()) / len(labels))
    t1 = calibrate_threshold(probs, labels, oos_id=5)
    assert t1 >= t
    assert (apply_threshold(probs, 5, t1) == labels).mean() >= accs.max() - se - 1e-9
    assert t1 >= grid[np.flatnonzero(accs >= accs.max() - se - 1e-9)[-1]] - 1e-3
    # grid: the smallest of 0, 0.02, ..., 1 with the best accuracy on that grid (never above "max")
    tg = calibrate_threshold(probs, labels, oos_id=5, rule="grid")
    coarse = np.array([(apply_threshold(probs, 5, c) == labels).mean() for c in np.arange(51) * 0.02])
    assert tg == pytest.approx(0.02 * int(np.argmax(coarse)))
    assert (apply_threshold(probs, 5, tg) == labels).mean() <= accs.max() + 1e-9
    with pytest.raises(ValueError, match="one of: one-se, max, grid"):
        calibrate_threshold(probs, labels, oos_id=5, rule="best")
    t90 = calibrate_threshold(probs, labels, oos_id=5, target_recall=0.9)
    pred = apply_threshold(probs, 5, t90)
    assert (pred[labels == 5] == 5).mean() >= 0.9


def test_unreachable_rows_are_never_produced(tiny_model, corpus):
    """Every id the tokenizer emits (on the corpus and on odd text) survives exact trimming, and the
    placeholder, split-off continuation and accent-folded rows go."""
    from tokenizers import Tokenizer

    from edgepack.stages.export.unreachable import reachable_ids

    tok_json = json.loads((tiny_model / "tokenizer.json").read_text())
    vocab = tok_json["model"]["vocab"]
    for extra in ("[unused0]", "##!", "é", "##é"):
        vocab.setdefault(extra, len(vocab))
    keep = set(reachable_ids(tok_json).tolist())
    tok = Tokenizer.from_str(json.dumps(tok_json))
    texts = [t for t, _ in corpus["test"]] + ["Héllo!! [unused0] wörld ¿qué? 東京 e-mail $200.50"]
    emitted = {i for t in texts for i in tok.encode(t).ids}
    assert emitted <= keep
    assert {vocab["[unused0]"], vocab["##!"], vocab["é"], vocab["##é"]}.isdisjoint(keep)
    assert {vocab["[PAD]"], vocab["[UNK]"], vocab["[CLS]"], vocab["[SEP]"]} <= keep


def test_export_trims_positions_to_max_length(tmp_path, tiny_model, corpus):
    from edgepack.stages.export import export_onnx

    rec = export_onnx(ExportConfig(), tiny_model, tmp_path / "e", [t for t, _ in corpus["val"]], max_length=32)
    trim = rec["metrics"]["unreachable_trimmed"]
    assert trim["positions_before"] == 128 and trim["positions_after"] == 32
    assert json.loads((tmp_path / "e" / "config.json").read_text())["max_position_embeddings"] == 32
    assert rec["metrics"]["parity_max_abs_diff"] < 1e-4


def test_pack_a_model_with_uneven_pruned_heads(tmp_path, tiny_model, clinc_json):
    """prune -> pack: heads sliced per layer (no transformers class for it) export and bundle."""
    import onnx

    pruned = tmp_path / "pruned"
    assert main(["prune", str(tiny_model), "--data", str(clinc_json), "--out", str(pruned), "--heads-per-layer",
                 "3,1", "--ffn-size", "16", "--no-recover", "--importance-rows", "16"]) == 0
    out = tmp_path / "bundle"
    assert main(["pack", str(pruned), "--data", str(clinc_json), "--out", str(out), "--max-accuracy-drop", "100", "--min-agreement", "0"]) == 0
    from runtime_shim import OnnxPipeline

    assert OnnxPipeline(out)("what is my checking balance")[0]["label"]
    shapes = [tuple(d.dims) for d in onnx.load(str(out / "model.quant.onnx")).graph.initializer
              if d.data_type == onnx.TensorProto.INT8 and len(d.dims) == 2]
    assert (32, 16) in shapes and (16, 32) in shapes  # the pruned FFN, int8


def test_embedding_bits_4_stores_the_table_in_4bit_blocks(tmp_path, tiny_model, clinc_json, tiny_bundle):
    import onnx
    from onnx import numpy_helper

    from edgepack.config import DataConfig, PackConfig
    from edgepack.runner.pack import pack
    from edgepack.stages.quantize.formats import count_ops
    from runtime_shim import OnnxPipeline

    out = tmp_path / "emb4"
    pack(PackConfig.of(max_accuracy_drop=100.0, min_agreement=0.0, eval_rows=20, embedding_bits=4), tiny_model,
         DataConfig(source=str(clinc_json)), out, log=lambda *a: None)
    ops = count_ops(out / "model.quant.onnx")
    assert ops.get("DequantizeLinear") == 1 and ops.get("BitShift") == 1 and "EmbedLayerNormalization" not in ops
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out / "model.quant.onnx")).graph.initializer}
    packed = next(v for k, v in inits.items() if k.endswith("_q4"))
    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    assert packed.dtype == np.uint8 and packed.shape == (vocab, 32 // 2)  # two 4-bit weights a byte
    assert not any(v.dtype == np.float32 and v.shape == (vocab, 32) for v in inits.values())  # no fp32 table left
    eight = OnnxPipeline(tiny_bundle)
    four = OnnxPipeline(out)
    queries = ["what is my balance", "book a flight to paris", "tell me a joke about cats"]
    a = [r[0]["label"] for r in eight(queries, top_k=1)]
    b = [r[0]["label"] for r in four(queries, top_k=1)]
    assert sum(x == y for x, y in zip(a, b, strict=True)) >= 2


def test_4bit_embedding_decodes_to_its_blocks(tmp_path):
    """The decode graph returns exactly the dequantised blocks, within half a step of the weights."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgepack.stages.quantize.formats import quantize_embedding_4bit

    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT32, [1, "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(table, "table")])
    src = tmp_path / "g.onnx"
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(src))
    out = quantize_embedding_4bit(src, tmp_path / "q.onnx", 16)
    ids = np.array([[0, 7, 49, 7]], dtype=np.int32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0][0]
    blocks = table[ids[0]].reshape(4, 4, 16)
    step = (blocks.max(axis=2) - blocks.min(axis=2)) / 15.0
    err = np.abs(got.reshape(4, 4, 16) - blocks)
    assert (err <= step[:, :, None] * 0.5 + 1e-6).all()
    assert np.array_equal(got[1], got[3])  # same id, same row


def test_pack_with_a_target_file(tmp_path, tiny_model, clinc_json):
    """``--target my.toml``: a target file outside targets/ quantizes the bundle with its settings (the
    file's path was once replaced by its name, which no targets/ directory knows)."""
    from edgepack.config import PackConfig
    from edgepack.runner.pack import pack

    target = tmp_path / "my-plain-int8.toml"
    target.write_text('name = "my-plain-int8"\narch = "x86_64"\n[quantize]\nweight_type = "qint8"\n'
                      "per_channel = false\nreduce_range = false\n")
    manifest = pack(PackConfig.of(target=str(target), max_accuracy_drop=100.0, min_agreement=0.0, eval_rows=20),
                    tiny_model, DataConfig(source=str(clinc_json)), tmp_path / "b", log=lambda *a: None)
    assert manifest["target"]["name"] == "my-plain-int8"
    record = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert record["target"]["name"] == "my-plain-int8"
