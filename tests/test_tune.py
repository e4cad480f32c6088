"""On-device thread tuning (``runtime_shim.tune``) on the tiny bundle, with few runs: the search covers
threads 1..physical cores and the spinning choices, compares against ORT's defaults, writes the winner
into runtime.json and keeps the manifest valid; it runs with the runtime packages only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.cli import main
from edgepack.errors import ExitCode
from runtime_shim import tune
from runtime_shim.manifest import verify

FAST = ["--runs", "6", "--warmup", "2", "--gap-ms", "1", "--rounds", "2"]


@pytest.fixture
def bundle(tmp_path, tiny_bundle) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dest)
    return dest


def test_physical_cores_not_above_logical():
    assert 1 <= tune.physical_cores() <= (os.cpu_count() or 1)


def test_candidates_threads_and_spinning():
    names = [c.name for c in tune.thread_candidates(3)]
    assert names == ["ort-defaults", "t1", "t2-spin-on", "t2-spin-off", "t2-spin-force-stop",
                     "t3-spin-on", "t3-spin-off", "t3-spin-force-stop"]
    c = tune.candidate(2, "force-stop", "extended")
    assert c.settings["session_config"] == {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"}
    assert c.settings["graph_optimization_level"] == "extended" and c.name == "t2-spin-force-stop-extended"
    assert tune.candidate(1, "off").settings["session_config"] == {}  # no worker pool: nothing spins
    # 0 = ORT's pinned pool of one thread per physical core: searched with spinning off / force-stop
    assert [c.name for c in tune.thread_candidates(2, auto=True)][-2:] == ["auto-spin-off", "auto-spin-force-stop"]
    assert tune.candidate(0, "off").settings["intra_op_num_threads"] == 0


def test_quant_precision_only_on_x86_without_vnni():
    assert tune.needs_quant_precision("x86_64", {"avx2"})
    assert tune.needs_quant_precision("x86_64", {"avx2", "avx512f", "avx512bw"})
    assert not tune.needs_quant_precision("x86_64", {"avx2", "avx_vnni"})
    assert not tune.needs_quant_precision("arm64", {"asimddp"})


def test_target_warning_names_missing_flags():
    manifest = {"target": {"name": "arm64-i8mm", "arch": "arm64", "requires_flags": ["asimddp", "i8mm"]}}
    msg = tune.target_warning(manifest, "arm64", {"asimd", "asimddp"})
    assert "arm64-i8mm" in msg and "i8mm" in msg and "\n" not in msg
    assert tune.target_warning(manifest, "arm64", {"asimddp", "i8mm"}) is None
    assert tune.target_warning({}, "x86_64", set()) is None


def test_tune_writes_winner_and_keeps_manifest_valid(bundle, capsys):
    before = json.loads((bundle / "runtime.json").read_text())
    assert main(["tune", str(bundle), *FAST]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "ort-defaults" in out and "t1" in out and "confirmation" in out and "winner " in out
    runtime = json.loads((bundle / "runtime.json").read_text())
    manifest = verify(bundle)  # re-hashed: the tuned runtime.json passes the checksum check
    tuned = manifest["tuned"]
    assert set(tuned["ratios_vs_ort_defaults"]) == {"b2b_p50", "b2b_p95", "gap_p50", "gap_p95"}
    # the winner is no worse than ORT's defaults in the confirmation round, or it is the defaults
    assert tuned["winner"] == "ort-defaults" or all(v <= 1.0 for v in tuned["ratios_vs_ort_defaults"].values())
    assert 0 <= runtime["intra_op_num_threads"] <= tune.physical_cores()
    assert "env" not in runtime
    for key in ("model", "max_length", "inputs", "pad_id"):
        assert runtime[key] == before[key]
    # readable by a service user on the device, like every other bundle file (mkstemp alone gives 0600)
    assert (bundle / "runtime.json").stat().st_mode & 0o777 == 0o644
    assert (bundle / "manifest.json").stat().st_mode & 0o777 == 0o644
    names = {r["name"] for r in tuned["table"]}
    assert {"ort-defaults", "t1"} <= names
    if tune.physical_cores() >= 2:
        assert {"t2-spin-on", "t2-spin-off", "t2-spin-force-stop"} <= names


def test_tune_function_with_x64quantprecision(bundle):
    from runtime_shim import OnnxPipeline

    pipe = OnnxPipeline(bundle, verify=False)
    result = tune.tune(pipe, ["set an alarm for noon", "what is my savings balance"], max_threads=1, runs=4,
                       warmup=1, gap_ms=0.5, rounds=1, graph_levels=("basic",), quant_precision=True, log=lambda m: None)
    names = [r["name"] for r in result.rows]
    assert names[:2] == ["ort-defaults", "t1"] and "t1-basic" in names and "t1-x64qp" in names
    assert "winner" in result.table()


def test_dry_run_leaves_bundle_unchanged(bundle, capsys):
    before = (bundle / "runtime.json").read_bytes()
    assert main(["tune", str(bundle), "--profile", "edge-x86-2core", "--dry-run", *FAST]) == ExitCode.OK
    assert "dry run" in capsys.readouterr().out
    assert (bundle / "runtime.json").read_bytes() == before


def test_threads_above_physical_cores_refused(bundle, capsys):
    n = tune.physical_cores() + 1
    assert main(["tune", str(bundle), "--max-threads", str(n), *FAST]) == ExitCode.USAGE
    err = capsys.readouterr().err.strip()
    assert f"--max-threads {n}" in err and "physical cores" in err and len(err.splitlines()) == 1
    assert tune.main([str(bundle), "--max-threads", str(n)]) == 2


def test_unknown_profile_refused(bundle, capsys):
    assert main(["tune", str(bundle), "--profile", "pi-zero"]) == ExitCode.USAGE
    assert "known profiles:" in capsys.readouterr().err


def test_shim_tune_imports_only_runtime_packages():
    code = ("import sys, runtime_shim.tune, runtime_shim.__main__ as m; m.make_parser(); "
            "bad = [x for x in ('torch', 'transformers', 'edgepack', 'sklearn', 'onnx') if x in sys.modules]; "
            "print(','.join(bad))")
    root = Path(tune.__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.stdout.strip() == ""


def test_profile_caps_threads_and_warns_on_other_hardware(bundle, capsys):
    # avx512-vnni-server-core is one physical core: the search stops at one thread
    assert main(["tune", str(bundle), "--profile", "avx512-vnni-server-core", "--dry-run", *FAST]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "t1" in out and "t2-spin" not in out
    assert main(["tune", str(bundle), "--profile", "raspberry-pi-4", "--max-threads", "1", "--dry-run", *FAST]) == ExitCode.OK
    err = capsys.readouterr().err
    if tune.cpu_flags()[0] != "arm64":
        assert "profile 'raspberry-pi-4' is for target 'arm64'" in err
