"""The report: files, structure of the HTML and markdown, and a render in a real headless browser."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.cli import main
from edgepack.errors import EdgepackError, ExitCode
from edgepack.report import (
    DASH,
    MAX_CHANGED,
    PLOTS,
    attach_eval_data,
    domain_accuracy,
    host_notes,
    load_rows,
    write_report,
)

CHROMIUM = Path("/usr/bin/chromium")
DOMAINS = {"banking": ["balance", "transfer"], "home": ["alarm", "weather"]}
GOLD = ["balance", "transfer", "alarm", "weather", "oos"] * 8  # 40 queries
TEXTS = [f"query {i} for {g}" for i, g in enumerate(GOLD)]
MD_COLUMNS = ["Model", "Accuracy %", "Raw acc. %", "In-scope %", "OOS recall %", "Agree %", "Model MB",
              "Bundle MB", "p50 ms", "mean ms", "p95 ms", "p99 ms", "qps b1", "qps b32", "Peak RSS MB", "Threads"]


def _row(name: str, acc: float, mb: float, p50: float, wrong: tuple[int, ...] = (), **extra) -> dict:
    preds = [("oos" if g != "oos" else "balance") if i in wrong else g for i, g in enumerate(GOLD)]
    row = {
        "name": name, "accuracy": acc, "accuracy_raw": acc - 0.028, "in_scope_accuracy": acc + 0.05,
        "oos_recall": acc - 0.23, "agreement": 0.97, "model_bytes": int(mb * 1e6),
        "bundle_bytes": int(mb * 1e6) + 700_000,
        "latency_ms": {"p50": p50, "p95": p50 * 1.3, "p99": p50 * 1.8, "n": 300},
        "tokenize_ms": {"p50": 0.07}, "model_ms": {"p50": p50 - 0.1},
        "throughput_qps": {"1": 1000 / p50, "32": 3500 / p50}, "peak_rss_mb": 90 + 2 * mb, "threads": 1,
        "predictions": preds, "gold": GOLD,
    }
    row.update(extra)
    return row


@pytest.fixture
def rows() -> list[dict]:
    return [
        _row("teacher", 0.9038, 86.7, 9.8, baseline=True, texts=TEXTS),
        _row("student-l3", 0.8970, 44.1, 5.2, wrong=(0, 7)),
        _row("onnx-fp32", 0.8955, 22.2, 2.4, wrong=(0, 7), agreement=None),
        _row("int8-u8s8", 0.8941, 8.67, 0.92, wrong=(0, 7, 9)),
        {"name": "bundle-bare"},  # a stage the harness did not measure: every cell is "—"
    ]


@pytest.fixture
def budgets() -> list[dict]:
    return [
        {"name": "model_size", "limit": 4, "measured": 3.7, "unit": "MB", "passed": True},
        {"name": "latency_p50", "limit": 0.8, "measured": 0.92, "unit": "ms", "passed": False},
    ]


def _md_table(md: str, first_header: str) -> list[list[str]]:
    """The markdown table whose header starts with ``first_header``, as rows of stripped cells."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return table


# A shape search's frontier.json, two shapes built, one skipped.
FRONTIER = {"teacher_validation_accuracy": 95.1, "max_drop": 1.0, "chosen": "L1-h0.33", "why": "the fastest inside",
            "cpu": "test CPU", "order": "latency", "latency_model": {"shapes": 2, "median_abs": 0.15, "max_abs": 0.25},
            "candidates": [
                {"name": "L0", "shape": "layers=0", "status": "built", "validation_accuracy": 91.3,
                 "teacher_drop": 3.8, "p50_ms": 0.08, "noise_ms": 0.002, "bundle_bytes": 3_000_000, "inside": False,
                 "predicted_p50_ms": 0.07, "probe_p50_ms": 0.06, "probe_error": -0.25},
                {"name": "L1-h0.33", "shape": "layers=1 heads=1/3", "status": "built", "validation_accuracy": 94.4,
                 "teacher_drop": 0.7, "p50_ms": 0.2, "noise_ms": 0.004, "bundle_bytes": 4_000_000, "inside": True,
                 "predicted_p50_ms": 0.21, "probe_p50_ms": 0.23, "probe_error": 0.15},
                {"name": "L2", "shape": "layers=2", "status": "skipped (a cheaper shape is inside the budget)",
                 "predicted_p50_ms": 0.5}]}


