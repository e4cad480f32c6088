"""Write the static student (``edgepack.static_model``) as a small ONNX graph:

    Gather(table, input_ids) -> masked mean (Mul, ReduceSum, ReduceSum, Max, Div)
        [-> masked max (Sub, Mul, Add, ReduceMax), Concat] [-> MatMul, Add, Relu] -> MatMul, Add -> logits

Same inputs as the fused BERT writer (``input_ids`` and ``attention_mask``, int32, right-padded) and the
same ``logits`` output, so ``runtime_shim.OnnxPipeline`` runs it unchanged. The table is a plain
Gather: dynamic quantization stores it in 8 bits (Gather + DequantizeLinear) and
``quantize_embedding_4bit`` finds it for 4 bits. ``producer_name`` is ``edgepack``: nothing for ORT's
transformer optimizer to fuse (the quantize variants skip the "fused" flip for it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgepack.stages.export.bert_onnx import _Graph, _np
from edgepack.static_model import MASK_FILL


def build_graph(model, *, opset: int = 17) -> onnx.ModelProto:
    """The ONNX model of a ``StaticEmbeddingForSequenceClassification``."""
    cfg = model.config
    g = _Graph()
    x = g.node("Gather", [g.weight("word_embeddings", model.word_embeddings.weight), "input_ids"],
               name="word_gather", axis=0)  # [batch, sequence, hidden]
    mask = g.node("Cast", ["attention_mask"], name="mask_float", to=TensorProto.FLOAT)
    mask = g.node("Unsqueeze", [mask, g.const("axis2", np.array([2], dtype=np.int64))], name="mask_3d")
    axis1 = g.const("axis1", np.array([1], dtype=np.int64))
    total = g.node("ReduceSum", [g.node("Mul", [x, mask], name="masked"), axis1], name="sum", keepdims=0)
    count = g.node("ReduceSum", [mask, axis1], name="count", keepdims=0)  # [batch, 1]
    count = g.node("Max", [count, g.const("one", np.array(1.0, dtype=np.float32))], name="count_min1")
    h = g.node("Div", [total, count], name="mean")
    if cfg.pooling == "mean_max":
        # x + (mask - 1) * 1e4: padded positions fall far below every real row before the maximum.
        off = g.node("Sub", [mask, g.const("one_b", np.array(1.0, dtype=np.float32))], name="mask_off")
        off = g.node("Mul", [off, g.const("fill", np.array(-MASK_FILL, dtype=np.float32))], name="mask_fill")
        shifted = g.node("Add", [x, off], name="masked_max_in")
        # ReduceMax takes its axes as an input from opset 18, as an attribute before.
        top = (g.node("ReduceMax", [shifted, axis1], name="max", keepdims=0) if opset >= 18
               else g.node("ReduceMax", [shifted], name="max", keepdims=0, axes=[1]))
        h = g.node("Concat", [h, top], name="mean_max", axis=-1)
    if model.hidden is not None:
        h = g.matmul(h, model.hidden, "hidden")
        h = g.node("Add", [h, g.weight("hidden_b", model.hidden.bias)], name="hidden_bias")
        h = g.node("Relu", [h], name="hidden_relu")
    head = model.classifier
    logits = g.matmul(h, head, "classifier")
    g.nodes.append(helper.make_node("Add", [logits, g.const("classifier_b", _np(head.bias))], ["logits"],
                                    name="classifier_bias"))
    graph = helper.make_graph(
        g.nodes, "edgepack_static",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT32, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", head.out_features])],
        initializer=g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgepack")
    m.ir_version = 8
    return m


def write_static_onnx(model, path: Path, *, opset: int = 17) -> Path:
    """Write :func:`build_graph` of ``model`` to ``path`` (checked by ``onnx.checker``)."""
    m = build_graph(model, opset=opset)
    onnx.checker.check_model(m)
    path = Path(path)
    onnx.save(m, str(path))
    return path
