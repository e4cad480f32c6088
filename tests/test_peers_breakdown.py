"""``benchmarks/peers.py --breakdown`` on the tiny bundle: every part of one query is timed before and after
the answer moved into the graph, beside ONNX Runtime's floor and fastText, and both paths answer alike."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_breakdown_times_every_part_of_a_query(tiny_bundle, clinc_json, tmp_path):
    pytest.importorskip("fasttext", reason="fastText is in the peers extra: pip install -e '.[peers]'")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--work", str(tmp_path),
                           "--data", str(clinc_json), "--no-teacher", "--breakdown", str(tiny_bundle),
                           "--rounds", "2", "--per-round", "5", "--warmup", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((tmp_path / "breakdown.json").read_text())
    parts = saved["parts"]
    assert {"before: whole call, pipe(text)", "after: whole call, pipe(text)", "token ids (fast WordPiece)",
            "before: session run, logits (run_rows)", "before: answer from the logits in Python (top_of_list)",
            "after: session run, answer in the graph (run_one)", "after: reading the answer (checks, threshold)",
            "ONNX Runtime's floor: a 2-node graph, same call (run_one)", "fastText (model.bin), whole call"} <= set(parts)
    assert all(r["p50_ms"] > 0 for name, r in parts.items() if "Python around" not in name)
    paired = saved["paired"]
    assert paired["rows"] > 0 and paired["labels_differ"] == 0 and paired["max_score_diff"] < 1e-12
    assert paired["accuracy_before"] == paired["accuracy_after"]
    assert "| after: whole call, pipe(text) |" in proc.stdout
