"""Quantize an fp32 ONNX classifier with ONNX Runtime for a target CPU (``targets/*.toml``)."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from edgepack.bundle_files import QUANT_NAME  # noqa: F401  (the stage and its callers name it from here)
from edgepack.config import QuantSettings
from edgepack.console import hushed_root
from edgepack.errors import EdgepackError
from edgepack.modeling import ModelInfo

Feed = Mapping[str, np.ndarray]


def _hushed(fn):
    """The quantizer logs hints ("run pre-processing first") on the root logger at every call; the
    exported graph is already shape-inferred: drop them for the call, leaving the root logger as it was."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with hushed_root(where=f"onnxruntime{os.sep}quantization"):
            return fn(*args, **kwargs)

    return call



def fuse(src: Path, out: Path, info: ModelInfo) -> Path:
    """ORT's transformer fusions (Attention, SkipLayerNorm, BiasGelu, EmbedLayerNorm) into ``out``.
    Fuse before quantizing: the quantizer then sees fused Attention and quantizes it whole."""
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = info.model_type if info.model_type in ("bert", "distilbert", "roberta") else "bert"
    # opt_level=0: only the offline fusions; ORT applies its own graph optimisations at load time.
    optimized = optimize_model(str(src), model_type=model_type, num_heads=info.num_heads,
                               hidden_size=info.hidden_size, opt_level=0)
    optimized.save_model_to_file(str(out))
    return out


def written_fused(path: Path) -> bool:
    """True for a graph ``edgepack.stages.export.bert_onnx`` wrote: already fused (the optimizer would only turn its
    Add + LayerNormalization pairs back into the slower SkipLayerNormalization)."""
    import onnx

    return onnx.load(str(path), load_external_data=False).producer_name == "edgepack"


