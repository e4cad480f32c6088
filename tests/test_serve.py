"""``python -m runtime_shim serve``: answers as ``OnnxPipeline`` gives them, over TCP and a Unix socket;
every bad request its status; a slow client never delays another; a new release taken under load with
no failed request, the old one freed; a bad release refused while the old one keeps serving.

Each test starts the service as its own process, as a device's systemd would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import runtime_shim
from runtime_shim import trust as T
from runtime_shim.manifest import update_manifest
from runtime_shim.pipeline import OnnxPipeline
from runtime_shim.serve_client import Client

SHIM_PARENT = str(Path(runtime_shim.__file__).resolve().parent.parent)
TEXTS = [
    "what is my checking balance",
    "set an alarm for seven",
    "send money to my landlord",
    "will it rain tomorrow",
    "who won the game last night",
    "Ünïcode wörds über alles",
    "",
]


class Service:
    """A running ``serve`` process: its address, its log, a client."""

    def __init__(
        self, bundle: Path, tmp: Path, *args: str, unix: bool = False, env: dict[str, str] | None = None
    ):
        self.sock = str(tmp / "serve.sock") if unix else None
        where = ["--socket", self.sock] if unix else ["--port", "0"]
        self.log_path = tmp / f"serve-{time.monotonic_ns()}.log"
        self.log_file = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        full_env = {**os.environ, "PYTHONPATH": SHIM_PARENT, **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime_shim", "serve", str(bundle), *where, *args],
            stderr=self.log_file,
            env=full_env,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = re.search(r" on (\S+); pid", self.log())
            if m:
                self.address = m.group(1)
                break
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.log()}")
            time.sleep(0.05)
        else:
            raise AssertionError(f"serve did not start: {self.log()}")
        self.client = Client(self.address, timeout=30)
        self.host_port = None if unix else self.address[len("http://") :].rsplit(":", 1)

    def log(self) -> str:
        return self.log_path.read_text()

    def raw(self) -> socket.socket:
        if self.sock:
            s = socket.socket(socket.AF_UNIX)
            s.connect(self.sock)
        else:
            s = socket.create_connection((self.host_port[0], int(self.host_port[1])))
        s.settimeout(30)
        return s

    def metric(self, name: str) -> float:
        _, text = self.client.request("GET", "/metrics")
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert m, f"{name} not in /metrics:\n{text}"
        return float(m.group(1))

    def stop(self) -> int:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode


@pytest.fixture
def serve(tmp_path):
    started: list[Service] = []

    def start(bundle: Path, *args: str, **kw) -> Service:
        s = Service(bundle, tmp_path, *args, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def pipe(tiny_bundle) -> OnnxPipeline:
    return OnnxPipeline(tiny_bundle)


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix-socket"])
def test_answers_are_the_pipelines(serve, tiny_bundle, pipe, unix):
    svc = serve(tiny_bundle, unix=unix)
    assert svc.address.startswith("http://127.0.0.1:") or unix  # loopback unless --host says otherwise
    c = svc.client
    for text in TEXTS:
        assert c(text) == pipe(text)
        assert c(text, top_k=3) == pipe(text, top_k=3)
        assert c(text, apply_threshold=False) == pipe(text, apply_threshold=False)
    assert c(TEXTS) == pipe(TEXTS)
    assert c(TEXTS, top_k=2) == pipe(TEXTS, top_k=2)
    status, health = c.request("GET", "/healthz")
    assert status == 200 and health["status"] == "ok"
    status, info = c.request("GET", "/v1/bundle")
    assert status == 200
    assert info["labels"] == pipe.label_names and info["oos_label"] == pipe.oos_label
    assert info["oos_threshold"] == pipe.oos_threshold and info["name"] == pipe.name
    import hashlib

    assert info["manifest_sha256"] == hashlib.sha256((tiny_bundle / "manifest.json").read_bytes()).hexdigest()
    assert svc.metric('edgepack_requests_total{path="/v1/classify",code="200"}') == 3 * len(TEXTS) + 2
    assert svc.metric('edgepack_classify_seconds_bucket{le="+Inf"}') == 3 * len(TEXTS) + 2
    assert svc.metric("edgepack_texts_total") == 3 * len(TEXTS) + 2 * len(TEXTS)
    assert svc.stop() == 0
    assert "stopped" in svc.log() and (not unix or not os.path.exists(svc.sock))


BIG = b'{"inputs": "' + b"a" * 5000 + b'"}'
BAD = {
    "malformed-json": (b'{"inputs": "unterminated', 400, "not JSON"),
    "invalid-utf8": (b'{"inputs": "\xff\xfe"}', 400, "not JSON"),
    "deep-nesting": (b"[" * 4000, 400, "not JSON"),
    "not-an-object": (b'["a text"]', 400, '"inputs"'),
    "inputs-a-number": (b'{"inputs": 5}', 400, "string or a list"),
    "a-number-in-the-list": (b'{"inputs": ["ok", 5]}', 400, "string or a list"),
    "empty-list": (b'{"inputs": []}', 400, "empty list"),
    "top-k-a-string": (b'{"inputs": "a", "top_k": "3"}', 400, "top_k"),
    "top-k-zero": (b'{"inputs": "a", "top_k": 0}', 400, "top_k"),
    "threshold-not-bool": (b'{"inputs": "a", "apply_threshold": 1}', 400, "apply_threshold"),
    "unknown-field": (b'{"inputs": "a", "model": "other"}', 400, "unknown field model"),
    "too-many-texts": (json.dumps({"inputs": ["a"] * 9}).encode(), 413, "--max-texts"),
    "text-too-long": (json.dumps({"inputs": ["a", "b" * 101]}).encode(), 413, "--max-text-chars"),
    "body-over-limit": (BIG, 413, "--max-body-bytes"),
}


def test_each_bad_request_gets_its_status_and_the_service_goes_on(serve, tiny_bundle, pipe):
    svc = serve(tiny_bundle, "--max-texts", "8", "--max-text-chars", "100", "--max-body-bytes", "4096")
    c = svc.client
    for case, (body, status, needle) in BAD.items():
        got, doc = c.request("POST", "/v1/classify", body)
        assert (got, needle in doc["error"]) == (status, True), (case, doc)
    assert c.request("GET", "/nowhere")[0] == 404
    assert c.request("GET", "/v1/classify")[0] == 405
    assert c.request("POST", "/healthz", b"{}")[0] == 405
    # Without a Content-Length, and an answer before a huge body is read.
    for head, status in (
        (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n\r\n", 411),
        (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
        (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n", 413),
        (b"POST /v1/classify HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400),
        (b"NONSENSE\r\n\r\n", 400),
        (b"BREW /v1/classify HTTP/1.1\r\n\r\n", 501),
        (b"GET /healthz HTTP/9.9\r\n\r\n", 505),
        (b"GET /" + b"x" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
    ):
        with svc.raw() as s:
            s.sendall(head)
            assert s.recv(4096).split(b" ", 2)[1] == str(status).encode(), head
    assert c("set an alarm") == pipe("set an alarm")
    assert svc.metric('edgepack_requests_total{path="/v1/classify",code="413"}') == 4
    assert svc.proc.poll() is None and "Traceback" not in svc.log()


def test_a_slow_client_does_not_delay_another(serve, tiny_bundle, pipe):
    svc = serve(tiny_bundle, "--read-timeout", "1.5", "--idle-timeout", "3")
    stalled_body = svc.raw()  # its headers say 100 bytes, it sends 10 and stops
    stalled_body.sendall(b'POST /v1/classify HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"inputs":')
    trickle = svc.raw()  # one byte of its headers every 0.4 s: under any per-read timeout, forever
    silent = svc.raw()  # connects and says nothing
    stop = threading.Event()

    def drip() -> None:
        for b in b"POST /v1/classify HTTP/1.1\r\nHost: slow\r\n":
            if stop.wait(0.4):
                return
            try:
                trickle.sendall(bytes([b]))
            except OSError:
                return

    threading.Thread(target=drip, daemon=True).start()
    started = time.monotonic()
    fast = Client(svc.address, timeout=2.0)  # a delay past 2 s fails the test
    for text in TEXTS * 3:
        t0 = time.monotonic()
        assert fast(text) == pipe(text)
        assert time.monotonic() - t0 < 1.0
    assert svc.metric("edgepack_open_connections") >= 4
    for s, status in ((stalled_body, b"408"), (trickle, b"408")):
        reply = s.recv(4096)
        assert reply.split(b" ", 2)[1] == status, reply
        assert time.monotonic() - started < 6
    assert silent.recv(4096) == b""  # closed after --idle-timeout, no answer owed
    assert time.monotonic() - started < 8
    stop.set()
    for s in (stalled_body, trickle, silent):
        s.close()
    assert fast("set an alarm") == pipe("set an alarm")
    assert svc.proc.poll() is None


def test_connections_over_the_limit_get_503_at_once(serve, tiny_bundle):
    svc = serve(tiny_bundle, "--max-connections", "3", "--idle-timeout", "30")
    held = [svc.raw() for _ in range(3)]
    time.sleep(0.3)
    with svc.raw() as s:
        assert s.recv(4096).split(b" ", 2)[1] == b"503"
    for s in held:
        s.close()
    deadline = time.monotonic() + 5
    while True:  # the slots free as the server sees the closes
        try:
            assert svc.client("set an alarm")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            svc.client.close()
            time.sleep(0.1)


# ------------------------------------------------------------------------------------------ reload


def _release(
    src: Path,
    dest: Path,
    *,
    threshold: float | None = None,
    key: Path | None = None,
    version: int | None = None,
) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "manifest.sig"))
    if threshold is not None:
        labels = json.loads((dest / "labels.json").read_text())
        labels["oos_threshold"] = threshold
        (dest / "labels.json").write_text(json.dumps(labels))
        update_manifest(dest)
    if key is not None:
        from edgepack.signing import sign_bundle

        sign_bundle(dest, key, name="tiny", version=version, profile="edge-x86")
    return dest


def _switch(root: Path, release: Path) -> None:
    """What deploy's ``activate`` does: a new link renamed over ``current``."""
    tmp = root / ".current.new"
    os.symlink(os.path.relpath(release, root), tmp)
    os.replace(tmp, root / "current")


