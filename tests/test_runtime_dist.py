"""The device runtime as its own distribution: ``edgepack runtime wheel`` writes ``edgepack-runtime`` from
the installed ``runtime_shim`` (the same bytes every time, offline), and once it is installed on a
runtime-only Python, ``python -m runtime_shim predict BUNDLE TEXT`` works from any directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest
from conftest import clean_env

import runtime_shim
from edgepack.cli import main
from edgepack.runtime_dist import MIN_PYTHON, build_wheel, wheel_bytes, wheel_name


def test_wheel_is_the_installed_shim_and_the_same_every_time(tmp_path, capsys):
    assert main(["runtime", "wheel", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    wheel = tmp_path / "a" / wheel_name()
    assert f"wrote {wheel}" in out and wheel.read_bytes() == wheel_bytes() == build_wheel(tmp_path / "b").read_bytes()
    shim = Path(runtime_shim.__file__).parent
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        ours = sorted(p.name for p in shim.iterdir() if p.is_file() and p.suffix == ".py")
        assert sorted(n.split("/", 1)[1] for n in names if n.startswith("runtime_shim/")) == ours
        assert all(z.read(f"runtime_shim/{n}") == (shim / n).read_bytes() for n in ours)
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(info).decode())
        entry_points = z.read(info.replace("METADATA", "entry_points.txt")).decode()
        record = z.read(info.replace("METADATA", "RECORD")).decode()
    assert meta["Name"] == "edgepack-runtime" and meta["Version"] == metadata.version("edgepack")
    assert meta["Requires-Python"] == f">={MIN_PYTHON[0]}.{MIN_PYTHON[1]}"
    requires = meta.get_all("Requires-Dist")
    assert {r.split(">=")[0] for r in requires if "extra" not in r} == {"onnxruntime", "tokenizers", "numpy"}
    assert [r for r in requires if "extra" in r] == ['cryptography>=42; extra == "signed"']
    assert "edgepack-runtime = runtime_shim.__main__:console" in entry_points
    assert len(record.splitlines()) == len(names)


@pytest.mark.slow
def test_installed_runtime_predicts_from_any_directory(device_python, tiny_bundle, tmp_path):
    """A runtime-only venv with the wheel installed: predict a bundle from an unrelated directory and from
    inside the bundle (the script and ``-I`` never import the bundle's copy, here replaced by a trap)."""
    venv = tmp_path / "device"
    shutil.copytree(device_python.parent.parent, venv, symlinks=True)
    python = venv / "bin" / "python"
    wheel = build_wheel(tmp_path / "dist")
    env = clean_env(venv)
    pip = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert pip.returncode == 0, pip.stderr
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle, ignore=shutil.ignore_patterns("__pycache__"))
    trap = tmp_path / "sprung"
    (bundle / "runtime_shim" / "__main__.py").write_text(f"open({str(trap)!r}, 'w').close()\n")
    expected = runtime_shim.OnnxPipeline(tiny_bundle)("what is my checking balance")[0]["label"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for argv, cwd in (([str(python), "-m", "runtime_shim"], elsewhere),
                      ([str(venv / "bin" / "edgepack-runtime")], bundle),
                      ([str(python), "-I", "-m", "runtime_shim"], bundle)):
        target = "." if cwd == bundle else str(bundle)
        proc = subprocess.run([*argv, "predict", target, "what is my checking balance", "--json", "--no-verify"],
                              cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, (argv, proc.stderr)
        assert json.loads(proc.stdout)[0]["label"] == expected
    assert not trap.exists()
