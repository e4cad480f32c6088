"""``python -m runtime_shim COMMAND BUNDLE ...``: the bundle's command line on a device.

    python -m runtime_shim predict BUNDLE "what is my balance" [--top-k 3] [--json]
    python -m runtime_shim bench BUNDLE [--data FILE] [--split test] [--json OUT] [--threads N]
    python -m runtime_shim verify BUNDLE [--update] [--keys DIR] [--allow-downgrade]
    python -m runtime_shim unpack BUNDLE.tar.gz DEST [--keys DIR]   (extract safely, verify, move into place)
    python -m runtime_shim rss BUNDLE          (peak memory of a fresh process, one JSON line)

Each command is a ``register(subparsers) -> parser`` and a ``run(args) -> int`` in ``COMMANDS``. Optional
commands living in their own module (``runtime_shim/tune.py`` with the same two functions) are
picked up when present; see ``OPTIONAL_COMMANDS``.

numpy (and so the pipeline) is imported inside the commands. With trusted keys (``--keys DIR`` or
``EDGEPACK_TRUSTED_KEYS``) the bundle is verified before any of its files is read for use
(``runtime_shim/trust.py``), and ``--no-verify`` is refused.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .exitcodes import COMMON, ExitCode, KeepTable, epilog, os_error_line
from .manifest import MANIFEST, SIGNATURE, BundleError, update_manifest, write_json_atomic

PROG = "python -m runtime_shim"


def _bundle_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE", help="the bundle directory (holding manifest.json)")


def _threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="intra-op threads for this run, instead of runtime.json's (0: one per physical core)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the checksum check of the bundle's files (refused where trusted keys are configured)")
    _trust_args(p)


def _trust_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys", default=None, metavar="DIR",
                   help="require a signature by a public key in DIR (default: $EDGEPACK_TRUSTED_KEYS; unset: checksums only)")
    p.add_argument("--allow-downgrade", action="store_true",
                   help="accept a signed version older than the last one accepted for this bundle name")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "overrides", None):
        try:
            out.update(json.loads(args.overrides))
        except json.JSONDecodeError as e:
            raise BundleError(f"--overrides: not a JSON object ({e.msg}); pass e.g. '{{\"intra_op_num_threads\": 2}}'") from None
    if getattr(args, "threads", None) is not None:
        if args.threads < 0:
            raise BundleError(f"--threads {args.threads}: use 0 (one per physical core) or a positive count")
        out["intra_op_num_threads"] = args.threads
    return out


def _load(args: argparse.Namespace):
    from .trust import refuse_no_verify_with_keys, trusted_keys_dir, verify_bundle

    checked = None
    if getattr(args, "no_verify", False):
        refuse_no_verify_with_keys(getattr(args, "keys", None))
    keys = trusted_keys_dir(getattr(args, "keys", None))
    if keys is not None:
        checked = verify_bundle(args.bundle, keys=keys, allow_downgrade=getattr(args, "allow_downgrade", False))
    from .pipeline import OnnxPipeline

    if checked is None:
        return OnnxPipeline(args.bundle, verify=not getattr(args, "no_verify", False), overrides=_overrides(args))
    pipe = OnnxPipeline(args.bundle, verify=False, overrides=_overrides(args))  # checked above, not hashed twice
    pipe.trust, pipe.manifest = checked, checked.manifest
    return pipe


# ---------------------------------------------------------------------------------------- predict


def _register_predict(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("predict", help="classify texts", description="Classify each TEXT with the bundle.")
    _bundle_arg(p)
    p.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="show the K most probable labels")
    p.add_argument("--no-threshold", action="store_true", help="plain argmax: ignore the out-of-scope threshold")
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    _threads_arg(p)
    return p


def _run_predict(args: argparse.Namespace) -> int:
    if args.top_k is not None and args.top_k < 1:
        raise BundleError(f"--top-k {args.top_k}: use a positive count")
    pipe = _load(args)
    top_k = "best" if args.top_k is None else args.top_k  # the pipeline's default: one label per text
    if args.json:
        # What the pipeline returns for the same call: pipe("text") for one TEXT, pipe([...]) for several.
        inputs = args.texts[0] if len(args.texts) == 1 else args.texts
        print(json.dumps(pipe(inputs, top_k=top_k, apply_threshold=not args.no_threshold)))
        return ExitCode.OK
    out = pipe(args.texts, top_k=top_k, apply_threshold=not args.no_threshold)
    for text, answer in zip(args.texts, out, strict=True):
        if args.top_k is None:
            print(f"{answer['label']}\t{answer['score']:.4f}\t{text}")
        else:
            print(text)
            for a in answer:
                print(f"  {a['label']}\t{a['score']:.4f}")
    return ExitCode.OK


# ------------------------------------------------------------------------------------------ bench


def _register_bench(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench", help="accuracy, latency, throughput and memory of the bundle",
        description="Benchmark the bundle on labelled data (default: its eval.jsonl) and print a table.")
    _bundle_arg(p)
    p.add_argument("--data", default=None, metavar="FILE",
                   help="labelled .jsonl/.csv or CLINC150 .json (default: BUNDLE/eval.jsonl)")
    p.add_argument("--split", default="test", help="split of a CLINC150 .json file (default: test)")
    p.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    p.add_argument("--label-column", default="label", help="column holding the label (default: label)")
    p.add_argument("--reference", default=None, metavar="FILE",
                   help="reference predictions for --data (e.g. the teacher's `bench --json` output): adds agreement")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the full result (with predictions) here")
    p.add_argument("--runs", type=int, default=200, help="timed single queries (default: 200)")
    p.add_argument("--warmup", type=int, default=50, help="untimed queries first (default: 50)")
    p.add_argument("--gap-ms", type=float, default=0.0, metavar="MS",
                   help="pause between timed queries, as requests arriving apart (default: 0)")
    p.add_argument("--batch-sizes", default="1,32", metavar="B,B", help="throughput batch sizes (default: 1,32)")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-memory probe in a fresh process")
    p.add_argument("--service", default=None, metavar="ADDRESS",
                   help="time BUNDLE through its running service (`serve`): http://HOST:PORT, a Unix socket or "
                        "the service's --status-file; peak memory is the service's")
    p.add_argument("--progress", action="store_true",
                   help="print what is being measured to stderr as it goes (\"progress: queries 50/250\")")
    _threads_arg(p)
    return p


def _batch_sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise BundleError(f"--batch-sizes {value!r}: pass positive integers separated by commas, e.g. 1,32")
    return sizes


def _run_bench(args: argparse.Namespace) -> int:
    if args.runs < 1 or args.warmup < 0:
        raise BundleError(f"--runs {args.runs} --warmup {args.warmup}: need at least 1 run and 0 warm-ups")
    batch_sizes = _batch_sizes(args.batch_sizes)
    if args.service:  # what an application sees: the service's answers, its queue and its memory
        from .serve_client import ServiceBackend

        pipe, args.no_rss = ServiceBackend(args.service, args.bundle), True
    else:
        pipe = _load(args)
    from .bench import format_table, run_benchmark
    from .datafiles import read_labelled, read_reference

    data = Path(args.data) if args.data else pipe.bundle_dir / "eval.jsonl"
    texts, gold = read_labelled(data, split=args.split, text_column=args.text_column,
                                label_column=args.label_column)
    reference = read_reference(args.reference, n=len(texts)) if args.reference else None
    result = run_benchmark(pipe, texts, gold, reference=reference, warmup=args.warmup, runs=args.runs,
                           batch_sizes=batch_sizes, gap_ms=args.gap_ms, rss_argv=[] if args.no_rss else None,
                           progress=_progress_line if args.progress else None)
    result["data"] = str(data)
    if args.service:
        result["service"], result["peak_rss_mb"] = pipe.address, pipe.peak_rss_mb()
    result["build_metrics"] = pipe.manifest.get("metrics")
    print(format_table([result]))
    build = _build_accuracy(pipe.manifest)
    if build:
        print(build)
    if result.get("peak_rss_error"):
        print(f"peak memory not measured: {result['peak_rss_error']}", file=sys.stderr)
    if args.json:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    return ExitCode.OK


def _progress_line(text: str) -> None:
    print(f"progress: {text}", file=sys.stderr, flush=True)


def _build_accuracy(manifest: dict[str, Any]) -> str | None:
    """The build machine's test accuracy from manifest.json, to read beside the device's figures."""
    metrics = manifest.get("metrics") if isinstance(manifest, dict) else None
    test = metrics.get("test") if isinstance(metrics, dict) else None
    if not isinstance(test, dict) or not isinstance(test.get("accuracy"), (int, float)):
        return None
    parts = [f"{key.replace('_', ' ')} {100 * test[key]:.2f}%" for key in
             ("accuracy", "accuracy_raw", "in_scope_accuracy", "oos_recall") if isinstance(test.get(key), (int, float))]
    rows = metrics.get("test_rows")
    return f"at build time (manifest.json, test split{f' of {rows} rows' if rows else ''}): {', '.join(parts)}"


# ----------------------------------------------------------------------------------------- verify


def _register_verify(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("verify", help="check every file against manifest.json (and its signature, given keys)",
                       description="Check the sha256 and size of every file the manifest lists. With trusted keys "
                       "(--keys DIR or EDGEPACK_TRUSTED_KEYS) also check manifest.sig, that no file is unlisted, "
                       "and that the version is not older than the last one accepted here.")
    _bundle_arg(p)
    p.add_argument("--update", action="store_true",
                   help="after changing a file on purpose (e.g. runtime.json): re-hash and rewrite manifest.json")
    _trust_args(p)
    return p


def _run_verify(args: argparse.Namespace) -> int:
    from .trust import trusted_keys_dir, verify_bundle

    root = Path(args.bundle)
    if args.update:
        manifest = update_manifest(root)
        print(f"updated {root / MANIFEST}: {len(manifest['files'])} files")
        if (root / SIGNATURE).exists():
            print(f"note: {root / SIGNATURE} no longer matches the manifest; devices with trusted keys will refuse the "
                  "bundle until it is re-signed with `edgepack sign`")
        return ExitCode.OK
    keys = trusted_keys_dir(args.keys)
    result = verify_bundle(root, keys=keys, allow_downgrade=args.allow_downgrade)
    count = f"ok: {len(result.manifest['files'])} files match {root / MANIFEST}"
    if not result.signed:
        print(f"{count}; signature not checked (no trusted keys: pass --keys DIR or set EDGEPACK_TRUSTED_KEYS)")
        return ExitCode.OK
    print(f"{count}, signed by key {result.key_id} ({result.key_file}); {result.name} version {result.version}; "
          "no unlisted files")
    return ExitCode.OK


# -------------------------------------------------------------------------------------------- rss


def _register_rss(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "rss", help="peak memory of a fresh process serving the bundle (one JSON line)",
        description="Load the bundle, run warm-up, single and batch-32 queries, print peak RSS as JSON. "
                    "Run it as its own process: peak memory only ever grows.")
    _bundle_arg(p)
    p.add_argument("--overrides", default=None, metavar="JSON", help="runtime.json settings to replace, as JSON")
    _threads_arg(p)
    return p


def _run_rss(args: argparse.Namespace) -> int:
    pipe = _load(args)
    from .datafiles import DataError, read_labelled
    from .memory import rss_report

    try:
        texts, _ = read_labelled(pipe.bundle_dir / "eval.jsonl")
    except DataError:
        texts = ["what is the balance of my checking account", "set an alarm for seven in the morning"]
    print(json.dumps(rss_report(pipe, texts)))
    return ExitCode.OK


# ------------------------------------------------------------------------------------------- main

Command = tuple[Callable[[Any], argparse.ArgumentParser], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "predict": (_register_predict, _run_predict),
    "bench": (_register_bench, _run_bench),
    "verify": (_register_verify, _run_verify),
    "rss": (_register_rss, _run_rss),
}
# Commands in modules of their own, added when the module exists (``runtime_shim/tune.py`` with
# ``register(subparsers) -> parser`` and ``run(args) -> int``); imported only when the CLI runs that
# command or lists them all (tune's dataclasses and unpack's tempfile are 2.7 MB of a serving process).
OPTIONAL_COMMANDS = ("tune", "unpack", "serve")


def _optional(name: str):
    try:
        return importlib.import_module(f"{__package__ or 'runtime_shim'}.{name}")
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith(f"runtime_shim.{name}"):
            return None
        raise


class _Formatter(KeepTable, argparse.HelpFormatter):
    """argparse's formatter (the exit-status epilog kept as a table) with the terminal width read as ``shutil.get_terminal_size`` reads it, without
    importing ``shutil`` (with bz2, lzma and fnmatch: 1.2 MB of a serving process; argparse imports it in
    every formatter it makes, and it makes one per argument added)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None):
        if width is None:
            try:
                width = int(os.environ["COLUMNS"])
            except (KeyError, ValueError):
                try:
                    width = os.get_terminal_size(sys.__stdout__.fileno()).columns
                except (AttributeError, ValueError, OSError):
                    width = 80
            width -= 2
        super().__init__(prog, indent_increment, max_help_position, width)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` using ``_Formatter``; its subparsers are made of this class too."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def make_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with every command, optional ones included when their module exists; with
    ``command`` given, of the optional ones only that one (the others' modules stay unimported).

    Example:
        >>> make_parser().parse_args(["predict", "bundle", "hi"]).texts
        ['hi']
    """
    parser = _Parser(prog=PROG, description="Run and check an edgepack bundle on this device.", epilog=epilog())
    parser.add_argument("--version", action="version", version=f"runtime_shim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register, run in COMMANDS.values():
        register(sub).set_defaults(_run=run)
    for name in OPTIONAL_COMMANDS:
        if command is not None and command != name and command in (*COMMANDS, *OPTIONAL_COMMANDS):
            continue
        module = _optional(name)
        if module is not None:
            module.register(sub).set_defaults(_run=module.run)
    for p in sub.choices.values():  # every command: the same exit codes (exitcodes.COMMON)
        p.epilog = epilog(COMMON)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code (``ExitCode``).

    Example:
        >>> main(["predict", "bundle", "what is my balance"])  # doctest: +SKIP
        balance	0.9731	what is my balance
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return ExitCode.USAGE
    from .cpu import one_line_warnings
    from .datafiles import DataError

    one_line_warnings()  # the bundle-built-for-another-CPU warning as one console line

    try:
        return int(args._run(args) or ExitCode.OK)
    except (BundleError, DataError) as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:  # output piped into `head`: stop quietly, as other command-line tools do
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the interpreter flushes it at exit)
        return ExitCode.OK
    except OSError as e:
        if e.filename is None:
            raise
        print(f"{PROG} {args.command}: error: {os_error_line(e)}", file=sys.stderr)
        return ExitCode.USAGE


def console() -> None:
    """The ``edgepack-runtime`` script of the installed runtime (``python -m runtime_shim`` without the cwd)."""
    sys.exit(main())


if __name__ == "__main__":
    console()