class Load:
    """Clients sending requests without pause; counts failures and which release answered."""

    def __init__(self, address: str, clients: int = 3):
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.answers: list[tuple[float, str, list]] = []
        self.threads = [
            threading.Thread(target=self._run, args=(address, i), daemon=True) for i in range(clients)
        ]
        for t in self.threads:
            t.start()

    def _run(self, address: str, i: int) -> None:
        c = Client(address, timeout=10)
        while not self.stop.is_set():
            text = TEXTS[i % len(TEXTS)]
            try:
                status, doc = c.request("POST", "/v1/classify", {"inputs": [text]})
                if status != 200:
                    self.failures.append(f"{status} {doc}")
                else:
                    self.answers.append((time.monotonic(), doc["release"], doc["outputs"]))
            except Exception as e:
                self.failures.append(repr(e))
                c.close()
        c.close()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


def _wait(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from edgepack.signing import new_keypair

    d = tmp_path_factory.mktemp("serve-keys")
    private, public, _ = new_keypair(d / "build")
    trusted = d / "trusted"
    trusted.mkdir()
    shutil.copy(public, trusted / public.name)
    return private, trusted, new_keypair(d / "other", name="attacker")[0]


@pytest.mark.parametrize("how", ["sighup", "watch"])
def test_a_new_release_under_load_drops_nothing_and_a_bad_one_is_refused(
    serve, tiny_bundle, pipe, tmp_path, keys, how, monkeypatch
):
    private, trusted, attacker = keys
    monkeypatch.setenv(T.STATE_ENV, str(tmp_path / "state.json"))
    root = tmp_path / "slot"
    a = _release(tiny_bundle, root / "releases" / "a", key=private, version=100)
    b = _release(
        tiny_bundle, root / "releases" / "b", key=private, version=101, threshold=1.0
    )  # all out of scope
    bad = _release(tiny_bundle, root / "releases" / "bad", key=attacker, version=102)
    _switch(root, a)
    status = tmp_path / "run" / "status.json"
    svc = serve(
        root / "current",
        "--keys",
        str(trusted),
        "--status-file",
        str(status),
        "--watch",
        "0" if how == "sighup" else "0.2",
    )
    assert json.loads(status.read_text())["release"] == "a"
    assert json.loads(status.read_text())["pid"] == svc.proc.pid
    load = Load(svc.address)
    _wait(lambda: len(load.answers) > 20)
    switched = time.monotonic()
    _switch(root, b)
    if how == "sighup":
        svc.proc.send_signal(signal.SIGHUP)
    _wait(lambda: load.answers and load.answers[-1][1] == "b")
    n = len(load.answers)
    _wait(lambda: len(load.answers) > n + 20)
    assert svc.metric("edgepack_releases_loaded") == 1  # the old release freed once its requests finished
    freed = len(load.answers)
    assert json.loads(status.read_text())["release"] == "b"
    # A release signed by another key: refused in one line, b keeps serving.
    _switch(root, bad)
    if how == "sighup":
        svc.proc.send_signal(signal.SIGHUP)
    _wait(lambda: "refused" in svc.log())
    n = len(load.answers)
    _wait(lambda: len(load.answers) > n + 20)
    load.finish()
    assert load.failures == []
    first_b = next(i for i, (_, r, _) in enumerate(load.answers) if r == "b")
    assert all(r == "a" for _, r, _ in load.answers[:first_b])
    # Requests in flight on a when b took over may still come back from a, until a is freed.
    assert {r for _, r, _ in load.answers[first_b:freed]} <= {"a", "b"}
    assert all(r == "b" for _, r, _ in load.answers[freed:])  # never back to a, never the bad one
    b_outputs = [out for _, r, out in load.answers[first_b:] if r == "b"]
    assert all(out == [{"label": "oos", "score": out[0]["score"]}] for out in b_outputs)
    a_outputs = {tuple(json.dumps(o) for o in out) for _, r, out in load.answers if r == "a"}
    assert a_outputs <= {(json.dumps(pipe([t])[0]),) for t in TEXTS}
    assert load.answers[first_b][0] - switched < 10
    refused = [line for line in svc.log().splitlines() if "refused" in line]
    assert len(refused) == 1 and "releases/bad" in refused[0] and "manifest.sig" in refused[0], refused
    assert "still serving" in refused[0] and str(b) in refused[0]
    assert json.loads(status.read_text())["state"].startswith("refused")
    assert svc.metric('edgepack_reloads_total{result="refused"}') == 1
    assert svc.metric('edgepack_reloads_total{result="ok"}') == 1
    assert svc.client("set an alarm")[0]["label"] == "oos"
    assert "Traceback" not in svc.log()


def test_sixty_four_clients_connect_at_once(serve, tiny_bundle):
    """The listen backlog holds a burst of connections while the service is busy (here: stopped), so
    none waits for a dropped SYN's retry (1 s, then 3 s); socketserver's default backlog is 5."""
    svc = serve(tiny_bundle)
    host, port = svc.host_port[0], int(svc.host_port[1])
    socks = []
    os.kill(svc.proc.pid, signal.SIGSTOP)  # nothing accepts: only the kernel's queue takes them
    try:
        for _ in range(64):
            socks.append(socket.create_connection((host, port), timeout=0.5))
    finally:
        os.kill(svc.proc.pid, signal.SIGCONT)
    try:
        for s in socks:
            s.settimeout(30)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for s in socks:
            assert s.recv(64).startswith(b"HTTP/1.1 200"), "every queued connection is answered"
    finally:
        for s in socks:
            s.close()
