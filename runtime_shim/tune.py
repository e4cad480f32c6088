"""``python -m runtime_shim tune BUNDLE``: find the fastest ONNX Runtime session settings on this device.

Runs on the device, so it imports only onnxruntime, tokenizers, numpy and the standard library.

What is searched, and why:

- ``intra_op_num_threads`` from 1 to the *physical* cores (never hyperthreads: two int8 GEMM threads
  on one core share its vector units). For ~20-token queries one thread often wins: handing work to
  a second thread costs more than it saves.
- spinning: ``on`` (workers busy-wait between ops: lowest latency back to back, burns a core),
  ``off`` (workers sleep: each op pays a wake-up), ``force-stop`` (spin within a run, stop at its end
  via ``session.force_spinning_stop``). Only meaningful with 2+ threads.
- ``graph_optimization_level`` (all, extended, basic) for the leading thread setting.
- on x86-64 without VNNI, ``session.x64quantprecision=1`` (exact U8S8 at some speed cost).

Each setting is timed end to end (tokenize + run + softmax) in two modes: back to back, and with a
gap between queries (default 20 ms, as an assistant sees them: spinning threads have gone to sleep
by then). The settings the bundle runs with now (``current``: ``runtime.json`` and this device's own
tuned settings) and ONNX Runtime's own defaults (a bare ``SessionOptions()``) are measured in the same
run (back to back in interleaved blocks, gapped query by query in turn), and a confirmation round
re-measures the leaders, the defaults and the current settings together.

A candidate replaces the current settings only when it is faster than them on at least one figure
and slower on none (p50, mean and p95, back to back and gapped) beyond the spread measured: the 95%
bootstrap interval of each ratio to the current settings. Anything else keeps the current settings,
so tune never makes a device slower than its own measurements say it is now.

On a device (the installed runtime, ``deploy --setup``) the winner is kept beside the releases, in the
runtime's state (``runtime_shim.tuned``), for that bundle only: the signed ``manifest.json`` and
``runtime.json`` are never rewritten there, and a rollback does not carry them. On a build machine
it goes into the bundle's ``runtime.json`` (``manifest.json`` re-hashed, the table under ``tuned``),
before the bundle is signed. Threads are ``SessionOptions`` alone: the onnxruntime wheel has not
used OpenMP since 1.7, and numpy's BLAS does no work in the shim.

    python -m runtime_shim tune BUNDLE [--max-threads N] [--runs 200] [--gap-ms 20] [--dry-run]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .cpu import VNNI_FLAGS, cpu_flags, physical_cores, target_warning  # noqa: F401 (re-exported)
from .exitcodes import ExitCode
from .manifest import BundleError, write_json_atomic
from .tuned import SETTING_KEYS, TUNED_KEYS

SPINNING = {
    "on": {"session.intra_op.allow_spinning": "1"},
    "off": {"session.intra_op.allow_spinning": "0"},
    "force-stop": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"},
}
DEFAULTS = "ort-defaults"
CURRENT = "current"  # the settings the bundle runs with now on this machine: the reference
MODES = ("b2b", "gap")
FIGURES = ("p50", "mean", "p95")


# ------------------------------------------------------------------------------------------ the CPU

# cpu_flags, physical_cores and target_warning live in runtime_shim.cpu (OnnxPipeline warns with them
# at load) and stay importable from here.


# ----------------------------------------------------------------------------------- the candidates


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One session setting. ``settings`` are ``runtime.json`` keys; None = ONNX Runtime's defaults."""

    name: str
    settings: Mapping[str, Any] | None

    def describe(self) -> dict[str, Any]:
        if self.settings is None:
            return {"threads": "0 (1/phys core, pinned)", "spinning": "default", "graph": "all"}
        sc = self.settings.get("session_config", {})
        spin = next((k for k, v in SPINNING.items() if all(sc.get(a) == b for a, b in v.items())
                     and (k == "force-stop" or "session.force_spinning_stop" not in sc)), "-")
        threads = self.settings["intra_op_num_threads"]
        return {"threads": "0 (1/phys core, pinned)" if threads == 0 else threads,
                "spinning": spin if threads != 1 else "-",
                "graph": self.settings["graph_optimization_level"],
                **({"x64quantprecision": sc["session.x64quantprecision"]} if "session.x64quantprecision" in sc else {})}