def test_writes_self_contained_html_markdown_and_plots(tmp_path, rows, budgets):
    html_path, md_path = write_report(tmp_path / "r", rows, title="tiny build", budgets=budgets, domains=DOMAINS,
                                      notes=["cpu: test machine", "onnxruntime 0.0"], frontier=FRONTIER)
    assert (html_path.name, md_path.name) == ("report.html", "report.md")
    for name in PLOTS.values():
        assert (tmp_path / "r" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = html_path.read_text()
    # Every plot is embedded, and decodes to a PNG: the file stands alone.
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == len(PLOTS)
    assert all(base64.b64decode(u)[:4] == b"\x89PNG" for u in uris)
    assert not re.search(r'(src|href)="(https?:|//)', html) and "<script" not in html
    for r in rows:
        assert f'<td class="name">{r["name"]}' in html
    assert "tiny build" in html and "cpu: test machine" in html
    assert "Accuracy per domain" in html and "banking" in html
    md = md_path.read_text()
    shapes = _md_table(md, "Shape")
    assert [r[0] for r in shapes[2:]] == ["L0", "L1-h0.33", "L2"] and shapes[3][-1] == "chosen"
    assert shapes[2][3] == "91.30%" and shapes[4][2].startswith("skipped") and "accuracy-latency frontier" in html
    # the cost model: the untrained graph's p50 and its error beside a built shape, the ordering p50 for a skipped one
    col = shapes[0].index("Untrained p50 ms (error)")
    assert [r[col] for r in shapes[2:]] == ["0.060 (-25%)", "0.230 (+15%)", "0.500"]
    assert "15% median, 25% at most (2 shapes)" in md
    # No temporary files left beside the report.
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted(["report.html", "report.md", *PLOTS.values()])


def test_markdown_table_columns_and_missing_values(tmp_path, rows):
    _, md_path = write_report(tmp_path, rows, title="t")
    md = md_path.read_text()
    table = _md_table(md, "Model")
    assert table[0] == MD_COLUMNS
    assert table[1][0] == ":---" and all(c == "---:" for c in table[1][1:])
    body = table[2:]
    assert [r[0] for r in body] == ["teacher (baseline)", "student-l3", "onnx-fp32", "int8-u8s8", "**bundle-bare**"]
    assert all(len(r) == len(MD_COLUMNS) for r in body)
    bare = body[-1]
    assert bare[1:] == [DASH] * (len(MD_COLUMNS) - 1)
    assert body[2][MD_COLUMNS.index("Agree %")] == DASH  # agreement None
    assert body[0][MD_COLUMNS.index("Accuracy %")] == "90.38"
    assert body[0][MD_COLUMNS.index("Model MB")] == "86.70"
    # Ratios against the baseline row: a tenth of the teacher's size, a point and a bit less accurate.
    assert body[3][MD_COLUMNS.index("Model MB")] == "8.67 (×0.10)"
    assert body[3][MD_COLUMNS.index("Accuracy %")] == "89.41 (−0.97 pt)"
    # The markdown links the PNG files written beside it.
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (tmp_path / link).is_file()
    html = (tmp_path / "report.html").read_text()
    bare_rows = re.findall(r'<tr class=final><td class="name">bundle-bare.*?</tr>', html)  # accuracy; size and speed
    assert len(bare_rows) == 2 and sum(r.count(DASH) for r in bare_rows) == len(MD_COLUMNS) - 1


def test_budgets_show_pass_and_fail(tmp_path, rows, budgets):
    html_path, md_path = write_report(tmp_path, rows, title="t", budgets=budgets)
    html, md = html_path.read_text(), md_path.read_text()
    assert re.search(r"model_size</td>.*?badge pass\">PASS<", html)
    assert re.search(r"latency_p50</td>.*?badge fail\">FAIL<", html)
    assert "1 failed" in html
    table = _md_table(md, "Budget")
    assert table[2] == ["model_size", "4", "3.7", "MB", "✅ PASS"]
    assert table[3] == ["latency_p50", "0.8", "0.92", "ms", "❌ FAIL"]


def test_budget_checks_from_profiles_are_accepted(tmp_path, rows):
    from edgepack.profiles import BudgetCheck

    checks = [BudgetCheck("p95_latency_ms", 5.0, 1.2, True), BudgetCheck("bundle_size_mb", 4.0, None, False)]
    _, md_path = write_report(tmp_path, rows, title="t", budgets=checks)
    table = _md_table(md_path.read_text(), "Budget")
    assert table[2] == ["p95_latency_ms", "5", "1.2", "ms", "✅ PASS"]
    assert table[3] == ["bundle_size_mb", "4", DASH, "MB", "❌ FAIL"]


def test_eval_data_is_attached_only_when_it_lines_up(rows):
    bare = [{k: v for k, v in r.items() if k not in ("gold", "texts", "accuracy")} for r in rows]
    bare[0]["accuracy"] = 1.0  # the teacher's predictions are the gold labels: checked against them
    assert attach_eval_data(bare, TEXTS, GOLD) == 4
    assert bare[1]["gold"] == GOLD and bare[1]["texts"] == TEXTS and "gold" not in bare[-1]
    shuffled = [{"name": "teacher", "accuracy": 1.0, "predictions": GOLD}]
    with pytest.raises(EdgepackError, match="pass the file and split it was measured on"):
        attach_eval_data(shuffled, TEXTS, GOLD[1:] + GOLD[:1])


def test_host_notes_from_the_harness():
    host = {"machine": "x86_64", "system": "Linux", "cpus": 2, "versions": {"python": "3.11.7", "onnxruntime": "1.20"}}
    assert host_notes([{"name": "a", "host": host}, {"name": "b", "host": host}, {"name": "c"}]) == [
        "machine: Linux x86_64, 2 CPUs · python 3.11.7, onnxruntime 1.20"]


def test_domain_accuracy_counts_oos_apart():
    teacher = {"name": "t", "predictions": GOLD, "gold": GOLD}
    wrong = {"name": "w", "predictions": ["oos"] * 8 + GOLD[8:]}  # gold borrowed from the other row
    names, acc = domain_accuracy([teacher, wrong], DOMAINS)
    assert names == ["banking", "home", "oos"]
    assert acc["t"] == {"banking": (100.0, 16), "home": (100.0, 16), "oos": (100.0, 8)}
    # The first 8 queries hold 4 banking, 3 home and 1 "oos" query: all wrong but the "oos" one.
    assert acc["w"]["banking"] == (pytest.approx(100 * 12 / 16), 16)
    assert acc["w"]["home"] == (pytest.approx(100 * 13 / 16), 16)
    assert acc["w"]["oos"] == (100.0, 8)


def test_changed_queries_are_derived_escaped_and_capped(tmp_path):
    n = MAX_CHANGED + 10
    texts = [f"<b>q{i}</b> | pipe" for i in range(n)]
    teacher = {"name": "teacher", "baseline": True, "predictions": ["a"] * n, "gold": ["a"] * n, "texts": texts}
    model = {"name": "bundle", "predictions": ["b"] * n}
    html_path, md_path = write_report(tmp_path, [teacher, model], title="t")
    html, md = html_path.read_text(), md_path.read_text()
    assert f"{n} queries predicted differently by bundle" in html
    assert html.count('<td class="text">') == MAX_CHANGED
    assert "&lt;b&gt;q0&lt;/b&gt;" in html and "<b>q0</b>" not in html
    table = _md_table(md, "Query")
    assert len(table) == 2 + MAX_CHANGED
    assert table[2] == ["<b>q0</b> \\| pipe", "a", "a", "b"]
    # Given explicitly, the list is shown with regressions first.
    changed = [{"text": "fixed", "gold": "a", "teacher": "c", "model": "a"},
               {"text": "broken", "gold": "a", "teacher": "a", "model": "c"}]
    write_report(tmp_path, [teacher, model], title="t", changed=changed)
    md = (tmp_path / "report.md").read_text()
    assert "2 queries predicted differently by bundle: 1 newly wrong, 1 newly right, 0 wrong either way" in md
    assert [r[0] for r in _md_table(md, "Query")[2:]] == ["broken", "fixed"]


def test_rows_without_numbers_leave_no_stale_plots(tmp_path, rows):
    write_report(tmp_path, rows, title="t", domains=DOMAINS, frontier=FRONTIER)
    assert all((tmp_path / name).exists() for name in PLOTS.values())
    html_path, md_path = write_report(tmp_path, [{"name": "only-a-name"}], title="t")
    assert not any((tmp_path / name).exists() for name in PLOTS.values())
    assert "data:image/png" not in html_path.read_text()
    assert "only-a-name" in md_path.read_text()


def test_load_rows_accepts_the_harness_shapes(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps({"accuracy": 0.9}))
    (tmp_path / "many.json").write_text(json.dumps([{"name": "a"}, {"accuracy": 0.5}]))
    (tmp_path / "wrapped.json").write_text(json.dumps({"rows": [{"name": "w"}]}))
    (tmp_path / "stage.json").write_text(json.dumps({"stage": "quantize", "metrics": {"accuracy": 0.8}}))
    rows = load_rows(sorted(tmp_path.glob("*.json")))
    assert [r["name"] for r in rows] == ["a", "many[1]", "one", "quantize", "w"]
    assert rows[3]["accuracy"] == 0.8
    with pytest.raises(EdgepackError, match="missing.json: no such file"):
        load_rows([tmp_path / "missing.json"])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(EdgepackError, match="bad.json: not valid JSON"):
        load_rows([tmp_path / "bad.json"])


def test_cli_writes_the_report(tmp_path, rows, capsys):
    paths = []
    for r in rows:
        p = tmp_path / f"{r['name']}.json"
        p.write_text(json.dumps({k: v for k, v in r.items() if k != "baseline"}))
        paths.append(str(p))
    (tmp_path / "domains.json").write_text(json.dumps(DOMAINS))
    out = tmp_path / "out"
    code = main(["report", str(out), *paths, "--domains", str(tmp_path / "domains.json"),
                 "--title", "CLI report", "--baseline", "teacher", "--note", "machine: test"])
    assert code == ExitCode.OK
    assert capsys.readouterr().out.split() == [str(out / "report.html"), str(out / "report.md")]
    md = (out / "report.md").read_text()
    assert md.startswith("# CLI report") and "teacher (baseline)" in md and "machine: test" in md
    assert main(["report", str(out), *paths, "--baseline", "nope"]) == ExitCode.USAGE
    assert "--baseline nope: no such row" in capsys.readouterr().err


def test_cli_data_gives_gold_for_domains_and_changed_queries(tmp_path, capsys):
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"text": t, "label": g}) + "\n"
                                                 for t, g in zip(TEXTS, GOLD, strict=True)))
    wrong = ["oos"] + GOLD[1:]  # query 0 ("balance") newly wrong
    results = [{"name": "teacher", "accuracy": 1.0, "predictions": GOLD},
               {"name": "bundle", "accuracy": 39 / 40, "predictions": wrong}]
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "domains.json").write_text(json.dumps(DOMAINS))
    code = main(["report", str(tmp_path / "out"), str(tmp_path / "results.json"),
                 "--data", str(tmp_path / "eval.jsonl"), "--domains", str(tmp_path / "domains.json")])
    assert code == ExitCode.OK, capsys.readouterr().err
    md = (tmp_path / "out" / "report.md").read_text()
    assert _md_table(md, "Query")[2] == ["query 0 for balance", "balance", "balance", "oos"]
    domains = {r[0]: r[1:] for r in _md_table(md, "Domain")[2:]}
    assert domains["banking"] == ["16", "100.0", "93.8"] and domains["oos"] == ["8", "100.0", "100.0"]



