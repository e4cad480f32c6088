"""The answer inside the graph: the bundle's model also outputs ``answer``, ``[batch, 2]`` float64 rows of
(top softmax probability, top label id), so a single query's answer is read from ONNX Runtime instead of
computed in Python over every logit (``runtime_shim.OnnxPipeline`` reads it when ``runtime.json``'s
``answer`` names it; docs/results.md, "One static query, part by part", has the saving).

Float64, like the shim's own softmax: a float32 top probability rounds near the out-of-scope threshold
(a probability of 0.99999997 is 1.0 in float32), so the threshold, applied by the shim from
``labels.json``, would decide differently from the batch path. The label id is exact in float64.
``logits`` stays the first output: older runtimes and Optimum read it as before.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgepack.records import atomic_file

ANSWER = "answer"  # the output's name, written into runtime.json's "answer"
_PREFIX = "edgepack_answer/"  # names of the nodes and values added (none of the model's own)


def add_answer(src: Path, dst: Path, *, logits: str = "logits") -> Path:
    """Write ``src`` with the ``answer`` output appended to ``dst`` (atomically): ``logits`` cast to float64,
    Softmax, TopK of 1 (the top probability and its index), the index cast to float64, both concatenated:
    five nodes, measured against six with ReduceMax and ArgMax (docs/results.md).

    >>> add_answer(Path("quantize/model.quant.onnx"), Path("bundle/model.quant.onnx"))  # doctest: +SKIP
    PosixPath('bundle/model.quant.onnx')
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    graph = model.graph
    names = [o.name for o in graph.output]
    if logits not in names or ANSWER in names:
        raise ValueError(f"{src}: outputs {names}: expected {logits!r} and no {ANSWER!r}")
    out = graph.output[names.index(logits)]
    dims = out.type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[1].dim_value or dims[1].dim_value >= 2 ** 53:
        raise ValueError(f"{src}: {logits!r} is not [batch, labels]")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        raise ValueError(f"{src}: opset {opset}: the answer needs TopK's tie rule of opset 11 or later")
    p = _PREFIX
    graph.initializer.append(helper.make_tensor(p + "k", TensorProto.INT64, [1], np.array([1], dtype=np.int64)))
    graph.node.extend([
        helper.make_node("Cast", [logits], [p + "z"], name=p + "to_double", to=TensorProto.DOUBLE),
        helper.make_node("Softmax", [p + "z"], [p + "probs"], name=p + "softmax", axis=-1),
        # TopK's tie rule is the lower index first, as argmax; float64 probabilities of distinct float32
        # logits stay distinct, so its index is the logits' first maximum.
        helper.make_node("TopK", [p + "probs", p + "k"], [p + "top", p + "id"], name=p + "top", axis=-1),
        helper.make_node("Cast", [p + "id"], [p + "id_double"], name=p + "id_to_double", to=TensorProto.DOUBLE),
        helper.make_node("Concat", [p + "top", p + "id_double"], [ANSWER], name=p + "answer", axis=1),
    ])
    batch = dims[0].dim_param or (dims[0].dim_value or "batch")
    graph.output.append(helper.make_tensor_value_info(ANSWER, TensorProto.DOUBLE, [batch, 2]))
    onnx.checker.check_model(model)
    with atomic_file(Path(dst), "wb") as f:
        f.write(model.SerializeToString())
    return Path(dst)


def remove_answer(src: Path, dst: Path) -> Path:
    """Write ``src`` without what ``add_answer`` appended (its nodes, initializer and output): the graph of a
    bundle from before the answer output, for comparisons (``benchmarks/peers.py --breakdown``).

    >>> remove_answer(Path("bundle/model.quant.onnx"), Path("before.onnx"))  # doctest: +SKIP
    PosixPath('before.onnx')
    """
    import onnx

    model = onnx.load(str(src))
    g = model.graph
    for items, keep in ((g.node, lambda n: not n.name.startswith(_PREFIX)),
                        (g.initializer, lambda t: not t.name.startswith(_PREFIX)),
                        (g.output, lambda o: o.name != ANSWER)):
        kept = [x for x in items if keep(x)]
        del items[:]
        items.extend(kept)
    with atomic_file(Path(dst), "wb") as f:
        f.write(model.SerializeToString())
    return Path(dst)


def check_answer(model: Path, encoded_batches) -> dict:
    """Run ``model`` on every batch of ``encoded_batches`` (the pipeline's ``encode`` dicts) fetching
    ``logits`` and ``answer`` from the same run; the answer's ids must be the logits' argmax and its
    probabilities their float64 softmax maximum. Returns ``{"rows", "max_prob_diff"}``; raises
    ``ValueError`` on any other id.

    >>> check_answer(Path("bundle/model.quant.onnx"), [pipe.encode(["hi"])])  # doctest: +SKIP
    {'rows': 1, 'max_prob_diff': 0.0}
    """
    import onnxruntime as ort

    from runtime_shim.scores import softmax

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    rows, worst = 0, 0.0
    for feed in encoded_batches:
        logits, answer = sess.run(["logits", ANSWER], {k: v for k, v in feed.items() if k in wanted})
        ids = logits.argmax(axis=-1)
        if not np.array_equal(answer[:, 1], ids.astype(np.float64)):
            bad = int(np.flatnonzero(answer[:, 1] != ids)[0])
            raise ValueError(f"{model}: the answer output says label {answer[bad, 1]} where the logits' argmax is "
                             f"{ids[bad]} (row {rows + bad})")
        worst = max(worst, float(np.abs(answer[:, 0] - softmax(logits).max(axis=-1)).max()))
        rows += len(ids)
    return {"rows": rows, "max_prob_diff": worst}
