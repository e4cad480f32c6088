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
by then). ONNX Runtime's own defaults (a bare ``SessionOptions()``) are measured in the same run
(back to back in interleaved blocks, gapped query by query in turn), and a confirmation round re-measures the leaders against them; the winner must
be no worse than the defaults at p50 and p95 in both modes, else the defaults are kept.

The winner goes into ``runtime.json`` (and ``manifest.json`` is re-hashed, with the table under
``tuned``). Threads are ``SessionOptions`` alone: the onnxruntime wheel has not used OpenMP since 1.7,
and numpy's BLAS does no work in the shim (an older tune's ``env`` table is dropped).

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .cpu import VNNI_FLAGS, cpu_flags, physical_cores, target_warning  # noqa: F401 (re-exported)
from .manifest import BundleError, write_json_atomic

TUNED_KEYS = ("session.intra_op.allow_spinning", "session.force_spinning_stop", "session.x64quantprecision")
SPINNING = {
    "on": {"session.intra_op.allow_spinning": "1"},
    "off": {"session.intra_op.allow_spinning": "0"},
    "force-stop": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"},
}
DEFAULTS = "ort-defaults"


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
    return {"p50": round(float(p50), 4), "p95": round(float(p95), 4), "p99": round(float(p99), 4), "n": int(a.size)}


