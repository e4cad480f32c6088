"""ONNX Runtime sessions from a bundle's ``runtime.json``: every thread and graph setting goes through
``SessionOptions`` (never environment variables: the PyPI onnxruntime wheel has not used OpenMP since
1.7, so ``OMP_NUM_THREADS`` does not reach it).

Keys read here (others in ``runtime.json`` are kept in the settings and ignored):

- ``intra_op_num_threads``: 0 lets ORT use one thread per physical core (pinned); N uses N-1
  workers plus the calling thread. For short sequences one thread often beats two.
- ``inter_op_num_threads`` and ``execution_mode`` (``sequential``/``parallel``): BERT is a chain of
  layers, so ``parallel`` buys nothing; ``sequential`` is the default.
- ``graph_optimization_level``: ``disable``, ``basic``, ``extended``, ``all`` (``layout`` too when
  the installed onnxruntime has it).
- ``session_config``: string entries for ``add_session_config_entry``, e.g.
  ``session.intra_op.allow_spinning`` or ``session.x64quantprecision``.
- ``enable_cpu_mem_arena``, ``enable_mem_pattern`` (booleans) and ``log_severity_level`` (0-4).
- ``disabled_optimizers``: names of ORT graph transformers not to run at load. The default turns off
  ``SkipLayerNormFusion``: its fused CPU kernel took 18 us on 9 x 384 rows where the Add and
  LayerNormalization it replaces took 7 us (onnxruntime 1.31, x86-64, one thread), and edgepack's
  graphs keep that pair on purpose (``edgepack.bert_onnx``). ``[]`` runs every transformer.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import onnxruntime as ort

from .manifest import BundleError

GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
if hasattr(ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT"):  # onnxruntime >= 1.22
    GRAPH_LEVELS["layout"] = ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT
EXECUTION_MODES = {"sequential": ort.ExecutionMode.ORT_SEQUENTIAL, "parallel": ort.ExecutionMode.ORT_PARALLEL}

DEFAULTS: dict[str, Any] = {
    "intra_op_num_threads": 1,
    "inter_op_num_threads": 1,
    "execution_mode": "sequential",
    "graph_optimization_level": "all",
    "session_config": {},
    # ORT warns at level 2 about initializers it folds away: noise on a device's console.
    "log_severity_level": 3,
    "disabled_optimizers": ["SkipLayerNormFusion"],
}


def effective_settings(settings: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``DEFAULTS`` updated by ``settings`` (a ``runtime.json`` dict) and then by ``overrides``.

    ``session_config`` tables are merged entry by entry; every other key is replaced.

    Example:
        >>> s = effective_settings({"intra_op_num_threads": 1, "session_config": {"a": "1"}},
        ...                        {"intra_op_num_threads": 2, "session_config": {"b": "0"}})
        >>> s["intra_op_num_threads"], s["session_config"]
        (2, {'a': '1', 'b': '0'})
    """
    out = copy.deepcopy(DEFAULTS)
    for layer in (settings or {}), (overrides or {}):
        for key, value in layer.items():
            if key == "session_config" and isinstance(value, Mapping):
                out["session_config"] = {**out["session_config"], **{str(k): str(v) for k, v in value.items()}}
            else:
                out[key] = copy.deepcopy(value)
    return out


def _int(settings: Mapping[str, Any], key: str, lo: int, hi: int | None = None) -> int:
    value = settings[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"an integer >= {lo}" if hi is None else f"an integer {lo}..{hi}"
        raise BundleError(f"runtime.json: {key}={value!r} is not valid; use {bound}")
    return value


def _choice(settings: Mapping[str, Any], key: str, choices: Mapping[str, Any]) -> Any:
    value = settings[key]
    if value not in choices:
        raise BundleError(f"runtime.json: {key}={value!r} is not valid; choose one of: {', '.join(choices)}")
    return choices[value]


def session_options(settings: Mapping[str, Any] | None = None) -> ort.SessionOptions:
    """``onnxruntime.SessionOptions`` for a ``runtime.json`` dict (missing keys take ``DEFAULTS``).

    Raises ``BundleError`` naming the key and the valid values when a setting is wrong.

    Example:
        >>> so = session_options({"intra_op_num_threads": 2, "session_config": {"session.intra_op.allow_spinning": "0"}})
        >>> so.intra_op_num_threads, so.get_session_config_entry("session.intra_op.allow_spinning")
        (2, '0')
    """
    s = effective_settings(settings)
    so = ort.SessionOptions()
    so.intra_op_num_threads = _int(s, "intra_op_num_threads", 0)
    so.inter_op_num_threads = _int(s, "inter_op_num_threads", 0)
    so.execution_mode = _choice(s, "execution_mode", EXECUTION_MODES)
    so.graph_optimization_level = _choice(s, "graph_optimization_level", GRAPH_LEVELS)
    so.log_severity_level = _int(s, "log_severity_level", 0, 4)
    for key in ("enable_cpu_mem_arena", "enable_mem_pattern"):
        if key in s:
            if not isinstance(s[key], bool):
                raise BundleError(f"runtime.json: {key}={s[key]!r} is not valid; use true or false")
            setattr(so, key, s[key])
    config = s["session_config"]
    if not isinstance(config, Mapping):
        raise BundleError(f"runtime.json: session_config={config!r} is not valid; use a table of string entries")
    for key, value in config.items():
        try:
            so.add_session_config_entry(str(key), str(value))
        except Exception as e:  # ORT raises a bare RuntimeError/Fail for a bad entry
            raise BundleError(f"runtime.json: session_config entry {key}={value!r} was refused by onnxruntime "
                              f"({str(e).splitlines()[0]}); fix or remove it") from None
    return so


def make_session(model_path: str | os.PathLike, settings: Mapping[str, Any] | None = None,
                 overrides: Mapping[str, Any] | None = None) -> ort.InferenceSession:
    """A CPU ``InferenceSession`` for an ``.onnx`` or ``.ort`` model with the given settings.

    Example:
        >>> sess = make_session("bundle/model.quant.onnx", {"intra_op_num_threads": 1})  # doctest: +SKIP
        >>> [i.name for i in sess.get_inputs()]  # doctest: +SKIP
        ['input_ids', 'attention_mask', 'token_type_ids']
    """
    s = effective_settings(settings, overrides)
    so = session_options(s)
    disabled = s.get("disabled_optimizers") or []
    if not isinstance(disabled, list) or not all(isinstance(d, str) for d in disabled):
        raise BundleError(f"runtime.json: disabled_optimizers={disabled!r} is not valid; use a list of "
                          "ORT graph transformer names, e.g. [\"SkipLayerNormFusion\"], or []")
    path = os.fspath(model_path)
    if not os.path.isfile(path):
        raise BundleError(f"{path}: missing; check the 'model' entry of runtime.json or re-run `edgepack pack`")
    try:
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    except Exception as e:  # ORT raises InvalidGraph, Fail, NotImplemented... for a file it cannot load
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"{path}: onnxruntime {ort.__version__} cannot load it ({first[:200]}); "
                          "re-run `edgepack pack` or install the onnxruntime version in manifest.json") from None
