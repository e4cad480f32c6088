"""The shim's load-time warning when the CPU lacks the bundle's target flags (faked with
EDGEPACK_CPU_FLAGS), and the host profile."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from runtime_shim import cpu, tune
from runtime_shim.manifest import update_manifest

VNNI_TARGET = {"name": "x86-64-vnni", "arch": "x86_64", "requires_flags": [], "any_flags": ["avx512_vnni", "avx_vnni"],
               "quantize": {"weight_type": "qint8", "reduce_range": False, "per_channel": True}}


@pytest.fixture()
def fresh(monkeypatch):
    """A process that has not warned yet."""
    monkeypatch.setattr(cpu, "_warned", set())
    return monkeypatch


@pytest.fixture()
def vnni_bundle(tmp_path, tiny_bundle) -> Path:
    """The tiny bundle, recorded as built for a VNNI CPU (manifest re-hashed: it verifies)."""
    out = tmp_path / "vnni"
    shutil.copytree(tiny_bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["target"] = VNNI_TARGET
    (out / "manifest.json").write_text(json.dumps(manifest))
    update_manifest(out)
    return out


def test_faked_flags_replace_the_cpu(monkeypatch):
    monkeypatch.setenv(cpu.FLAGS_ENV, "arm64:asimd,asimddp")
    assert cpu.cpu_flags() == ("arm64", {"asimd", "asimddp"})
    assert tune.cpu_flags() == ("arm64", {"asimd", "asimddp"})  # the old import path still works
    monkeypatch.setenv(cpu.FLAGS_ENV, "avx2 fma")
    assert cpu.cpu_flags()[1] == {"avx2", "fma"}
    monkeypatch.setenv(cpu.FLAGS_ENV, "")
    assert cpu.faked_cpu() is None  # empty: this CPU's own flags


def test_message_names_missing_flags_and_the_accuracy_risk():
    msg = cpu.target_warning({"target": VNNI_TARGET}, "x86_64", {"avx2", "fma"})
    assert "x86-64-vnni" in msg and "avx512_vnni or avx_vnni" in msg and "\n" not in msg
    assert "accuracy" in msg and "VPMADDUBSW" in msg and "edgepack emulate accuracy" in msg
    assert cpu.target_warning({"target": VNNI_TARGET}, "x86_64", {"avx2", "avx512_vnni"}) is None
    arm = cpu.target_warning({"target": {"name": "arm64-dotprod", "arch": "arm64", "requires_flags": ["asimddp"]}},
                             "arm64", {"asimd"})
    assert "asimddp" in arm and "accuracy" in arm and "VPMADDUBSW" not in arm
    other = cpu.target_warning({"target": {"name": "arm64", "arch": "arm64"}}, "x86_64", {"avx2"})
    assert "arm64" in other and "x86_64" in other


def test_pipeline_warns_once_per_process(fresh, vnni_bundle):
    from runtime_shim import OnnxPipeline

    fresh.setenv(cpu.FLAGS_ENV, "x86_64:sse4_2 avx avx2 fma")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        OnnxPipeline(vnni_bundle)
        OnnxPipeline(vnni_bundle)
    ours = [w for w in caught if issubclass(w.category, cpu.CpuTargetWarning)]
    assert len(ours) == 1
    assert "avx512_vnni or avx_vnni" in str(ours[0].message) and "accuracy" in str(ours[0].message)
    assert ours[0].filename == __file__  # points at the caller's line, not the shim's


def test_pipeline_quiet_when_the_cpu_has_the_flags(fresh, vnni_bundle):
    from runtime_shim import OnnxPipeline

    fresh.setenv(cpu.FLAGS_ENV, "x86_64:avx2 avx512f avx512_vnni")
    with warnings.catch_warnings():
        warnings.simplefilter("error", cpu.CpuTargetWarning)
        OnnxPipeline(vnni_bundle)


@pytest.mark.parametrize("command", [["predict", "{b}", "what is my balance"], ["tune", "{b}", "--dry-run", "--runs", "5", "--warmup", "1", "--rounds", "1"]])
def test_cli_prints_one_warning(vnni_bundle, command):
    env = {**os.environ, cpu.FLAGS_ENV: "x86_64:avx2 fma"}
    argv = [sys.executable, "-m", "runtime_shim", *[c.format(b=vnni_bundle) for c in command]]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300,
                       cwd=str(Path(__file__).resolve().parents[1]))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("needs CPU flags this CPU lacks") == 1, r.stderr
    line = next(x for x in r.stderr.splitlines() if "needs CPU flags" in x)
    assert line.startswith("warning: bundle built for target 'x86-64-vnni'") and "avx512_vnni or avx_vnni" in line


def test_bench_warns(fresh, vnni_bundle):
    from edgepack.cli import main

    fresh.setenv(cpu.FLAGS_ENV, "x86_64:avx2 fma")
    with pytest.warns(cpu.CpuTargetWarning, match="avx512_vnni or avx_vnni"):
        assert main(["bench", str(vnni_bundle), "--runs", "3", "--warmup", "0"]) == 0


def test_host_profile(monkeypatch):
    from edgepack import profiles, targets

    monkeypatch.setenv(cpu.FLAGS_ENV, "x86_64:avx2 fma sse4_2")
    prof = profiles.host_profile()
    assert prof.name == "host" and prof.target == "x86-64-avx2" == targets.detect().name
    assert prof.physical_cores == cpu.physical_cores() and prof.memory_mb > 0
    assert prof.threads.intra_op_num_threads <= prof.physical_cores
    assert profiles.load("host") == prof
    monkeypatch.setenv(cpu.FLAGS_ENV, "arm64:asimd asimddp")
    assert profiles.load("host").target == "arm64-dotprod"
