"""Clients of ``python -m runtime_shim serve``: ``Client``, a keep-alive client with ``OnnxPipeline``'s
call, and ``ServiceBackend``, ``bench``'s backend through a running service (``bench --service``).
Standard library (numpy only where ``bench`` asks for logits).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .manifest import BundleError

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
        self, inputs: str | Sequence[str], *, top_k: int | str | None = "best", apply_threshold: bool = True, **_: Any
    ) -> list:
        body: dict[str, Any] = {"inputs": inputs if isinstance(inputs, str) else list(inputs)}
        if top_k != "best":
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


class ServiceBackend:
    """``bench``'s backend through a running service (``bench --service``): the figures an application on
    the device sees, HTTP and the service's queue included. Each ``forward`` is one request of top-1
    answers (an application's request); its "logits" are log-probabilities with the answer's label on
    top at its score, so ``bench``'s argmax, threshold and accuracy are the service's own.

    ``address``: ``http://HOST:PORT``, a Unix socket, or the service's status file (``--status-file``).

    Example:
        >>> ServiceBackend("/run/edgepack-kiosk/status.json", "/srv/edgepack/clinc150/current").name  # doctest: +SKIP
        'clinc150'
    """

    def __init__(self, address: str, bundle: str | None = None):
        from . import manifest as _manifest

        if Path(address).is_file():  # a status file names the address it listens on
            address = str(
                _manifest.read_json(Path(address), "pass the service's --status-file").get("address")
            )
        self.client = Client(address)
        status, info = self.client.request("GET", "/v1/bundle")
        if status != 200:
            raise BundleError(
                f"{address}: GET /v1/bundle answered {status}; is it a runtime_shim serve service?"
            )
        self.info, self.address = info, address
        self.name, self.label_names = str(info["name"]), list(info["labels"])
        self.oos_label, self.oos_threshold = info.get("oos_label"), info.get("oos_threshold")
        self.settings: dict[str, Any] = {}
        root = Path(bundle if bundle is not None else info["path"])
        if bundle is not None:
            import hashlib

            digest = hashlib.sha256((root / _manifest.MANIFEST).read_bytes()).hexdigest()
            if digest != info.get("manifest_sha256"):
                raise BundleError(
                    f"{address} serves {info.get('path')} (manifest {str(info.get('manifest_sha256'))[:16]}), "
                    f"not {root} ({digest[:16]}); point the service at it or bench that bundle"
                )
        self.bundle_dir, self.manifest = root, _manifest.read_manifest(root)
        self.bundle_bytes = _manifest.bundle_bytes(root)
        self.model_bytes = sum(p.stat().st_size for p in root.glob("*.onnx"))

    def encode(self, texts: Sequence[str]) -> list[str]:
        return list(texts)

    def forward(self, texts: list[str]):
        import numpy as np

        status, doc = self.client.request("POST", "/v1/classify", {"inputs": texts, "apply_threshold": False})
        if status != 200:
            raise BundleError(f"{self.address}: /v1/classify answered {status}: {doc}")
        n = len(self.label_names)
        out = np.empty((len(texts), n))
        for row, answer in zip(out, doc["outputs"], strict=True):
            top = min(max(float(answer["score"]), 1e-12), 1 - 1e-12)
            row.fill(np.log((1 - top) / max(1, n - 1)) if n > 1 else 0.0)
            row[self.label_names.index(answer["label"])] = np.log(top)
        return out

    def peak_rss_mb(self) -> float | None:
        """The service process's peak resident memory (``/metrics``), in MiB."""
        status, text = self.client.request("GET", "/metrics")
        for line in text.splitlines() if status == 200 else ():
            if line.startswith("process_peak_resident_memory_bytes "):
                return round(float(line.split()[1]) / (1024 * 1024), 2)
        return None
