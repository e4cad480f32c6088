"""The export stage: a Hugging Face sequence classifier (or an ONNX export of one made elsewhere) ->
fp32 ONNX with dynamic batch and sequence axes, its logits checked against PyTorch on real rows.

``run(cfg, src, out, ctx)`` writes ``out/model.onnx``, ``tokenizer.json``, ``config.json``, and a
``labels.json`` + ``runtime.json`` so the directory runs as an fp32 pipeline (the quantize stage's
reference), then ``stage.json``. Helpers: the fused BERT writer (``bert_onnx``), the static student's
writer (``static_onnx``) and the exact trim of unreachable embedding rows (``unreachable``).
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgepack.config import ExportConfig
from edgepack.errors import EdgepackError
from edgepack.modeling import INPUT_NAMES, ModelInfo, load_with_tokenizer, read_model_info
from edgepack.records import hash_tree, write_stage_record
from edgepack.stages import StageRecord
from edgepack.static_model import is_static

ONNX_NAME = "model.onnx"
def export_onnx(cfg: ExportConfig, model_dir: Path, out_dir: Path, parity_texts: Sequence[str], *,
                max_length: int = 64) -> dict:
    """Write ``model.onnx``, ``tokenizer.json`` and ``config.json`` into ``out_dir`` (created) and its
    ``stage.json``; returns the record. Raises when the ONNX logits differ from PyTorch's by more
    than ``cfg.atol`` on ``parity_texts``."""
    import torch

    started = time.time()
    info = read_model_info(model_dir)
    reference, tokenizer = load_with_tokenizer(model_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The file itself, not tokenizers' re-serialisation: that keeps one token per id and would drop
    # the tokens vocabulary folding (prune --cluster-rest) put on shared rows.
    raw_tok = Path(model_dir) / "tokenizer.json"
    tok_json = json.loads(raw_tok.read_text() if raw_tok.is_file() else tokenizer.backend_tokenizer.to_str())
    model, trim = reference, None
    if cfg.trim_unreachable:
        import copy

        from edgepack.stages.export.unreachable import trim_unreachable

        model = copy.deepcopy(reference)
        tok_json, trim = trim_unreachable(model, tok_json, max_length)
    tok_path = out_dir / "tokenizer.json"
    tok_path.write_text(json.dumps(tok_json, ensure_ascii=False))
    runtime_tok = _runtime_tokenizer(tok_path, max_length)
    onnx_path = out_dir / ONNX_NAME
    writer = choose_writer(cfg.writer, model)
    if writer == "static":
        from edgepack.stages.export.static_onnx import write_static_onnx

        write_static_onnx(model, onnx_path, opset=cfg.opset)
    elif writer == "fused":
        from edgepack.stages.export.bert_onnx import write_bert_onnx

        write_bert_onnx(model, onnx_path, opset=cfg.opset, embedding=cfg.embedding)
    else:
        sample = _encode(runtime_tok, ["edgepack export sample", "a second, longer sample sentence for the trace"],
                         info.input_names)
        args = tuple(torch.from_numpy(sample[name]) for name in info.input_names)
        axes = {name: {0: "batch", 1: "sequence"} for name in info.input_names} | {"logits": {0: "batch"}}
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about Python-side shape checks in transformers' masking code and about
            # advanced indexing; parity below is the check that matters, so keep the console clean.
            warnings.simplefilter("ignore")
            # dynamo=False: the TorchScript exporter needs no onnxscript.
            torch.onnx.export(model, args, str(onnx_path), input_names=list(info.input_names),
                              output_names=["logits"], dynamic_axes=axes, opset_version=cfg.opset, dynamo=False)
    model.config.to_json_file(str(out_dir / "config.json"))
    # Parity is against the untouched model and its own tokenizer: it covers the export and the
    # trimming together.
    max_diff = parity(reference, tokenizer, onnx_path, runtime_tok, info, parity_texts[: cfg.parity_rows],
                      max_length)
    if max_diff > cfg.atol:
        raise EdgepackError(f"{onnx_path}: ONNX logits differ from PyTorch by {max_diff:.2e} > {cfg.atol:g} "
                            "on real rows; raise --atol only if this is expected for the architecture")
    metrics = {"writer": writer, "input_names": list(check_onnx_classifier(onnx_path, info.num_labels)),
               "parity_max_abs_diff": max_diff, "parity_rows": min(len(parity_texts), cfg.parity_rows),
               "onnx_bytes": onnx_path.stat().st_size, "source_weight_bytes": _weight_bytes(model_dir),
               "info": info.to_dict(), **({"unreachable_trimmed": trim} if trim else {})}
    return write_stage_record(out_dir, stage="export", config={**cfg.to_dict(), "max_length": max_length},
                              input_hash=hash_tree(model_dir), metrics=metrics, started=started,
                              extra={"source_dir": str(model_dir)})


def choose_writer(writer: str, model) -> str:
    """``fused`` or ``torch`` for ``ExportConfig.writer`` (``auto``: fused where the model allows);
    ``static`` for the static student unless ``torch`` is asked for (its own small graph is what
    "fused" means for it)."""
    from edgepack.stages.export.bert_onnx import supported

    if is_static(model):
        return "torch" if writer == "torch" else "static"

    why = supported(model)
    if writer == "fused" and why:
        raise EdgepackError(f"--writer fused cannot write this model ({why}); use --writer torch or auto")
    if writer == "auto":
        return "torch" if why else "fused"
    return writer


def _weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for pattern in ("*.safetensors", "pytorch_model*.bin") for f in Path(model_dir).glob(pattern))


def _runtime_tokenizer(path: Path, max_length: int):
    """The ``tokenizers`` object as the runtime shim configures it (truncation, no padding here)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def _encode(tok, texts: Sequence[str], input_names: Sequence[str]) -> dict[str, np.ndarray]:
    encs = tok.encode_batch(list(texts))
    width = max(len(e.ids) for e in encs)
    ids = np.zeros((len(encs), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for r, e in enumerate(encs):
        n = len(e.ids)
        ids[r, :n], mask[r, :n], types[r, :n] = e.ids, e.attention_mask, e.type_ids
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {k: feed[k] for k in input_names}


def parity(model, tokenizer, onnx_path: Path, onnx_tokenizer, info: ModelInfo, texts: Sequence[str],
           max_length: int) -> float:
    """Max |logit difference| between the PyTorch model (with its Hugging Face tokenizer) and the
    ONNX model under ONNX Runtime (fp32, with the runtime's tokenizer) over ``texts``, batched."""
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    from runtime_shim.pipeline import ORT_INT_TYPES

    # The graph's own inputs and integer types (the fused writer takes int32 ids and mask only).
    feeds = {i.name: ORT_INT_TYPES.get(i.type, np.int64) for i in sess.get_inputs()}
    worst = 0.0
    for i in range(0, len(texts), 16):
        batch = list(texts[i:i + 16])
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        ref_feed = {name: _input(enc, name).astype(np.int64) for name in info.input_names}
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in ref_feed.items()}).logits.numpy()
        encoded = _encode(onnx_tokenizer, batch, INPUT_NAMES)
        got = sess.run(["logits"], {k: encoded[k].astype(t) for k, t in feeds.items()})[0]
        worst = max(worst, float(np.abs(ref - got).max()))
    return worst


