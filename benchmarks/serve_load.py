"""The bundle as a service under load, on loopback: ``python -m runtime_shim serve`` (the standard
library's threads) beside the same service on uvicorn+starlette, and ``OnnxPipeline`` in-process as
the baseline, all in one run.

    nice -n 10 python benchmarks/serve_load.py --bundle BUNDLE [--seconds 10] [--runs 3] [--soak-minutes 10]

1. Baseline: single texts through ``OnnxPipeline`` in this process (latency) and its peak memory in a
   fresh process (``python -m runtime_shim rss``).
2. Each server at 1, 8 and 64 concurrent clients (``wrk``, keep-alive, one text a request, texts
   cycling through the bundle's eval.jsonl): requests/s, p50, mean, p95, p99, failed requests; the
   median of ``--runs`` runs per level; the server's peak memory (VmHWM) after them.
3. Reloads under load: ``current`` switched between two releases every ``--reload-every`` seconds
   (and SIGHUP) while 8 clients send; failed requests counted (must be 0).
4. Soak: 8 clients for ``--soak-minutes`` with a reload every 30 s, resident memory sampled.

Writes ``serve_load.json`` and a plot under ``--out``; prints the tables for docs/results.md.
Loopback only; every phase bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _shared import ROOT

LEVELS = (1, 8, 64)
WRK_SCRIPT = r"""
local bodies = {%s}
local i = 0
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", "/v1/classify", {["Content-Type"] = "application/json"}, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %%d, "seconds": %%f, "p50": %%f, "p95": %%f, "p99": %%f, ' ..
    '"mean": %%f, "max": %%f, "connect": %%d, "read": %%d, "write": %%d, "status": %%d, "timeout": %%d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(95) / 1e3,
    latency:percentile(99) / 1e3, latency.mean / 1e3, latency.max / 1e3, e.connect, e.read, e.write,
    e.status, e.timeout))
end
"""



def _wrk_argv(clients: int, seconds: float, script: Path, port: int) -> list[str]:
    """One wrk thread, CLIENTS connections for SECONDS, posting SCRIPT's requests to the service."""
    return ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(script),
            f"http://127.0.0.1:{port}/v1/classify"]

