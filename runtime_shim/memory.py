"""Peak memory of a process serving a bundle: the figure ``bench`` reports as ``peak_rss_mb``, measured in
a fresh process (``python -m runtime_shim rss BUNDLE``). Standard library only, so the probe itself
loads nothing a device's process would not (docs/memory.md).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The shim's parent directory: a fresh process started for the memory probe must import this same copy.
_SHIM_PARENT = str(Path(__file__).resolve().parent.parent)


def session_api(backend: Any) -> str | None:
    """Which ONNX Runtime API a backend's figures come from: ``"c"`` (``runtime_shim.csession``),
    ``"python"`` (the package), or None for a backend without a session (edgepack's PyTorch one)."""
    session = getattr(backend, "session", None)
    if session is None:
        return None
    return "c" if hasattr(session, "run_rows") else "python"


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far, in MiB (``None`` where it cannot be read).

    On Linux this is ``VmHWM`` from ``/proc/self/status``: ``ru_maxrss`` survives ``execve``, so a
    child started by a large parent (a benchmark that has torch loaded) would report the parent's
    peak. Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).

    Example:
        >>> peak_rss_mb() > 0  # doctest: +SKIP
        True
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 2)
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024, 2)


def rss_report(backend: Any, texts: Sequence[str], *, warmup: int = 10, singles: int = 20,
               batches: int = 3, batch_size: int = 32) -> dict[str, Any]:
    """Serve with a freshly loaded pipeline (warm-up and single texts, then batches) and report peak memory.

    What the fresh process started by ``run_benchmark`` runs (``python -m runtime_shim rss BUNDLE``
    prints the result as one JSON line). It calls the pipeline as an application does (``pipe(text)``,
    ``pipe(texts)``), with the harness's workload: ``warmup + singles`` single texts and ``batches + 1``
    batches of ``batch_size``, cycling through ``texts``; timing is ``bench``'s job, not this one's.

    Example:
        >>> rss_report(OnnxPipeline("bundle"), ["set an alarm"])  # doctest: +SKIP
        {'peak_rss_mb': 54.3, 'name': 'bundle', 'threads': 1, 'session_api': 'c', 'numpy_loaded': False}
    """
    texts = list(texts) or ["hello"]
    n = len(texts)
    for i in range(warmup + singles):
        backend(texts[i % n])
    for b in range(batches + 1):
        backend([texts[(b * batch_size + j) % n] for j in range(batch_size)], batch_size=batch_size)
    return {"peak_rss_mb": peak_rss_mb(), "name": backend.name,
            "threads": backend.settings.get("intra_op_num_threads"),
            "session_api": session_api(backend),
            "numpy_loaded": "numpy" in sys.modules}


def measure_peak_rss(argv: Sequence[str], *, timeout: float = 600.0) -> float:
    """Run ``argv`` in a fresh process and return the ``peak_rss_mb`` from the JSON line it prints.

    Raises ``RuntimeError`` with the command's last stderr line when it fails.

    Example:
        >>> measure_peak_rss([sys.executable, "-m", "runtime_shim", "rss", "bundle"])  # doctest: +SKIP
        61.3
    """
    import subprocess

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_SHIM_PARENT, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{' '.join(map(str, argv[:5]))}... exited {proc.returncode}: {last}")
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and data.get("peak_rss_mb") is not None:
            return float(data["peak_rss_mb"])
    raise RuntimeError(f"{' '.join(map(str, argv[:5]))}... printed no JSON line with peak_rss_mb")
