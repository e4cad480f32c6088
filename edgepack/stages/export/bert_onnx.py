"""Write a BERT classifier straight to a fused ONNX graph of ONNX Runtime's transformer operators.

``torch.onnx.export`` of a transformers 5 BERT yields ~95 small nodes per layer: the new attention-mask
code (Range, GreaterOrEqual, And, Where, IsNaN...) no longer matches the patterns of ONNX Runtime's
transformer optimizer, so its Attention and EmbedLayerNormalization fusions find nothing. On a small
student those small nodes, not the matrix products, are the latency. This module writes the graph the
optimizer would have produced, from the weights:

    EmbedLayerNormalization -> per layer: Attention, MatMul, Add + LayerNormalization,
    MatMul, BiasGelu, MatMul, Add + LayerNormalization -> [CLS] -> pooler MatMul/Add/Tanh -> classifier

(Add + LayerNormalization rather than the fused SkipLayerNormalization, whose CPU kernel is slower;
``runtime_shim.session`` keeps ORT from fusing them back at load time.)

and in the last layer only the [CLS] row goes through the attention output and the FFN (the only row
the classifier reads). Heads may differ per layer (pruned models). The token-type embedding of segment
0 is folded into the position table: the graph takes ``input_ids`` and ``attention_mask`` (int32,
right-padded) only. ``edgepack.stages.export`` checks the result against the PyTorch model like any export.

Supported: ``model_type`` "bert" with absolute positions and an erf or tanh GELU; anything else
raises :class:`Unsupported` and the caller falls back to ``torch.onnx.export``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"
GELU_OPS = {"gelu": "BiasGelu", "gelu_new": "FastGelu", "gelu_pytorch_tanh": "FastGelu", "gelu_fast": "FastGelu"}


class Unsupported(ValueError):
    """The model is outside what this writer emits; export it with ``torch.onnx.export`` instead."""


def supported(model) -> str | None:
    """Why ``model`` cannot be written by :func:`write_bert_onnx` (None when it can)."""
    cfg = model.config
    if getattr(cfg, "model_type", None) != "bert":
        return f"model_type {getattr(cfg, 'model_type', None)!r} is not bert"
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type {cfg.position_embedding_type!r} is not absolute"
    if getattr(cfg, "hidden_act", None) not in GELU_OPS:
        return f"hidden_act {getattr(cfg, 'hidden_act', None)!r} has no fused ONNX Runtime operator"
    if getattr(model, "bert", None) is None or getattr(model.bert, "pooler", None) is None:
        return "no pooler: not a BertForSequenceClassification"
    if getattr(cfg, "problem_type", None) not in (None, "single_label_classification"):
        return f"problem_type {cfg.problem_type!r}"
    return None


def _np(tensor) -> np.ndarray:
    return tensor.detach().cpu().float().numpy()


class _Graph:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, name: str, array) -> str:
        arr = np.asarray(array)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def weight(self, name: str, tensor) -> str:
        return self.const(name, _np(tensor))

    def matmul(self, x: str, linear, name: str) -> str:
        """``x @ linear.weight.T`` (the bias is added by the caller's next node)."""
        return self.node("MatMul", [x, self.const(f"{name}_w", _np(linear.weight).T)], name=name)

    def add_norm(self, x: str, skip: str, bias, norm, name: str, eps: float) -> str:
        """LayerNorm(x + bias + skip): Add, Add, LayerNormalization. ONNX Runtime's fused
        SkipLayerNormalization computes the same but took 18 us on 9 x 384 rows against 7 us for
        these three (1.31, x86-64, one thread)."""
        gamma, beta = self.weight(f"{name}_gamma", norm.weight), self.weight(f"{name}_beta", norm.bias)
        y = self.node("Add", [x, self.weight(f"{name}_bias", bias)], name=f"{name}_bias")
        y = self.node("Add", [y, skip], name=f"{name}_residual")
        return self.node("LayerNormalization", [y, gamma, beta], name=name, axis=-1, epsilon=eps)

    def node(self, op: str, inputs: list[str], n_out: int = 1, *, domain: str = "", name: str = "", **attrs):
        self._n += 1
        base = name or f"{op}_{self._n}"
        outputs = [f"{base}_out{i}" if n_out > 1 else f"{base}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=base, domain=domain or None, **attrs))
        return outputs if n_out > 1 else outputs[0]


EMBEDDINGS = ("fused", "gather")


def build_graph(model, *, opset: int = 17, embedding: str = "fused") -> onnx.ModelProto:
    """The fused ONNX model of a BERT sequence classifier (see the module docstring).

    ``embedding="gather"`` writes the embedding as Gather + Add + LayerNormalization instead of one
    EmbedLayerNormalization, so that the word table can be block-quantized to 4 bits
    by ``edgepack.stages.quantize.formats.quantize_embedding_4bit``; the attention then reads the 0/1 mask directly."""
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding={embedding!r}; choose one of: {', '.join(EMBEDDINGS)}")
    why = supported(model)
    if why:
        raise Unsupported(why)
    cfg = model.config
    eps = float(cfg.layer_norm_eps)
    gelu = GELU_OPS[cfg.hidden_act]
    emb = model.bert.embeddings
    g = _Graph()

    pos = _np(emb.position_embeddings.weight)
    if getattr(emb, "token_type_embeddings", None) is not None:
        pos = pos + _np(emb.token_type_embeddings.weight[0])[None, :]
    if embedding == "fused":
        x, mask_index = g.node(
            "EmbedLayerNormalization",
            ["input_ids", "", g.weight("word_embeddings", emb.word_embeddings.weight),
             g.const("position_embeddings", pos), "", g.weight("emb_ln_gamma", emb.LayerNorm.weight),
             g.weight("emb_ln_beta", emb.LayerNorm.bias), "attention_mask"],
            2, domain=MS, name="embed", epsilon=eps)
    else:
        words = g.node("Gather", [g.weight("word_embeddings", emb.word_embeddings.weight), "input_ids"],
                       name="word_gather", axis=0)
        length = g.node("Shape", ["input_ids"], name="seq_len", start=1, end=2)
        positions = g.node("Slice", [g.const("position_embeddings", pos), g.const("zero", np.array([0], dtype=np.int64)),
                                     length, g.const("axis0", np.array([0], dtype=np.int64))], name="positions")
        x = g.node("Add", [words, positions], name="embed_sum")
        x = g.node("LayerNormalization", [x, g.weight("emb_ln_gamma", emb.LayerNorm.weight),
                                          g.weight("emb_ln_beta", emb.LayerNorm.bias)], name="embed_ln", axis=-1,
                   epsilon=eps)
        mask_index = "attention_mask"  # Attention takes the [batch, sequence] 0/1 mask as it is

    layers = model.bert.encoder.layer
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        att = layer.attention.self
        q, k, v = att.query, att.key, att.value
        width = q.out_features
        heads = width // (cfg.hidden_size // cfg.num_attention_heads)
        w = np.concatenate([_np(m.weight).T for m in (q, k, v)], axis=1)
        b = np.concatenate([_np(m.bias) for m in (q, k, v)])
        ctx = g.node("Attention", [x, g.const(f"l{i}_qkv_w", w), g.const(f"l{i}_qkv_b", b), mask_index],
                     domain=MS, name=f"l{i}_attention", num_heads=heads)
        skip = x
        if last:  # only [CLS] is read after this point; a scalar index drops the sequence axis: [batch, hidden]
            zero = g.const("cls_index", np.array(0, dtype=np.int64))
            ctx = g.node("Gather", [ctx, zero], name=f"l{i}_cls_ctx", axis=1)
            skip = g.node("Gather", [x, zero], name=f"l{i}_cls_skip", axis=1)
        out = layer.attention.output
        h = g.matmul(ctx, out.dense, f"l{i}_attn_out")
        x1 = g.add_norm(h, skip, out.dense.bias, out.LayerNorm, f"l{i}_ln1", eps)
        inter, ffo = layer.intermediate.dense, layer.output
        f = g.matmul(x1, inter, f"l{i}_ffn_in")
        f = g.node(gelu, [f, g.weight(f"l{i}_ffn_in_b", inter.bias)], domain=MS, name=f"l{i}_gelu")
        f = g.matmul(f, ffo.dense, f"l{i}_ffn_out")
        x = g.add_norm(f, x1, ffo.dense.bias, ffo.LayerNorm, f"l{i}_ln2", eps)

    if not len(layers):
        x = g.node("Gather", [x, g.const("cls_index", np.array(0, dtype=np.int64))], name="cls", axis=1)
    pooler = model.bert.pooler.dense
    p = g.matmul(x, pooler, "pooler")  # x: the [CLS] rows, [batch, hidden]
    p = g.node("Add", [p, g.weight("pooler_b", pooler.bias)], name="pooler_bias")
    p = g.node("Tanh", [p], name="pooler_tanh")
    head = model.classifier
    logits = g.matmul(p, head, "classifier")
    g.nodes.append(helper.make_node("Add", [logits, g.weight("classifier_b", head.bias)], ["logits"], name="classifier_bias"))

    graph = helper.make_graph(
        g.nodes, "edgepack_bert",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT32, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", head.out_features])],
        initializer=g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                          producer_name="edgepack")
    m.ir_version = 8
    return m


def write_bert_onnx(model, path: Path, *, opset: int = 17, embedding: str = "fused") -> Path:
    """Write :func:`build_graph` of ``model`` to ``path`` (checked by ``onnx.checker``)."""
    m = build_graph(model, opset=opset, embedding=embedding)
    onnx.checker.check_model(m)
    path = Path(path)
    onnx.save(m, str(path))
    return path
