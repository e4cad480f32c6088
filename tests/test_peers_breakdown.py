"""``benchmarks/peers.py --breakdown`` on the tiny bundle: every part of one query is timed, ONNX Runtime's
floor and the answer computed inside the graph included, and the in-graph answer is the pipeline's own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_breakdown_times_every_part_of_a_query(tiny_bundle, clinc_json, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--work", str(tmp_path),
                           "--data", str(clinc_json), "--no-teacher", "--breakdown", str(tiny_bundle),
                           "--rounds", "2", "--per-round", "5", "--warmup", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    parts = json.loads((tmp_path / "breakdown.json").read_text())["parts"]
    assert {"whole call: pipe(text)", "token ids (fast WordPiece)", "session run (C API, bound buffers)",
            "answer from logits (top_of_list)", "ONNX Runtime floor: a 2-node graph, same call",
            "session run with the answer in the graph (a measurement)"} <= set(parts)
    assert all(r["p50_ms"] > 0 for name, r in parts.items() if not name.startswith("Python"))
    assert "| whole call: pipe(text) |" in proc.stdout


@pytest.mark.slow
def test_the_answer_in_the_graph_is_the_pipelines(tiny_bundle, tmp_path):
    """The measured graph computes what ``top_of_list`` computes from the logits: the same label and the
    same top probability (float32 softmax against float64), so its timing is of the same answer."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import peers
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from runtime_shim import OnnxPipeline
    from runtime_shim.csession import CSession
    from runtime_shim.scores import top_of_list

    pipe = OnnxPipeline(tiny_bundle, overrides={"session_api": "c"})
    graph = CSession(peers._answer_in_graph(pipe.model_path, tmp_path / "answer.onnx"), pipe.session.options)
    for text in ["what is my checking balance", "set an alarm for seven", "tell me a joke about cats"]:
        ids = pipe._ids(text)
        top, label = graph.run_rows([ids], pipe.pad_id, "logits")[0]
        k, p = top_of_list(pipe._run_rows([ids], pipe.pad_id, pipe.output_name)[0])
        assert int(label) == k and top == pytest.approx(p, rel=1e-5)