def starlette_app(bundle: str, port: int, workers: int) -> None:
    """The same ``Service`` (parsing, limits, reload) behind uvicorn+starlette: what the optional extra
    would run. Started as ``serve_load.py --starlette BUNDLE PORT WORKERS``."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    from runtime_shim.service import Limits, RequestError, Service

    svc = Service(bundle, limits=Limits(workers=workers))

    async def classify(request: Request):
        body = await request.body()
        try:
            status, doc = await run_in_threadpool(svc.classify, body)
        except RequestError as e:
            status, doc = e.status, {"error": str(e)}
        return JSONResponse(doc, status_code=status)

    async def healthz(request: Request):
        return JSONResponse({"status": "ok", "release": svc.current.info["release"]})

    async def metrics(request: Request):
        return PlainTextResponse(svc.metrics())

    app = Starlette(
        routes=[
            Route("/v1/classify", classify, methods=["POST"]),
            Route("/healthz", healthz),
            Route("/metrics", metrics),
        ]
    )
    print(f"serving on http://127.0.0.1:{port}; pid {os.getpid()}", file=sys.stderr, flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import http.client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the server did not answer /healthz")


def start(
    kind: str, bundle: Path, port: int, workers: int, log: Path, extra: list[str] = ()
) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if kind == "stdlib":
        argv = [
            sys.executable,
            "-m",
            "runtime_shim",
            "serve",
            str(bundle),
            "--port",
            str(port),
            "--workers",
            str(workers),
            *extra,
        ]
    else:
        argv = [sys.executable, __file__, "--starlette", str(bundle), str(port), str(workers)]
    proc = subprocess.Popen(argv, stderr=open(log, "a"), env=env)  # noqa: SIM115
    wait_healthy(port, proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def proc_mb(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def wrk(port: int, clients: int, seconds: float, script: Path) -> dict:
    out = subprocess.run(
        _wrk_argv(clients, seconds, script, port),
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    m = re.search(r"^WRKJSON (.*)$", out.stdout, re.M)
    if not m:
        raise SystemExit(f"wrk printed no result: {out.stdout[-500:]} {out.stderr[-500:]}")
    r = json.loads(m.group(1))
    r["failed"] = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    r["rps"] = r["requests"] / r["seconds"]
    return r


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def baseline(bundle: Path, texts: list[str], n: int = 2000) -> dict:
    from runtime_shim.memory import measure_peak_rss
    from runtime_shim.pipeline import OnnxPipeline

    pipe = OnnxPipeline(bundle)
    for t in texts[:100]:
        pipe(t)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        pipe(texts[i % len(texts)])
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "p50": percentile(times, 50),
        "mean": statistics.fmean(times),
        "p95": percentile(times, 95),
        "p99": percentile(times, 99),
        "rps": 1e3 / statistics.fmean(times),
        "peak_rss_mb": measure_peak_rss(pipe.rss_argv),
    }


def switch(root: Path, release: str) -> None:
    tmp = root / ".current.new"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(f"releases/{release}", tmp)
    os.replace(tmp, root / "current")


def reload_run(
    proc: subprocess.Popen,
    port: int,
    root: Path,
    script: Path,
    seconds: float,
    every: float,
    clients: int = 8,
    samples: list | None = None,
) -> dict:
    """wrk for ``seconds`` while ``current`` flips every ``every`` seconds (with SIGHUP)."""
    wrk_proc = subprocess.Popen(
        _wrk_argv(clients, seconds, script, port),
        stdout=subprocess.PIPE,
        text=True,
    )
    started = time.monotonic()
    flips, which, last = 0, "a", started
    while wrk_proc.poll() is None:
        time.sleep(min(1.0, every))
        now = time.monotonic()
        if samples is not None:
            samples.append((round(now - started, 1), proc_mb(proc.pid, "VmRSS")))
        if now - last >= every and now - started < seconds - 1:
            which = "b" if which == "a" else "a"
            switch(root, which)
            proc.send_signal(signal.SIGHUP)
            flips, last = flips + 1, now
    out = wrk_proc.stdout.read()
    m = re.search(r"^WRKJSON (.*)$", out, re.M)
    r = json.loads(m.group(1))
    r["failed"] = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    r["rps"] = r["requests"] / r["seconds"]
    r["switches"] = flips
    return r


def metric(port: int, name: str) -> float:
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    soak = result.get("soak") or {}
    fig, axes = plt.subplots(1, 3 if soak.get("samples") else 2, figsize=(14 if soak.get("samples") else 10, 4))
    for (kind, rows), color in zip(result["servers"].items(), ("C0", "C1"), strict=False):
        xs = [r["clients"] for r in rows["levels"]]
        axes[0].plot(xs, [r["rps"] for r in rows["levels"]], "o-", c=color, label=kind)
        for q, style in (("p50", "o-"), ("mean", "s:"), ("p95", "^--")):
            axes[1].plot(xs, [r[q] for r in rows["levels"]], style, c=color, label=f"{kind} {q}")
    axes[0].axhline(result["baseline"]["rps"], ls="--", c="grey", label="OnnxPipeline in-process, 1 thread")
    for ax, title in ((axes[0], "requests/s"), (axes[1], "latency (ms): p50, mean, p95")):
        ax.set_xscale("log")
        ax.set_xticks(LEVELS, [str(x) for x in LEVELS])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    if soak.get("samples"):
        axes[2].plot([s[0] / 60 for s in soak["samples"]], [s[1] for s in soak["samples"]])
        axes[2].set_xlabel("minutes (8 clients, a reload every 30 s)")
        axes[2].set_title("service resident memory (MB)")
    fig.suptitle(f"runtime_shim serve on loopback, {result['bundle_name']}, {result['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cpu_name() -> str:
    name = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni") if f in flags]
    return f"{name}, {os.cpu_count()} cores ({', '.join(shown)})"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--starlette":
        starlette_app(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out (finally)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, type=Path, help="a CLINC150 bundle (edgepack pack or build)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "serve_load")
    p.add_argument("--servers", default="stdlib,starlette", help="which servers to load (default: both)")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per load run (default: 10)")
    p.add_argument("--runs", type=int, default=3, help="runs per level; the median is reported (default: 3)")
    p.add_argument("--workers", type=int, default=2, help="requests running the model at once (default: 2)")
    p.add_argument(
        "--reload-seconds", type=float, default=30.0, help="length of the reload run (default: 30)"
    )
    p.add_argument("--reload-every", type=float, default=3.0, help="seconds between switches (default: 3)")
    p.add_argument("--soak-minutes", type=float, default=10.0, help="soak length, at most 10 (0: skip)")
    args = p.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install wrk")
    args.soak_minutes = min(args.soak_minutes, 10.0)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "servers.log"
    texts = [
        json.loads(line)["text"] for line in (args.bundle / "eval.jsonl").read_text().splitlines() if line
    ]
    script = args.out / "post.lua"
    bodies = ",".join(json.dumps(json.dumps({"inputs": t})) for t in texts[:200])
    script.write_text(WRK_SCRIPT % bodies)
    started = time.time()
    result: dict = {
        "cpu": cpu_name(),
        "bundle": str(args.bundle),
        "bundle_name": args.bundle.name,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": args.seconds,
        "runs": args.runs,
        "workers": args.workers,
        "servers": {},
    }
    print(f"[baseline] OnnxPipeline in-process on {result['cpu']}", flush=True)
    result["baseline"] = baseline(args.bundle, texts)
    print(
        f"  p50 {result['baseline']['p50']:.2f} ms, peak {result['baseline']['peak_rss_mb']:.1f} MB",
        flush=True,
    )

    # Both servers up at once, loaded in turn (level by level, run by run): on a shared machine the
    # load from elsewhere changes by the minute, and interleaving gives each server the same share of it.
    kinds = args.servers.split(",")
    procs, ports = {}, {}
    try:
        for kind in kinds:
            ports[kind] = free_port()
            procs[kind] = start(kind, args.bundle, ports[kind], args.workers, log)
            result["servers"][kind] = {"levels": [], "idle_rss_mb": proc_mb(procs[kind].pid, "VmRSS")}
            wrk(ports[kind], 8, 2, script)  # warm-up
        for clients in LEVELS:
            runs: dict = {k: [] for k in kinds}
            for _ in range(args.runs):
                for kind in kinds:
                    runs[kind].append(wrk(ports[kind], clients, args.seconds, script))
            for kind in kinds:
                rs = runs[kind]
                row = {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "mean", "p95", "p99")}
                row.update(
                    clients=clients,
                    failed=sum(r["failed"] for r in rs),
                    requests=sum(r["requests"] for r in rs),
                )
                result["servers"][kind]["levels"].append(row)
                print(
                    f"[{kind}] {clients:>2} clients: {row['rps']:.0f} req/s, p50 {row['p50']:.2f} ms, mean "
                    f"{row['mean']:.2f}, p95 {row['p95']:.2f}, p99 {row['p99']:.2f}, failed {row['failed']}",
                    flush=True,
                )
        for kind in kinds:
            entry = result["servers"][kind]
            entry["peak_rss_mb"] = proc_mb(procs[kind].pid, "VmHWM")
            print(
                f"[{kind}] memory: {entry['idle_rss_mb']:.1f} MB idle, {entry['peak_rss_mb']:.1f} MB peak",
                flush=True,
            )
    finally:
        for proc in procs.values():
            stop(proc)

    # Reloads and the soak: the standard-library service on a release layout like deploy's.
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        root = Path(tmp)
        for name in ("a", "b"):  # two releases: same files, two directories (deploy's releases/<digest>)
            shutil.copytree(
                args.bundle,
                root / "releases" / name,
                copy_function=os.link,
                ignore=shutil.ignore_patterns("__pycache__"),
            )
        switch(root, "a")
        port = free_port()
        proc = start("stdlib", root / "current", port, args.workers, log, ["--watch", "0"])
        try:
            reloads_and_soak(proc, port, root, script, args, result)
        finally:
            stop(proc)
    result["wall_seconds"] = round(time.time() - started)
    (args.out / "serve_load.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "serve-load.png")
    print(f"wrote {args.out / 'serve_load.json'} and {args.out / 'serve-load.png'}")
    return 0


def reloads_and_soak(
    proc: subprocess.Popen, port: int, root: Path, script: Path, args: argparse.Namespace, result: dict
) -> None:
    wrk(port, 8, 2, script)
    print(
        f"[reload] {args.reload_seconds:.0f} s of 8 clients, a switch every {args.reload_every:g} s",
        flush=True,
    )
    r = reload_run(proc, port, root, script, args.reload_seconds, args.reload_every)
    r["reloads_ok"] = metric(port, 'edgepack_reloads_total{result="ok"}')
    result["reload"] = r
    print(
        f"  {r['requests']} requests, {r['switches']} switches ({r['reloads_ok']:.0f} taken), "
        f"failed {r['failed']}, p99 {r['p99']:.2f} ms",
        flush=True,
    )
    if args.soak_minutes > 0:
        print(f"[soak] {args.soak_minutes:g} min of 8 clients, a switch every 30 s", flush=True)
        samples: list = []
        s = reload_run(proc, port, root, script, args.soak_minutes * 60, 30.0, samples=samples)
        minute = [m for t, m in samples if t <= 60]
        last = [m for t, m in samples if t >= samples[-1][0] - 60]
        s.update(
            samples=samples,
            first_minute_mb=statistics.median(minute),
            last_minute_mb=statistics.median(last),
            peak_rss_mb=proc_mb(proc.pid, "VmHWM"),
        )
        result["soak"] = s
        print(
            f"  {s['requests']} requests, {s['switches']} switches, failed {s['failed']}; resident "
            f"{s['first_minute_mb']:.1f} MB in the first minute, {s['last_minute_mb']:.1f} MB in the last",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