def candidate(threads: int, spinning: str = "on", graph: str = "all", extra: Mapping[str, str] | None = None) -> Candidate:
    """A candidate with ``threads`` intra-op threads (1 = no worker pool, so spinning does not apply;
    0 = ORT's choice: one thread per physical core, pinned to it, which an explicit count is not).

    Example:
        >>> candidate(2, "off").name, candidate(0, "force-stop").name
        ('t2-spin-off', 'auto-spin-force-stop')
    """
    config = dict(SPINNING[spinning]) if threads != 1 else {}
    config.update(extra or {})
    name = ("auto" if threads == 0 else f"t{threads}") + (f"-spin-{spinning}" if threads != 1 else "")
    name += "" if graph == "all" else f"-{graph}"
    if extra and extra.get("session.x64quantprecision") == "1":
        name += "-x64qp"
    return Candidate(name, {"intra_op_num_threads": threads, "inter_op_num_threads": 1,
                            "execution_mode": "sequential", "graph_optimization_level": graph,
                            "session_config": config})


def current_candidate(settings: Mapping[str, Any]) -> Candidate:
    """The thread settings of ``settings`` (a pipeline's effective ``runtime.json``) as a candidate.

    Example:
        >>> current_candidate({"intra_op_num_threads": 1, "model": "m.onnx", "session_config": {"a": "b"}}).settings
        {'intra_op_num_threads': 1, 'inter_op_num_threads': 1, 'execution_mode': 'sequential', 'graph_optimization_level': 'all', 'session_config': {}}
    """
    from .session import DEFAULTS as SESSION_DEFAULTS

    out = {k: settings.get(k, SESSION_DEFAULTS[k]) for k in SETTING_KEYS if k != "session_config"}
    out["session_config"] = {k: v for k, v in (settings.get("session_config") or {}).items() if k in TUNED_KEYS}
    return Candidate(CURRENT, out)


def thread_candidates(max_threads: int, *, auto: bool = False) -> list[Candidate]:
    """ORT's defaults, then 1..max_threads intra-op threads, each 2+ with every spinning choice; with
    ``auto`` (max_threads is all physical cores) also ORT's pinned pool without spinning."""
    out = [Candidate(DEFAULTS, None), candidate(1)]
    for t in range(2, max_threads + 1):
        out += [candidate(t, s) for s in SPINNING]
    if auto and max_threads > 1:
        out += [candidate(0, s) for s in SPINNING if s != "on"]  # auto + spinning on is the defaults
    return out


def needs_quant_precision(arch: str, flags: set[str]) -> bool:
    """x86-64 without VNNI: U8S8 runs on VPMADDUBSW, whose s16 sums can saturate; x64quantprecision
    trades speed for an exact path, worth measuring there only."""
    return arch == "x86_64" and not set(VNNI_FLAGS) & flags


# ------------------------------------------------------------------------------------ measurement


class _Runner:
    """A session for one candidate, sharing the pipeline's tokenizer."""

    def __init__(self, pipe, cand: Candidate, base: Mapping[str, Any]):
        from .session import make_session

        self.pipe, self.cand = pipe, cand
        if cand.settings is None:
            # Every knob at ONNX Runtime's default (SessionOptions(): threads 0, every optimizer), through
            # the same session API as the other candidates, so the comparison is of settings only.
            self.session = make_session(pipe.model_path, {
                "intra_op_num_threads": 0, "inter_op_num_threads": 0, "disabled_optimizers": [],
                "session_api": base.get("session_api", "auto")})
        else:
            self.session = make_session(pipe.model_path, _settings(base, cand))
        self.output = pipe.output_name

    def __call__(self, text: str):
        from .scores import softmax

        enc = self.pipe.encode([text])
        logits = self.session.run([self.output], {n: enc[n] for n in self.pipe.input_names})[0]
        return softmax(logits).argmax(-1)