def measure(runners: Mapping[str, _Runner], texts: Sequence[str], *, runs: int, warmup: int, gap_ms: float,
            rounds: int) -> dict[str, dict[str, float]]:
    """End-to-end ms per query for each runner. Back to back (``gap_ms=0``): ``rounds`` blocks per
    runner in rotated order, so slow spells of a shared machine land on every candidate. With gaps:
    query by query in turn, each after ``gap_ms`` of sleep, so every candidate sees the same moments
    (the gap is long enough for the previous session's workers to stop spinning).

    Example:
        >>> measure({"a": runner_a, "b": runner_b}, ["set an alarm"], runs=40, warmup=5, gap_ms=0, rounds=4)
        ... # doctest: +SKIP
        {'a': {'p50': 0.71, 'p95': 0.9, 'p99': 1.1, 'n': 40}, 'b': {...}}
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
    return {n: _stats(ts) for n, ts in times.items()}


MODES = ("b2b", "gap")


def _score(row: Mapping[str, Any], ref: Mapping[str, Any]) -> float:
    """Geometric mean of p50 and p95 ratios to the reference in both modes (lower is better)."""
    ratios = [row[m][p] / ref[m][p] for m in MODES for p in ("p50", "p95")]
    return math.exp(sum(math.log(x) for x in ratios) / len(ratios))


def _ratios(row: Mapping[str, Any], ref: Mapping[str, Any]) -> dict[str, float]:
    return {f"{m}_{p}": round(row[m][p] / ref[m][p], 3) for m in MODES for p in ("p50", "p95")}


@dataclasses.dataclass
class TuneResult:
    rows: list[dict[str, Any]]  # every candidate measured in the search, with its ratios to the defaults
    confirm: list[dict[str, Any]]  # the confirmation round: leaders and the defaults, re-measured
    winner: str
    settings: dict[str, Any]  # what goes into runtime.json
    ratios: dict[str, float]  # winner / defaults in the confirmation round (b2b_p50, b2b_p95, gap_p50, gap_p95)
    physical_cores: int
    gap_ms: float
    runs: int
    tolerance_pct: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        head = ("", "candidate", "threads", "spinning", "graph", "b2b p50", "b2b p95", "gap p50", "gap p95", "vs default")
        lines: list[tuple[str, ...]] = [head]
        for section, rows in (("search", self.rows), ("confirmation", self.confirm)):
            lines.append((section,))
            for r in rows:
                d = r["describe"]
                graph = str(d["graph"]) + (" x64qp" if "x64quantprecision" in d else "")
                lines.append(("*" if (section == "confirmation" and r["name"] == self.winner) else "", r["name"],
                              str(d["threads"]), str(d["spinning"]), graph,
                              f"{r['b2b']['p50']:.3f}", f"{r['b2b']['p95']:.3f}", f"{r['gap']['p50']:.3f}",
                              f"{r['gap']['p95']:.3f}", f"{r['score']:.3f}"))
        widths = [max(len(line[i]) for line in lines if len(line) > 1) for i in range(len(head))]
        out = [line[0] if len(line) == 1 else "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
               for line in lines]
        out.append(f"(ms end to end, tokenize + run + softmax; b2b: back to back; gap: {self.gap_ms:g} ms between "
                   f"queries; vs default: geometric mean of the four ratios to ORT's defaults, lower is faster; "
                   f"{self.physical_cores} physical core(s))")
        r = self.ratios
        best = min((c for c in self.confirm if c["name"] != DEFAULTS), key=lambda c: c["score"], default=None)
        if self.winner == DEFAULTS and best is not None and best["score"] < 1.0:
            worst_key = max(best["ratios"], key=best["ratios"].get)
            worst = best["ratios"][worst_key]
            out.append(f"{best['name']} scored {best['score']:.3f} but its {worst_key} was x{worst:.3f} of the defaults'; "
                       f"--tolerance {math.ceil((worst - 1) * 100)} would accept it")
        out.append(f"winner {self.winner}: p50 x{r['b2b_p50']:.2f} / p95 x{r['b2b_p95']:.2f} back to back, "
                   f"p50 x{r['gap_p50']:.2f} / p95 x{r['gap_p95']:.2f} gapped, relative to ORT defaults (confirmation round)")
        return "\n".join(out)


def tune(pipe, texts: Sequence[str], *, max_threads: int, runs: int = 200, warmup: int = 50, gap_ms: float = 20.0,
         rounds: int = 4, graph_levels: Sequence[str] = ("extended", "basic"), quant_precision: bool | None = None,
         tolerance_pct: float = 0.0, log=print) -> TuneResult:
    """Search the candidates on ``pipe`` (an ``OnnxPipeline``) with ``texts`` as queries.

    Example:
        >>> from runtime_shim import OnnxPipeline
        >>> result = tune(OnnxPipeline("bundle"), ["set an alarm for 7"], max_threads=2, runs=50)  # doctest: +SKIP
        >>> result.winner, result.ratios["gap_p95"] <= 1.0  # doctest: +SKIP
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

    def run_stage(cands: Sequence[Candidate], label: str, n_runs: int) -> dict[str, dict[str, Any]]:
        runners = {c.name: _Runner(pipe, c, base) for c in cands}
        log(f"[tune] {label}: {', '.join(runners)} ({n_runs} queries each, back to back and {gap_ms:g} ms apart)")
        res = {m: measure(runners, texts, runs=n_runs, warmup=warmup, gap_ms=g, rounds=rounds)
               for m, g in (("b2b", 0.0), ("gap", gap_ms))}
        rows = {}
        for c in cands:
            rows[c.name] = {"name": c.name, "settings": c.settings, "describe": c.describe(),
                            "b2b": res["b2b"][c.name], "gap": res["gap"][c.name]}
        ref = rows[DEFAULTS]
        for r in rows.values():
            r["score"] = round(_score(r, ref), 4)
            r["ratios"] = _ratios(r, ref)
        del runners
        return rows

    by_name = {c.name: c for c in thread_candidates(max_threads, auto=max_threads == cores)}
    rows = run_stage(list(by_name.values()), "threads and spinning", runs)
    lead = min((r for r in rows.values() if r["name"] != DEFAULTS), key=lambda r: r["score"])
    lead_c = by_name[lead["name"]]
    t = lead_c.settings["intra_op_num_threads"]
    spin = lead_c.describe()["spinning"] if t != 1 else "on"
    second = [candidate(t, spin, g) for g in graph_levels]
    if quant_precision:
        second.append(candidate(t, spin, "all", {"session.x64quantprecision": "1"}))
    if second:
        by_name.update({c.name: c for c in second})
        rows2 = run_stage([by_name[DEFAULTS], lead_c, *second], "graph level" + (" and x64quantprecision" if quant_precision else ""), runs)
        # Stage-2 rows are scored against the defaults of their own run; keep them beside stage 1's.
        for name, r in rows2.items():
            if name not in (DEFAULTS, lead_c.name):
                rows[name] = r
    # Confirm the best candidates that were already no worse than the defaults on all four figures,
    # then the best by score: a setting that wins back to back but loses with gaps is not a winner.
    ranked = sorted((r for r in rows.values() if r["name"] != DEFAULTS), key=lambda r: r["score"])
    feasible = [r for r in ranked if all(v <= 1.0 for v in r["ratios"].values())]
    picked = feasible[:2] + [r for r in ranked if r not in feasible[:2]][:max(1, 3 - len(feasible[:2]))]
    leaders = [by_name[r["name"]] for r in picked[:3]]
    confirm = run_stage([by_name[DEFAULTS], *leaders], "confirmation", max(runs, 2 * runs))
    limit = 1.0 + tolerance_pct / 100
    ok = [r for n, r in confirm.items() if n != DEFAULTS and all(v <= limit for v in r["ratios"].values())]
    if ok:
        win = min(ok, key=lambda r: r["score"])
        winner, settings = win["name"], dict(by_name[win["name"]].settings)
    else:
        # Nothing beat ORT's defaults at p50 and p95 in both modes: keep them (0 = one thread per
        # physical core, ORT's spinning default, all graph optimisations).
        winner = DEFAULTS
        settings = {"intra_op_num_threads": 0, "inter_op_num_threads": 0, "execution_mode": "sequential",
                    "graph_optimization_level": "all", "session_config": {}}
    return TuneResult(rows=list(rows.values()), confirm=list(confirm.values()), winner=winner, settings=settings,
                      ratios=confirm[winner]["ratios"], physical_cores=cores, gap_ms=gap_ms, runs=runs,
                      tolerance_pct=tolerance_pct)


# --------------------------------------------------------------------------------------- writing


