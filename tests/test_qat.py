"""Quantization-aware training: the simulated rounding against ORT's own, a real QAT recovery, its export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgepack import targets
from edgepack.cli import main
from edgepack.training import qat


@pytest.fixture(autouse=True)
def _teacher_cache(tmp_path, monkeypatch):
    import edgepack.training.teacher_cache as tc

    monkeypatch.setattr(tc, "DEFAULT_CACHE", tmp_path / "cache")


def _weights(rows=6, cols=40, seed=0):
    w = np.random.default_rng(seed).normal(size=(rows, cols)).astype(np.float32)
    w[1] *= 20  # channels of very different ranges: per-channel scales matter
    w[2] = np.abs(w[2])  # a channel with no negative values
    return w


def _ort_weight(w, *, signed, reduce_range, per_channel):
    """What ``quantize_dynamic`` stores for a MatMul weight (B = w.T, channel axis 1 = rows of w), dequantized."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    qtype = TensorProto.INT8 if signed else TensorProto.UINT8
    blocks = list(w) if per_channel else [w]
    out = []
    for block in blocks:
        zero, scale, q = quantize_data(block.ravel(), qtype, signed, reduce_range=reduce_range)
        out.append(((q.astype(np.float64) - float(zero)) * float(scale)).reshape(block.shape))
    return np.stack(out) if per_channel else out[0]


@pytest.mark.parametrize("signed,bits,per_channel", [(True, 7, True), (True, 8, True), (True, 8, False),
                                                     (False, 8, True), (False, 7, False)])
def test_weight_grid_is_ort_quantizers(signed, bits, per_channel):
    w = _weights()
    scheme = qat.Scheme("t", weight_signed=signed, weight_bits=bits, per_channel=per_channel)
    ours = qat.quantize_weight(torch.from_numpy(w), scheme).numpy()
    theirs = _ort_weight(w, signed=signed, reduce_range=bits == 7, per_channel=per_channel)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(w).max())
    if signed:  # symmetric: every row is an integer multiple of its scale, within +-qmax
        qmax = 64 if bits == 7 else 127
        absmax = np.abs(w).max(axis=1, keepdims=True) if per_channel else np.abs(w).max()
        codes = ours / (absmax / qmax)
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
        assert np.abs(np.round(codes)).max() == qmax
        # per channel, the small row keeps its own fine grid; one scale for the tensor collapses it
        levels = len(np.unique(np.round(codes[0])))
        assert levels > 20 if per_channel else levels < 20


