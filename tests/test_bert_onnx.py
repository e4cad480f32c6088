"""The fused BERT writer (edgepack.stages.export.bert_onnx): same logits as PyTorch, fewer nodes, pruned shapes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tokenizers import Tokenizer

from edgepack import modeling
from edgepack.config import ExportConfig
from edgepack.stages.export import export_onnx
from edgepack.stages.export.bert_onnx import Unsupported, build_graph, supported, write_bert_onnx
from edgepack.stages.prune import structured

TEXTS = ["what is my balance", "book a table for two at seven tonight please", "hi", "transfer money to my savings"]


def _padded(model_dir, texts):
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_truncation()
    tok.enable_padding(pad_id=0)
    encs = tok.encode_batch(texts)
    ids = np.array([e.ids for e in encs], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
    assert (mask == 0).any()  # rows of different lengths: padding must not leak into [CLS]
    return ids, mask


def _torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


def _ort_logits(path, ids, mask):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32)})[0]


def test_fused_graph_matches_pytorch_on_padded_batches(tiny_model, tmp_path):
    model = modeling.load_classifier(tiny_model, attn_implementation="eager").eval()
    ids, mask = _padded(tiny_model, TEXTS)
    path = write_bert_onnx(model, tmp_path / "m.onnx")
    np.testing.assert_allclose(_ort_logits(path, ids, mask), _torch_logits(model, ids, mask), atol=1e-4)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Attention") == 2 and ops.count("EmbedLayerNormalization") == 1
    assert len(ops) < 40  # torch.onnx.export of the same 2-layer model: ~200 nodes


def test_uneven_pruned_heads_write_and_agree(tiny_model, corpus, label_names, tmp_path):
    model = modeling.load_classifier(tiny_model, attn_implementation="eager").eval()
    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    texts = [t for t, _ in corpus["train"]]
    labels = np.array([label_names.index(lab) for _, lab in corpus["train"]])
    head_imp, ffn_imp = structured.importance(model, tok, texts, labels)
    structured.apply_plan(model, structured.make_plan(model, head_imp, ffn_imp, heads=(3, 1), ffn_size=16))
    ids, mask = _padded(tiny_model, TEXTS)
    graph = build_graph(model)
    heads = [a.i for n in graph.graph.node if n.op_type == "Attention" for a in n.attribute if a.name == "num_heads"]
    assert heads == [3, 1]
    inits = {i.name: tuple(i.dims) for i in graph.graph.initializer}
    assert inits["l0_qkv_w"] == (32, 3 * 24) and inits["l1_qkv_w"] == (32, 3 * 8)
    assert inits["l0_ffn_in_w"] == (32, 16) and inits["l1_attn_out_w"] == (8, 32)
    path = write_bert_onnx(model, tmp_path / "pruned.onnx")
    np.testing.assert_allclose(_ort_logits(path, ids, mask), _torch_logits(model, ids, mask), atol=1e-4)


def test_unsupported_models_fall_back_to_torch_export(tiny_model, corpus, tmp_path):
    model = modeling.load_classifier(tiny_model).eval()
    model.config.hidden_act = "relu"
    assert "hidden_act" in supported(model)
    with pytest.raises(Unsupported):
        build_graph(model)
    model.save_pretrained(tmp_path / "relu")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "relu" / name).write_bytes((tiny_model / name).read_bytes())
    texts = [t for t, _ in corpus["val"]]
    rec = export_onnx(ExportConfig(), tmp_path / "relu", tmp_path / "export", texts)
    assert rec["metrics"]["writer"] == "torch" and rec["metrics"]["parity_max_abs_diff"] < 1e-4
    fused = export_onnx(ExportConfig(), tiny_model, tmp_path / "fused", texts)["metrics"]
    torch_ = export_onnx(ExportConfig(writer="torch"), tiny_model, tmp_path / "torch", texts)["metrics"]
    assert fused["writer"] == "fused" and fused["input_names"] == ["input_ids", "attention_mask"]
    assert torch_["writer"] == "torch" and "token_type_ids" in torch_["input_names"]
    assert fused["parity_max_abs_diff"] < 1e-4 and torch_["parity_max_abs_diff"] < 1e-4


@pytest.mark.parametrize("api", ["python", "c"])
def test_session_keeps_add_layernorm_unfused(tiny_model, tmp_path, monkeypatch, api):
    """Through either session API (the C API takes the list as ORT's
    ``optimization.disable_specified_optimizers`` config entry)."""
    import runtime_shim.session as session_mod

    model = modeling.load_classifier(tiny_model, attn_implementation="eager").eval()
    path = write_bert_onnx(model, tmp_path / "m.onnx")
    opt = tmp_path / "optimized.onnx"
    real_so, real_checked = session_mod.session_options, session_mod.checked_options

    def saving(settings):  # the same options, plus: write the graph ORT actually runs
        so = real_so(settings)
        so.optimized_model_filepath = str(opt)
        return so

    def saving_c(settings):
        return {**real_checked(settings), "optimized_model_filepath": str(opt)}

    monkeypatch.setattr(session_mod, "session_options", saving)
    monkeypatch.setattr(session_mod, "checked_options", saving_c)
    session_mod.make_session(path, {"session_api": api})
    kept = [n.op_type for n in onnx.load(str(opt)).graph.node]
    opt.unlink()
    session_mod.make_session(path, {"disabled_optimizers": [], "session_api": api})
    fused = [n.op_type for n in onnx.load(str(opt)).graph.node]
    assert "SkipLayerNormalization" not in kept and "LayerNormalization" in kept
    assert "SkipLayerNormalization" in fused  # what the default setting prevents
