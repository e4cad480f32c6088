"""edgepack quantize: an ONNX model exported elsewhere enters the chain."""

from __future__ import annotations

import json

import pytest

from edgepack.cli import main
from edgepack.config import ExportConfig
from edgepack.errors import ExitCode


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model, corpus):
    from edgepack.stages.export import export_onnx

    out = tmp_path_factory.mktemp("exported")
    export_onnx(ExportConfig(), tiny_model, out, [t for t, _ in corpus["val"]])
    return out


def test_quantize_an_onnx_file(exported, tmp_path, capsys):
    from edgepack.stages.quantize.formats import count_ops

    out = tmp_path / "q"
    assert main(["quantize", str(exported / "model.onnx"), "--out", str(out), "--target", "x86-64-avx2"]) == 0
    assert "no accuracy check" in capsys.readouterr().out
    ops = count_ops(out / "model.quant.onnx")
    assert any(op in ops for op in ("QAttention", "MatMulInteger", "DynamicQuantizeMatMul"))
    rec = json.loads((out / "stage.json").read_text())
    assert rec["stage"] == "quantize" and rec["target"]["name"] == "x86-64-avx2"


def test_quantize_with_data_runs_the_gate_and_the_output_runs(exported, tmp_path, clinc_json, capsys):
    from runtime_shim import OnnxPipeline

    out = tmp_path / "q"
    code = main(["quantize", str(exported), "--out", str(out), "--data", str(clinc_json), "--max-accuracy-drop", "100",
                 "--min-agreement", "0"])
    assert code == 0, capsys.readouterr().err
    rec = json.loads((out / "stage.json").read_text())
    v = rec["metrics"]["validation"]
    assert 0.0 <= v["agreement_fp32_int8"] <= 1.0
    # the gate's paired interval against fp32, at the stage's default confidence
    assert v["drop_low"] <= v["accuracy_drop_points"] + 1e-9 <= v["drop_high"] + 2e-9 and v["confidence"] == 0.95
    assert rec["config"]["objective"] == "p95"  # edgepack quantize ranks variants by the default figure
    assert v["verdict"].startswith("inside") and v["verdict_text"] in capsys.readouterr().out
    assert OnnxPipeline(out, verify=False)("what is my checking balance")[0]["label"]


def test_quantize_refuses_a_missing_model_in_one_line(tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "q")]) == ExitCode.USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.onnx" in err



def test_quantize_gate_missed_exits_3(exported, tmp_path, clinc_json, monkeypatch, capsys):
    """An int8 model that answers wrong (its probabilities rolled by one label): the accuracy gate refuses
    it, exit 3, one line naming the gate, nothing written."""
    import numpy as np

    import edgepack.stages.quantize as quantize_mod

    real, calls = quantize_mod.evaluate, {"n": 0}

    def wrecked_int8(pipe, split, **kw):  # the second call evaluates the int8 model
        calls["n"] += 1
        probs = real(pipe, split, **kw)
        return np.roll(probs, 1, axis=1) if calls["n"] == 2 else probs

    monkeypatch.setattr(quantize_mod, "evaluate", wrecked_int8)
    out = tmp_path / "q"
    code = main(["quantize", str(exported), "--out", str(out), "--data", str(clinc_json), "--max-accuracy-drop", "1"])
    err = capsys.readouterr().err.strip()
    assert code == ExitCode.BUDGET, err
    assert len(err.splitlines()) == 1 and "--max-accuracy-drop" in err and not out.exists()
