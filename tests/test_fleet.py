"""The fleet against real devices: two OpenSSH ``sshd`` servers on 127.0.0.1 (host keys and a user key
generated into a temporary directory) and one ``local`` device, each with its own runtime-only virtual
environment. ``edgepack devices --check``, ``deploy`` and ``fleet bench`` run against them, and the
fault cases: a device that is down, a changed host key, an upload cut off half-way, a device without
onnxruntime (``--setup``), a CPU that lacks the bundle target's flags, an accuracy regression, and an
emulated CPU (QEMU, when installed); ``edgepack rollout`` through a group (a good bundle, one that stops
at the canary, one that stops in a later wave) on the same devices.

Needs ``/usr/sbin/sshd`` (Debian ``openssh-server``); skipped without it. The venvs are pip-installed
once per session (from the pip cache or the package index), so the module is marked ``slow``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from conftest import NETWORK_ERRORS as _NETWORK_ERRORS
from conftest import clean_env, make_venv
from sshlab import SSHD, Sshd, free_port, start_sshd

from edgepack.cli import main

pytestmark = pytest.mark.slow

QEMU = shutil.which("qemu-x86_64-static")
RUNTIME = ("onnxruntime", "tokenizers", "numpy")
HASWELL_FLAGS = ("sse4_2", "avx", "avx2", "fma", "bmi2", "f16c", "popcnt")


def _env() -> dict[str, str]:
    return clean_env()


def _venv(path: Path, packages: list[str]) -> Path:
    return make_venv(path, packages)


@pytest.fixture(scope="session")
def runtime_venv(device_python) -> Path:
    """The session's runtime-only venv (conftest.py); copied per device, which is quick."""
    return device_python.parent.parent


def _copy_venv(src: Path, dest: Path) -> Path:
    # A venv finds its site-packages from pyvenv.cfg beside bin/, so a copy (symlinks kept) is a venv.
    shutil.copytree(src, dest, symlinks=True)
    return dest / "bin" / "python"


@dataclass
class Lab:
    root: Path
    key: Path
    a: Sshd
    b: Sshd
    python_a: Path
    python_b: Path
    python_local: Path
    known_hosts: Path
    profiles: Path
    runtime: Path  # the installed runtime the lab's devices share (one machine): set up once

    @property
    def runtime_python(self) -> Path:
        return self.runtime / "venv" / "bin" / "python"


@pytest.fixture(scope="module")
def lab(tmp_path_factory, runtime_venv) -> Lab:
    if not Path(SSHD).is_file():
        pytest.skip("OpenSSH's sshd is not installed (apt-get install openssh-server)")
    import asyncssh

    from edgepack import targets

    root = tmp_path_factory.mktemp("fleet-lab")
    key = root / "id_ed25519"
    user_key = asyncssh.generate_private_key("ssh-ed25519")
    user_key.write_private_key(str(key))
    key.chmod(0o600)
    authorized = root / "authorized_keys"
    authorized.write_bytes(user_key.export_public_key("openssh"))
    a, b = start_sshd(root / "sshd-a", authorized), start_sshd(root / "sshd-b", authorized)
    known_hosts = root / "known_hosts"
    known_hosts.write_text(a.known_hosts_line() + b.known_hosts_line())
    # Two profiles: one for the target this CPU is detected as, one for another (a mismatch to report).
    profiles = root / "profiles"
    profiles.mkdir()
    here = targets.detect().name
    other = "x86-64-amx" if here != "x86-64-amx" else "x86-64-avx2"
    for name, target in (("fleet-a", here), ("fleet-b", other)):
        (profiles / f"{name}.toml").write_text(
            f'target = "{target}"\nphysical_cores = 1\nmemory_mb = 1024\n\n[budgets]\np95_latency_ms = 1000.0\n'
            "peak_memory_mb = 4000.0\nbundle_size_mb = 100.0\nmax_accuracy_drop = 100.0\n")
    lab = Lab(root, key, a, b, _copy_venv(runtime_venv, root / "venv-a"), _copy_venv(runtime_venv, root / "venv-b"),
              _copy_venv(runtime_venv, root / "venv-local"), known_hosts, profiles, root / "runtime")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEPACK_PROFILES_PATH", str(profiles))
        code = main(["devices", "--setup", "--to", "a", "--inventory", str(write_inventory(lab, root, ("a",)))])
    if code != 0:
        pytest.fail("devices --setup of the lab's runtime failed (see the captured output)")
    yield lab
    for s in (a, b):
        s.stop()


@pytest.fixture(autouse=True)
def _profiles(lab, monkeypatch):
    monkeypatch.setenv("EDGEPACK_PROFILES_PATH", str(lab.profiles))


def _toml(table: dict) -> str:
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in table.items() if v is not None) + "\n"


def write_inventory(lab: Lab, tmp_path: Path, names=("a", "b", "local"), *, known_hosts: Path | None = None,
                    **overrides: dict) -> Path:
    """devices.toml for the lab's devices; each device's remote directory is fresh under ``tmp_path``."""
    ssh = {"host": "127.0.0.1", "user": "root", "key_file": str(lab.key),
           "known_hosts": str(known_hosts or lab.known_hosts), "connect_timeout": 10}
    rt = str(lab.runtime)
    tables = {
        "a": {**ssh, "port": lab.a.port, "python": str(lab.python_a), "remote_dir": str(tmp_path / "dev-a"),
              "profile": "fleet-a", "runtime_dir": rt},
        "b": {**ssh, "port": lab.b.port, "python": str(lab.python_b), "remote_dir": str(tmp_path / "dev-b"),
              "profile": "fleet-b", "runtime_dir": rt},
        "local": {"transport": "local", "python": str(lab.python_local), "remote_dir": str(tmp_path / "dev-local"),
                  "profile": "fleet-a", "runtime_dir": rt},
        "down": {**ssh, "port": free_port(), "python": "python3", "remote_dir": "/tmp/unused", "profile": "fleet-a",
                 "connect_timeout": 5},
    }
    text = ""
    for name in names:
        table = {**tables.get(name, {}), **overrides.get(name, {})}
        text += f"[devices.{name}]\n" + _toml(table) + "\n"
    path = tmp_path / "devices.toml"
    path.write_text(text)
    return path


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _bundle_copy(src: Path, dest: Path, **manifest_fields) -> Path:
    from runtime_shim.manifest import read_manifest, update_manifest

    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    if manifest_fields:
        fields = {k: (v(read_manifest(dest)) if callable(v) else v) for k, v in manifest_fields.items()}
        update_manifest(dest, **fields)
    return dest


