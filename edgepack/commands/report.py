"""edgepack report OUT_DIR RESULT.json... [--data FILE] [--domains FILE] [--budgets FILE] [--baseline NAME]

Writes ``report.html`` and ``report.md`` (``edgepack.report``) from the JSON results ``edgepack bench
--json`` writes, or from stage records.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="write report.html and report.md from benchmark JSON results",
                       description="Write report.html and report.md from benchmark JSON results.")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="directory to write the report into")
    p.add_argument("results", metavar="RESULT.json", nargs="+", help="benchmark results, one row per candidate")
    p.add_argument("--domains", metavar="FILE", help="domain -> intents JSON (CLINC150's domains.json)")
    p.add_argument("--data", metavar="FILE",
                   help="the labelled file the results were measured on, for accuracy per domain and the "
                        "changed queries (JSON lines, CSV or CLINC150 JSON)")
    p.add_argument("--split", default="test", help="split of a CLINC150 JSON --data (default: test)")
    p.add_argument("--budgets", metavar="FILE", help='JSON list of {"name","limit","measured","unit","passed"}')
    p.add_argument("--baseline", metavar="NAME", help="the row the others are compared with")
    p.add_argument("--title", default="edgepack report", help="report title (default: edgepack report)")
    p.add_argument("--note", action="append", default=[], metavar="TEXT", help="a line for the notes (repeatable)")
    return p


def _load_json(path: str, what: str) -> Any:
    from ..errors import EdgepackError

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EdgepackError(f"--{what} {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise EdgepackError(f"--{what} {path}: not valid JSON ({e})") from None


def run(args: argparse.Namespace) -> int:
    from ..errors import EdgepackError, ExitCode
    from ..report import attach_eval_data, host_notes, load_rows, write_report

    rows = load_rows(args.results)
    if args.baseline:
        names = [str(r.get("name")) for r in rows]
        if args.baseline not in names:
            raise EdgepackError(f"--baseline {args.baseline}: no such row; rows are {', '.join(names)}")
        for r in rows:
            r["baseline"] = str(r.get("name")) == args.baseline
    if args.data:
        from runtime_shim.datafiles import DataError, read_labelled

        try:
            texts, gold = read_labelled(args.data, split=args.split)
        except DataError as e:
            raise EdgepackError(str(e)) from None
        if not attach_eval_data(rows, texts, gold):
            raise EdgepackError(f"--data {args.data}: {len(gold)} rows, but no result holds that many "
                                "predictions; pass the file and split the results were measured on")
    domains = _load_json(args.domains, "domains") if args.domains else None
    if domains is not None and not (isinstance(domains, Mapping)
                                    and all(isinstance(v, list) for v in domains.values())):
        raise EdgepackError(f"--domains {args.domains}: expected an object mapping each domain to a list "
                            "of labels")
    budgets = _load_json(args.budgets, "budgets") if args.budgets else None
    if budgets is not None and not isinstance(budgets, list):
        raise EdgepackError(f"--budgets {args.budgets}: expected a list of budget objects")
    html_path, md_path = write_report(args.out_dir, rows, title=args.title, budgets=budgets, domains=domains,
                                      notes=args.note or host_notes(rows))
    print(html_path)
    print(md_path)
    return ExitCode.OK
