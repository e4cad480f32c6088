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

The releases and requests: ``runtime_shim.service``; the HTTP layer (standard library only, chosen
over uvicorn+starlette by the figures in docs/results.md) and its limits: ``runtime_shim.serve_http``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
import time
from typing import Any

from .manifest import BundleError
from .serve_http import make_server
from .service import Limits, Service, log_line

PROG = "python -m runtime_shim serve"


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
    service.address = where
    service.write_status("serving")  # again, with the address: a client (bench --service) finds it there
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
    log_line(
        f"serving {info['path']} ({info['name']} version {info['version']}) on {where}; pid {os.getpid()}"
    )
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
    log_line("stopped")
    return 0