def quantize_embedding_4bit(src: Path, out: Path, block_size: int) -> Path:
    """The word-embedding table of ``src`` in 4 bits: asymmetric, one fp32 scale and uint8 zero point
    per block of ``block_size`` along the hidden axis, two weights a byte (first half of the hidden
    axis in the low nibbles, second half in the high ones). The Gather becomes

        Gather(packed) -> BitwiseAnd 15, BitShift 4 -> Concat -> DequantizeLinear(blocked, opset 21)
                          with Gather(scales), Gather(zero points)

    ORT's GatherBlockQuantized does the same in one node but took 27 us for 9 tokens x 384 (1.31, one
    thread, x86-64) where these seven took 9 us. Needs a plain Gather on the table: the fused writer's
    ``embedding="gather"`` or a ``torch.onnx.export`` graph, not EmbedLayerNormalization."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    tables = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
              and len(inits[n.input[0]].dims) == 2 and inits[n.input[0]].data_type == onnx.TensorProto.FLOAT
              and all(a.i == 0 for a in n.attribute if a.name == "axis")]
    if not tables:
        raise EdgepackError(f"{src}: no Gather on an embedding table to store in 4 bits (the embedding is fused); "
                            "export with ExportConfig(embedding='gather') or keep embedding_bits = 8")
    node = max(tables, key=lambda n: inits[n.input[0]].dims[0])  # the word table: the most rows
    weights = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
    rows, width = weights.shape
    # Blocks must tile each half of the hidden axis: the largest divisor of width / 2 up to block_size.
    block_size = max((b for b in range(1, min(block_size, width // 2) + 1) if (width // 2) % b == 0), default=1)
    if width % 2 or block_size < 2:
        raise EdgepackError(f"{src}: embedding width {width} cannot be split into 4-bit blocks; keep embedding_bits = 8")
    blocks = weights.reshape(rows, width // block_size, block_size)
    lo, hi = blocks.min(axis=2), blocks.max(axis=2)
    scale = np.maximum(hi - lo, 1e-8) / 15.0
    zero = np.clip(np.round(-lo / scale), 0, 15).astype(np.uint8)
    q = np.clip(np.round(blocks / scale[:, :, None]) + zero[:, :, None], 0, 15).astype(np.uint8).reshape(rows, width)
    packed = q[:, : width // 2] | (q[:, width // 2:] << 4)  # uint8: two 4-bit codes a byte
    name = node.input[0]
    new_inits = [numpy_helper.from_array(packed, f"{name}_q4"),
                 numpy_helper.from_array(scale.astype(np.float32), f"{name}_q4_scale"),
                 numpy_helper.from_array(zero, f"{name}_q4_zero"),
                 numpy_helper.from_array(np.array(15, dtype=np.uint8), f"{name}_q4_mask"),
                 numpy_helper.from_array(np.array(4, dtype=np.uint8), f"{name}_q4_shift")]
    ids, y = node.input[1], node.output[0]
    p = f"{name}_q4"
    decode = [
        helper.make_node("Gather", [f"{p}", ids], [f"{p}_rows"], name=f"{p}_gather", axis=0),
        helper.make_node("BitwiseAnd", [f"{p}_rows", f"{p}_mask"], [f"{p}_lo"], name=f"{p}_lo"),
        helper.make_node("BitShift", [f"{p}_rows", f"{p}_shift"], [f"{p}_hi"], name=f"{p}_hi", direction="RIGHT"),
        helper.make_node("Concat", [f"{p}_lo", f"{p}_hi"], [f"{p}_codes"], name=f"{p}_codes", axis=-1),
        helper.make_node("Gather", [f"{p}_scale", ids], [f"{p}_scales"], name=f"{p}_gather_scale", axis=0),
        helper.make_node("Gather", [f"{p}_zero", ids], [f"{p}_zeros"], name=f"{p}_gather_zero", axis=0),
        helper.make_node("DequantizeLinear", [f"{p}_codes", f"{p}_scales", f"{p}_zeros"], [y], name=f"{p}_dequantize",
                         axis=-1, block_size=block_size),
    ]
    nodes = list(graph.node)
    at = nodes.index(node)
    nodes[at:at + 1] = decode
    del graph.node[:]
    graph.node.extend(nodes)
    still_used = any(name in n.input for n in nodes)
    kept = [i for i in graph.initializer if i.name != name or still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version < 21:
            imp.version = 21  # blocked DequantizeLinear
    model.ir_version = max(model.ir_version, 10)
    onnx.save(model, str(out))
    return Path(out)


@_hushed
def quantize_model(cfg: QuantSettings, src: Path, out: Path, *, info: ModelInfo) -> Path:
    """Write the quantized model to ``out`` (never over ``src``). Static QDQ and 4-bit MatMulNBits
    are built by ``edgepack.stages.quantize.variants``, which measures them against the dynamic formats."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise ValueError("quantize_model writes a new file; out must differ from src")
    if cfg.format != "dynamic":
        return quantize_other(cfg, src, out, info=info)
    with tempfile.TemporaryDirectory(prefix="edgepack-quant-") as tmp:
        model_in = fuse(src, Path(tmp) / "fused.onnx", info) if cfg.fuse and not written_fused(src) else src
        op_types = list(cfg.op_types)
        if cfg.embedding_bits == 4:
            model_in = quantize_embedding_4bit(model_in, Path(tmp) / "embedding4.onnx", cfg.embedding_block_size)
            op_types = [t for t in op_types if t != "Gather"]
        quantize_dynamic(
            str(model_in), str(out),
            weight_type=QuantType.QInt8 if cfg.weight_type == "qint8" else QuantType.QUInt8,
            per_channel=cfg.per_channel,
            reduce_range=cfg.reduce_range,
            op_types_to_quantize=op_types,
            # Fused contrib ops (Attention, SkipLayerNormalization) defeat ONNX shape inference; their
            # outputs are fp32, which the quantizer must be told.
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return out


def count_ops(path: Path) -> dict[str, int]:
    """Node counts by op type (to check what the quantizer or the fuser did)."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


@_hushed
def quantize_other(cfg: QuantSettings, src: Path, out: Path, *, info: ModelInfo,
                   calibration: Iterable[Feed] | None = None) -> Path:
    """Build a ``static-qdq`` or ``matmul-nbits`` model from the fp32 ``src`` into ``out``.

    ``calibration``: model feeds (``{"input_ids": [[...]], ...}``) of real training rows; static
    QDQ needs them (its activation scales are fixed at build time), 4-bit ignores them.
    """
    src, out = Path(src).resolve(), Path(out).resolve()
    if cfg.format not in ("static-qdq", "matmul-nbits"):
        raise ValueError(f"format={cfg.format!r} is built by edgepack.stages.quantize.formats.quantize_model")
    if cfg.format == "static-qdq" and calibration is None:
        raise EdgepackError("static-qdq needs calibration rows; use `edgepack pack --variants`, which "
                            "calibrates on training rows, or pick a dynamic target")
    # ORT's symbolic shape inference and the external-data writer drop scratch files
    # (sym_shape_infer_temp.onnx, <uuid>.data) into the working directory: give them their own.
    with tempfile.TemporaryDirectory(prefix="edgepack-quant-scratch-") as scratch, contextlib.chdir(scratch):
        if cfg.embedding_bits == 4:  # the same 4-bit word table as the dynamic formats, so sizes compare

            src = quantize_embedding_4bit(src, Path(scratch) / "embedding4.onnx", cfg.embedding_block_size)
        elif _plain_gather_tables(src):
            # And the same 8-bit table (Gather + DequantizeLinear) the dynamic formats store: without it
            # these formats kept the word table, nearly all of a static student, in fp32.
            src = _gather_8bit(cfg, src, Path(scratch) / "embedding8.onnx")
        if cfg.format == "static-qdq":
            return _static_qdq(cfg, src, out, info, calibration)
        return _matmul_nbits(cfg, src, out)


def _plain_gather_tables(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return any(n.op_type == "Gather" and n.input[0] in inits for n in model.graph.node)


def _gather_8bit(cfg: QuantSettings, src: Path, out: Path) -> Path:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8 if cfg.weight_type == "qint8" else QuantType.QUInt8,
                     per_channel=cfg.per_channel, reduce_range=cfg.reduce_range, op_types_to_quantize=["Gather"],
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return out


def _static_qdq(cfg: QuantSettings, src: Path, out: Path, info: ModelInfo, calibration: Iterable[Feed]) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )


    class Reader(CalibrationDataReader):
        def __init__(self, feeds: Iterable[Feed]):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory(prefix="edgepack-qdq-") as tmp:
        model_in = fuse(src, Path(tmp) / "fused.onnx", info) if cfg.fuse else src
        pre = Path(tmp) / "pre.onnx"
        try:
            # Shape inference lets the quantizer see every MatMul's operand shapes.
            quant_pre_process(str(model_in), str(pre), skip_symbolic_shape=False)
        except Exception:  # symbolic inference fails on some exports; plain ONNX inference still works
            pre = model_in
        quantize_static(
            str(pre), str(out), Reader(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(cfg.op_types),
            per_channel=cfg.per_channel,
            reduce_range=cfg.reduce_range,
            activation_type=QuantType.QUInt8 if cfg.activation_type == "quint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8 if cfg.weight_type == "qint8" else QuantType.QUInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # Weight MatMuls only: Q.K^T and attention.V multiply two activations, whose int8 rounding
            # costs accuracy for little time at short sequence lengths.
            extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True, "ActivationSymmetric": False},
        )
    return out


def _matmul_nbits(cfg: QuantSettings, src: Path, out: Path) -> Path:
    import onnx

    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ModuleNotFoundError as e:
        # onnxruntime >= 1.32 imports onnx_ir here without declaring it; edgepack declares onnx-ir.
        raise EdgepackError(f"4-bit MatMulNBits needs the {e.name!r} package, which onnxruntime "
                            f"{_ort_version()} imports but does not install; pip install onnx-ir") from None

    model = onnx.load(str(src))
    # accuracy_level=4: activations are quantized to int8 per block and the dot products run on the
    # int8 kernels (VNNI / dot-product); level 0/1 would dequantize the weights to fp32 first.
    quant = MatMulNBitsQuantizer(model, bits=4, block_size=cfg.nbits_block_size, is_symmetric=True,
                                 accuracy_level=4, op_types_to_quantize=("MatMul",))
    quant.process()
    quant.model.save_model_to_file(str(out), use_external_data_format=False)
    return out


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