def _loads_on_device(python: Path, bundle_dir: Path) -> str:
    """The bundle loads with the device's installed runtime, run from another directory."""
    proc = subprocess.run([str(python), "-I", "-B", "-m", "runtime_shim", "predict", str(bundle_dir),
                           "set an alarm for 7 am"], cwd="/", capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ------------------------------------------------------------------------------------------- tests


def test_inventory_errors_name_the_file_and_the_fix(tmp_path):
    from edgepack.errors import EdgepackError
    from edgepack.fleet.inventory import load_inventory

    cases = {
        'transport = "telnet"\nhost = "x"\nprofile = "fleet-a"': "transport='telnet' is not valid; choose one of: ssh, local",
        'host = "x"': "missing profile",
        'host = "x"\nprofile = "fleet-a"\npassword = "hunter2"': "passwords do not belong in the inventory",
        'host = "x"\nprofile = "fleet-a"\nprot = 22': "unknown key prot",
        'host = "x"\nprofile = "fleet-a"\nport = 70000': "port=70000 must be 1..65535",
        'host = "x"\nprofile = "no-such-profile"': "profile 'no-such-profile' is not a known profile",
        'profile = "fleet-a"': "transport 'ssh' needs host",
    }
    for body, expected in cases.items():
        path = tmp_path / "devices.toml"
        path.write_text(f"[devices.edge-1]\n{body}\n")
        with pytest.raises(EdgepackError) as err:
            load_inventory(path)
        assert str(path) in str(err.value) and expected in str(err.value), str(err.value)
        assert "\n" not in str(err.value)
    path.write_text('[devices.edge-1]\nhost = "x"\nprofile = "fleet-a"\n')
    inv = load_inventory(path)
    with pytest.raises(EdgepackError, match="unknown device nope; .* has: edge-1"):
        inv.select("edge-1,nope")


def test_devices_list_and_check(lab, tmp_path, capsys):
    from edgepack import targets

    inv = write_inventory(lab, tmp_path, ("a", "b", "local", "down"))
    code, out = cli(capsys, "devices", "--inventory", inv)
    assert code == 0 and all(n in out for n in ("a ", "b ", "local", "down")), out

    report = tmp_path / "check.json"
    started = time.monotonic()
    code, out = cli(capsys, "devices", "--inventory", inv, "--check", "--json", report)
    assert code == 4, out  # partial: one device is down
    assert re.search(r"UNREACHABLE down: device 127\.0\.0\.1:\d+: unreachable \(connection refused\)", out), out
    assert "devices: 3/4 reachable; unreachable: down" in out
    found = {d["device"]: d for d in json.loads(report.read_text())}
    here = targets.detect().name
    for name in ("a", "b", "local"):
        d = found[name]
        assert d["reachable"] and d["python"] == f"{sys.version_info.major}.{sys.version_info.minor}." \
            f"{sys.version_info.micro}"
        assert {n: d["packages"][n] for n in RUNTIME} == {n: metadata.version(n) for n in RUNTIME}
        assert d["runtime"]["version"] == metadata.version("edgepack") and d["runtime_python"]
        assert d["detected_target"] == here and d["physical_cores"] >= 1 and d["arch"] == "x86_64"
    assert found["a"]["target_match"] is True and found["b"]["target_match"] is False
    v = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    assert re.search(rf"^a\s+yes\s+{re.escape(str(lab.python_a))} {re.escape(v)}\s", out, re.M), out
    assert f"b: the CPU reads as target '{here}' but profile 'fleet-b'" in out
    assert time.monotonic() - started < 60


def test_setup_says_which_python_runs_bundles(lab, tmp_path, capsys):
    inv = write_inventory(lab, tmp_path, ("a",))
    code, out = cli(capsys, "devices", "--setup", "--to", "a", "--inventory", inv)
    assert code == 0, out
    v = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    assert (f"a: runtime ready in {lab.runtime}: bundles run with {lab.runtime_python} (Python {v}), a venv of the "
            f"inventory's python ({lab.python_a}, {v})") in out, out


def test_deploy_bench_report_rollback(lab, tmp_path, capsys, tiny_bundle):
    inv = write_inventory(lab, tmp_path)
    code, out = cli(capsys, "deploy", tiny_bundle, "--to", "all", "--inventory", inv)
    assert code == 0, out
    assert out.count("deployed tiny") == 3 and "deploy: 3/3 devices done" in out
    release = json.loads((tmp_path / "dev-a" / "tiny" / "current" / "manifest.json").read_text())
    for dev in ("dev-a", "dev-b", "dev-local"):
        current = tmp_path / dev / "tiny" / "current"
        assert current.is_symlink() and not (tmp_path / dev / "tiny" / "previous").exists()
        assert json.loads((current / "manifest.json").read_text()) == release
        assert not list(current.resolve().rglob("__pycache__"))  # the device wrote nothing into the release
        _loads_on_device(lab.runtime_python, current)
    code, out = cli(capsys, "deploy", tiny_bundle, "--to", "a", "--inventory", inv)
    assert code == 0 and "a: already current tiny" in out and "nothing sent" in out

    # A second bundle (another manifest): the first becomes `previous`; --rollback restores it.
    v2 = _bundle_copy(tiny_bundle, tmp_path / "v2" / "tiny", note="second build")
    code, out = cli(capsys, "deploy", v2, "--to", "a,local", "--inventory", inv)
    assert code == 0, out
    first = os.readlink(tmp_path / "dev-a" / "tiny" / "current")
    assert os.readlink(tmp_path / "dev-a" / "tiny" / "previous") != first
    code, out = cli(capsys, "deploy", "--rollback", "a", "--inventory", inv)
    assert code == 0 and "a: rolled back tiny" in out, out
    assert os.readlink(tmp_path / "dev-a" / "tiny" / "previous") == first
    assert json.loads((tmp_path / "dev-a" / "tiny" / "current" / "manifest.json").read_text()) == release

    # fleet bench: `a` runs the first bundle again, so the second is deployed there first.
    out_dir = tmp_path / "report"
    code, out = cli(capsys, "fleet", "bench", v2, "--to", "all", "--inventory", inv, "--out", out_dir,
                    "--runs", "30", "--warmup", "5")
    assert code == 0, out
    assert "a: tiny" in out and "deploying it first" in out
    assert "fleet: 3/3 devices measured, 3 passed (all passed, exit 0)" in out
    assert re.search(r"^b: accuracy .* p50 [\d.]+ ms, mean [\d.]+ ms, p95 [\d.]+ ms \[ok\]$", out, re.M), out
    doc = json.loads((out_dir / "fleet.json").read_text())
    build = json.loads((v2 / "manifest.json").read_text())["metrics"]["eval"]
    digest = __import__("hashlib").sha256((v2 / "manifest.json").read_bytes()).hexdigest()
    assert [r["device"] for r in doc["devices"]] == ["a", "b", "local"]
    for r in doc["devices"]:
        assert r["status"] == "ok" and r["manifest_digest"] == digest
        assert r["accuracy"] == build["accuracy"] and r["agreement"] == 1.0  # same kernels, same rows
        assert r["regression"]["drop_points"] == 0 and r["latency_ms"]["n"] == 30
        assert r["latency_ms"]["p50"] <= r["latency_ms"]["p95"] <= r["latency_ms"]["p99"]
        assert r["peak_rss_mb"] > 10 and r["throughput_qps"]["1"] > 0
        assert {b["budget"] for b in r["budgets"] if b["ok"]} == {"p95_latency_ms", "peak_memory_mb",
                                                                  "bundle_size_mb", "max_accuracy_drop"}
        pulled = json.loads((out_dir / "devices" / r["device"] / "bench.json").read_text())
        assert pulled["predictions"] == build["predictions"]
        assert pulled["fleet"]["device"] == r["device"] and pulled["fleet"]["manifest_digest"] == digest
    assert doc["devices"][1]["target_match"] is False
    html = (out_dir / "fleet.html").read_text()
    assert all(f'<td class="name">{n}</td>' in html for n in ("a", "b", "local")) and "data:image/png;base64," in html
    assert (out_dir / "fleet.png").read_bytes()[:4] == b"\x89PNG"
    assert "| a | fleet-a | PASS |" in (out_dir / "fleet.md").read_text()

    # Two result sets of the same fleet: compare them device by device.
    code, out = cli(capsys, "fleet", "bench", tiny_bundle, "--to", "a,local", "--inventory", inv, "--out",
                    tmp_path / "report-v1", "--runs", "30", "--warmup", "5")
    assert code == 0, out
    code, out = cli(capsys, "fleet", "compare", tmp_path / "report-v1", out_dir)
    assert code == 0 and out.splitlines()[0].startswith("A: tiny") and "Δ pt" in out
    assert any(line.startswith("local ") and "+0.00" in line for line in out.splitlines()), out


def test_device_down_others_complete(lab, tmp_path, capsys, tiny_bundle):
    inv = write_inventory(lab, tmp_path, ("a", "down", "local"))
    code, out = cli(capsys, "fleet", "bench", tiny_bundle, "--inventory", inv, "--out", tmp_path / "r",
                    "--runs", "20", "--warmup", "2")
    assert code == 4, out
    assert re.search(r"FAILED down: device 127\.0\.0\.1:\d+: unreachable \(connection refused\)", out), out
    assert "fleet: 2/3 devices measured, 2 passed (partial, exit 4)" in out
    doc = json.loads((tmp_path / "r" / "fleet.json").read_text())
    assert [r["status"] for r in doc["devices"]] == ["ok", "failed", "ok"]
    assert "FAILED down: device 127.0.0.1:" in (tmp_path / "r" / "fleet.html").read_text()


def test_changed_host_key_refused(lab, tmp_path, capsys, tiny_bundle):
    import asyncssh

    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode().split()
    known = tmp_path / "known_hosts"
    known.write_text(lab.a.known_hosts_line() + f"[127.0.0.1]:{lab.b.port} {other[0]} {other[1]}\n")
    inv = write_inventory(lab, tmp_path, ("a", "b"), known_hosts=known)
    code, out = cli(capsys, "deploy", tiny_bundle, "--to", "all", "--inventory", inv, "--trust-new-host")
    assert code == 4, out
    line = next(ln for ln in out.splitlines() if ln.startswith("FAILED b:"))
    assert f"HOST KEY CHANGED: [127.0.0.1]:{lab.b.port} now presents ssh-ed25519 {lab.b.fingerprint()}" in line
    assert "a: deployed tiny" in out and not (tmp_path / "dev-b").exists()
    assert known.read_text().count(f"[127.0.0.1]:{lab.b.port}") == 1  # --trust-new-host never replaces a key


def test_new_host_needs_trust(lab, tmp_path, capsys):
    known = tmp_path / "known_hosts"  # absent: nothing is trusted (not even ~/.ssh/known_hosts)
    inv = write_inventory(lab, tmp_path, ("a",), known_hosts=known)
    code, out = cli(capsys, "devices", "--check", "--inventory", inv)
    assert code == 4 and f"[127.0.0.1]:{lab.a.port} is not in {known} (it presents ssh-ed25519 " \
        f"{lab.a.fingerprint()}); check the fingerprint and re-run with --trust-new-host" in out, out
    code, out = cli(capsys, "devices", "--check", "--inventory", inv, "--trust-new-host")
    assert code == 0 and f"a: trusted new host [127.0.0.1]:{lab.a.port}: ssh-ed25519 {lab.a.fingerprint()}" in out
    assert known.read_text() == lab.a.known_hosts_line()
    code, out = cli(capsys, "devices", "--check", "--inventory", inv)
    assert code == 0 and "trusted new host" not in out


def test_ssh_config_alias_and_jump_host(lab, tmp_path, capsys):
    config = tmp_path / "ssh_config"
    config.write_text(f"Host edge-a-alias\n  HostName 127.0.0.1\n  Port {lab.a.port}\n  User root\n"
                      f"  IdentityFile {lab.key}\n")
    inv = write_inventory(lab, tmp_path, ("a", "b"), a={"host": "edge-a-alias", "ssh_config": str(config),
                                                         "port": None, "user": None, "key_file": None},
                          b={"jump": f"root@127.0.0.1:{lab.a.port}"})
    code, out = cli(capsys, "devices", "--check", "--inventory", inv)
    assert code == 0 and "devices: 2/2 reachable" in out, out


def test_upload_cut_off_keeps_the_previous_bundle(lab, tmp_path, capsys, tiny_bundle, monkeypatch):
    from edgepack.fleet import transport

    inv = write_inventory(lab, tmp_path, ("b",))
    assert cli(capsys, "deploy", tiny_bundle, "--to", "b", "--inventory", inv)[0] == 0
    root = tmp_path / "dev-b" / "tiny"
    before = os.readlink(root / "current")
    v2 = _bundle_copy(tiny_bundle, tmp_path / "v2" / "tiny", note="second build")
    real_put, sent = transport.SSHTransport.put, []

    async def cut_off(self, local, remote, progress=None):
        if len(sent) == 4:  # half-way through the bundle's files the link drops
            self._conn.abort()
        sent.append(local)
        await real_put(self, local, remote, progress)

    monkeypatch.setattr(transport.SSHTransport, "put", cut_off)
    code, out = cli(capsys, "deploy", v2, "--to", "b", "--inventory", inv)
    assert code == 4 and "FAILED b:" in out, out
    assert os.readlink(root / "current") == before  # untouched
    _loads_on_device(lab.runtime_python, root / "current")
    assert [p.name for p in (root / "releases").iterdir() if p.name.startswith(".incoming-")]
    monkeypatch.undo()
    monkeypatch.setenv("EDGEPACK_PROFILES_PATH", str(lab.profiles))
    code, out = cli(capsys, "deploy", v2, "--to", "b", "--inventory", inv)
    assert code == 0 and "b: deployed tiny" in out, out
    assert not [p for p in (root / "releases").iterdir() if p.name.startswith(".incoming-")]
    assert os.readlink(root / "previous") == before


def test_device_without_the_runtime_then_setup(lab, tmp_path, capsys, tiny_bundle):
    """A device with a bare Python: refused before a byte is sent, naming --setup; --setup installs this
    machine's runtime wheel and the three packages into runtime_dir, and the bundle runs from there."""
    bare = _venv(tmp_path / "bare-venv", [])
    rt = tmp_path / "fresh-runtime"
    inv = write_inventory(lab, tmp_path, ("a", "local"), a={"python": str(bare), "runtime_dir": str(rt)})
    code, out = cli(capsys, "deploy", tiny_bundle, "--to", "all", "--inventory", inv)
    assert code == 4, out
    assert f"FAILED a: no edgepack runtime in {rt} on the device; run `edgepack devices --setup --to a`" in out
    assert "local: deployed tiny" in out and not (tmp_path / "dev-a" / "tiny").exists()
    code, out = cli(capsys, "deploy", tiny_bundle, "--to", "a", "--inventory", inv, "--setup")
    if code != 0 and any(m in out for m in _NETWORK_ERRORS):
        pytest.skip("--setup could not reach a package index")
    assert code == 0 and "a: deployed tiny" in out, out
    assert f"a: --setup: installing edgepack-runtime {metadata.version('edgepack')} into {rt / 'venv'}" in out
    assert f"a: --setup: {rt} is root's: serving accounts can read" in out
    _loads_on_device(rt / "venv" / "bin" / "python", tmp_path / "dev-a" / "tiny" / "current")
    code, out = cli(capsys, "devices", "--check", "--to", "a", "--inventory", inv, "--json", tmp_path / "c.json")
    found = json.loads((tmp_path / "c.json").read_text())[0]
    assert code == 0 and found["runtime_python"] == str(rt / "venv" / "bin" / "python")
    assert all(found["packages"][n] for n in RUNTIME) and found["runtime"]["keys"] is None
    # The runtime is this machine's own runtime_shim, file for file.
    import runtime_shim

    installed = next((rt / "venv" / "lib").glob("python3*/site-packages/runtime_shim"))
    ours = Path(runtime_shim.__file__).parent
    assert sorted(p.name for p in installed.glob("*.py")) == sorted(p.name for p in ours.glob("*.py"))
    assert all((installed / p.name).read_bytes() == p.read_bytes() for p in ours.glob("*.py"))


def test_signed_only_device_refuses_an_unsigned_bundle(lab, tmp_path, capsys, tiny_bundle):
    assert main(["keys", "new", "--out", str(tmp_path / "k")]) == 0
    inv = write_inventory(lab, tmp_path, ("a", "local"),
                          local={"signed_only": True, "trusted_keys": str(tmp_path / "k" / "signing.pub")})
    code, out = cli(capsys, "deploy", tiny_bundle, "--inventory", inv)
    assert code == 2, out
    assert out.strip().splitlines()[-1] == (f"edgepack deploy: error: local: accepts signed bundles only (signed_only "
                                            f"= true) and {tiny_bundle} has no manifest.sig; sign it with `edgepack "
                                            "sign` first")
    assert not (tmp_path / "dev-local").exists() and not (tmp_path / "dev-a").exists()


def test_cpu_without_the_targets_flags_is_warned_and_checked(lab, tmp_path, capsys, tiny_bundle):
    from runtime_shim.tune import cpu_flags

    lacking = sorted({"amx_int8", "avx512_vnni"} - cpu_flags()[1])
    if not lacking:
        pytest.skip("this CPU has every flag of the AMX target")
    amx = _bundle_copy(tiny_bundle, tmp_path / "amx" / "tiny",
                       target={"name": "x86-64-amx", "arch": "x86_64", "requires_flags": ["amx_int8", "avx512_vnni"],
                               "any_flags": []})
    inv = write_inventory(lab, tmp_path, ("b",))
    code, out = cli(capsys, "fleet", "bench", amx, "--inventory", inv, "--out", tmp_path / "r", "--runs", "20",
                    "--warmup", "2")
    assert code == 0, out
    assert f"b: warning: bundle built for target 'x86-64-amx' needs CPU flags this CPU lacks: {', '.join(lacking)}" in out
    r = json.loads((tmp_path / "r" / "fleet.json").read_text())["devices"][0]
    assert r["regression"]["ok"] is True and r["regression"]["drop_points"] == 0 and r["agreement"] == 1.0
    assert "needs CPU flags this CPU lacks" in (tmp_path / "r" / "fleet.html").read_text()


def test_accuracy_regression_fails_the_fleet(lab, tmp_path, capsys, tiny_bundle):
    def higher(manifest):  # the build claimed 5 points more than the bundle scores on its eval slice
        return {**manifest["metrics"], "eval": {**manifest["metrics"]["eval"],
                                                "accuracy": manifest["metrics"]["eval"]["accuracy"] + 0.05}}

    claimed = _bundle_copy(tiny_bundle, tmp_path / "claimed" / "tiny", metrics=higher)
    inv = write_inventory(lab, tmp_path, ("a", "local"))
    code, out = cli(capsys, "fleet", "bench", claimed, "--inventory", inv, "--out", tmp_path / "r", "--runs", "20",
                    "--warmup", "2")
    assert code == 3, out
    for name in ("a", "local"):
        assert any(ln.startswith(f"REGRESSED {name}: accuracy") and "5.00 points below the build-time" in ln
                   for ln in out.splitlines()), out
    doc = json.loads((tmp_path / "r" / "fleet.json").read_text())
    assert doc["summary"]["regressed"] == ["a", "local"] and doc["summary"]["exit_code"] == 3
    # A wider tolerance passes the same devices.
    code, out = cli(capsys, "fleet", "bench", claimed, "--inventory", inv, "--out", tmp_path / "r2", "--runs", "20",
                    "--warmup", "2", "--tolerance", "6")
    assert code == 0, out


def test_fleet_tune(lab, tmp_path, capsys, tiny_bundle):
    inv = write_inventory(lab, tmp_path, ("a", "local", "haswell"), haswell={
        "transport": "local", "python": str(lab.python_local), "remote_dir": str(tmp_path / "dev-haswell"),
        "profile": "fleet-a", "runtime_dir": str(lab.runtime), "command_prefix": "qemu-x86_64-static -cpu Haswell"})
    runtime = tmp_path / "dev-a" / "tiny" / "current" / "runtime.json"
    code, out = cli(capsys, "fleet", "tune", tiny_bundle, "--to", "a,local", "--inventory", inv, "--out", tmp_path / "t",
                    "--runs", "10", "--rounds", "1", "--dry-run")
    assert code == 0, out
    before = runtime.read_text()
    doc = json.loads((tmp_path / "t" / "tune.json").read_text())
    for r in doc["devices"]:
        assert r["status"] == "ok" and r["tune"]["winner"] and r["manifest_digest"] == doc["bundle"]["manifest_digest"]
        assert f"{r['device']}: winner {r['tune']['winner']}" in out
    assert "| a | ok |" in (tmp_path / "t" / "tune.md").read_text()
    if QEMU:  # emulated devices are not tuned: the emulator's timings are not the device's
        code, out = cli(capsys, "fleet", "tune", tiny_bundle, "--to", "haswell", "--inventory", inv, "--out",
                        tmp_path / "t2")
        assert code == 0 and "haswell: skipped (emulated" in out, out
    assert runtime.read_text() == before  # --dry-run left the device's runtime.json alone

    # Tuned for real: the device keeps a winner in its runtime state, keyed by this bundle's manifest; no
    # file of the release changes (a copy of the bundle, so other tests' devices never see its settings).
    own = _bundle_copy(tiny_bundle, tmp_path / "own" / "tiny", note="tuned on the device")
    code, out = cli(capsys, "fleet", "tune", own, "--to", "local", "--inventory", inv, "--out", tmp_path / "t3",
                    "--runs", "10", "--rounds", "1")
    assert code == 0, out
    release = (tmp_path / "dev-local" / "tiny" / "current").resolve()
    assert all((release / n).read_bytes() == (own / n).read_bytes() for n in ("runtime.json", "manifest.json"))
    digest = __import__("hashlib").sha256((own / "manifest.json").read_bytes()).hexdigest()
    kept = lab.runtime / "state" / "tuned" / f"{digest}.json"
    t = json.loads((tmp_path / "t3" / "tune.json").read_text())["devices"][0]["tune"]
    if t["winner"] == "current":
        assert not kept.exists() and "local: winner current" in out
    else:
        assert json.loads(kept.read_text())["winner"] == t["winner"] and "kept there for this bundle" in out
        kept.unlink()
    md = (tmp_path / "t3" / "tune.md").read_text()
    assert "## local" in md and "| search | current |" in md and "| confirmation | ort-defaults |" in md
    assert md.count("| search |") == len(t["rows"])  # every candidate of the search is listed


@pytest.mark.skipif(QEMU is None, reason="qemu-user-static is not installed")
def test_emulated_device_reports_accuracy_not_latency(lab, tmp_path, capsys, tiny_bundle):
    inv = write_inventory(lab, tmp_path, ("haswell",), haswell={
        "transport": "local", "python": str(lab.python_local), "remote_dir": str(tmp_path / "dev-haswell"),
        "profile": "fleet-a", "runtime_dir": str(lab.runtime), "command_prefix": f"{QEMU} -cpu Haswell", "cpu_flags": list(HASWELL_FLAGS)})
    code, out = cli(capsys, "fleet", "bench", tiny_bundle, "--inventory", inv, "--out", tmp_path / "r")
    assert code == 0, out
    r = json.loads((tmp_path / "r" / "fleet.json").read_text())["devices"][0]
    build = json.loads((tiny_bundle / "manifest.json").read_text())["metrics"]["eval"]
    assert r["emulated"] and r["accuracy"] == build["accuracy"] and r["agreement"] == 1.0
    assert "latency_ms" not in r and "peak_rss_mb" not in r
    assert {b["budget"] for b in r["budgets"] if b["ok"] is None} == {"p95_latency_ms", "peak_memory_mb"}
    assert "emulated: accuracy only" in out


def test_signed_only_device_checks_with_the_keys_setup_installed(lab, tmp_path, capsys, tiny_bundle):
    from edgepack.signing import key_id_of

    for name in ("good", "other"):
        assert main(["keys", "new", "--out", str(tmp_path / name)]) == 0
    signed = tmp_path / "signed" / "tiny"
    shutil.copytree(tiny_bundle, signed, ignore=shutil.ignore_patterns("__pycache__"))
    assert main(["sign", str(signed), "--key", str(tmp_path / "good" / "signing.key")]) == 0
    rt = tmp_path / "signed-runtime"
    inv = write_inventory(lab, tmp_path, ("local",), local={"signed_only": True, "runtime_dir": str(rt),
                                                            "trusted_keys": str(tmp_path / "good" / "signing.pub")})
    capsys.readouterr()
    code, out = cli(capsys, "deploy", signed, "--inventory", inv)
    assert code == 4 and f"FAILED local: no edgepack runtime in {rt}" in out, out
    code, out = cli(capsys, "deploy", signed, "--inventory", inv, "--setup")
    assert code == 0 and "local: deployed tiny" in out and f"1 trusted public key(s) in {rt / 'keys'}" in out, out
    assert "signature checked here and on the device" in out
    good_id = key_id_of(tmp_path / "good" / "signing.pub")
    assert [p.name for p in (rt / "keys").iterdir()] == [f"{good_id}.pub"]
    assert not (tmp_path / "dev-local" / "trusted-keys").exists()  # nothing of the trust lives beside the releases
    accepted = json.loads((rt / "state" / "accepted.json").read_text())["bundles"]
    assert accepted["tiny"]["version"] == json.loads((signed / "manifest.json").read_text())["version"]
    # A bundle signed by a key the device does not trust is refused here, before a byte is sent.
    forged = tmp_path / "forged" / "tiny"
    shutil.copytree(tiny_bundle, forged, ignore=shutil.ignore_patterns("__pycache__"))
    assert main(["sign", str(forged), "--key", str(tmp_path / "other" / "signing.key"), "--version", "99999999999999"]) == 0
    capsys.readouterr()
    code, out = cli(capsys, "deploy", forged, "--inventory", inv)
    assert code == 2 and "refused before upload" in out and "which is not in" in out, out
    assert len(list((tmp_path / "dev-local" / "tiny" / "releases").iterdir())) == 1
    # The slot accepted the name "tiny": a validly signed bundle of another name is refused there.
    renamed = tmp_path / "renamed" / "tiny"
    shutil.copytree(tiny_bundle, renamed, ignore=shutil.ignore_patterns("__pycache__"))
    assert main(["sign", str(renamed), "--key", str(tmp_path / "good" / "signing.key"), "--name", "older"]) == 0
    capsys.readouterr()
    code, out = cli(capsys, "deploy", renamed, "--inventory", inv, "--name", "tiny")
    assert code == 4 and "holds bundle 'tiny', and this bundle is 'older': pass --rename" in out, out
    code, out = cli(capsys, "deploy", renamed, "--inventory", inv, "--name", "tiny", "--rename")
    assert code == 0 and "local: deployed tiny" in out, out
    slots = json.loads((rt / "state" / "slots.json").read_text())["slots"]
    assert slots == {str(tmp_path / "dev-local" / "tiny"): "older"}
    # Keys change by an explicit command only: --trust-key adds one, read-only for other accounts.
    code, out = cli(capsys, "devices", "--trust-key", tmp_path / "other" / "signing.pub", "--inventory", inv)
    assert code == 0 and f"local: 1 trusted public key(s) in {rt / 'keys'}" in out, out
    other_id = key_id_of(tmp_path / "other" / "signing.pub")  # the same file name: kept apart by key id
    assert sorted(p.name for p in (rt / "keys").iterdir()) == sorted([f"{good_id}.pub", f"{other_id}.pub"])
    assert (rt / "keys" / f"{other_id}.pub").read_bytes() == (tmp_path / "other" / "signing.pub").read_bytes()
    assert (rt / "keys" / f"{other_id}.pub").stat().st_mode & 0o777 == 0o644
    code, out = cli(capsys, "devices", "--trust-key", tmp_path / "other" / "signing.key", "--inventory", inv)
    assert code == 2 and "no public key (*.pub)" in out, out


def test_setup_says_when_the_device_is_not_protected():
    from edgepack.fleet.inventory import Device
    from edgepack.fleet.runtime import protection
    from edgepack.fleet.session import Session

    device = Device(name="pi", profile="fleet-a", transport="local", python="python3")
    user = Session(device, None, {"uid": 1000, "runtime_dir": "/home/pi/.local/share/edgepack-runtime"})
    assert protection(user).startswith("pi: NOT PROTECTED against its own user: deploy logs in as a non-root account")
    assert "deploy as root (user = \"root\")" in protection(user)
    exposed = Session(device, None, {"uid": 0, "runtime_dir": "/srv/rt", "runtime_exposed": ["/srv"]})
    assert protection(exposed).startswith("pi: NOT PROTECTED: /srv is owned by or writable by an account other than root")
    assert protection(Session(device, None, {"uid": 0, "runtime_dir": "/opt/edgepack-runtime"})) is None


def test_python_older_than_the_runtime_is_refused_in_one_line():
    from edgepack.fleet.inventory import Device
    from edgepack.fleet.session import Session

    session = Session(Device(name="old", profile="fleet-a", transport="local", python="/usr/bin/python3.8"), None,
                      {"python": "3.8.10", "remote_dir": "/tmp/x", "runtime_dir": "/tmp/rt"})
    assert session.python_too_old() == ("old: Python 3.8.10 (/usr/bin/python3.8) is older than 3.10, the oldest the "
                                        "edgepack runtime supports; set python = \"...\" in the inventory to a newer "
                                        "Python on the device")
    session.info["python"] = "3.10.0"
    assert session.python_too_old() is None


# -------------------------------------------------------------------------- edgepack rollout

ROLLOUT_FAST = ("--runs", "20", "--warmup", "2")


def _current(tmp_path, dev: str) -> str:
    return os.path.basename(os.readlink(tmp_path / f"dev-{dev}" / "tiny" / "current"))


def _claims_more(tiny_bundle, dest):
    def higher(manifest):  # the build claimed 5 points more than the bundle scores on its eval slice
        ev = manifest["metrics"]["eval"]
        return {**manifest["metrics"], "eval": {**ev, "accuracy": ev["accuracy"] + 0.05}}

    return _bundle_copy(tiny_bundle, dest, metrics=higher)


def test_rollout_good_passes_bad_stops_at_the_canary(lab, tmp_path, capsys, tiny_bundle):
    kitchen = {"groups": ["kitchen"]}
    inv = write_inventory(lab, tmp_path, ("a", "b", "local"), a=kitchen, b=kitchen, local=kitchen)
    assert cli(capsys, "deploy", tiny_bundle, "--to", "all", "--inventory", inv)[0] == 0
    v1 = _current(tmp_path, "a")

    good = _bundle_copy(tiny_bundle, tmp_path / "good" / "tiny", note="second build")
    code, out = cli(capsys, "rollout", good, "--to", "kitchen", "--inventory", inv, "--out", tmp_path / "r-good", *ROLLOUT_FAST)
    assert code == 0, out
    assert "canary: a\nwave 2/2: b, local" in out  # one device of each profile first: a (fleet-a), then b (fleet-b)
    assert "rollout: 3/3 devices in 2 wave(s), every gate passed (exit 0)" in out
    v2 = _current(tmp_path, "a")
    assert v2 != v1 and all(_current(tmp_path, d) == v2 for d in ("b", "local"))
    doc = json.loads((tmp_path / "r-good" / "rollout.json").read_text())
    assert doc["completed"] and [w["devices"] for w in doc["waves"]] == [["a"], ["b", "local"]]
    assert json.loads((tmp_path / "r-good" / "fleet.json").read_text())["summary"]["ok"] == ["a", "b", "local"]

    bad = _claims_more(tiny_bundle, tmp_path / "bad" / "tiny")
    code, out = cli(capsys, "rollout", bad, "--to", "kitchen", "--inventory", inv, "--out", tmp_path / "r-bad", *ROLLOUT_FAST)
    assert code == 3, out
    stop = next(ln for ln in out.splitlines() if ln.startswith("STOPPED"))
    assert stop.startswith("STOPPED a: accuracy: accuracy ") and "5.00 points below the build-time" in stop, out
    assert f"rolled back a: rolled back, current {v2}" in out
    assert "rollout: stopped at canary (1/3 devices reached; 2 never touched), exit 3" in out
    assert all(_current(tmp_path, d) == v2 for d in ("a", "b", "local"))  # the canary is back, the rest untouched
    assert not (tmp_path / "dev-b" / "tiny" / "releases" / bad.name).exists()
    assert len(list((tmp_path / "dev-b" / "tiny" / "releases").iterdir())) == 2
    doc = json.loads((tmp_path / "r-bad" / "rollout.json").read_text())
    assert doc["stopped_by"][0]["device"] == "a" and doc["stopped_by"][0]["figure"] == "accuracy"
    assert doc["rolled_back"] == [{"device": "a", "ok": True, "before": v2, "action": "rolled back",
                                   "current": v2}]


def test_rollout_stops_in_a_later_wave_and_rolls_back_every_wave(lab, tmp_path, capsys, tiny_bundle):
    tight = lab.profiles / "fleet-tight.toml"  # a device whose profile allows 1 MB of peak memory
    tight.write_text((lab.profiles / "fleet-a.toml").read_text().replace("peak_memory_mb = 4000.0", "peak_memory_mb = 1.0"))
    inv = write_inventory(lab, tmp_path, ("a", "local"), a={"groups": ["g"]}, local={"groups": ["g"], "profile": "fleet-tight"})
    assert cli(capsys, "deploy", tiny_bundle, "--to", "g", "--inventory", inv)[0] == 0
    v1 = {d: _current(tmp_path, d) for d in ("a", "local")}
    good = _bundle_copy(tiny_bundle, tmp_path / "good" / "tiny", note="second build")
    code, out = cli(capsys, "rollout", good, "--to", "g", "--inventory", inv, "--out", tmp_path / "r", *ROLLOUT_FAST)
    assert code == 3, out
    assert "canary: a\nwave 2/2: local" in out and "rollout: canary: a: pass" in out
    stop = next(ln for ln in out.splitlines() if ln.startswith("STOPPED"))
    assert stop.startswith("STOPPED local: peak_memory_mb: profile 'fleet-tight' budget missed:"), out
    assert {d: _current(tmp_path, d) for d in ("a", "local")} == v1  # both waves rolled back
    assert "rolled back a:" in out and "rolled back local:" in out
    assert "rollout: stopped at wave 2/2 (2/2 devices reached; 0 never touched), exit 3" in out
    # Each wave and the rollback show every device's state as it changes (progress lines, no terminal here).
    for what, names in (("rollout canary", ["a"]), ("rollout wave 2/2", ["local"]), ("rollback", ["a", "local"])):
        assert f"{what}: {len(names)} device(s)" in out, out
        assert f"{what}: {len(names)}/{len(names)} devices done ({len(names)} ok, 0 failed)" in out, out
    assert "a: uploading (" in out and "local: benchmarking: queries (" in out, out


def test_rollout_with_a_device_down_is_partial(lab, tmp_path, capsys, tiny_bundle):
    """The canary passes; the next wave's device is down: the rollout stops there, exit 4 (partial)."""
    inv = write_inventory(lab, tmp_path, ("local", "down"), local={"groups": ["g"]},
                          down={"groups": ["g"], "profile": "fleet-b"})
    code, out = cli(capsys, "rollout", tiny_bundle, "--to", "g", "--inventory", inv, "--out", tmp_path / "r",
                    "--canary", "1", *ROLLOUT_FAST)
    assert code == 4, out
    assert "down" in out


# ------------------------------------------------------------------------------- bad days in the field


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs: a device's remote_dir on a file system that fills (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(directory: Path, leave: int = 0) -> Path:
    """Fill ``directory``'s file system until ``leave`` bytes are free."""
    filler = directory / "filler"
    st = os.statvfs(directory)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.write(fd, b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
        while not leave:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def _one_line(out: str, needle: str) -> str:
    lines = [ln for ln in out.splitlines() if needle in ln]
    assert lines, out
    return lines[-1]


def test_disk_full_during_upload_bench_and_tune(lab, tmp_path, capsys, tiny_bundle, small_disk, monkeypatch):
    """The device's disk fills during an upload, a bench and a tune: each ends with one line naming the
    device and the fix, the live release untouched and loadable, nothing written into it, and the next
    deploy healthy once there is room. Too little room before an upload is refused before a byte."""
    from edgepack.fleet import transport

    inv = write_inventory(lab, tmp_path, ("b",), b={"remote_dir": str(small_disk)})
    assert cli(capsys, "deploy", tiny_bundle, "--to", "b", "--inventory", inv)[0] == 0
    root = small_disk / "tiny"
    live = os.readlink(root / "current")
    v2 = _bundle_copy(tiny_bundle, tmp_path / "v2" / "tiny", note="second build")

    real_put, sent = transport.SSHTransport.put, []

    async def filling(self, local, remote, progress=None):
        if len(sent) == 3:  # another writer takes the rest of the disk mid-upload
            _fill(small_disk)
        sent.append(local)
        await real_put(self, local, remote, progress)

    monkeypatch.setattr(transport.SSHTransport, "put", filling)
    code, out = cli(capsys, "deploy", v2, "--to", "b", "--inventory", inv)
    assert code == 4, out
    line = _one_line(out, "FAILED b:")
    assert f"b: no space left on the device under {small_disk} while uploading" in line, out
    assert f"the live release {live[len('releases/'):]} is untouched" in line and "docs/FLEET.md" in line
    assert "Failure" not in out
    monkeypatch.undo()
    monkeypatch.setenv("EDGEPACK_PROFILES_PATH", str(lab.profiles))
    assert os.readlink(root / "current") == live and not list((root / "releases").glob(".incoming-*"))

    _fill(small_disk)  # the failed upload's removal freed a little: full again
    code, out = cli(capsys, "fleet", "bench", tiny_bundle, "--to", "b", "--inventory", inv, "--out",
                    tmp_path / "r", "--runs", "5", "--warmup", "1")
    assert code == 4 and f"b: no space left on the device under {small_disk} while benchmarking" in \
        _one_line(out, "FAILED b:"), out
    code, out = cli(capsys, "fleet", "tune", tiny_bundle, "--to", "b", "--inventory", inv, "--out",
                    tmp_path / "t", "--runs", "3", "--rounds", "1")
    assert code == 4 and f"b: no space left on the device under {small_disk} while tuning" in \
        _one_line(out, "FAILED b:"), out
    assert os.readlink(root / "current") == live and not list(small_disk.rglob("__pycache__"))
    _loads_on_device(lab.runtime_python, root / "current")

    (small_disk / "filler").unlink()
    _fill(small_disk, leave=1 << 20)  # 1 MiB free: less than the bundle and its room
    code, out = cli(capsys, "deploy", v2, "--to", "b", "--inventory", inv)
    assert code == 4 and "while checking before the upload (" in out and "MB free, an upload of this bundle " \
        "needs" in out, out
    (small_disk / "filler").unlink()
    code, out = cli(capsys, "deploy", v2, "--to", "b", "--inventory", inv)
    assert code == 0 and "b: deployed tiny" in out, out
    _loads_on_device(lab.runtime_python, root / "current")
    assert os.readlink(root / "previous") == live


def test_damaged_live_release_is_replaced(lab, tmp_path, capsys, tiny_bundle):
    """deploy checks the live release every time: a truncated file there is sent again, not trusted."""
    inv = write_inventory(lab, tmp_path, ("local",))
    assert cli(capsys, "deploy", tiny_bundle, "--to", "local", "--inventory", inv)[0] == 0
    current = tmp_path / "dev-local" / "tiny" / "current"
    (current / "runtime.json").write_text("{")
    code, out = cli(capsys, "deploy", tiny_bundle, "--to", "local", "--inventory", inv)
    assert code == 0 and "local: repaired tiny" in out, out
    _loads_on_device(lab.runtime_python, current)


def _interrupt_when(ready, timeout: float = 120.0) -> threading.Thread:
    """Send this process SIGINT (a Ctrl-C) once ``ready()`` holds."""
    import signal

    def watch() -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ready():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_ctrl_c_during_deploy(lab, tmp_path, capsys, tiny_bundle, monkeypatch):
    """Ctrl-C during an upload: the upload directory is removed, current is untouched, the device's state
    is printed."""
    from edgepack.fleet import transport

    inv = write_inventory(lab, tmp_path, ("a", "local"))
    real_put = transport.SSHTransport.put

    async def slow(self, local, remote, progress=None):
        await asyncio.sleep(0.3)
        await real_put(self, local, remote, progress)

    monkeypatch.setattr(transport.SSHTransport, "put", slow)
    releases = tmp_path / "dev-a" / "tiny" / "releases"
    _interrupt_when(lambda: releases.is_dir() and any(p.name.startswith(".incoming-") for p in releases.iterdir()))
    code, out = cli(capsys, "deploy", tiny_bundle, "--to", "a", "--inventory", inv)
    assert code == 130, out
    assert "a: interrupted while uploading" in out and "its upload was removed; current is still none" in out, out
    assert not list(releases.iterdir()) and not (tmp_path / "dev-a" / "tiny" / "current").exists()



def _bench_processes(under: Path) -> dict[int, list[str]]:
    """The processes running ``runtime_shim bench`` on a path under ``under`` (read from /proc: ps cuts
    long command lines), with their argv."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        joined = " ".join(argv)
        if "runtime_shim bench" in joined and f"{under}/" in joined:
            found[int(proc.name)] = argv
    return found


def test_ctrl_c_during_fleet_bench_leaves_no_remote_process(lab, tmp_path, capsys, tiny_bundle):
    """Ctrl-C while a device over SSH and a local one benchmark: exit 130 with each device's state, and
    no benchmark keeps running on either."""
    import signal

    inv = write_inventory(lab, tmp_path, ("a", "local"))
    assert cli(capsys, "deploy", tiny_bundle, "--inventory", inv)[0] == 0

    def benching(name: str) -> bool:  # the runtime itself, not the SSH guard around it
        return any(argv[1:6] == ["-I", "-B", "-m", "runtime_shim", "bench"]
                   for argv in _bench_processes(tmp_path / f"dev-{name}").values())

    _interrupt_when(lambda: benching("a") and benching("local"))
    started = time.monotonic()
    try:
        code, out = cli(capsys, "fleet", "bench", tiny_bundle, "--inventory", inv, "--out", tmp_path / "r",
                        "--runs", "1000000", "--warmup", "0")
        assert code == 130 and time.monotonic() - started < 120, out
        assert "a: interrupted while benchmarking" in out and "local: interrupted while benchmarking" in out, out
        end = time.monotonic() + 15
        while _bench_processes(tmp_path) and time.monotonic() < end:
            time.sleep(0.1)
        assert not _bench_processes(tmp_path)
    finally:
        for pid in _bench_processes(tmp_path):  # a failed run must not leave a million queries on the machine
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

def test_python_older_than_310_refused_over_ssh(lab, tmp_path, capsys, tiny_bundle):
    """A device whose Python reports 3.8: reachable, refused in one line, nothing sent."""
    fake = tmp_path / "python3.8"
    shim = tmp_path / "fake38.py"
    shim.write_text("import platform, sys\n"
                    "platform.python_version = lambda: '3.8.10'\n"
                    "sys.version_info = (3, 8, 10, 'final', 0)\n"
                    "args = [a for a in sys.argv[1:] if a not in ('-I', '-B')]\n"
                    "sys.argv = ['-c', *args[2:]]\n"
                    "exec(compile(args[1], '<string>', 'exec'), {'__name__': '__main__'})\n")
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -I {shim} \"$@\"\n")
    fake.chmod(0o755)
    inv = write_inventory(lab, tmp_path, ("a",), a={"python": str(fake)})
    code, out = cli(capsys, "deploy", tiny_bundle, "--inventory", inv)
    assert code == 4, out
    assert _one_line(out, "FAILED a:") == (f"FAILED a: Python 3.8.10 ({fake}) is older than 3.10, the oldest the "
                                           "edgepack runtime supports; set python = \"...\" in the inventory to a "
                                           "newer Python on the device")
    assert not (tmp_path / "dev-a").exists()
    code, out = cli(capsys, "devices", "--check", "--inventory", inv)
    assert "UNREACHABLE" not in out and re.search(r"^a\s+yes\s+\S+python\S* 3\.8\.10", out, re.M), out


def _started_then_cut(conn):
    real_create = conn.create_process

    async def create(*a, **k):  # the command starts, then the link goes
        proc = await real_create(*a, **k)
        asyncio.get_running_loop().call_soon(conn.abort)
        return proc

    return create


def _cut_while_opening(conn):
    async def create(*a, **k):  # asyncssh has raised a bare AssertionError when the link went here
        conn.abort()
        await asyncio.sleep(0)
        raise AssertionError

    return create


@pytest.mark.parametrize(("cut", "said"), [(_started_then_cut, "dropped while running runtime_shim verify"),
                                           (_cut_while_opening, "dropped while opening a channel for runtime_shim "
                                                                "verify")], ids=["running", "opening"])
def test_dropped_connection_is_reported_as_one(lab, tmp_path, capsys, tiny_bundle, monkeypatch, cut, said):
    from edgepack.fleet import transport

    inv = write_inventory(lab, tmp_path, ("a",))
    real_run = transport.SSHTransport.run

    async def run(self, argv, **kw):
        if "verify" in argv:  # the link goes once verify runs on the device (a timer could outlast it)
            self._conn.create_process = cut(self._conn)
        return await real_run(self, argv, **kw)

    monkeypatch.setattr(transport.SSHTransport, "run", run)
    code, out = cli(capsys, "deploy", tiny_bundle, "--inventory", inv)
    assert code == 4, out
    line = _one_line(out, "FAILED a:")
    assert re.search(rf"a: the connection to root@127\.0\.0\.1:\d+ {said}", line), out
    assert "verify failed" not in out and "ok:" not in line and "AssertionError" not in out


def test_progress_lines_without_a_terminal(lab, tmp_path, capsys, tiny_bundle):
    inv = write_inventory(lab, tmp_path, ("a", "local"))
    capsys.readouterr()
    code = main(["fleet", "bench", str(tiny_bundle), "--inventory", str(inv), "--out", str(tmp_path / "r"),
                 "--runs", "40", "--warmup", "0"])
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert code == 0, out
    lines = captured.err.splitlines()  # the progress; the results ("a: accuracy ...") are on stdout
    assert lines[0] == "fleet bench: 2 device(s)", out
    for name in ("a", "local"):
        states = [ln.partition(": ")[2] for ln in lines if ln.startswith(f"{name}: ")]
        assert states[0].startswith("connecting to") and states[1].startswith("connected (Python 3.")
        assert "uploading (" in " ".join(states), states
        assert "verifying on the device" in states and any(s.startswith("benchmarking: queries (40") for s in states)
        assert any(s.startswith("done (") for s in states), states
    assert any(ln.startswith("fleet bench: 2/2 devices done (2 ok, 0 failed), 0 running") for ln in lines), out
