"""Quantization variants on the tiny model: every candidate builds, is measured and lands in the table;
the chosen one is the fastest inside the accuracy budget; the ORT format loads in the shim."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgepack import targets, variants
from edgepack.config import ExportConfig, QuantizeConfig
from edgepack.errors import BudgetError, EdgepackError
from edgepack.export import export_onnx, read_model_info
from edgepack.quantize import count_ops


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory, tiny_model, corpus) -> Path:
    out = tmp_path_factory.mktemp("export")
    # torch.onnx.export's graph: the variants include ORT's optimizer fusions (the fused writer's graph
    # is already fused, and search() leaves that flip out for it).
    export_onnx(ExportConfig(writer="torch"), tiny_model, out, [t for t, _ in corpus["val"]])
    return out / "model.onnx"


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, tiny_bundle, fp32_onnx) -> Path:
    """The bundle's settings and labels with the export's tokenizer (pack may trim the bundle's vocabulary)."""
    dest = tmp_path_factory.mktemp("pipe") / "b"
    shutil.copytree(tiny_bundle, dest)
    shutil.copy2(fp32_onnx.parent / "tokenizer.json", dest / "tokenizer.json")
    return dest


@pytest.fixture(scope="module")
def search(tmp_path_factory, tiny_model, pipeline_dir, fp32_onnx, corpus, label_names):
    val = corpus["val"]
    work = tmp_path_factory.mktemp("variants")
    result = variants.search(
        targets.load("x86-64-vnni"), fp32_onnx, work, info=read_model_info(tiny_model), pipeline_dir=pipeline_dir,
        val_texts=[t for t, _ in val], val_labels=np.array([label_names.index(lab) for _, lab in val]),
        calibration_texts=[t for t, _ in corpus["train"]][:32], max_accuracy_drop=100.0,
        runs=12, warmup=2, latency_texts=8, log=lambda *a: None)
    return result, work


def test_candidates_cover_the_issue_list():
    names = [v.name for v in variants.candidates(targets.load("x86-64-vnni"))]
    assert names[0] == "dyn-u8s8-pc"  # the target's own settings first
    assert {"dyn-u8u8-pc", "dyn-u8s8-pc-rr", "dyn-u8s8-pt", "dyn-u8s8-pc-fused", "qdq-u8s8-pc", "nbits4-b32"} <= set(names)
    assert len(names) == len(set(names))
    avx2 = [v.name for v in variants.candidates(targets.load("x86-64-avx2"))]
    # the target's per-channel 7-bit weights first, then without the saturation guard and per-tensor
    assert avx2[0] == "dyn-u8s8-pc-rr" and {"dyn-u8s8-pc", "dyn-u8s8-pt-rr"} <= set(avx2)
    assert [v.name for v in variants.candidates(targets.load("arm64"), formats=("dynamic",))][-1] == "dyn-u8s8-pc-fused"


def test_every_variant_measured_and_chosen_marked(search):
    result, work = search
    rows = {r["name"]: r for r in result.rows}
    assert rows["fp32"]["accuracy_drop"] == 0.0
    measured = [r for r in result.rows if r["name"] != "fp32" and "p50_ms" in r]
    assert len(measured) >= 5, [r.get("error") for r in result.rows]
    for r in measured:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["p95_ms"] >= r["p50_ms"] > 0 and r["n"] >= 10
    fastest = min(r["p50_ms"] for r in measured)
    tied = [r for r in measured if r["p50_ms"] <= fastest * (1 + result.tie_pct / 100)]
    assert result.chosen == min(tied, key=lambda r: (-r["agreement"], r["p50_ms"]))["name"]
    assert all("accuracy_calibrated" in r for r in measured)  # the tiny data has an oos label
    table = result.table()
    assert any(line.startswith("*") and result.chosen in line for line in table.splitlines())
    saved = json.loads((work / variants.VARIANTS_JSON).read_text())
    assert saved["chosen"] == result.chosen and len(saved["rows"]) == len(result.rows)


def test_variant_graphs_are_what_they_claim(search):
    result, _ = search
    ops = {r["name"]: count_ops(Path(r["path"])) for r in result.rows if r["name"] != "fp32" and "error" not in r}
    assert ops["dyn-u8s8-pc"].get("DynamicQuantizeLinear") or ops["dyn-u8s8-pc"].get("MatMulInteger")
    assert ops["dyn-u8s8-pc-fused"].get("QAttention", 0) == 2  # fused before quantizing: Attention quantized whole
    assert ops["qdq-u8s8-pc"].get("QuantizeLinear", 0) > 0 and ops["qdq-u8s8-pc"].get("DequantizeLinear", 0) > 0
    assert ops["nbits4-b32"].get("MatMulNBits", 0) > 0


def test_chosen_model_copied(search, tmp_path):
    result, _ = search
    dest = variants.chosen_model(result, tmp_path / "model.quant.onnx")
    assert dest.read_bytes() == Path(result.row(result.chosen)["path"]).read_bytes()


def test_no_variant_within_budget_is_refused(tmp_path, tiny_model, pipeline_dir, fp32_onnx, corpus, label_names):
    val = corpus["val"][:10]
    with pytest.raises(BudgetError, match="no quantization variant for x86-64-vnni stays within -1 points"):
        variants.search(targets.load("x86-64-vnni"), fp32_onnx, tmp_path, info=read_model_info(tiny_model),
                        pipeline_dir=pipeline_dir, val_texts=[t for t, _ in val],
                        val_labels=np.array([label_names.index(lab) for _, lab in val]), calibration_texts=[],
                        max_accuracy_drop=-1.0, runs=2, warmup=0, formats=("dynamic",), log=lambda *a: None)
    assert (tmp_path / variants.VARIANTS_JSON).is_file()  # the table is kept for the post-mortem


def test_static_qdq_needs_calibration(tmp_path, tiny_model, fp32_onnx):
    with pytest.raises(EdgepackError, match="static-qdq needs calibration rows"):
        variants.quantize_other(QuantizeConfig(format="static-qdq"), fp32_onnx, tmp_path / "q.onnx",
                                info=read_model_info(tiny_model))


def test_ort_format_loads_in_the_shim(tmp_path, tiny_bundle):
    from edgepack.ortformat import REQUIRED_OPERATORS, write_ort
    from runtime_shim import OnnxPipeline

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    model, config = write_ort(bundle / "model.quant.onnx", bundle)
    assert model.name == "model.ort" and config.name == REQUIRED_OPERATORS
    ops = config.read_text()
    assert "ai.onnx;" in ops and "com.microsoft;1;" in ops and "DynamicQuantizeMatMul" in ops
    onnx_pipe = OnnxPipeline(bundle, verify=False)
    ort_pipe = OnnxPipeline(bundle, verify=False, overrides={"model": "model.ort"})
    texts = ["set an alarm for noon", "what is the weather in paris"]
    enc = onnx_pipe.encode(texts)
    np.testing.assert_allclose(ort_pipe.forward(enc), onnx_pipe.forward(enc), atol=1e-5)


@pytest.mark.parametrize("fmt", ["static-qdq", "matmul-nbits"])
def test_quantizers_leave_the_working_directory_alone(fmt, tmp_path, monkeypatch, tiny_model, fp32_onnx, pipeline_dir):
    """ORT's shape inference drops scratch files into the current directory; they must not land in a checkout."""
    from edgepack.config import QuantizeConfig
    from runtime_shim import OnnxPipeline

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    pipe = OnnxPipeline(pipeline_dir, verify=False, overrides={"model": str(fp32_onnx)})
    feeds = [pipe.encode(["what is my balance"]), pipe.encode(["set an alarm for 7"])]
    out = tmp_path / "q.onnx"
    variants.quantize_other(QuantizeConfig(format=fmt, per_channel=True), fp32_onnx, out,
                            info=read_model_info(tiny_model), calibration=feeds)
    assert out.stat().st_size > 0
    assert list(cwd.iterdir()) == []
