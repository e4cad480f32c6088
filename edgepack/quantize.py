"""Quantize an fp32 ONNX classifier with ONNX Runtime for a target CPU (``targets/*.toml``)."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

from .config import QuantizeConfig
from .errors import EdgepackError
from .export import ModelInfo
from .records import hash_tree, write_stage_record

QUANT_NAME = "model.quant.onnx"


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
    """True for a graph ``edgepack.bert_onnx`` wrote: already fused (the optimizer would only turn its
    Add + LayerNormalization pairs back into the slower SkipLayerNormalization)."""
    import onnx

    return onnx.load(str(path), load_external_data=False).producer_name == "edgepack"


def quantize_embedding_4bit(src: Path, out: Path, block_size: int) -> Path:
    """The word-embedding Gather of ``src`` as a 4-bit, block-quantized GatherBlockQuantized (blocks of
    ``block_size`` along the hidden axis, symmetric). Needs a plain Gather on the table: the fused
    writer's ``embedding="gather"`` or a ``torch.onnx.export`` graph, not EmbedLayerNormalization."""
    import numpy as np
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    if not any(n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2
               for n in model.graph.node):
        raise EdgepackError(f"{src}: no Gather on an embedding table to store in 4 bits (the embedding is fused); "
                            "export with ExportConfig(embedding='gather') or keep embedding_bits = 8")
    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=4,
                                       op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),))
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs one INFO line per node it skips
    try:
        quantizer = MatMulNBitsQuantizer(model, algo_config=cfg)
        with np.errstate(invalid="ignore", divide="ignore"):  # an all-zero block (the [PAD] row): scale 0, handled
            quantizer.process()
    finally:
        logging.getLogger().setLevel(level)
    quantizer.model.save_model_to_file(str(out))
    return Path(out)


def quantize_model(cfg: QuantizeConfig, src: Path, out: Path, *, info: ModelInfo) -> Path:
    """Write the quantized model to ``out`` (never over ``src``). Static QDQ and 4-bit MatMulNBits
    are built by ``edgepack.variants``, which measures them against the dynamic formats."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise ValueError("quantize_model writes a new file; out must differ from src")
    if cfg.format != "dynamic":
        from . import variants  # optional formats live with their measurements

        return variants.quantize_other(cfg, src, out, info=info)
    with tempfile.TemporaryDirectory(prefix="edgepack-quant-") as tmp:
        model_in = fuse(src, Path(tmp) / "fused.onnx", info) if cfg.fuse and not written_fused(src) else src
        op_types = list(cfg.op_types)
        if cfg.embedding_bits == 4:
            model_in = quantize_embedding_4bit(model_in, Path(tmp) / "embedding4.onnx", cfg.embedding_block_size)
            op_types = [t for t in op_types if t != "Gather"]
        # The quantizer logs a "run pre-processing first" hint on every call; the exported graph is
        # already shape-inferred, so keep the console for our own progress lines.
        logging.getLogger().setLevel(logging.ERROR)
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


def quantize(cfg: QuantizeConfig, src: Path, out: Path, *, info: ModelInfo) -> dict:
    """The stage: ``src/model.onnx`` (+ tokenizer, config) -> ``out/model.quant.onnx`` + stage.json."""
    started = time.time()
    src, out = Path(src), Path(out)
    onnx_in = src / "model.onnx" if src.is_dir() else src
    if not onnx_in.is_file():
        raise EdgepackError(f"{src}: no model.onnx; run the export stage first (edgepack pack does both)")
    out.mkdir(parents=True, exist_ok=True)
    quant = quantize_model(cfg, onnx_in, out / QUANT_NAME, info=info)
    if src.is_dir():
        for name in ("tokenizer.json", "config.json"):
            if (src / name).is_file():
                shutil.copy2(src / name, out / name)
    metrics = {"fp32_bytes": onnx_in.stat().st_size, "quant_bytes": quant.stat().st_size,
               "size_ratio": round(quant.stat().st_size / onnx_in.stat().st_size, 4), "ops": count_ops(quant)}
    return write_stage_record(out, stage="quantize", config=cfg.to_dict(), input_hash=hash_tree(onnx_in),
                              metrics=metrics, started=started)