def _settings(base: Mapping[str, Any], cand: Candidate) -> dict[str, Any]:
    """``runtime.json`` with the candidate's thread settings in place of the tuned keys."""
    out = {k: v for k, v in base.items() if k != "session_config"}
    config = {k: v for k, v in (base.get("session_config") or {}).items() if k not in TUNED_KEYS}
    out.update({k: v for k, v in (cand.settings or {}).items() if k != "session_config"})
    out["session_config"] = {**config, **(cand.settings or {}).get("session_config", {})}
    return out


def _stats(ms: Sequence[float]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(ms, dtype=np.float64)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50": round(float(p50), 4), "mean": round(float(a.mean()), 4), "p95": round(float(p95), 4),
            "p99": round(float(p99), 4), "n": int(a.size)}


def measure(runners: Mapping[str, Any], texts: Sequence[str], *, runs: int, warmup: int, gap_ms: float,
            rounds: int) -> dict[str, list[float]]:
    """End-to-end ms per query for each runner (a callable taking one text). Back to back
    (``gap_ms=0``): ``rounds`` blocks per runner in rotated order, so slow spells of a shared machine
    land on every candidate. With gaps: query by query in turn, each after ``gap_ms`` of sleep, so every
    candidate sees the same moments (the gap is long enough for the previous session's workers to stop
    spinning). ``tune(measure=...)`` takes another function of this shape (a fake clock in the tests).

    Example:
        >>> measure({"a": runner_a, "b": runner_b}, ["set an alarm"], runs=40, warmup=5, gap_ms=0, rounds=4)
        ... # doctest: +SKIP
        {'a': [0.71, 0.69, ...], 'b': [...]}
    """
    names = list(runners)
    for name in names:
        for i in range(warmup):
            runners[name](texts[i % len(texts)])
    times: dict[str, list[float]] = {n: [] for n in names}
    gap_s = gap_ms / 1000.0
    clock = time.perf_counter_ns
    gc_was = gc.isenabled()
    gc.disable()
    try:
        if gap_s:
            for k in range(runs):
                text = texts[k % len(texts)]
                shift = k % len(names)
                for name in names[shift:] + names[:shift]:
                    time.sleep(gap_s)
                    t0 = clock()
                    runners[name](text)
                    times[name].append((clock() - t0) / 1e6)
        else:
            per_block = max(1, math.ceil(runs / rounds))
            k = 0
            for r in range(rounds):
                shift = r % len(names)
                for name in names[shift:] + names[:shift]:
                    run = runners[name]
                    # Let the previous block's spinning workers give up their cores before timing this one.
                    time.sleep(0.02)
                    run(texts[k % len(texts)])
                    for _ in range(per_block):
                        text = texts[k % len(texts)]
                        k += 1
                        t0 = clock()
                        run(text)
                        times[name].append((clock() - t0) / 1e6)
    finally:
        if gc_was:
            gc.enable()
    return times


def _score(row: Mapping[str, Any], ref: Mapping[str, Any]) -> float:
    """Geometric mean of the p50, mean and p95 ratios to the reference in both modes (lower is better)."""
    ratios = [row[m][f] / ref[m][f] for m in MODES for f in FIGURES]
    return math.exp(sum(math.log(x) for x in ratios) / len(ratios))


def _ratios(row: Mapping[str, Any], ref: Mapping[str, Any]) -> dict[str, float]:
    return {f"{m}_{f}": round(row[m][f] / ref[m][f], 3) for m in MODES for f in FIGURES}


BOOTSTRAP = 1000  # resamples per comparison; the interval's ends move by well under 1% past this


