"""The build report: ``report.html`` (one self-contained file) and ``report.md`` from benchmark rows.

A row is one candidate or stage (teacher, student, pruned, ONNX fp32, each quantized variant, the final
bundle) as the benchmark harness writes it: ``name``, ``accuracy`` (with the calibrated out-of-scope
threshold), ``accuracy_raw``, ``in_scope_accuracy``, ``oos_recall``, ``agreement``, ``model_bytes``,
``bundle_bytes``, ``latency_ms`` {p50, p95, p99, n}, ``tokenize_ms`` {p50}, ``model_ms`` {p50},
``throughput_qps`` {"1", "32"}, ``peak_rss_mb``, ``threads`` and optionally ``predictions``, ``gold`` and
``texts`` (lists, one item per test query). Any key may be missing; the report shows "—". Two optional
flags steer the comparison: ``"baseline": True`` marks the row the others are compared with (ratios in
the table, the "changed" list) and ``"final": True`` the row the summary is about (default: the last).

Accuracies are fractions in [0, 1] as the harness writes them (a value above 1 is taken as a percent
already). Sizes are in MB of 10**6 bytes, as ``edgepack bench`` and the profiles' budgets count them
(the reference recipe's published sizes are MiB: its 418.16 MB teacher is 438.5 MB here).

    write_report(Path("build"), rows, title="clinc150 build", budgets=[...], domains=json.load(...))

writes ``build/report.html``, ``build/report.md`` and the PNG plots the markdown links to.
Command line: ``edgepack report OUT_DIR RESULT.json... [--domains domains.json] [--title T]``
(``edgepack/commands/report.py``; ``python -m edgepack.report`` runs the same command).

The modules, each importing only those listed after it: ``writer`` (``write_report``), ``html`` and
``markdown`` (the renderers), ``plots``, ``analysis`` (per-domain accuracy, changed queries, the parts
both renderers show) and ``load`` (input files), ``tables`` (values, formats, the table's columns).
"""

from __future__ import annotations

from .analysis import MAX_CHANGED, OOS_LABELS, changed_queries, domain_accuracy
from .html import CSS
from .load import attach_eval_data, host_notes, load_rows
from .plots import PLOTS, plot_accuracy_latency, plot_domains, plot_latency
from .tables import DASH, MB, Column
from .writer import write_report

__all__ = [
    "CSS", "DASH", "MAX_CHANGED", "MB", "OOS_LABELS", "PLOTS", "Column", "attach_eval_data",
    "changed_queries", "domain_accuracy", "host_notes", "load_rows", "plot_accuracy_latency", "plot_domains",
    "plot_latency", "write_report",
]
