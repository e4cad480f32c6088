"""The benchmark harness: one implementation for ``python -m runtime_shim bench`` on a device and for
``edgepack bench`` on the build machine (which adds a PyTorch backend beside the bundle).

A *backend* is anything with these attributes (``OnnxPipeline`` is one)::

    name: str                     label_names: list[str]          settings: dict
    oos_label: str | None         oos_threshold: float | None     model_bytes: int    bundle_bytes: int
    encode(texts) -> dict of arrays            forward(encoded) -> np.ndarray logits [batch, num_labels]
    rss_argv: list[str]  (optional: the command that loads it in a fresh process, see ``rss_report``)

The harness does the softmax, argmax and threshold itself, in numpy, so every backend is timed and
scored by the same code.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from .datafiles import DataError

# The memory probe lives in runtime_shim.memory (standard library only: the probe's process must not load
# numpy for itself); re-exported here, where the harness and edgepack have always found it.
from .memory import measure_peak_rss, peak_rss_mb, rss_report, session_api  # noqa: F401
from .metrics import agreement, label_metrics
from .scores import softmax, thresholded, top_of_row


class Backend(Protocol):
    """What ``run_benchmark`` needs of a model (``OnnxPipeline`` and edgepack's PyTorch backend fit).

    Examples:
        >>> run_benchmark(OnnxPipeline("bundle"), texts, gold)  # doctest: +SKIP
        >>> run_benchmark(TorchBackend("teacher/"), texts, gold)  # edgepack's, same protocol  # doctest: +SKIP
    """

    name: str
    label_names: list[str]
    oos_label: str | None
    oos_threshold: float | None
    settings: dict
    model_bytes: int
    bundle_bytes: int

    def encode(self, texts: Sequence[str]) -> Any:
        """Model inputs for a batch of texts. Example: ``backend.encode(["hi", "set an alarm"])``."""

    def forward(self, encoded: Any) -> np.ndarray:
        """Logits ``[batch, num_labels]``. Example: ``backend.forward(backend.encode(["hi"])).shape``."""


# ------------------------------------------------------------------------------------------- accuracy


def _oos_id(backend: Backend) -> int | None:
    oos = getattr(backend, "oos_label", None)
    return backend.label_names.index(oos) if oos in backend.label_names else None


def predict_probs(backend: Backend, texts: Sequence[str], *, batch_size: int = 32,
                  progress: Callable[[str], None] | None = None) -> np.ndarray:
    """Softmax probabilities ``[n, num_labels]`` for ``texts``, in their order.

    Texts are batched by length so batches carry little padding: faster, and with dynamic int8
    quantization (activation ranges computed per batch) padding could nudge a borderline answer.

    Examples:
        >>> probs = predict_probs(OnnxPipeline("bundle"), ["set an alarm", "hi"])  # doctest: +SKIP
        >>> probs.shape  # doctest: +SKIP
        (2, 5)
    """
    n = len(texts)
    out = np.zeros((n, len(backend.label_names)), dtype=np.float64)
    order = sorted(range(n), key=lambda i: len(texts[i]))
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        out[idx] = softmax(np.asarray(backend.forward(backend.encode([texts[i] for i in idx]))))
        if progress:
            progress(f"accuracy {min(n, start + batch_size)}/{n} rows")
    return out


def accuracy_metrics(pred: Sequence[str], gold: Sequence[str], oos_label: str | None) -> dict[str, float | None]:
    """``accuracy``, ``in_scope_accuracy`` and ``oos_recall`` of label names against gold label names
    (:func:`runtime_shim.metrics.label_metrics`).

    Examples:
        >>> accuracy_metrics(["a", "oos", "b"], ["a", "oos", "oos"], "oos")
        {'accuracy': 0.6666666666666666, 'in_scope_accuracy': 1.0, 'oos_recall': 0.5}
    """
    return label_metrics(pred, gold, oos_label)


# -------------------------------------------------------------------------------------------- timing


def _stats(ns: Sequence[int]) -> dict[str, float]:
    ms = np.asarray(ns, dtype=np.float64) / 1e6
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    return {"p50": round(float(p50), 4), "p90": round(float(p90), 4), "p95": round(float(p95), 4),
            "p99": round(float(p99), 4), "mean": round(float(ms.mean()), 4), "n": int(ms.size)}


def _answer(logits: np.ndarray, label_names: Sequence[str], oos_id: int | None,
            threshold: float | None) -> list[str]:
    if len(logits) == 1:  # one query: what OnnxPipeline's single-text call does
        return [label_names[top_of_row(logits[0], oos_id, threshold)[0]]]
    probs = softmax(logits)
    ids = thresholded(probs.argmax(axis=-1), probs.max(axis=-1), oos_id, threshold)
    return [label_names[int(i)] for i in ids]


def time_single_queries(backend: Backend, texts: Sequence[str], *, warmup: int = 50, runs: int = 200,
                        gap_ms: float = 0.0, progress: Callable[[str], None] | None = None
                        ) -> dict[str, dict[str, float]]:
    """End-to-end single-query latency (tokenize + run + softmax/threshold), split into its parts.

    ``runs`` queries cycle through ``texts`` (in ``spread_order``) after ``warmup`` untimed ones; ``gap_ms`` sleeps between
    queries (a device answering requests as they come, not back to back: thread pools that spin
    between calls look better back to back than they serve). ``progress`` gets ``"queries n/N"``
    about every twentieth query (outside the timed region's clock reads).

    Examples:
        >>> t = time_single_queries(OnnxPipeline("bundle"), ["set an alarm"], warmup=5, runs=20)  # doctest: +SKIP
        >>> sorted(t)  # doctest: +SKIP
        ['latency_ms', 'model_ms', 'tokenize_ms']
    """
    names, oos_id, thr = backend.label_names, _oos_id(backend), getattr(backend, "oos_threshold", None)
    order = spread_order(len(texts), warmup + runs)
    total_n, every = warmup + runs, max(1, (warmup + runs) // 20)
    for i in range(warmup):
        _answer(backend.forward(backend.encode([texts[order[i % len(order)]]])), names, oos_id, thr)
        if progress and (i + 1) % every == 0:
            progress(f"queries {i + 1}/{total_n}")
    tok, model, total = [], [], []
    clock = time.perf_counter_ns
    gap_s = gap_ms / 1000.0
    # No collection pauses inside the timed region: they would land on random queries as tail latency
    # that belongs to this harness's lists, not to the model.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(runs):
            text = texts[order[(warmup + i) % len(order)]]
            if gap_s:
                time.sleep(gap_s)
            t0 = clock()
            enc = backend.encode([text])
            t1 = clock()
            logits = backend.forward(enc)
            t2 = clock()
            _answer(logits, names, oos_id, thr)
            t3 = clock()
            tok.append(t1 - t0)
            model.append(t2 - t1)
            total.append(t3 - t0)
            if progress and (warmup + i + 1) % every == 0:
                progress(f"queries {warmup + i + 1}/{total_n}")
    finally:
        if gc_was_enabled:
            gc.enable()
    return {"latency_ms": _stats(total), "tokenize_ms": _stats(tok), "model_ms": _stats(model)}


def spread_order(n: int, count: int) -> list[int]:
    """The order timed queries take the ``n`` texts in: every ``n // count``-th first, so the first
    ``count`` queries sample the whole split (a labelled file is often sorted by label; a cascade's
    latency depends on which texts it sends on), then the rest, so cycling still covers every text.

    Examples:
        >>> spread_order(10, 3)
        [0, 3, 6, 9, 1, 4, 7, 2, 5, 8]
        >>> spread_order(3, 5)
        [0, 1, 2]
    """
    step = max(1, n // max(1, count))
    return [i for start in range(step) for i in range(start, n, step)]


def throughput(backend: Backend, texts: Sequence[str], batch_size: int, *, batches: int) -> float:
    """Queries per second, end to end, over ``batches`` batches of ``batch_size`` (after one warm-up batch).

    Examples:
        >>> throughput(OnnxPipeline("bundle"), ["set an alarm", "hi"], 32, batches=5)  # doctest: +SKIP
        4120.5
    """
    names, oos_id, thr = backend.label_names, _oos_id(backend), getattr(backend, "oos_threshold", None)
    order = spread_order(len(texts), batch_size * (batches + 1))
    n = len(order)
    chunks = [[texts[order[(b * batch_size + j) % n]] for j in range(batch_size)] for b in range(batches + 1)]
    _answer(backend.forward(backend.encode(chunks[0])), names, oos_id, thr)
    t0 = time.perf_counter_ns()
    for chunk in chunks[1:]:
        _answer(backend.forward(backend.encode(chunk)), names, oos_id, thr)
    elapsed = (time.perf_counter_ns() - t0) / 1e9
    return round(batch_size * batches / elapsed, 2) if elapsed > 0 else float("inf")


# ------------------------------------------------------------------------------------------- harness


def _versions() -> dict[str, str]:
    from importlib import metadata  # not at import: it pulls in email, zipfile and csv (3.8 MB resident)

    out = {"python": platform.python_version()}
    for name in ("onnxruntime", "tokenizers", "numpy", "torch", "transformers"):
        if name in ("torch", "transformers") and name not in sys.modules:
            continue  # report them only for a backend that uses them
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def run_benchmark(
    backend: Backend,
    texts: Sequence[str],
    gold: Sequence[str],
    *,
    reference: Sequence[str] | None = None,
    warmup: int = 50,
    runs: int = 200,
    batch_sizes: Sequence[int] = (1, 32),
    rss_argv: Sequence[str] | None = None,
    gap_ms: float = 0.0,
    eval_batch_size: int = 32,
    throughput_batches: int = 20,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Accuracy, latency, throughput, memory and size of one backend on labelled texts.

    - Accuracy is computed on every row: ``accuracy`` (with the backend's out-of-scope threshold),
      ``accuracy_raw`` (argmax), ``in_scope_accuracy``/``oos_recall`` and their ``_raw`` variants when
      the backend has an out-of-scope label (``None`` otherwise), ``agreement`` with ``reference``
      labels when given, and ``predictions`` (thresholded label names) to compare models with.
    - ``latency_ms``/``tokenize_ms``/``model_ms``: p50/p90/p95/p99/mean/n over ``runs`` single queries
      after ``warmup``; ``throughput_qps``: ``{"1": ..., "32": ...}`` for ``batch_sizes``, over
      ``max(throughput_batches, ceil(runs / batch_size))`` batches each.
    - ``peak_rss_mb``: from ``rss_argv`` (default: the backend's ``rss_argv``) run in a fresh
      process; ``[]`` skips it. A failure leaves ``None`` and the reason in ``peak_rss_error``.
    - ``progress`` gets a short line as the work goes (``"accuracy 64/120 rows"``, ``"queries 50/250"``,
      ``"throughput at batch 32"``, ``"peak memory"``).

    Examples:
        >>> pipe = OnnxPipeline("bundle")  # doctest: +SKIP
        >>> texts, gold = read_labelled("bundle/eval.jsonl")  # doctest: +SKIP
        >>> r = run_benchmark(pipe, texts, gold, warmup=5, runs=20)  # doctest: +SKIP
        >>> r["accuracy"], r["latency_ms"]["p50"], r["peak_rss_mb"]  # doctest: +SKIP
        (0.95, 0.21, 58.4)
    """
    texts = [str(t) for t in texts]
    gold = [str(g) for g in gold]
    if not texts:
        raise DataError("no evaluation rows; give a file with labelled rows")
    if len(texts) != len(gold):
        raise DataError(f"{len(texts)} texts but {len(gold)} gold labels; pass one label per text")
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs={runs}, warmup={warmup}: need runs >= 1 and warmup >= 0")
    names = list(backend.label_names)
    unknown = sorted(set(gold) - set(names))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise DataError(f"gold labels the model does not know: {shown} (model labels: {', '.join(names[:8])}"
                        f"{', ...' if len(names) > 8 else ''}); evaluate on data with the model's labels")
    if reference is not None and len(reference) != len(texts):
        raise DataError(f"{len(reference)} reference labels for {len(texts)} rows; "
                        "benchmark the reference on the same data")
    oos_label = getattr(backend, "oos_label", None)
    oos_label = oos_label if oos_label in names else None
    threshold = getattr(backend, "oos_threshold", None) if oos_label is not None else None

    probs = predict_probs(backend, texts, batch_size=eval_batch_size, progress=progress)
    raw_ids = probs.argmax(axis=-1)
    final_ids = thresholded(raw_ids, probs.max(axis=-1), _oos_id(backend) if oos_label else None, threshold)
    raw_pred = [names[int(i)] for i in raw_ids]
    pred = [names[int(i)] for i in final_ids]
    with_thr = accuracy_metrics(pred, gold, oos_label)
    raw = accuracy_metrics(raw_pred, gold, oos_label)

    result: dict[str, Any] = {
        "name": backend.name,
        "n": len(texts),
        "accuracy": with_thr["accuracy"],
        "accuracy_raw": raw["accuracy"],
        "in_scope_accuracy": with_thr["in_scope_accuracy"],
        "in_scope_accuracy_raw": raw["in_scope_accuracy"],
        "oos_recall": with_thr["oos_recall"],
        "oos_recall_raw": raw["oos_recall"],
        "agreement": None,
        "oos_label": oos_label,
        "oos_threshold": threshold,
    }
    if reference is not None:
        result["agreement"] = agreement(pred, [str(r) for r in reference])

    result.update(time_single_queries(backend, texts, warmup=warmup, runs=runs, gap_ms=gap_ms, progress=progress))
    result["throughput_qps"] = {}
    for bs in batch_sizes:
        if progress:
            progress(f"throughput at batch {bs}")
        result["throughput_qps"][str(bs)] = throughput(backend, texts, bs,
                                                       batches=max(throughput_batches, math.ceil(runs / bs)))

    argv = rss_argv if rss_argv is not None else getattr(backend, "rss_argv", None)
    result["peak_rss_mb"] = None
    if argv:
        import subprocess

        if progress:
            progress("peak memory")
        try:
            result["peak_rss_mb"] = measure_peak_rss(argv)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
            result["peak_rss_error"] = " ".join(str(e).split())
    settings = dict(getattr(backend, "settings", {}) or {})
    result.update({
        "model_bytes": int(backend.model_bytes),
        "bundle_bytes": int(backend.bundle_bytes),
        "threads": settings.get("intra_op_num_threads"),
        "settings": settings,
        "session_api": session_api(backend),  # which ONNX Runtime API made the figures
        "warmup": warmup,
        "runs": runs,
        "gap_ms": gap_ms,
        "host": {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count(),
                 "versions": _versions()},
        "predictions": pred,
    })
    return result


# --------------------------------------------------------------------------------------------- table


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _ms(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def _num(x: Any, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def result_value(result: Mapping[str, Any], dotted: str) -> Any:
    """A figure of a benchmark result by dotted path (``"latency_ms.p95"``); None when any part is missing.

    Examples:
        >>> result_value({"latency_ms": {"p95": 1.3}}, "latency_ms.p95")
        1.3
    """
    if dotted in result:
        return result[dotted]
    node: Any = result
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width table, one row per benchmarked model (accuracies in %, times in ms, sizes in MB).

    Examples:
        >>> print(format_table([run_benchmark(pipe, texts, gold)]))  # doctest: +SKIP
        model   acc %  acc raw %  in-scope %  oos rec %  agree %  model MB  p50 ms ...
        bundle  95.00      90.00       100.0 ...
    """
    batch_sizes = sorted({int(k) for r in results for k in (r.get("throughput_qps") or {})})
    columns: list[tuple[str, Any]] = [
        ("model", lambda r: str(r.get("name", "?"))),
        ("acc %", lambda r: _pct(r.get("accuracy"))),
        ("acc raw %", lambda r: _pct(r.get("accuracy_raw"))),
        ("in-scope %", lambda r: _pct(r.get("in_scope_accuracy"))),
        ("oos rec %", lambda r: _pct(r.get("oos_recall"))),
        ("agree %", lambda r: _pct(r.get("agreement"))),
        ("model MB", lambda r: _num(None if r.get("model_bytes") is None else r["model_bytes"] / 1e6, 2)),
        ("p50 ms", lambda r: _ms((r.get("latency_ms") or {}).get("p50"))),
        ("mean ms", lambda r: _ms((r.get("latency_ms") or {}).get("mean"))),
        ("p95 ms", lambda r: _ms((r.get("latency_ms") or {}).get("p95"))),
        ("p99 ms", lambda r: _ms((r.get("latency_ms") or {}).get("p99"))),
        ("tok p50", lambda r: _ms((r.get("tokenize_ms") or {}).get("p50"))),
        ("model p50", lambda r: _ms((r.get("model_ms") or {}).get("p50"))),
    ]
    for bs in batch_sizes:
        columns.append((f"qps@{bs}", lambda r, bs=bs: _num((r.get("throughput_qps") or {}).get(str(bs)))))
    columns += [
        ("RSS MB", lambda r: _num(r.get("peak_rss_mb"))),
        ("threads", lambda r: "-" if r.get("threads") is None else str(r["threads"])),
    ]
    cells = [[fn(r) for _, fn in columns] for r in results]
    widths = [max([len(head)] + [len(row[i]) for row in cells]) for i, (head, _) in enumerate(columns)]

    def _line(values: Sequence[str]) -> str:
        first = values[0].ljust(widths[0])
        return "  ".join([first] + [v.rjust(w) for v, w in zip(values[1:], widths[1:], strict=True)]).rstrip()

    out = [_line([head for head, _ in columns]), _line(["-" * w for w in widths])]
    out += [_line(row) for row in cells]
    n = {r.get("n") for r in results if r.get("n")}
    runs = {r.get("runs") for r in results if r.get("runs")}
    if n or runs:
        notes = []
        if n:
            notes.append(f"accuracy over {', '.join(map(str, sorted(n)))} rows")
        if runs:
            notes.append(f"latency over {', '.join(map(str, sorted(runs)))} single queries")
        out.append("(" + "; ".join(notes) + "; acc: with the out-of-scope threshold, acc raw: argmax)")
    return "\n".join(out)
