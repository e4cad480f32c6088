"""The bundle: everything a device needs to run and verify the model, and nothing that needs torch.

Layout: ``model.quant.onnx``, ``tokenizer.json``, ``labels.json``,
``runtime.json``, ``manifest.json``, ``runtime_shim/``, ``eval.jsonl``, ``requirements.txt`` and a
``config.json`` so Hugging Face Optimum can load the model too.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from edgepack.records import atomic_file, write_json_atomic

BUNDLE_FORMAT = "edgepack-bundle/1"
QUANT_NAME = "model.quant.onnx"  # the bundle's model file (runtime.json names it)
RUNTIME_PACKAGES = ("onnxruntime", "tokenizers", "numpy")


def default_runtime(model_name: str, *, max_length: int, inputs: tuple[str, ...], pad_id: int,
                    session_config: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Session settings before tuning. One intra-op thread: for short queries thread hand-off costs
    more than it saves; ``edgepack tune`` measures the alternatives on the device."""
    return {
        "model": model_name,
        "max_length": max_length,
        "inputs": list(inputs),
        "pad_id": pad_id,
        "intra_op_num_threads": 1,
        "inter_op_num_threads": 1,
        "execution_mode": "sequential",  # a BERT graph is a chain: no parallel branches to run
        "graph_optimization_level": "all",
        "session_config": dict(session_config or {}),
    }


def requirements_txt() -> str:
    """Pin the runtime packages to the versions the bundle was built and checked with (>=, so a
    device may run newer releases)."""
    lines = []
    for name in RUNTIME_PACKAGES:
        try:
            lines.append(f"{name}>={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            lines.append(name)
    return "\n".join(lines) + "\n"


def copy_shim(dest: Path) -> None:
    """Copy the ``runtime_shim`` package (sources only) into ``dest/runtime_shim``."""
    import runtime_shim

    src = Path(runtime_shim.__file__).parent
    shutil.copytree(src, dest / "runtime_shim", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def write_labels(dest: Path, label_names: list[str], oos_label: str | None, threshold: float | None) -> None:
    write_json_atomic(dest / "labels.json", {"labels": list(label_names), "oos_label": oos_label,
                                             "oos_threshold": threshold})


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def archive(bundle: Path) -> Path:
    """``BUNDLE.tar.gz`` beside the bundle, written to a temporary name and renamed when complete."""
    bundle = Path(bundle)
    out = bundle.with_name(bundle.name + ".tar.gz")
    with atomic_file(out, "wb") as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
        tar.add(bundle, arcname=bundle.name, filter=lambda t: None if "__pycache__" in t.name else t)
    return out


def pad_id(tokenizer_json: Path) -> int:
    """The padding token's id in a ``tokenizers`` file (0 when it names none)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    for name in ("[PAD]", "<pad>"):
        tid = tok.token_to_id(name)
        if tid is not None:
            return tid
    return 0


def write_skeleton(dest: Path, *, model_name: str, info: Any, max_length: int, oos_label: str | None,
                   session_config: Mapping[str, str] | None = None) -> None:
    """``labels.json`` and ``runtime.json`` beside ``dest/tokenizer.json``: enough for
    ``runtime_shim.OnnxPipeline(dest, verify=False)`` to run ``dest/model_name`` (how the export and
    quantize stages measure their models before there is a bundle)."""
    write_labels(dest, list(info.label_names), oos_label, None)
    write_json_atomic(dest / "runtime.json", default_runtime(
        model_name, max_length=max_length, inputs=tuple(info.input_names), pad_id=pad_id(dest / "tokenizer.json"),
        session_config=session_config))


def eval_slice_reference(stage: Path) -> dict[str, Any]:
    """The bundle's answers on its own ``eval.jsonl``, computed by the shim's harness exactly as
    ``python -m runtime_shim bench`` computes them on a device: the build-time figure and predictions
    the fleet report compares every device with (accuracy within a tolerance, label agreement)."""
    import runtime_shim
    from runtime_shim.bench import run_benchmark
    from runtime_shim.datafiles import read_labelled

    texts, gold = read_labelled(stage / "eval.jsonl")
    r = run_benchmark(runtime_shim.OnnxPipeline(stage, verify=False), texts, gold, warmup=0, runs=1,
                      batch_sizes=(1,), rss_argv=[], throughput_batches=1)
    return {"rows": len(texts), **{k: r[k] for k in ("accuracy", "accuracy_raw", "in_scope_accuracy", "oos_recall")},
            "predictions": r["predictions"]}