def spread(cand: Mapping[str, Sequence[float]], ref: Mapping[str, Sequence[float]], *, seed: int = 0
           ) -> dict[str, list[float]]:
    """``{"b2b_p50": [low, high], ...}``: the 95% bootstrap interval of each figure's ratio ``cand / ref``
    (timings in ms per mode, resampled independently, a fixed seed: the same timings give the same
    answer). Above 1 at ``low``: slower beyond the spread; below 1 at ``high``: faster beyond it.

    Example:
        >>> iv = spread({"b2b": [2.0, 2.1, 2.2] * 20, "gap": [1.0] * 60}, {"b2b": [1.0, 1.1] * 30, "gap": [1.0] * 60})
        >>> iv["b2b_p50"][0] > 1, iv["gap_p95"]
        (True, [1.0, 1.0])
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {}
    for m in MODES:
        sides = []
        for times in (cand[m], ref[m]):
            a = np.asarray(times, dtype=np.float64)
            s = a[rng.integers(0, a.size, (BOOTSTRAP, a.size))]
            sides.append({"p50": np.percentile(s, 50, axis=1), "mean": s.mean(axis=1),
                          "p95": np.percentile(s, 95, axis=1)})
        for f in FIGURES:
            lo, hi = np.percentile(sides[0][f] / sides[1][f], [2.5, 97.5])
            out[f"{m}_{f}"] = [round(float(lo), 4), round(float(hi), 4)]
    return out


def judge(interval: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """The verdict on one candidate against the current settings: the figures it is slower and faster on
    beyond the spread, and whether it may replace them (faster on one at least, slower on none).

    Example:
        >>> judge({"b2b_p50": [0.8, 0.9], "b2b_p95": [1.05, 1.2], "gap_p50": [0.97, 1.02]})
        {'slower': ['b2b_p95'], 'faster': ['b2b_p50'], 'keep': False}
    """
    slower = [k for k, (lo, _) in interval.items() if lo > 1.0]
    faster = [k for k, (_, hi) in interval.items() if hi < 1.0]
    return {"slower": slower, "faster": faster, "keep": not slower and bool(faster)}


@dataclasses.dataclass
class TuneResult:
    rows: list[dict[str, Any]]  # every candidate measured in the search, with its ratios to the current settings
    confirm: list[dict[str, Any]]  # the confirmation round: leaders, the defaults and the current settings, re-measured
    winner: str  # a candidate's name, or CURRENT when none may replace the current settings
    settings: dict[str, Any]  # the winner's thread settings
    ratios: dict[str, float]  # winner / current in the confirmation round (b2b_p50, b2b_mean, ..., gap_p95)
    physical_cores: int
    gap_ms: float
    runs: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def changed(self) -> bool:
        return self.winner != CURRENT

    def table(self) -> str:
        head = ("", "candidate", "threads", "spinning", "graph", "b2b p50", "b2b mean", "b2b p95", "gap p50",
                "gap mean", "gap p95", "vs current", "verdict")
        lines: list[tuple[str, ...]] = [head]
        for section, rows in (("search", self.rows), ("confirmation", self.confirm)):
            lines.append((section,))
            for r in rows:
                d = r["describe"]
                graph = str(d["graph"]) + (" x64qp" if "x64quantprecision" in d else "")
                lines.append(("*" if (section == "confirmation" and r["name"] == self.winner) else "", r["name"],
                              str(d["threads"]), str(d["spinning"]), graph,
                              *(f"{r[m][f]:.3f}" for m in MODES for f in FIGURES), f"{r['score']:.3f}",
                              verdict(r)))
        widths = [max(len(line[i]) for line in lines if len(line) > 1) for i in range(len(head))]
        out = [line[0] if len(line) == 1 else "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
               for line in lines]
        out.append(f"(ms end to end, tokenize + run + softmax; b2b: back to back; gap: {self.gap_ms:g} ms between "
                   f"queries; vs current: geometric mean of the six ratios to the current settings, lower is faster; "
                   f"slower/faster: beyond the 95% bootstrap interval; {self.physical_cores} physical core(s))")
        if self.changed:
            r = self.ratios
            out.append(f"winner {self.winner}: " + ", ".join(f"{k.replace('_', ' ')} x{v:.2f}" for k, v in r.items())
                       + " of the current settings (confirmation round)")
        else:
            out.append("winner current: no candidate was faster than the current settings without being slower on "
                       "a figure; they stay")
        return "\n".join(out)


def verdict(row: Mapping[str, Any]) -> str:
    """One cell: what the spread says of a row against the current settings."""
    if row["name"] == CURRENT:
        return "reference"
    v = row.get("verdict") or {}
    if v.get("slower"):
        return "slower: " + ", ".join(k.replace("_", " ") for k in v["slower"])
    if v.get("faster"):
        return "faster: " + ", ".join(k.replace("_", " ") for k in v["faster"])
    return "same within spread"


def tune(pipe, texts: Sequence[str], *, max_threads: int, runs: int = 200, warmup: int = 50, gap_ms: float = 20.0,
         rounds: int = 4, graph_levels: Sequence[str] = ("extended", "basic"), quant_precision: bool | None = None,
         measure: Callable[..., Mapping[str, Sequence[float]]] = measure, log=print) -> TuneResult:
    """Search the candidates on ``pipe`` (an ``OnnxPipeline``) with ``texts`` as queries, against the
    settings ``pipe`` runs with now; ``measure`` times them (``measure`` above, or a fake in tests).

    Example:
        >>> from runtime_shim import OnnxPipeline
        >>> result = tune(OnnxPipeline("bundle"), ["set an alarm for 7"], max_threads=2, runs=50)  # doctest: +SKIP
        >>> result.winner, all(v <= 1.0 for v in result.ratios.values())  # doctest: +SKIP
        ('t1', True)
    """
    from .bench import spread_order

    texts = [texts[i] for i in spread_order(len(texts), warmup + runs)]  # the whole split, not its first rows
    base = {k: v for k, v in pipe.settings.items()}
    cores = physical_cores()
    if max_threads > cores:
        raise BundleError(f"--max-threads {max_threads} is above this CPU's {cores} physical cores; "
                          "hyperthreads share a core's vector units, so pass at most " + str(cores))
    arch, flags = cpu_flags()
    if quant_precision is None:
        quant_precision = needs_quant_precision(arch, flags)
    timer = measure

    def run_stage(cands: Sequence[Candidate], label: str, n_runs: int) -> dict[str, dict[str, Any]]:
        runners = {c.name: _Runner(pipe, c, base) for c in cands}
        log(f"[tune] {label}: {', '.join(runners)} ({n_runs} queries each, back to back and {gap_ms:g} ms apart)")
        times = {m: timer(runners, texts, runs=n_runs, warmup=warmup, gap_ms=g, rounds=rounds)
                 for m, g in (("b2b", 0.0), ("gap", gap_ms))}
        rows = {}
        for c in cands:
            rows[c.name] = {"name": c.name, "settings": c.settings, "describe": c.describe(),
                            **{m: _stats(times[m][c.name]) for m in MODES}}
        ref = rows[CURRENT]
        ref_times = {m: times[m][CURRENT] for m in MODES}
        for r in rows.values():
            r["score"] = round(_score(r, ref), 4)
            r["ratios"] = _ratios(r, ref)
            if r["name"] != CURRENT:
                r["spread"] = spread({m: times[m][r["name"]] for m in MODES}, ref_times)
                r["verdict"] = judge(r["spread"])
        del runners
        return rows

    current = current_candidate(base)
    by_name = {CURRENT: current, **{c.name: c for c in thread_candidates(max_threads, auto=max_threads == cores)}}
    rows = run_stage(list(by_name.values()), "threads and spinning", runs)
    lead = min((r for r in rows.values() if r["name"] not in (DEFAULTS, CURRENT)), key=lambda r: r["score"])
    lead_c = by_name[lead["name"]]
    t = lead_c.settings["intra_op_num_threads"]
    spin = lead_c.describe()["spinning"] if t != 1 else "on"
    second = [candidate(t, spin, g) for g in graph_levels]
    if quant_precision:
        second.append(candidate(t, spin, "all", {"session.x64quantprecision": "1"}))
    if second:
        by_name.update({c.name: c for c in second})
        rows2 = run_stage([current, lead_c, *second], "graph level" + (" and x64quantprecision" if quant_precision else ""),
                          runs)
        # Stage-2 rows are judged against the current settings of their own run; kept beside stage 1's.
        for name, r in rows2.items():
            if name not in (CURRENT, lead_c.name):
                rows[name] = r
    # Confirm the best candidates that were slower on no figure, then the best by score, with ORT's
    # defaults always among them: a setting that wins back to back but loses with gaps is not a winner.
    ranked = sorted((r for r in rows.values() if r["name"] not in (CURRENT, DEFAULTS)), key=lambda r: r["score"])
    clean = [r for r in ranked if not r["verdict"]["slower"]]
    picked = clean[:2] + [r for r in ranked if r not in clean[:2]][:max(1, 3 - len(clean[:2]))]
    leaders = [by_name[r["name"]] for r in picked[:3]]
    confirm = run_stage([current, by_name[DEFAULTS], *leaders], "confirmation", 2 * runs)
    ok = [r for n, r in confirm.items() if n != CURRENT and r["verdict"]["keep"]]
    win = min(ok, key=lambda r: r["score"]) if ok else confirm[CURRENT]
    settings = dict(current.settings) if win["name"] == CURRENT else _winner_settings(by_name[win["name"]])
    return TuneResult(rows=list(rows.values()), confirm=list(confirm.values()), winner=win["name"], settings=settings,
                      ratios=win["ratios"], physical_cores=cores, gap_ms=gap_ms, runs=runs)


def _winner_settings(cand: Candidate) -> dict[str, Any]:
    if cand.settings is None:  # ORT's defaults: 0 = one thread per physical core, its spinning, every optimisation
        return {"intra_op_num_threads": 0, "inter_op_num_threads": 0, "execution_mode": "sequential",
                "graph_optimization_level": "all", "session_config": {}}
    return dict(cand.settings)


# --------------------------------------------------------------------------------------- writing


def _record(result: TuneResult) -> dict[str, Any]:
    arch, _ = cpu_flags()
    keep = ("name", "describe", "b2b", "gap", "score", "verdict")
    return {"winner": result.winner, "settings": result.settings, "ratios_vs_current": result.ratios,
            "physical_cores": result.physical_cores, "arch": arch, "gap_ms": result.gap_ms, "runs": result.runs,
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "table": [{k: r[k] for k in keep if k in r} for r in result.rows],
            "confirm": [{k: r[k] for k in keep if k in r} for r in result.confirm]}


def write_winner(bundle_dir: str | os.PathLike, result: TuneResult) -> dict[str, Any]:
    """Build side: put the winner's settings into the bundle's ``runtime.json`` (other keys and other
    session-config entries kept, ``env`` dropped) and re-hash ``manifest.json`` with the table under
    ``tuned``. A signed bundle is refused: its signature would no longer hold (tune before signing).

    Example:
        >>> write_winner("bundle", tune(OnnxPipeline("bundle"), texts, max_threads=2))  # doctest: +SKIP
        {'model': 'model.quant.onnx', ..., 'intra_op_num_threads': 1, ...}
    """
    from .manifest import SIGNATURE, update_manifest

    root = Path(bundle_dir)
    if (root / SIGNATURE).exists():
        raise BundleError(f"{root}: signed ({SIGNATURE}): writing runtime.json would break its signature; tune "
                          "before `edgepack sign`, or on the device, where the settings are kept beside the release")
    runtime = json.loads((root / "runtime.json").read_text())
    new = _settings(runtime, Candidate(result.winner, result.settings))
    new.pop("env", None)  # no longer applied (pipeline.check_runtime)
    write_json_atomic(root / "runtime.json", new)
    update_manifest(root, tuned=_record(result))
    return new


def write_device(bundle_dir: str | os.PathLike, result: TuneResult, state_dir: str | os.PathLike | None = None
                 ) -> Path | None:
    """Device side: keep the winner as this device's settings for this bundle (``runtime_shim.tuned``),
    leaving every file of the bundle as it is; ``None`` when the current settings stay.

    Example:
        >>> write_device("/srv/edgepack/tiny/current", result)  # doctest: +SKIP
        PosixPath('/opt/edgepack-runtime/state/tuned/5e72....json')
    """
    from .tuned import manifest_digest, write_tuned

    if not result.changed:
        return None
    return write_tuned(manifest_digest(bundle_dir), result.settings,
                       {k: v for k, v in _record(result).items() if k != "settings"}, state_dir)


# ------------------------------------------------------------------------------------------- CLI


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("tune", help="find faster thread settings on this device; keep them only if slower on nothing",
                       description="Measure intra-op threads (1..physical cores), spinning, graph optimisation level "
                                   "(and x64quantprecision on x86 without VNNI) back to back and with gaps, against "
                                   "the settings the bundle runs with now and ONNX Runtime's defaults in the same run; "
                                   "a candidate replaces the current settings only when it is faster on one figure "
                                   "and slower on none (p50, mean, p95) beyond the measured spread.")
    p.add_argument("bundle", metavar="BUNDLE", help="the bundle directory (holding manifest.json)")
    p.add_argument("--max-threads", type=int, default=None, metavar="N",
                   help="search 1..N intra-op threads (default and maximum: this CPU's physical cores)")
    p.add_argument("--runs", type=int, default=200, help="timed queries per candidate and mode (default: 200)")
    p.add_argument("--warmup", type=int, default=50, help="untimed queries per candidate first (default: 50)")
    p.add_argument("--gap-ms", type=float, default=20.0, help="pause between gapped queries (default: 20)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved blocks per candidate (default: 4)")
    p.add_argument("--into", choices=("device", "bundle"), default=None,
                   help="where the winner goes: device (this device's settings for this bundle, in the runtime's "
                        "state; the bundle is not changed) or bundle (its runtime.json, re-hashing manifest.json; "
                        "before signing). Default: device under the installed runtime (deploy --setup), else bundle")
    p.add_argument("--data", default=None, help="query texts: a labelled file (default: the bundle's eval.jsonl)")
    p.add_argument("--dry-run", action="store_true", help="print the table, change nothing")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the full result as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum check of the bundle's files")
    return p


def run(args: argparse.Namespace) -> int:
    if args.runs < 1 or args.warmup < 0 or args.rounds < 1 or args.gap_ms < 0:
        raise BundleError(f"--runs {args.runs} --warmup {args.warmup} --rounds {args.rounds} --gap-ms {args.gap_ms}: "
                          "need runs >= 1, warmup >= 0, rounds >= 1, gap >= 0")
    cores = physical_cores()
    max_threads = cores if args.max_threads is None else args.max_threads
    if max_threads < 1 or max_threads > cores:
        raise BundleError(f"--max-threads {max_threads} is not valid on this CPU: it has {cores} physical cores "
                          "(hyperthreads excluded); pass 1.." + str(cores))
    from .datafiles import read_labelled
    from .pipeline import OnnxPipeline
    from .trust import refuse_no_verify_with_keys, runtime_anchors

    into = args.into or ("device" if runtime_anchors() else "bundle")
    if args.no_verify:
        refuse_no_verify_with_keys(None)
    pipe = OnnxPipeline(args.bundle, verify=not args.no_verify)  # warns once if this CPU lacks the target's flags
    data = Path(args.data) if args.data else pipe.bundle_dir / "eval.jsonl"
    texts, _ = read_labelled(data)
    if not texts:
        raise BundleError(f"{data}: no texts to time; pass --data FILE")
    result = tune(pipe, texts, max_threads=max_threads, runs=args.runs, warmup=args.warmup, gap_ms=args.gap_ms,
                  rounds=args.rounds, log=lambda m: print(m, file=sys.stderr))
    print(result.table())
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, {**result.to_dict(), "into": into, "dry_run": args.dry_run})
    if args.dry_run:
        print("dry run: nothing changed")
        return ExitCode.OK
    del pipe
    if into == "device":
        path = write_device(args.bundle, result)
        print(f"wrote {path}: this device's settings for this bundle (the bundle's files unchanged)" if path else
              "the current settings stay: nothing written")
        return ExitCode.OK
    new = write_winner(args.bundle, result)
    print(f"wrote {Path(args.bundle) / 'runtime.json'}: intra_op_num_threads={new['intra_op_num_threads']}, "
          f"graph_optimization_level={new['graph_optimization_level']}, session_config={new['session_config']}; "
          f"manifest.json re-hashed")
    return ExitCode.OK


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m runtime_shim tune ...`` as a function; returns the exit code.

    Example:
        >>> main(["bundle", "--runs", "50", "--dry-run"])  # doctest: +SKIP
        0
    """
    parser = argparse.ArgumentParser(prog="python -m runtime_shim tune")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["tune", *(argv or [])])
    try:
        return run(args)
    except BundleError as e:
        print(f"python -m runtime_shim tune: error: {e}", file=sys.stderr)
        return ExitCode.USAGE