def test_activation_rounding_is_dynamic_quantize_linear():
    """The rounding of a Linear's input equals ORT's DynamicQuantizeLinear -> DequantizeLinear."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "dq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for x in (rng.normal(size=(7, 33)).astype(np.float32) * 3, np.abs(rng.normal(size=(4, 9))).astype(np.float32),
              -np.abs(rng.normal(size=(4, 9))).astype(np.float32) - 1):
        want = sess.run(None, {"x": x})[0]
        got = qat.quantize_activation(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(x).max())


def test_straight_through_gradient():
    w = torch.from_numpy(_weights()).requires_grad_(True)
    scheme = qat.Scheme("t", weight_bits=7)
    (qat.quantize_weight(w, scheme) * 3).sum().backward()
    assert torch.equal(w.grad, torch.full_like(w, 3.0))
    x = torch.randn(5, 8, requires_grad=True)
    qat.quantize_activation(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_targets_give_their_schemes():
    avx2, arm = qat.scheme_for(targets.load("x86-64-avx2")), qat.scheme_for(targets.load("arm64"))
    assert (avx2.weight_signed, avx2.weight_bits, avx2.per_channel) == (True, 7, True)
    assert (arm.weight_signed, arm.weight_bits, arm.per_channel) == (True, 8, True)
    assert qat.target_name("arm64") == "arm64"


def test_fake_quantized_swaps_and_restores(tiny_model):
    from edgepack.modeling import load_classifier

    model = load_classifier(tiny_model).eval()
    keys = list(model.state_dict())
    ids = torch.tensor([[2, 7, 9, 11, 3]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with qat.fake_quantized(model, qat.resolve("x86-64-avx2")):
            n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
            assert qat.count_quantized(model) == n_linear + 1  # every Linear and the word table
            simulated = model(input_ids=ids).logits
            assert list(model.state_dict()) == keys  # checkpoints save and reload as usual
        assert qat.count_quantized(model) == 0
        assert torch.equal(model(input_ids=ids).logits, plain)
    assert not torch.equal(simulated, plain)
    assert torch.allclose(simulated, plain, atol=0.2 * plain.abs().max().item())


def test_qat_recovery_records_scheme_exports_and_runs(tiny_model, clinc_json, tmp_path, capsys):
    from runtime_shim import OnnxPipeline

    pruned = tmp_path / "pruned"
    code = main(["prune", str(tiny_model), "--data", str(clinc_json), "--out", str(pruned), "--heads-per-layer", "2",
                 "--epochs", "1", "--importance-rows", "32", "--qat", "--qat-target", "x86-64-avx2"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((pruned / "stage.json").read_text())
    recover = record["metrics"]["steps"][-1]
    assert recover["step"] == "recover" and recover["distill"]["qat"] is True
    assert recover["distill"]["qat_target"] == "x86-64-avx2"
    assert record["metrics"]["qat"]["target"] == "x86-64-avx2" and record["metrics"]["qat"]["weight_bits"] == 7
    from edgepack.modeling import load_classifier

    assert qat.count_quantized(load_classifier(pruned)) == 0  # saved as a plain fp32 classifier

    bundle = tmp_path / "bundle"
    code = main(["pack", str(pruned), "--data", str(clinc_json), "--out", str(bundle), "--target", "x86-64-avx2",
                 "--max-accuracy-drop", "100", "--min-agreement", "0"])
    assert code == 0, capsys.readouterr().err
    from edgepack.stages.quantize.formats import count_ops

    ops = count_ops(bundle / "model.quant.onnx")
    assert ops.get("MatMulInteger", 0) + ops.get("QAttention", 0) + ops.get("DynamicQuantizeMatMul", 0) > 0
    answer = OnnxPipeline(bundle)("what is my checking balance")[0]
    assert answer["label"] in {"alarm", "balance", "oos", "transfer", "weather"}


def test_without_qat_the_record_says_none(tiny_model, clinc_json, tmp_path, capsys):
    pruned = tmp_path / "plain"
    code = main(["prune", str(tiny_model), "--data", str(clinc_json), "--out", str(pruned), "--heads-per-layer", "2",
                 "--epochs", "1", "--importance-rows", "32"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((pruned / "stage.json").read_text())
    assert record["metrics"]["qat"] is None and record["metrics"]["steps"][-1]["distill"]["qat"] is False


def test_unknown_qat_target_is_one_line(tiny_model, clinc_json, tmp_path, capsys):
    out = tmp_path / "x"
    code = main(["prune", str(tiny_model), "--data", str(clinc_json), "--out", str(out), "--heads-per-layer", "2",
                 "--epochs", "1", "--importance-rows", "32", "--qat", "--qat-target", "no-such-cpu"])
    err = capsys.readouterr().err
    assert code != 0 and "unknown target 'no-such-cpu'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_distill_flags_set_the_config(tmp_path):
    from edgepack.cli import make_parser
    from edgepack.commands.distill import resolve_config

    base = ["distill", str(tmp_path), "--data", "x.json", "--out", str(tmp_path / "s")]
    assert resolve_config(make_parser().parse_args(base)).qat is False
    cfg = resolve_config(make_parser().parse_args(base + ["--qat", "--qat-target", "arm64"]))
    assert cfg.qat is True and cfg.qat_target == "arm64"


@pytest.mark.slow
def test_build_trains_for_the_profiles_target(tmp_path, tiny_model, clinc_json, capsys):
    """In a build, qat_target "auto" becomes the quantize target (the profile's), in the ledger key too."""
    from test_build import write_recipe

    recipe = write_recipe(tmp_path / "recipe.toml", teacher=tiny_model, out=tmp_path / "bundle", data=clinc_json,
                          recover_epochs="1\nqat = true")
    # --max-drop 100: whether a tiny model trained for one epoch stays near its teacher is luck
    assert main(["build", str(recipe), "--max-drop", "100"]) == 0, capsys.readouterr().err
    build = tmp_path / "bundle.build"
    want = qat.scheme_for(targets.load("x86-64-vnni"))  # tiny-box.toml is edge-x86-2core: x86-64-vnni
    assert json.loads((build / "prune" / "stage.json").read_text())["metrics"]["qat"]["weight_bits"] == want.weight_bits
    ledger = json.loads((build / "ledger" / "prune.json").read_text())
    assert ledger["config"]["prune"]["recovery"]["qat_target"] == "x86-64-vnni"
    assert json.loads((build / "distill" / "stage.json").read_text())["metrics"]["qat"] is None  # distill: off
