"""``edgepack deploy`` and a device running the model service (``service = "NAME"`` in the inventory):
``--setup`` writes the unit, each switch of ``current`` (deploy, ``--rollback``) is signalled and
deploy waits until the service answers with the new release, while a client's requests keep flowing
with none failed. The service is started directly with the device's installed runtime (no systemd
here), as its unit would start it.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import clean_env
from test_serve import Load, _wait

from edgepack.cli import main
from runtime_shim.manifest import update_manifest
from runtime_shim.serve_client import Client

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def device(tmp_path_factory, device_python) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-device")
    shutil.copytree(device_python.parent.parent, root / "venv", symlinks=True)
    return {
        "python": root / "venv" / "bin" / "python",
        "remote": root / "edgepack",
        "runtime": root / "runtime",
        "status": root / "run" / "status.json",
        "root": root,
    }


def _inventory(device: dict[str, Path], tmp_path: Path) -> Path:
    path = tmp_path / "devices.toml"
    path.write_text(f"""[devices.kiosk]
transport = "local"
python = "{device["python"]}"
remote_dir = "{device["remote"]}"
runtime_dir = "{device["runtime"]}"
profile = "edge-x86-2core"
service = "edgepack-kiosk"
service_status = "{device["status"]}"
""")
    return path


def _variant(src: Path, dest: Path, threshold: float) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    labels = json.loads((dest / "labels.json").read_text())
    labels["oos_threshold"] = threshold
    (dest / "labels.json").write_text(json.dumps(labels))
    update_manifest(dest)
    return dest


def _deploy(capsys, *argv) -> tuple[int, str]:
    code = main(["deploy", *map(str, argv)])
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def test_deploy_and_rollback_signal_the_service_under_load(device, tiny_bundle, tmp_path, capsys):
    inv = _inventory(device, tmp_path)
    v1 = _variant(tiny_bundle, tmp_path / "v1" / "tiny", 0.0)
    v2 = _variant(tiny_bundle, tmp_path / "v2" / "tiny", 1.0)  # every answer out of scope
    code, out = _deploy(capsys, v1, "--to", "kiosk", "--setup", "--inventory", inv)
    assert code == 0, out
    unit = device["runtime"] / "systemd" / "edgepack-kiosk.service"
    text = unit.read_text()
    current = device["remote"] / "tiny" / "current"
    assert f"serve {current} --socket /run/edgepack-kiosk/serve.sock" in text
    assert f"{device['runtime'] / 'venv' / 'bin' / 'python'} -I -B -m runtime_shim" in text
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text and "DynamicUser=yes" in text
    assert "not signalled: no status file" in out  # nothing runs yet: the deploy is done all the same

    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            str(device["runtime"] / "venv" / "bin" / "python"),
            "-I",
            "-B",
            "-m",
            "runtime_shim",
            "serve",
            str(current),
            "--port",
            "0",
            "--watch",
            "0",
            "--status-file",
            str(device["status"]),
        ],
        cwd=device["runtime"],
        stderr=log,
        env=clean_env(),
    )
    try:
        _wait(
            lambda: (
                re.search(r" on (\S+); pid", (tmp_path / "serve.log").read_text()) or proc.poll() is not None
            ),
            120,
        )
        address = re.search(r" on (\S+); pid", (tmp_path / "serve.log").read_text()).group(1)
        release1 = current.resolve().name
        load = Load(address, clients=2)
        _wait(lambda: len(load.answers) > 10)
        code, out = _deploy(capsys, v2, "--to", "kiosk", "--inventory", inv)
        assert code == 0, out
        release2 = current.resolve().name
        assert re.search(rf"service edgepack-kiosk \(pid {proc.pid}\) now serves {release2}", out), out
        n = len(load.answers)
        _wait(lambda: len(load.answers) > n + 10)
        assert load.answers[-1][1] == release2 and load.answers[-1][2][0]["label"] == "oos"
        code, out = _deploy(capsys, "--rollback", "kiosk", "--inventory", inv)
        assert code == 0, out
        assert f"now serves {release1}" in out and current.resolve().name == release1
        n = len(load.answers)
        _wait(lambda: len(load.answers) > n + 10)
        # fleet bench --service: the device's figures through its service, answers the pipeline's.
        code = main(
            [
                "fleet",
                "bench",
                str(v1),
                "--to",
                "kiosk",
                "--service",
                "--runs",
                "20",
                "--warmup",
                "2",
                "--inventory",
                str(inv),
                "--out",
                str(tmp_path / "fleet"),
            ]
        )
        out = capsys.readouterr().out
        rec = json.loads((tmp_path / "fleet" / "fleet.json").read_text())["devices"][0]
        assert rec["status"] in ("ok", "budget"), out  # the loaded test machine may miss a latency budget
        assert rec["agreement"] == 1.0 and rec["regression"]["drop_points"] == 0, rec
        assert rec["latency_ms"]["n"] == 20 and rec["peak_rss_mb"] > 10
        pulled = json.loads((tmp_path / "fleet" / "devices" / "kiosk" / "bench.json").read_text())
        assert pulled["service"] == address and pulled["fleet"]["through_service"] is True
        load.finish()
        assert load.failures == []
        # Answers arrive in the order they finish: a request in flight on the old release answers from it
        # after a newer one answered from the new release, so the order near a switch may interleave.
        seen = [r for _, r, _ in load.answers]
        assert seen[0] == release1 and release2 in seen and seen[-1] == release1 and set(seen) == {release1, release2}
        assert Client(address)("set an alarm") == Client(address)("set an alarm")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    # A status file whose pid is gone (the service stopped): reported, not signalled, deploy done.
    code, out = _deploy(capsys, v2, "--to", "kiosk", "--inventory", inv)
    assert code == 0 and re.search(
        r"not signalled: pid \d+ of \S+ is not (running|a runtime_shim serve)", out
    ), out
