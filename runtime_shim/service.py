"""The service behind ``python -m runtime_shim serve``, without its HTTP: the releases (loaded, swapped,
drained, freed), the checks of a classify request, and the counters ``/metrics`` shows.

A new release is verified (with the device's keys where it has them, its version checked but never
recorded: the deploying account records it) and loaded beside the serving one, then swapped in by one
assignment under a lock; each request holds the release it started on, so requests in flight finish
on the old release, which is freed once the last of them returns. A release that fails to verify or
load is refused with one log line and the old one keeps serving.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .manifest import write_json_atomic

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STATUS_FORMAT = "edgepack-serve/1"


class Limits:
    """What one request may hold and how long a client may take (the command's options)."""

    def __init__(
        self,
        *,
        max_body_bytes: int = 1 << 20,
        max_texts: int = 256,
        max_text_chars: int = 4096,
        read_timeout: float = 10.0,
        idle_timeout: float = 30.0,
        max_connections: int = 256,
        workers: int = 2,
    ):
        self.max_body_bytes, self.max_texts, self.max_text_chars = max_body_bytes, max_texts, max_text_chars
        self.read_timeout, self.idle_timeout = read_timeout, idle_timeout
        self.max_connections, self.workers = max_connections, workers


class RequestError(Exception):
    """A request the service answers with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def log_line(line: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} serve: {line}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- releases


class Release:
    """One loaded bundle and what the service says about it; ``inflight`` counts requests using it."""

    def __init__(self, pipe: Any, target: Path, digest: str):
        self.pipe, self.target, self.inflight = pipe, target, 0
        m = pipe.manifest if isinstance(pipe.manifest, dict) else {}
        trust = pipe.trust
        self.info: dict[str, Any] = {
            "name": pipe.name,
            "version": m.get("version"),
            "release": target.name,
            "path": str(target),
            "manifest_sha256": digest,
            "target": m.get("target"),
            "labels": list(pipe.label_names),
            "oos_label": pipe.oos_label,
            "oos_threshold": pipe.oos_threshold,
            "signed": bool(trust and trust.signed),
            "key_id": trust.key_id if trust and trust.signed else None,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def load_release(path: Path, *, keys: str | None, overrides: dict[str, Any]) -> Release:
    """Verify and load the bundle ``path`` resolves to now (``BundleError`` when it does not pass)."""
    from .pipeline import OnnxPipeline
    from .trust import trusted_keys_dir, verify_bundle

    target = Path(os.path.realpath(path))
    keys_dir = trusted_keys_dir(keys)
    # With keys: signature, files and version checked, the version not recorded (the service's account
    # may not write the device's state; deploy recorded it when it checked the release).
    checked = verify_bundle(target, keys=keys_dir, record=False) if keys_dir is not None else None
    pipe = OnnxPipeline(target, verify=checked is None, overrides=overrides)
    if checked is not None:
        pipe.trust, pipe.manifest = checked, checked.manifest
    digest = hashlib.sha256((target / "manifest.json").read_bytes()).hexdigest()
    pipe("warm up")  # the first call allocates; do it before the release takes traffic
    return Release(pipe, target, digest)


def _malloc_trim() -> None:
    """Hand freed heap pages back to the system (glibc keeps them otherwise: RSS would not show the free)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Service:
    """The releases and the counters; the HTTP layer calls ``classify``, ``bundle``, ``metrics``.

    Example:
        >>> svc = Service("/srv/edgepack/clinc150/current")  # doctest: +SKIP
        >>> svc.classify({"inputs": "set an alarm"})[1]["outputs"]  # doctest: +SKIP
        [{'label': 'alarm', 'score': 0.97}]
    """

    def __init__(
        self,
        bundle: str | os.PathLike,
        *,
        keys: str | None = None,
        overrides: dict[str, Any] | None = None,
        limits: Limits | None = None,
        status_file: str | None = None,
        log: Callable[[str], None] = log_line,
    ):
        self.path = Path(bundle)
        self.keys, self.overrides = keys, dict(overrides or {})
        self.limits = limits or Limits()
        self.status_file = status_file
        self.address: str | None = None  # where the HTTP layer listens, for the status file
        self.log = log
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._model_slots = threading.BoundedSemaphore(self.limits.workers)
        self._alive: weakref.WeakSet[Release] = weakref.WeakSet()
        self._refused: dict[str, str] = {}  # target -> the reason, logged once until SIGHUP asks again
        self.current = load_release(self.path, keys=keys, overrides=self.overrides)
        self._alive.add(self.current)
        self.requests: dict[tuple[str, int], int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum, self.latency_count, self.texts = 0.0, 0, 0
        self.reloads = {"ok": 0, "refused": 0}
        self.connections = 0
        self.started = time.time()
        self.write_status("serving")

    # ------------------------------------------------------------------------------------- reload

    def check(self, *, asked: bool = False) -> str:
        """Load the release ``path`` resolves to when it is not the one serving; ``asked`` (SIGHUP) retries
        a release refused before. Returns what happened: ``unchanged``, ``reloaded`` or ``refused``."""
        target = os.path.realpath(self.path)
        if target == str(self.current.target):
            return "unchanged"
        if target in self._refused and not asked:
            return "refused"
        old = self.current
        try:
            new = load_release(self.path, keys=self.keys, overrides=self.overrides)
        except Exception as e:  # a release that does not load must never take the service down
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            self._refused[target] = reason
            self.reloads["refused"] += 1
            self.log(f"refused {target}: {reason}; still serving {old.target}")
            self.write_status(f"refused {target}: {reason}")
            return "refused"
        if str(new.target) != target:  # the link moved again while loading: the next check takes it
            self.log(f"{self.path} moved while {target} loaded; checking again")
        with self._lock:
            self.current = new  # one assignment: each request holds the release it started on
            self._alive.add(new)
        self._refused.pop(target, None)
        self.reloads["ok"] += 1
        self.log(
            f"serving {new.target} ({new.info['name']} version {new.info['version']}); draining {old.target}"
        )
        self.write_status("serving")
        self._free(old)
        return "reloaded"

    def _free(self, old: Release) -> None:
        with self._drained:
            self._drained.wait_for(lambda r=old: r.inflight == 0, timeout=300)
        left = old.inflight
        ref = weakref.ref(old)
        del old
        gc.collect()
        _malloc_trim()
        if ref() is not None or left:
            self.log(f"the previous release is still referenced ({left} requests in flight)")

    def write_status(self, state: str) -> None:
        if not self.status_file:
            return
        info = self.current.info
        doc = {
            "format": STATUS_FORMAT,
            "pid": os.getpid(),
            "address": self.address,
            "bundle": str(self.path),
            "state": state,
            "release": info["release"],
            "path": info["path"],
            "name": info["name"],
            "version": info["version"],
            "manifest_sha256": info["manifest_sha256"],
            "time": time.time(),
        }
        try:
            write_json_atomic(self.status_file, doc)
        except OSError as e:
            self.log(f"{self.status_file}: cannot write the status file ({e.strerror})")

    @property
    def releases_loaded(self) -> int:
        return len(self._alive)

    # ----------------------------------------------------------------------------------- requests

    def parse(self, body: bytes) -> tuple[str | list[str], int | None, bool]:
        """``(inputs, top_k, apply_threshold)`` of a classify body; ``RequestError`` (400, 413) otherwise."""
        lim = self.limits
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser goes
            raise RequestError(
                400,
                f"the body is not JSON ({str(e)[:80]}); send "
                '{"inputs": "text"} or {"inputs": ["text", ...]}',
            ) from None
        if not isinstance(doc, dict) or "inputs" not in doc:
            raise RequestError(400, 'expected a JSON object with "inputs": a text or a list of texts')
        unknown = sorted(set(doc) - {"inputs", "top_k", "apply_threshold"})
        if unknown:
            raise RequestError(
                400, f"unknown field {', '.join(unknown)[:80]}; fields: inputs, top_k, apply_threshold"
            )
        inputs = doc["inputs"]
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise RequestError(400, '"inputs" must be a string or a list of strings')
        if not texts:
            raise RequestError(400, '"inputs" is an empty list; send at least one text')
        if len(texts) > lim.max_texts:
            raise RequestError(
                413, f"{len(texts)} texts in one request; at most {lim.max_texts} (--max-texts)"
            )
        longest = max(len(t) for t in texts)
        if longest > lim.max_text_chars:
            raise RequestError(
                413, f"a text of {longest} characters; at most {lim.max_text_chars} (--max-text-chars)"
            )
        top_k = doc.get("top_k", "best")  # absent: the best label; null: every label (as OnnxPipeline)
        if top_k not in (None, "best") and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise RequestError(400, '"top_k" must be a positive integer, null (every label) or "best"')
        apply = doc.get("apply_threshold", True)
        if not isinstance(apply, bool):
            raise RequestError(400, '"apply_threshold" must be true or false')
        return inputs, top_k, apply

    def classify(self, body: bytes) -> tuple[int, dict[str, Any]]:
        inputs, top_k, apply = self.parse(body)
        with self._lock:
            release = self.current
            release.inflight += 1
        try:
            with self._model_slots:
                outputs = release.pipe(inputs, top_k=top_k, apply_threshold=apply)
            return 200, {
                "outputs": outputs,
                "bundle": release.info["name"],
                "release": release.info["release"],
            }
        finally:
            with self._drained:
                self.texts += 1 if isinstance(inputs, str) else len(inputs)
                release.inflight -= 1
                if release.inflight == 0:
                    self._drained.notify_all()

    def count(self, path: str, status: int, seconds: float | None) -> None:
        key = (path, status)
        with self._lock:
            self.requests[key] = self.requests.get(key, 0) + 1
            if seconds is not None:
                i = next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
                self.buckets[i] += 1
                self.latency_sum += seconds
                self.latency_count += 1

    def metrics(self) -> str:
        """The Prometheus text exposition of the counters."""
        from .memory import peak_rss_mb

        lines = [
            "# HELP edgepack_requests_total Requests answered, by path and HTTP status.",
            "# TYPE edgepack_requests_total counter",
        ]
        with self._lock:
            requests = sorted(self.requests.items())
            buckets, total, count = list(self.buckets), self.latency_sum, self.latency_count
        lines += [f'edgepack_requests_total{{path="{p}",code="{c}"}} {n}' for (p, c), n in requests]
        lines += [
            "# HELP edgepack_classify_seconds Time from a whole request to its answer, /v1/classify.",
            "# TYPE edgepack_classify_seconds histogram",
        ]
        running = 0
        for b, n in zip((*LATENCY_BUCKETS, "+Inf"), buckets, strict=True):
            running += n
            lines.append(f'edgepack_classify_seconds_bucket{{le="{b}"}} {running}')
        lines += [
            f"edgepack_classify_seconds_sum {total:.6f}",
            f"edgepack_classify_seconds_count {count}",
            "# TYPE edgepack_texts_total counter",
            f"edgepack_texts_total {self.texts}",
            "# HELP edgepack_reloads_total Releases taken (ok) or refused since start.",
            "# TYPE edgepack_reloads_total counter",
            *(f'edgepack_reloads_total{{result="{k}"}} {v}' for k, v in self.reloads.items()),
            "# HELP edgepack_releases_loaded Releases in memory (2 while one drains).",
            "# TYPE edgepack_releases_loaded gauge",
            f"edgepack_releases_loaded {self.releases_loaded}",
            "# TYPE edgepack_open_connections gauge",
            f"edgepack_open_connections {self.connections}",
            "# TYPE process_resident_memory_bytes gauge",
            f"process_resident_memory_bytes {_rss_bytes()}",
            "# TYPE process_peak_resident_memory_bytes gauge",
            f"process_peak_resident_memory_bytes {int((peak_rss_mb() or 0) * 1024 * 1024)}",
            "# TYPE process_start_time_seconds gauge",
            f"process_start_time_seconds {self.started:.3f}",
        ]
        return "\n".join(lines) + "\n"


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
