"""The "device": a fresh virtual environment holding only onnxruntime, tokenizers and numpy (and what
they depend on), where a copied bundle must verify, predict and benchmark through its own shim.

Slow (it creates a venv and pip-installs the three packages at the versions installed here, from
the pip cache or the package index), so it is marked ``slow``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from conftest import clean_env

pytestmark = pytest.mark.slow

RUNTIME = ("onnxruntime", "tokenizers", "numpy")
HEAVY = ("torch", "transformers", "edgepack", "sklearn", "datasets", "optimum")


def _env(venv: Path | None = None) -> dict[str, str]:
    return clean_env(venv)


def _run(python: Path, args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(python), *args], cwd=cwd, capture_output=True, text=True,
                          env={**_env(python.parent.parent), **env}, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-2000:]}"
    return proc


def test_device_has_only_the_runtime(device_python: Path, tmp_path):
    code = ("import importlib.util as u, json; "
            f"print(json.dumps([m for m in {HEAVY!r} if u.find_spec(m)]))")
    assert json.loads(_run(device_python, ["-c", code], tmp_path).stdout) == []
    code = ("import json; from importlib import metadata as m; "
            f"print(json.dumps({{n: m.version(n) for n in {RUNTIME!r}}}))")
    versions = json.loads(_run(device_python, ["-c", code], tmp_path).stdout)
    assert versions == {name: metadata.version(name) for name in RUNTIME}


def test_bundle_runs_on_the_device(device_python: Path, tiny_bundle: Path, tmp_path):
    from runtime_shim import OnnxPipeline
    from runtime_shim.bench import run_benchmark
    from runtime_shim.datafiles import read_labelled

    # Copied as a user would (scp, tar): no __pycache__ from the build machine.
    bundle = tmp_path / "copied" / "bundle"
    shutil.copytree(tiny_bundle, bundle, ignore=shutil.ignore_patterns("__pycache__"))

    assert "ok" in _run(device_python, ["-m", "runtime_shim", "verify", "."], bundle).stdout

    proc = _run(device_python, ["-m", "runtime_shim", "predict", ".", "what is my checking balance", "--json"], bundle)
    answer = json.loads(proc.stdout)
    assert set(answer[0]) == {"label", "score"}
    here = OnnxPipeline(tiny_bundle)("what is my checking balance")
    assert answer[0]["label"] == here[0]["label"]
    assert answer[0]["score"] == pytest.approx(here[0]["score"], abs=1e-6)

    # From the bundle's parent, with the bundle on PYTHONPATH (the other documented way to run it).
    proc = _run(device_python, ["-m", "runtime_shim", "predict", "bundle", "set an alarm for 7 am"], bundle.parent,
                PYTHONPATH=str(bundle))
    assert proc.stdout.strip().endswith("set an alarm for 7 am")

    out = tmp_path / "device_bench.json"
    proc = _run(device_python, ["-m", "runtime_shim", "bench", ".", "--runs", "50", "--warmup", "10",
                                "--json", str(out)], bundle)
    assert proc.stdout.splitlines()[0].startswith("model")
    result = json.loads(out.read_text())
    for key in ("accuracy", "in_scope_accuracy", "oos_recall", "model_bytes", "bundle_bytes", "peak_rss_mb",
                "threads"):
        assert key in result, key
    assert result["latency_ms"]["n"] == 50 and result["latency_ms"]["p50"] > 0
    assert result["tokenize_ms"]["p50"] > 0 and result["model_ms"]["p50"] > 0
    assert result["peak_rss_mb"] is not None and result["peak_rss_mb"] > 10, result.get("peak_rss_error")
    assert "torch" not in result["host"]["versions"]
    assert result["host"]["versions"]["onnxruntime"] == metadata.version("onnxruntime")

    # The device reproduces the build machine's answers on the bundle's own held-out slice.
    texts, gold = read_labelled(tiny_bundle / "eval.jsonl")
    build = run_benchmark(OnnxPipeline(tiny_bundle), texts, gold, warmup=0, runs=1, rss_argv=[])
    assert result["predictions"] == build["predictions"]
    assert result["accuracy"] == build["accuracy"] and result["accuracy_raw"] == build["accuracy_raw"]


def test_damaged_bundle_refused_on_the_device(device_python: Path, tiny_bundle: Path, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle, ignore=shutil.ignore_patterns("__pycache__"))
    labels = bundle / "labels.json"
    labels.write_text(labels.read_text().replace('"oos"', '"xoos"', 1))
    proc = subprocess.run([str(device_python), "-m", "runtime_shim", "predict", ".", "hello"], cwd=bundle,
                          capture_output=True, text=True, env=_env(device_python.parent.parent), timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "labels.json" in lines[0]