def test_python_m_edgepack_report_still_runs_the_command(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps([{"name": "teacher", "accuracy": 0.9}, {"name": "bundle"}]))
    proc = subprocess.run([sys.executable, "-m", "edgepack.report", str(tmp_path / "out"), str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert proc.stdout.split() == [str(tmp_path / "out" / "report.html"), str(tmp_path / "out" / "report.md")]

@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_report_renders_in_a_headless_browser(tmp_path, rows, budgets):
    import numpy as np
    from PIL import Image

    html_path, _ = write_report(tmp_path / "r", rows, title="browser check", budgets=budgets, domains=DOMAINS)
    shot = tmp_path / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
           html_path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    px = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert px.shape == (1600, 1200, 3)
    assert px.std() > 5 and (px.min(axis=2) < 235).mean() > 0.02, "the screenshot is blank"
    # The embedded scatter plot is drawn: the teacher's big blue disc is saturated colour the page's
    # own CSS never uses at that scale (a broken image shows an icon and alt text: ~300 such pixels).
    r, b = px[..., 0], px[..., 2]
    saturated = int(((b - r > 60) & (b > 150)).sum())
    assert saturated > 3000, saturated
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


# The quantize stage's variants table as an older build wrote it (no intervals, no mean, no confidence) and
# as it is written now; a bundle's manifest carries it, so the final row's build_metrics hold it.
OLD_VARIANTS = {"chosen": "dyn-u8s8-pc", "max_accuracy_drop": 1.0, "min_agreement": 0.99, "threads": 1, "rows": [
    {"name": "fp32", "format": "fp32", "model_mb": 17.5, "accuracy": 0.9, "accuracy_drop": 0.0, "agreement": 1.0,
     "p50_ms": 1.2, "p95_ms": 1.5, "noise_ms": 0.02},
    {"name": "dyn-u8s8-pc", "format": "dynamic", "model_mb": 4.6, "accuracy": 0.897, "accuracy_drop": 0.3,
     "agreement": 0.991, "p50_ms": 0.5, "p95_ms": 0.7, "noise_ms": 0.01, "within_budget": True},
    {"name": "nbits4-b32", "format": "matmul-nbits", "error": "RuntimeError: no kernel"}]}
NEW_VARIANTS = {**OLD_VARIANTS, "confidence": 0.9, "objective": "p95", "rows": [
    {**OLD_VARIANTS["rows"][0], "mean_ms": 1.25},
    {**OLD_VARIANTS["rows"][1], "mean_ms": 0.55, "drop_low": -0.1, "drop_high": 0.74, "confidence": 0.9,
     "verdict": "inside", "verdict_text": "inside the budget"},
    {"name": "dyn-u8u8-pc", "format": "dynamic", "model_mb": 4.6, "accuracy": 0.88, "accuracy_drop": 2.0,
     "agreement": 0.95, "p50_ms": 0.6, "mean_ms": 0.65, "p95_ms": 0.8, "noise_ms": 0.01, "within_budget": False,
     "drop_low": 1.2, "drop_high": 2.9, "confidence": 0.9, "verdict": "outside", "verdict_text": "outside the budget"}]}


@pytest.mark.parametrize("table", [OLD_VARIANTS, NEW_VARIANTS], ids=["before-intervals", "with-intervals"])
def test_quantization_variants_table_old_and_new(tmp_path, rows, table):
    rows[-2]["build_metrics"] = {"variants": json.loads(json.dumps(table))}  # as read back from a manifest
    rows[-2]["final"] = True
    html_path, md_path = write_report(tmp_path, rows, title="t")
    md, html = md_path.read_text(), html_path.read_text()
    assert "## Quantization variants" in md and "<h2>Quantization variants</h2>" in html
    t = {r[0]: r for r in _md_table(md, "Variant")}
    assert t["Variant"][4:10] == ["Points below fp32 (interval)", "Budget", "Agreement", "p50 ms (± spread)",
                                  "mean ms", "p95 ms"]
    assert t["dyn-u8s8-pc"][-1] == "chosen" and t["fp32"][-1] == "reference"
    if table is OLD_VARIANTS:  # drawn with what it has: the drop alone, no verdict, no mean
        assert t["dyn-u8s8-pc"][4] == "+0.30" and t["dyn-u8s8-pc"][5] == DASH and t["dyn-u8s8-pc"][8] == DASH
        assert t["nbits4-b32"][-1].startswith("failed: RuntimeError") and "interval" not in md.split("## Quantization")[1][:200]
        assert "a faster one wins by a p50 lead larger than the timing spread (the spread of its round medians)" in md
    else:
        assert t["dyn-u8s8-pc"][4] == "+0.30 (-0.10 to +0.74)" and t["dyn-u8s8-pc"][5] == "inside the budget"
        assert t["dyn-u8s8-pc"][7:10] == ["0.500 ± 0.010", "0.550", "0.700"]
        assert t["dyn-u8u8-pc"][5] == "outside the budget" and t["dyn-u8u8-pc"][-1] == "over the gate"
        assert "90% paired-bootstrap interval" in md and "+0.30 (-0.10 to +0.74)" in html
        assert "a faster one wins by a p95 lead larger than the timing spread (the spread of its round p95s)" in md
