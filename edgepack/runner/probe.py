"""Latency of student shapes before any is trained: the shape search's cost model.

A shape's latency does not depend on what its weights learned, only on its graph: depth, heads, FFN
width, vocabulary rows, the word table's bits and the quantized format. So each shape is built
untrained, the teacher's own weights cut to it (``stages.distill.untrained``), then through the
build's own prune (vocabulary, heads, FFN; no recovery), export and quantize stages (the target's
format; no variants, no accuracy gate: an untrained model's labels mean nothing), into
``BUILD/probes/<shape>/`` through a ledger, so a rerun times what is already there. The probes are
then timed end to end on this CPU, single queries, interleaved rounds: the shape search tries shapes
fastest first, and keeps the recipe's order where two are within the spread of their round medians
(so two runs of one build do not order shapes by noise).

The model's error is measured, not assumed: after the search the built candidates and their probes
are timed together in the same interleaved rounds, and ``frontier.json`` records each probe's error
against its trained bundle (``probe_error``: the probe's p50 over the bundle's, minus 1). It misses
what only training decides: the quantization variant the trained model's accuracy allows (a probe
uses the target's default format) and sparsity (not applied to a probe).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgepack import console
from edgepack.config import BuildConfig, SearchConfig
from edgepack.runner.ledger import Ledger


def probe_config(ccfg: BuildConfig) -> BuildConfig:
    """A candidate's config as its probe builds it: no recovery (nor sparsity, which needs it), the
    target's default quantization without variants, and no accuracy gate."""
    return ccfg.replace(prune=ccfg.prune.replace(recover=False, sparsity="none"),
                        quantize=ccfg.quantize.replace(variants=False, max_accuracy_drop=100.0, min_agreement=0.0))


def build_probes(configs: Mapping[str, BuildConfig], ctx, root: Path, src: Path, src_hash: str) -> dict[str, Path]:
    """Each shape's probe (name -> BUILD/probes/<name>/quantize, a pipeline directory); the probes of
    one depth share their untrained student (the ledger's ``share``)."""
    from edgepack.runner.chain import PROBE, chain, run_links

    # The probes' own stage lines go to the build log only: on the console they would read like the
    # candidates' (the ledger's one line per probe stage stays).
    quiet = dataclasses.replace(ctx, log=console.log().debug)
    dirs = [root / "probes" / name for name in configs]
    out: dict[str, Path] = {}
    for i, (name, ccfg) in enumerate(configs.items()):
        links = chain(probe_config(ccfg), ctx.profile, PROBE, untrained=True)
        ledger = Ledger(root / "probes" / name, quiet.log, total=len(links),
                        prefix=f"probe {name} {i + 1}/{len(configs)}", share=dirs)
        out[name], _ = run_links(links, ledger, quiet, src, src_hash)
    return out


def time_dirs(dirs: Mapping[str, Path], texts: Sequence[str], *, runs: int, rounds: int) -> dict[str, dict[str, float]]:
    """End-to-end single-query latency of the pipelines in ``dirs`` (bundles, or probes' quantize
    directories), interleaved in rounds: name -> {p50_ms, p95_ms, noise_ms} (``variants.round_summary``)."""
    from edgepack.stages.quantize.variants import round_summary, time_interleaved
    from runtime_shim import OnnxPipeline
    from runtime_shim.bench import spread_order

    if not dirs:
        return {}
    pipes = {name: OnnxPipeline(d, verify=(Path(d) / "manifest.json").is_file()) for name, d in dirs.items()}
    runners = {name: (lambda text, p=p: p(text)) for name, p in pipes.items()}
    feeds = [texts[i] for i in spread_order(len(texts), 50 + runs * rounds)]  # the whole split, not its first rows
    times = time_interleaved(runners, feeds, warmup=50, runs=runs * rounds, rounds=rounds)
    return {name: round_summary(times[name]) for name in dirs}


def order(names: Sequence[str], timing: Mapping[str, Mapping[str, float]]) -> list[str]:
    """``names`` fastest first by their probes' p50, where "faster" means by more than the larger of
    the two spreads: among the shapes no remaining one is faster than, the recipe's first goes next.
    So near-ties keep the recipe's order and noise does not reorder them, while a shape clearly faster
    than another always comes first (a topological order of "clearly faster", ties by the recipe).

    >>> t = {"a": {"p50_ms": 1.0, "noise_ms": 0.1}, "b": {"p50_ms": 0.5, "noise_ms": 0.1},
    ...      "c": {"p50_ms": 0.95, "noise_ms": 0.1}}
    >>> order(["a", "b", "c"], t)
    ['b', 'a', 'c']
    """
    def faster(x: str, y: str) -> bool:
        tx, ty = timing[x], timing[y]
        return ty["p50_ms"] - tx["p50_ms"] > max(tx["noise_ms"], ty["noise_ms"])

    left, out = list(names), []
    while left:
        nxt = next(n for n in left if not any(faster(m, n) for m in left if m != n))
        out.append(nxt)
        left.remove(nxt)
    return out


def error_summary(errors: Sequence[float]) -> dict[str, Any] | None:
    """The cost model's error over the built shapes: median and largest absolute relative error.

    >>> error_summary([0.1, -0.3, 0.05])
    {'shapes': 3, 'median_abs': 0.1, 'max_abs': 0.3}
    """
    if not errors:
        return None
    a = [abs(e) for e in errors]
    return {"shapes": len(a), "median_abs": round(statistics.median(a), 4), "max_abs": round(max(a), 4)}


def wanted(search: SearchConfig, shapes: int) -> bool:
    """Whether the search orders its ``shapes`` by probes (``order = "latency"``, more than one shape)."""
    return search.order == "latency" and shapes > 1

