"""Peak memory and latency of one bundle served through ONNX Runtime's C API (``session_api: c``, the
default on Linux) and through its Python package (``session_api: python``), measured side by side.

    python benchmarks/memory_probe.py BUNDLE [--rounds 5] [--plot docs/figures/memory-session-api.png]

For each API, alternating, in the same run:
- ``peak_rss_mb`` of ``python -m runtime_shim rss BUNDLE`` (what ``bench`` reports; a fresh process each
  time, ``--rss-runs`` of them);
- a 4-thread soak in a fresh process: four threads classifying ``eval.jsonl`` one text at a time, a batch
  of 32 every 50 texts, for ``--soak-s`` seconds; the process's peak;
- latency in one process holding both pipelines, ``--rounds`` interleaved rounds of 1,000 single texts
  after 200 warm-ups, each API first in every other round: end to end as an application calls it
  (``pipe(text)``), and as ``bench``'s harness times it (``forward(encode([text]))``); medians over the
  rounds, the spread the rounds' range.

Prints a table (Markdown) and draws the plot. Names the CPU. Standard library, the shim and matplotlib.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APIS = ("c", "python")


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def rss(bundle: Path, api: str) -> float:
    out = subprocess.run([sys.executable, "-m", "runtime_shim", "rss", str(bundle), "--overrides",
                          json.dumps({"session_api": api})], capture_output=True, text=True, check=True,
                         env=_env(), cwd=str(ROOT))
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def soak_child(bundle: Path, api: str, seconds: float) -> None:
    """In the fresh process: four threads serving for ``seconds``; print the peak as JSON."""
    from runtime_shim import OnnxPipeline
    from runtime_shim.datafiles import read_labelled
    from runtime_shim.memory import peak_rss_mb

    pipe = OnnxPipeline(bundle, overrides={"session_api": api})
    texts, _ = read_labelled(bundle / "eval.jsonl")
    stop = time.monotonic() + seconds
    served = [0] * 4

    def work(k: int) -> None:
        i = k * 97
        while time.monotonic() < stop:
            pipe(texts[i % len(texts)])
            i += 1
            served[k] += 1
            if i % 50 == 0:
                pipe([texts[(i + j) % len(texts)] for j in range(32)])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "served": sum(served)}))


def soak(bundle: Path, api: str, seconds: float) -> dict:
    out = subprocess.run([sys.executable, __file__, str(bundle), "--soak-child", api, "--soak-s", str(seconds)],
                         capture_output=True, text=True, check=True, env=_env(), cwd=str(ROOT))
    return json.loads(out.stdout.strip().splitlines()[-1])


def latency(bundle: Path, rounds: int, n: int = 1000, warmup: int = 200) -> dict[str, dict[str, list[float]]]:
    sys.path.insert(0, str(ROOT))
    from runtime_shim import OnnxPipeline
    from runtime_shim.datafiles import read_labelled

    texts, _ = read_labelled(bundle / "eval.jsonl")
    pipes = {api: OnnxPipeline(bundle, overrides={"session_api": api}) for api in APIS}
    out: dict[str, dict[str, list[float]]] = {api: {"call": [], "harness": []} for api in APIS}
    clock = time.perf_counter_ns

    def p50(fn) -> float:
        for i in range(warmup):
            fn(texts[i % len(texts)])
        ts = []
        for i in range(n):
            t = texts[i % len(texts)]
            t0 = clock()
            fn(t)
            ts.append(clock() - t0)
        return statistics.median(ts) / 1e6

    for r in range(rounds):
        for api in (APIS if r % 2 == 0 else APIS[::-1]):  # each API first in every other round
            pipe = pipes[api]
            out[api]["call"].append(p50(pipe))
            out[api]["harness"].append(p50(lambda t, p=pipe: p.forward(p.encode([t]))))
    return out


def plot(results: dict, path: Path, cpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    colors = {"c": "#2171b5", "python": "#bdbdbd"}
    labels = {"c": "C API (default)", "python": "Python package"}
    for k, key in enumerate(("rss", "soak")):
        for i, api in enumerate(APIS):
            vals = results[api][key]
            axes[0].bar(k * 3 + i, statistics.median(vals), color=colors[api], label=labels[api] if k == 0 else None)
            axes[0].scatter([k * 3 + i] * len(vals), vals, color="k", s=8, zorder=3)
    axes[0].axhline(64, color="#a50f15", ls="--", lw=1, label="64 MB goal")
    axes[0].set_xticks([0.5, 3.5], ["fresh process\n(bench's figure)", "4-thread soak"])
    axes[0].set_ylabel("peak RSS, MiB")
    axes[0].legend(fontsize=7, loc="lower right")
    for k, key in enumerate(("call", "harness")):
        for i, api in enumerate(APIS):
            vals = [1000 * v for v in results[api][key]]
            axes[1].bar(k * 3 + i, statistics.median(vals), color=colors[api])
            axes[1].scatter([k * 3 + i] * len(vals), vals, color="k", s=8, zorder=3)
    axes[1].set_xticks([0.5, 3.5], ["pipe(text)", "forward(encode)\n(bench's harness)"])
    axes[1].set_ylabel("single-query p50, us")
    fig.suptitle(f"one bundle, two session APIs; bars: medians, dots: each run ({cpu})", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--rss-runs", type=int, default=3)
    ap.add_argument("--soak-s", type=float, default=8.0)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--soak-child", choices=APIS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.soak_child:
        soak_child(args.bundle, args.soak_child, args.soak_s)
        return 0
    results: dict[str, dict[str, list]] = {api: {"rss": [], "soak": [], "served": []} for api in APIS}
    for _ in range(args.rss_runs):
        for api in APIS:
            results[api]["rss"].append(rss(args.bundle, api))
    for _ in range(2):
        for api in APIS:
            s = soak(args.bundle, api, args.soak_s)
            results[api]["soak"].append(s["peak_rss_mb"])
            results[api]["served"].append(s["served"] / args.soak_s)
    lat = latency(args.bundle, args.rounds)
    for api in APIS:
        results[api].update(lat[api])
    cpu = _cpu()
    med = statistics.median
    print(f"bundle {args.bundle} ({(args.bundle / 'model.quant.onnx').stat().st_size / 1e6:.2f} MB model); CPU {cpu}")
    print("\n| session API | peak RSS, fresh process (runs) | 4-thread soak peak | soak texts/s | "
          "p50 pipe(text) [round range] | p50 bench harness [round range] |")
    print("|---|---:|---:|---:|---:|---:|")
    for api in APIS:
        r = results[api]
        print(f"| {api} | {med(r['rss']):.1f} MB ({', '.join(f'{v:.1f}' for v in r['rss'])}) | "
              f"{med(r['soak']):.1f} MB ({', '.join(f'{v:.1f}' for v in r['soak'])}) | {med(r['served']):,.0f} | "
              f"{1000 * med(r['call']):.1f} us [{1000 * min(r['call']):.1f}-{1000 * max(r['call']):.1f}] | "
              f"{1000 * med(r['harness']):.1f} us [{1000 * min(r['harness']):.1f}-{1000 * max(r['harness']):.1f}] |")
    if args.plot:
        plot(results, args.plot, cpu)
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
