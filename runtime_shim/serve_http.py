"""The HTTP/1.1 layer of ``python -m runtime_shim serve`` (``http.server``'s threads, standard library
only).

Each connection has a thread; a bounded number run the model at once (``Limits.workers``), a bounded
number of connections are open (503 beyond, answered without a thread), and once a request line has
arrived the rest must arrive within ``read_timeout``: a reaper cuts the reading side of slower
connections (408), however the client spaces its bytes, so a slow or stalled client holds one
connection slot and never the model.
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from .manifest import BundleError
from .service import RequestError, Service


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
    # The listen backlog (socketserver's default is 5): 64 clients connecting at once had SYNs dropped
    # and retried after 1 and 3 s, the service's p95 and p99 (docs/results.md, "The model as a service").
    request_queue_size = 1024
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