def write_winner(bundle_dir: str | os.PathLike, result: TuneResult) -> dict[str, Any]:
    """Put the winner's settings into ``runtime.json`` (other keys and other session-config entries
    kept, ``env`` dropped) and re-hash ``manifest.json`` with the table under ``tuned``.

    Example:
        >>> write_winner("bundle", tune(OnnxPipeline("bundle"), texts, max_threads=2))  # doctest: +SKIP
        {'model': 'model.quant.onnx', ..., 'intra_op_num_threads': 1, ...}
    """
    from .manifest import update_manifest

    root = Path(bundle_dir)
    runtime = json.loads((root / "runtime.json").read_text())
    new = _settings(runtime, Candidate(result.winner, result.settings))
    new.pop("env", None)  # no longer applied (pipeline.check_runtime)
    write_json_atomic(root / "runtime.json", new)
    arch, _ = cpu_flags()
    update_manifest(root, tuned={"winner": result.winner, "settings": result.settings, "ratios_vs_ort_defaults": result.ratios,
                                 "tolerance_pct": result.tolerance_pct,
                                 "physical_cores": result.physical_cores, "arch": arch, "gap_ms": result.gap_ms,
                                 "runs": result.runs, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 "table": [{k: r[k] for k in ("name", "describe", "b2b", "gap", "score")} for r in result.rows],
                                 "confirm": [{k: r[k] for k in ("name", "describe", "b2b", "gap", "score")} for r in result.confirm]})
    return new


# ------------------------------------------------------------------------------------------- CLI


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("tune", help="find the fastest thread settings on this device and write them to runtime.json",
                       description="Measure intra-op threads (1..physical cores), spinning, graph optimisation level "
                                   "(and x64quantprecision on x86 without VNNI) back to back and with gaps, against "
                                   "ONNX Runtime's defaults in the same run; write the winner into runtime.json.")
    p.add_argument("bundle", metavar="BUNDLE", help="the bundle directory (holding manifest.json)")
    p.add_argument("--max-threads", type=int, default=None, metavar="N",
                   help="search 1..N intra-op threads (default and maximum: this CPU's physical cores)")
    p.add_argument("--runs", type=int, default=200, help="timed queries per candidate and mode (default: 200)")
    p.add_argument("--warmup", type=int, default=50, help="untimed queries per candidate first (default: 50)")
    p.add_argument("--gap-ms", type=float, default=20.0, help="pause between gapped queries (default: 20)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved blocks per candidate (default: 4)")
    p.add_argument("--tolerance", type=float, default=0.0, metavar="PCT",
                   help="accept a winner up to PCT%% worse than ORT's defaults on any of its four figures "
                        "(default 0: no worse on p50 and p95, back to back and gapped)")
    p.add_argument("--data", default=None, help="query texts: a labelled file (default: the bundle's eval.jsonl)")
    p.add_argument("--dry-run", action="store_true", help="print the table, leave the bundle unchanged")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the full result as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum check of the bundle's files")
    return p


def run(args: argparse.Namespace) -> int:
    if args.runs < 1 or args.warmup < 0 or args.rounds < 1 or args.gap_ms < 0 or args.tolerance < 0:
        raise BundleError(f"--runs {args.runs} --warmup {args.warmup} --rounds {args.rounds} --gap-ms {args.gap_ms}: "
                          "need runs >= 1, warmup >= 0, rounds >= 1, gap >= 0 (and --tolerance >= 0)")
    cores = physical_cores()
    max_threads = cores if args.max_threads is None else args.max_threads
    if max_threads < 1 or max_threads > cores:
        raise BundleError(f"--max-threads {max_threads} is not valid on this CPU: it has {cores} physical cores "
                          "(hyperthreads excluded); pass 1.." + str(cores))
    from .datafiles import read_labelled
    from .pipeline import OnnxPipeline
    from .trust import refuse_no_verify_with_keys

    if args.no_verify:
        refuse_no_verify_with_keys(None)
    pipe = OnnxPipeline(args.bundle, verify=not args.no_verify)  # warns once if this CPU lacks the target's flags
    data = Path(args.data) if args.data else pipe.bundle_dir / "eval.jsonl"
    texts, _ = read_labelled(data)
    if not texts:
        raise BundleError(f"{data}: no texts to time; pass --data FILE")
    result = tune(pipe, texts, max_threads=max_threads, runs=args.runs, warmup=args.warmup, gap_ms=args.gap_ms,
                  rounds=args.rounds, tolerance_pct=args.tolerance, log=lambda m: print(m, file=sys.stderr))
    print(result.table())
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, result.to_dict())
    if args.dry_run:
        print("dry run: runtime.json unchanged")
        return 0
    del pipe
    new = write_winner(args.bundle, result)
    print(f"wrote {Path(args.bundle) / 'runtime.json'}: intra_op_num_threads={new['intra_op_num_threads']}, "
          f"graph_optimization_level={new['graph_optimization_level']}, session_config={new['session_config']}; "
          f"manifest.json re-hashed")
    return 0


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
        return 2
