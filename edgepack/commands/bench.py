"""edgepack bench PATH [PATH...] [--data DATA --split test] [--json OUT] [--profile NAME]

Measures bundles and Hugging Face model directories side by side with one harness
(``runtime_shim.bench``): the same queries, the same threads, the same run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgepack.commands._common import add_data_args


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="benchmark bundles and Hugging Face models side by side",
                       description="Accuracy, latency percentiles, throughput, peak memory and size of each PATH "
                       "(a bundle or a Hugging Face classifier directory), measured in the same run.")
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="bundle directories and/or model directories")
    add_data_args(p, required=False)
    p.add_argument("--split", default="test", help="split to measure on (default: test)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many rows of the split (stratified)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads for every model (default: each bundle's runtime.json; 1 for PyTorch)")
    p.add_argument("--runs", type=int, default=200, help="timed single queries (default: 200)")
    p.add_argument("--warmup", type=int, default=50, help="warm-up queries before timing (default: 50)")
    p.add_argument("--gap-ms", type=float, default=0.0, help="pause between timed queries, as a chat user leaves")
    p.add_argument("--reference", type=Path, default=None,
                   help="model whose predictions the others are compared with (default: the first model directory)")
    p.add_argument("--profile", default=None, help="check each bundle against this profile's budgets")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the results as JSON")
    return p


def is_bundle(path: Path) -> bool:
    return (path / "manifest.json").is_file() and (path / "runtime.json").is_file()


def run(args: argparse.Namespace) -> int:
    from edgepack.errors import EdgepackError
    from runtime_shim import BundleError
    from runtime_shim.datafiles import DataError

    try:
        return _run(args)
    except (BundleError, DataError) as e:
        raise EdgepackError(str(e)) from None


def _run(args: argparse.Namespace) -> int:
    from edgepack.config import DataConfig
    from edgepack.data import load_dataset, stratified_slice
    from edgepack.errors import BudgetError, EdgepackError
    from edgepack.records import write_json_atomic
    from edgepack.torch_backend import TorchBackend
    from runtime_shim import OnnxPipeline
    from runtime_shim.bench import format_table, run_benchmark
    from runtime_shim.datafiles import read_labelled

    for path in args.paths:
        if not path.is_dir():
            raise EdgepackError(f"{path}: no such directory; pass a bundle or a Hugging Face model directory")
    backends = []
    for path in args.paths:
        if is_bundle(path):
            overrides = {"intra_op_num_threads": args.threads} if args.threads else None
            backends.append(OnnxPipeline(path, overrides=overrides))
        else:
            backends.append(None)  # loaded below, once the data (and its out-of-scope label) is known
    first = next((b for b in backends if b is not None), None)
    if args.data is None:
        if len(args.paths) != 1 or first is None:
            raise EdgepackError("pass --data DATA to measure model directories or several paths on the same rows")
        texts, gold = read_labelled(args.paths[0] / "eval.jsonl")
        val = None
    else:
        model_labels = first.label_names if first is not None else None
        if model_labels is None:
            from edgepack.modeling import read_model_info

            model_labels = list(read_model_info(args.paths[0]).label_names)
        dcfg = DataConfig(source=str(args.data), text_column=args.text_column, label_column=args.label_column,
                          oos_label=args.oos_label, seed=args.seed)
        data = load_dataset(dcfg, dict(enumerate(model_labels)))
        if args.split not in data.splits:
            raise EdgepackError(f"{args.data}: no split '{args.split}'; choose one of {', '.join(data.splits)}")
        split = data[args.split]
        if args.limit:
            split = stratified_slice(split, args.limit, seed=args.seed)
        texts, gold = split.texts, [data.label_names[i] for i in split.labels]
        val = data["validation"]
    for i, path in enumerate(args.paths):
        if backends[i] is None:
            tb = TorchBackend(path, threads=args.threads or 1, oos_label=data.oos_label if val else None)
            if val is not None:
                tb.calibrate(val.texts, val.labels)
            backends[i] = tb

    ref_index = 0
    if args.reference is not None:
        matches = [i for i, p in enumerate(args.paths) if p.resolve() == args.reference.resolve()]
        if not matches:
            raise EdgepackError(f"--reference {args.reference}: not among the measured paths; list it as a PATH too")
        ref_index = matches[0]
    else:
        ref_index = next((i for i, b in enumerate(backends) if isinstance(b, TorchBackend)), None)
    results: list[dict] = [{} for _ in backends]
    order = ([ref_index] if ref_index is not None else []) + [i for i in range(len(backends)) if i != ref_index]
    reference = None
    for i in order:
        b = backends[i]
        print(f"[bench] {b.name}: {len(texts)} rows, {args.warmup} warm-up + {args.runs} timed queries", flush=True)
        res = run_benchmark(b, texts, gold, reference=reference if i != ref_index else None,
                            warmup=args.warmup, runs=args.runs, gap_ms=args.gap_ms,
                            rss_argv=getattr(b, "rss_argv", None))
        res["path"] = str(args.paths[i])
        if i == ref_index:
            reference = res.get("predictions")
        results[i] = res
    print()
    print(format_table(results))
    failures: list[str] = []
    if args.profile:
        from edgepack.profiles import check_budgets
        from edgepack.profiles import load as load_profile

        profile = load_profile(args.profile)
        for res, path in zip(results, args.paths, strict=True):
            if is_bundle(path):
                for msg in check_budgets(profile, res):
                    failures.append(f"{path}: {msg}")
                    res.setdefault("budget_failures", []).append(msg)
        print(f"\nprofile {args.profile}: " + ("all budgets met" if not failures else f"{len(failures)} budget(s) missed"))
    if args.json:
        payload = results[0] if len(results) == 1 else results
        write_json_atomic(args.json, _jsonable(payload))
        print(f"results written: {args.json}")
    if failures:
        raise BudgetError("; ".join(failures))
    return 0


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
