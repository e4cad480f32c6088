"""``python -m runtime_shim serve BUNDLE``: the bundle as an HTTP/1.1 JSON service for the other programs
on the device, taking new releases without dropping a request.

    python -m runtime_shim serve /srv/edgepack/clinc150/current --socket /run/edgepack/serve.sock
    python -m runtime_shim serve BUNDLE --host 127.0.0.1 --port 8080

- ``POST /v1/classify`` ``{"inputs": "text" | ["text", ...], "top_k": K, "apply_threshold": true}``:
  ``{"outputs": ..., "bundle": NAME, "release": ID}``, ``outputs`` exactly what ``OnnxPipeline`` returns
  for the same call.
- ``GET /healthz``: 200 while a release is loaded; ``GET /v1/bundle``: the release (name, version,
  manifest digest, target, threshold, labels); ``GET /metrics``: Prometheus text (requests by path and
  status, latency histogram, reloads, releases held, memory).

Reload: ``SIGHUP``, and a check of BUNDLE's target every ``--watch`` seconds (BUNDLE is usually the
``current`` link ``edgepack deploy`` switches). A new target is verified and loaded beside the serving
release (with the device's keys where it has them, never recording a version: the deploying account
does), swapped in by one assignment; requests in flight finish on the old release, which is then
freed. A release that fails is refused with one log line and the old one keeps serving.

Standard library only (``http.server``'s threads): measured against uvicorn+starlette in
docs/results.md. Each connection has a thread; a bounded number run the model at once (``--workers``),
a bounded number of connections are open (``--max-connections``, 503 beyond), and a request must
arrive whole within ``--read-timeout`` seconds (a reaper cuts slower clients: 408), so a slow or
stalled client holds one connection slot and never the model.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from .manifest import BundleError, write_json_atomic

PROG = "python -m runtime_shim serve"
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


def _log(line: str) -> None:
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
        log: Callable[[str], None] = _log,
    ):
        self.path = Path(bundle)
        self.keys, self.overrides = keys, dict(overrides or {})
        self.limits = limits or Limits()
        self.status_file = status_file
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
        self._write_status("serving")

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
            self._write_status(f"refused {target}: {reason}")
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
        self._write_status("serving")
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

    def _write_status(self, state: str) -> None:
        if not self.status_file:
            return
        info = self.current.info
        doc = {
            "format": STATUS_FORMAT,
            "pid": os.getpid(),
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
        top_k = doc.get("top_k")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise RequestError(400, '"top_k" must be a positive integer or null')
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


# ------------------------------------------------------------------------------------------- HTTP


class _Reaper:
    """Cuts the reading side of connections past their deadline: a client that sends slowly or never
    finishes gets EOF (then 408) however it spaces its bytes, which a per-read timeout alone allows."""

    def __init__(self) -> None:
        self._deadlines: dict[socket.socket, float] = {}
        self._cut: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="serve-reaper", daemon=True).start()

    def set(self, sock: socket.socket, deadline: float | None) -> None:
        with self._lock:
            if deadline is None:
                self._deadlines.pop(sock, None)
            else:
                self._deadlines[sock] = deadline

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            now = time.monotonic()
            with self._lock:
                late = [s for s, d in self._deadlines.items() if d <= now]
                for s in late:
                    del self._deadlines[s]
                    self._cut.add(s)
            for s in late:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RD)

    def was_cut(self, sock: socket.socket) -> bool:
        with self._lock:
            return sock in self._cut

    def forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._deadlines.pop(sock, None)
            self._cut.discard(sock)

    def stop(self) -> None:
        self._stop.set()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edgepack-serve"
    sys_version = ""
    service: Service  # set on the subclass the server makes
    reaper: _Reaper

    def setup(self) -> None:
        super().setup()
        self.timed_out = False
        self.connection.settimeout(self.service.limits.idle_timeout)
        if self.connection.family != socket.AF_UNIX:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reaper.set(self.connection, time.monotonic() + self.service.limits.idle_timeout)

    def finish(self) -> None:
        self.reaper.forget(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def version_string(self) -> str:
        return self.server_version

    def address_string(self) -> str:  # a Unix socket's peer has no address
        return str(self.client_address[0]) if self.client_address else "unix"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (BaseHTTPRequestHandler's name)
        pass  # no access log: /metrics counts requests

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # a bad request line is counted, its status sent; the log keeps service events only

    def handle_one_request(self) -> None:
        # Once the request line has arrived, the rest must come within --read-timeout.
        try:
            super().handle_one_request()
        except OSError:
            self.close_connection = True
        if not self.close_connection:
            self.reaper.set(self.connection, time.monotonic() + self.service.limits.idle_timeout)

    def parse_request(self) -> bool:
        self.reaper.set(self.connection, time.monotonic() + self.service.limits.read_timeout)
        if not super().parse_request():
            return False
        if self.reaper.was_cut(self.connection):  # the headers stopped coming: what arrived is not a request
            self.send_error(408)
            return False
        return True

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.reaper.set(self.connection, None)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        # Headers and body in one write: two small writes meet the client's delayed ACK (40 ms a request).
        self._headers_buffer.append(b"\r\n" + (body if self.command != "HEAD" else b""))
        self.flush_headers()

    def _json(self, status: int, doc: Any, path: str, started: float | None = None) -> None:
        self._send(status, json.dumps(doc).encode())
        self.service.count(path, status, None if started is None else time.perf_counter() - started)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own refusals (a bad request line, headers too long) as JSON, counted.
        if self.reaper.was_cut(self.connection):  # what arrived before the cut is not the client's request
            code, message = (
                408,
                "the request did not arrive within the time allowed (--read-timeout, --idle-timeout)",
            )
        self.close_connection = True
        self.request_version = "HTTP/1.1"  # an unparsed request line left 0.9, which has no status line
        with contextlib.suppress(OSError):
            self._json(code, {"error": message or self.responses.get(code, ("error",))[0]}, "other")

    def _route(self) -> str:
        return self.path.split("?", 1)[0]

    def do_GET(self) -> None:
        path, svc = self._route(), self.service
        if path == "/healthz":
            self._json(200, {"status": "ok", "release": svc.current.info["release"]}, path)
        elif path == "/v1/bundle":
            self._json(200, svc.current.info, path)
        elif path == "/metrics":
            self._send(200, svc.metrics().encode(), "text/plain; version=0.0.4")
            svc.count(path, 200, None)
        elif path == "/v1/classify":
            self._json(405, {"error": "use POST /v1/classify"}, path)
        else:
            self._json(
                404,
                {"error": f"no {path[:80]}; paths: POST /v1/classify, GET /healthz, /v1/bundle, /metrics"},
                "other",
            )

    do_HEAD = do_GET

    def do_POST(self) -> None:
        path = self._route()
        if path != "/v1/classify":
            self._discard_body()
            self._json(
                404 if path not in ("/healthz", "/v1/bundle", "/metrics") else 405,
                {"error": f"POST {path[:80]}: only /v1/classify takes POST"},
                "other",
            )
            return
        try:
            body = self._read_body()
        except RequestError as e:
            self.close_connection = True
            status = 408 if self.reaper.was_cut(self.connection) else e.status
            self._json(status, {"error": str(e)}, path)
            return
        started = time.perf_counter()
        try:
            status, doc = self.service.classify(body)
        except RequestError as e:
            status, doc = e.status, {"error": str(e)}
        except Exception as e:  # the model failing on one input answers 500; the service goes on
            status, doc = 500, {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            self.service.log(f"500 on /v1/classify: {type(e).__name__}: {str(e)[:200]}")
        self._json(status, doc, path, started if status == 200 else None)

    def _discard_body(self) -> None:
        self.close_connection = True  # whatever body came stays unread: the connection ends with this answer

    def _read_body(self) -> bytes:
        lim = self.service.limits
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(411, "send the body with a Content-Length (no chunked transfer)")
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "a POST needs a Content-Length header")
        try:
            n = int(length)
        except ValueError:
            raise RequestError(400, f"Content-Length {length[:20]!r} is not a number") from None
        if n < 0:
            raise RequestError(400, f"Content-Length {n} is negative")
        if n > lim.max_body_bytes:
            raise RequestError(413, f"a body of {n} bytes; at most {lim.max_body_bytes} (--max-body-bytes)")
        chunks, got = [], 0
        while got < n:
            try:
                chunk = (
                    self.rfile.read1(n - got) if hasattr(self.rfile, "read1") else self.rfile.read(n - got)
                )
            except (TimeoutError, OSError):
                chunk = b""
            if not chunk:
                raise RequestError(
                    408,
                    f"the body stopped at {got} of {n} bytes within --read-timeout {lim.read_timeout:g} s",
                )
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)


class _Server(socketserver.ThreadingMixIn):
    daemon_threads = True
    block_on_close = False
    service: Service

    def process_request(self, request: Any, client_address: Any) -> None:
        svc = self.service
        with svc._lock:
            full = svc.connections >= svc.limits.max_connections
            if not full:
                svc.connections += 1
        if full:  # answered here, without a thread: a flood of connections cannot exhaust them
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                body = json.dumps(
                    {
                        "error": f"over {svc.limits.max_connections} open connections "
                        "(--max-connections); retry"
                    }
                ).encode()
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nRetry-After: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                )
            svc.count("other", 503, None)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.service._lock:
                self.service.connections -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.service.log(f"connection error: {sys.exc_info()[1]!r}"[:300])


class TCPServer(_Server, socketserver.TCPServer):
    allow_reuse_address = True


class UnixServer(_Server, socketserver.UnixStreamServer):
    pass


def make_server(service: Service, *, host: str = "127.0.0.1", port: int = 0, socket_path: str | None = None):
    """An HTTP server for ``service`` on a TCP address or a Unix socket (not started).

    Example:
        >>> srv = make_server(Service("bundle"), port=0)  # doctest: +SKIP
        >>> srv.server_address  # doctest: +SKIP
        ('127.0.0.1', 40123)
    """
    reaper = _Reaper()
    handler = type("BoundHandler", (Handler,), {"service": service, "reaper": reaper})
    if socket_path:
        path = Path(socket_path)
        if path.is_socket():
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(str(path))
                raise BundleError(
                    f"{path}: another service is listening there; stop it or pass another --socket"
                )
            except OSError:
                path.unlink()  # left by a service that is gone
            finally:
                probe.close()
        elif path.exists() or path.is_symlink():
            raise BundleError(f"{path}: exists and is not a socket; pass another --socket")
        server = UnixServer(str(path), handler)
    else:
        server = TCPServer((host, port), handler)
    server.service = service
    server.reaper = reaper
    return server


# ------------------------------------------------------------------------------------------ client


class Client:
    """A keep-alive client of the service: ``Client("http://127.0.0.1:8080")`` or ``Client("/run/x.sock")``.

    Calling it classifies as ``OnnxPipeline`` does (``client("text")``, ``client([...], top_k=2)``), so
    ``bench`` can time an application's view of the service.

    Example:
        >>> Client("/run/edgepack/serve.sock")("set an alarm")  # doctest: +SKIP
        [{'label': 'alarm', 'score': 0.97}]
    """

    def __init__(self, address: str, *, timeout: float = 30.0):
        import http.client

        self.address, self.timeout = address, timeout
        if address.startswith("http://"):
            host, _, port = address[len("http://") :].rstrip("/").rpartition(":")
            self._make = lambda: http.client.HTTPConnection(host, int(port), timeout=timeout)
        else:
            path = address

            class _Unix(http.client.HTTPConnection):
                def connect(self) -> None:
                    self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self.sock.settimeout(timeout)
                    self.sock.connect(path)

            self._make = lambda: _Unix("localhost", timeout=timeout)
        self._conn: Any = None

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """``(status, parsed JSON or text)``; reconnects once when a kept-alive connection was closed."""
        import http.client

        data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = self._make()
            try:
                self._conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
                resp = self._conn.getresponse()
                raw = resp.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt:
                    raise
        if resp.will_close:
            self.close()
        kind = resp.getheader("Content-Type", "")
        return resp.status, json.loads(raw) if kind.startswith("application/json") else raw.decode()

    def __call__(
        self, inputs: str | Sequence[str], *, top_k: int | None = None, apply_threshold: bool = True, **_: Any
    ) -> list:
        body: dict[str, Any] = {"inputs": inputs if isinstance(inputs, str) else list(inputs)}
        if top_k is not None:
            body["top_k"] = top_k
        if not apply_threshold:
            body["apply_threshold"] = False
        status, doc = self.request("POST", "/v1/classify", body)
        if status != 200:
            raise BundleError(
                f"{self.address}: /v1/classify answered {status}: {doc.get('error') if isinstance(doc, dict) else doc}"
            )
        return doc["outputs"]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# -------------------------------------------------------------------------------------- command


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="serve the bundle over HTTP (loopback or a Unix socket), reloading new releases",
        description="Serve BUNDLE as an HTTP/1.1 JSON service: POST /v1/classify, GET /healthz, /v1/bundle, "
        "/metrics. Takes a new release when BUNDLE (the current link) points elsewhere: on SIGHUP "
        "and every --watch seconds.",
    )
    p.add_argument(
        "bundle", metavar="BUNDLE", help="the bundle directory, usually <remote_dir>/<bundle>/current"
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", default=None, metavar="PATH", help="listen on a Unix socket")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1; another only on purpose)",
    )
    where.add_argument(
        "--port", type=int, default=None, metavar="N", help="TCP port (default: 8080; 0: any free)"
    )
    p.add_argument(
        "--keys",
        default=None,
        metavar="DIR",
        help="require a signature by a key in DIR (default: $EDGEPACK_TRUSTED_KEYS, else the runtime's)",
    )
    p.add_argument(
        "--threads", type=int, default=None, metavar="N", help="intra-op threads, instead of runtime.json's"
    )
    p.add_argument(
        "--workers", type=int, default=2, metavar="N", help="requests running the model at once (default: 2)"
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=1 << 20,
        metavar="N",
        help="larger bodies get 413 (default: 1 MiB)",
    )
    p.add_argument("--max-texts", type=int, default=256, metavar="N", help="texts per request (default: 256)")
    p.add_argument(
        "--max-text-chars", type=int, default=4096, metavar="N", help="characters per text (default: 4096)"
    )
    p.add_argument(
        "--max-connections", type=int, default=256, metavar="N", help="open connections (default: 256)"
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds a request may take to arrive whole (default: 10)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds an idle keep-alive connection stays open (default: 30)",
    )
    p.add_argument(
        "--watch",
        type=float,
        default=2.0,
        metavar="S",
        help="seconds between checks of BUNDLE's target (default: 2; 0: on SIGHUP only)",
    )
    p.add_argument(
        "--status-file",
        default=None,
        metavar="FILE",
        help="write the pid and the release serving here (what `edgepack deploy` signals and reads)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    for name in ("workers", "max_body_bytes", "max_texts", "max_text_chars", "max_connections"):
        if getattr(args, name) < 1:
            raise BundleError(f"--{name.replace('_', '-')} {getattr(args, name)}: use a positive number")
    if args.read_timeout <= 0 or args.idle_timeout <= 0 or args.watch < 0:
        raise BundleError("--read-timeout and --idle-timeout must be > 0 seconds, --watch >= 0")
    if args.threads is not None and args.threads < 0:
        raise BundleError(f"--threads {args.threads}: use 0 (one per physical core) or a positive count")
    limits = Limits(
        max_body_bytes=args.max_body_bytes,
        max_texts=args.max_texts,
        max_text_chars=args.max_text_chars,
        read_timeout=args.read_timeout,
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
        workers=args.workers,
    )
    overrides = {"intra_op_num_threads": args.threads} if args.threads is not None else {}
    service = Service(
        args.bundle, keys=args.keys, overrides=overrides, limits=limits, status_file=args.status_file
    )
    server = make_server(
        service, host=args.host, port=8080 if args.port is None else args.port, socket_path=args.socket
    )
    where = args.socket or "http://{}:{}".format(*server.server_address[:2])
    wake, stop = threading.Event(), threading.Event()
    asked = [False]

    def on_hup(signum: int, frame: Any) -> None:
        asked[0] = True
        wake.set()

    def on_term(signum: int, frame: Any) -> None:
        stop.set()
        wake.set()

    def watch() -> None:
        while not stop.is_set():
            wake.wait(args.watch or None)
            wake.clear()
            if stop.is_set():
                break
            hup, asked[0] = asked[0], False
            service.check(asked=hup)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    watcher = threading.Thread(target=watch, name="serve-watch", daemon=True)
    watcher.start()
    info = service.current.info
    _log(f"serving {info['path']} ({info['name']} version {info['version']}) on {where}; pid {os.getpid()}")
    try:
        server.serve_forever(poll_interval=0.5)
        deadline = time.monotonic() + limits.read_timeout
        while service.current.inflight and time.monotonic() < deadline:  # answers already under way go out
            time.sleep(0.05)
    finally:
        server.server_close()
        server.reaper.stop()
        if args.socket:
            with contextlib.suppress(OSError):
                os.unlink(args.socket)
    _log("stopped")
    return 0