def _input(encoded, name: str):
    # A tokenizer saved without token type ids still feeds a BERT that has them: segment 0 throughout.
    return encoded[name] if name in encoded else encoded["input_ids"] * 0


def check_onnx_classifier(onnx_path: Path, num_labels: int) -> tuple[str, ...]:
    """The input names of an ONNX sequence classifier; one-line error when it is not one."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:
        raise EdgepackError(f"{onnx_path}: not a readable ONNX model ({type(e).__name__})") from None
    inits = {i.name for i in model.graph.initializer}
    inputs = tuple(i.name for i in model.graph.input if i.name not in inits)
    if "input_ids" not in inputs:
        raise EdgepackError(f"{onnx_path}: no 'input_ids' input (inputs: {', '.join(inputs) or 'none'}); "
                            "export a text classifier (edgepack pack MODEL_DIR exports one)")
    outs = model.graph.output
    dims = [d.dim_value for d in outs[0].type.tensor_type.shape.dim] if outs else []
    if len(outs) < 1 or len(dims) != 2 or (dims[1] and dims[1] != num_labels):
        raise EdgepackError(f"{onnx_path}: first output is not [batch, {num_labels}] logits; "
                            "export a sequence classifier whose labels match config.json")
    unknown = [n for n in inputs if n not in INPUT_NAMES]
    if unknown:
        raise EdgepackError(f"{onnx_path}: unexpected inputs {', '.join(unknown)}; edgepack feeds {', '.join(INPUT_NAMES)}")
    return inputs


def source_kind(model_dir: Path) -> str:
    """``torch`` (weights to export) or ``onnx`` (an exported model.onnx to take as it is)."""
    model_dir = Path(model_dir)
    if any((model_dir / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
        return "torch"
    if (model_dir / ONNX_NAME).is_file():
        return "onnx"
    raise EdgepackError(f"{model_dir}: no model.safetensors, pytorch_model.bin or model.onnx; pass a classifier directory")


def run(cfg: ExportConfig, src: Path, out: Path, ctx) -> StageRecord:
    """The stage: ``src`` (a classifier directory, or one holding ``model.onnx`` + ``tokenizer.json`` +
    ``config.json``) -> ``out``, atomically. Parity against PyTorch is checked on validation rows."""
    import shutil

    from edgepack import bundle_files
    from edgepack.records import staging_dir

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise EdgepackError(f"{src}: no such directory; pass a Hugging Face classifier directory")
    info = read_model_info(src)
    kind = source_kind(src)
    with staging_dir(out, force=True) as tmp:
        if kind == "torch":
            rec = export_onnx(cfg, src, tmp, ctx.data["validation"].texts, max_length=ctx.max_length)
            info = dataclasses.replace(info, input_names=tuple(rec["metrics"]["input_names"]))
        else:
            started = time.time()
            if not (src / "tokenizer.json").is_file():
                raise EdgepackError(f"{src}: no tokenizer.json beside model.onnx; save the fast tokenizer there")
            inputs = check_onnx_classifier(src / ONNX_NAME, info.num_labels)
            info = dataclasses.replace(info, input_names=inputs)
            for name in (ONNX_NAME, "tokenizer.json", "config.json"):
                shutil.copy2(src / name, tmp / name)
            metrics = {"writer": "given", "input_names": list(inputs), "parity_max_abs_diff": None,
                       "onnx_bytes": (src / ONNX_NAME).stat().st_size,
                       "source_weight_bytes": (src / ONNX_NAME).stat().st_size, "info": info.to_dict()}
            write_stage_record(tmp, stage="export", config={**cfg.to_dict(), "max_length": ctx.max_length},
                               input_hash=hash_tree(src), metrics=metrics, started=started,
                               extra={"source_dir": str(src)})
        bundle_files.write_skeleton(tmp, model_name=ONNX_NAME, info=info, max_length=ctx.max_length,
                                    oos_label=ctx.data.oos_label)
        record = json.loads((tmp / "stage.json").read_text())
        record["metrics"]["info"] = info.to_dict()
        from edgepack.records import write_json_atomic

        write_json_atomic(tmp / "stage.json", record)  # the record stays the last file written
    return StageRecord.read(out)
