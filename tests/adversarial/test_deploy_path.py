"""An attacker against the real deploy path: a real ``sshd`` on 127.0.0.1 as the device, ``edgepack
deploy`` logging in as root, and a real second account (``edge-serve``, made with ``useradd --system``)
as the account that serves the model and owns its data directory (``remote_dir``).

The attacker writes bundles (a replaced shim with a rewritten manifest, a genuine bundle with one extra
module, a junk signature, modules under every name the runtime imports), or acts as the serving
account. Each attack is refused with one line, and nothing runs or changes on the device.

Needs root (to make the account and run processes as it) and ``/usr/sbin/sshd``; CI runs as root.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import py_compile
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import clean_env
from sshlab import SSHD, Sshd, start_sshd

from edgepack.cli import main
from edgepack.signing import new_keypair, sign_bundle
from runtime_shim.manifest import update_manifest

pytestmark = pytest.mark.slow

SERVE = "edge-serve"  # the serving account
MARKER = ("import os as _os\n"
          "open(_os.path.join({dir!r}, {name!r} + '-' + str(_os.getpid())), 'w').close()\n")


@dataclass
class Device:
    base: Path
    sshd: Sshd
    inventory: Path
    remote: Path  # remote_dir: the serving account's own directory
    runtime: Path  # runtime_dir: root's
    markers: Path  # where a module of a bundle would leave its mark (anyone may write there)
    good: Path  # the signing key the device trusts
    good_pub: Path  # installed on the device as <key id>.pub
    attacker: Path  # a key the device does not trust
    attacker_pub: Path
    profiles: Path
    base_python: Path  # the device's own Python (the inventory's python)

    @property
    def good_installed(self) -> Path:
        from edgepack.signing import key_id_of

        return self.runtime / "keys" / f"{key_id_of(self.good_pub)}.pub"

    @property
    def python(self) -> Path:
        return self.runtime / "venv" / "bin" / "python"

    def marks(self) -> list[str]:
        return sorted(p.name for p in self.markers.iterdir())

    def snapshot(self) -> list[tuple]:
        """Every path under remote_dir and runtime_dir with its size, mode and modification time."""
        out = []
        for top in (self.remote, self.runtime):
            for p in sorted(top.rglob("*")):
                st = p.lstat()
                out.append((str(p), st.st_size, st.st_mode, st.st_mtime_ns))
        return out


def as_serving(argv: list[str], *, cwd: Path | str = "/", **env: str) -> subprocess.CompletedProcess:
    """Run ``argv`` as the serving account (runuser: its uid, gid and groups), with a clean environment."""
    base = {k: v for k, v in clean_env().items() if not k.startswith("EDGEPACK_")}
    return subprocess.run(["runuser", "-u", SERVE, "--", *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                          env={**base, "HOME": "/nonexistent", **env}, timeout=600)


def _ensure_account() -> None:
    try:
        pwd.getpwnam(SERVE)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVE], check=True,
                       capture_output=True, timeout=60)


def _inventory(dev: Device, path: Path, **overrides) -> Path:
    import asyncssh  # noqa: F401  (the fleet's SSH client: the lab needs it)

    table = {"host": "127.0.0.1", "port": dev.sshd.port, "user": "root", "key_file": str(dev.base / "id_ed25519"),
             "known_hosts": str(dev.base / "known_hosts"), "python": overrides.pop("python"),
             "remote_dir": str(dev.remote), "runtime_dir": str(dev.runtime), "profile": "adversarial",
             "signed_only": True, "trusted_keys": str(dev.good_pub), "connect_timeout": 10, **overrides}
    path.write_text("[devices.edge]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items()))
    return path


def _system_python_device(path: Path) -> Path:
    """The device's Python: a venv of the system's ``/usr/bin/python3`` with the runtime packages at the
    versions installed here (a Python every account may run, as on a real device)."""
    from importlib import metadata

    from conftest import DEVICE_PACKAGES, NETWORK_ERRORS

    system = Path("/usr/bin/python3")
    if not system.is_file():
        pytest.skip("no /usr/bin/python3 (Debian's python3) for the serving account to run")
    subprocess.run([str(system), "-m", "venv", str(path)], check=True, timeout=300, env=clean_env())
    pins = [f"{n}=={metadata.version(n)}" for n in DEVICE_PACKAGES]
    proc = subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", *pins], capture_output=True,
                          text=True, env=clean_env(path), timeout=900)
    if proc.returncode != 0 and any(m in proc.stderr for m in NETWORK_ERRORS):
        pytest.skip("cannot pip install the runtime packages (no package index reachable)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return path / "bin" / "python"


@pytest.fixture(scope="module")
def device() -> Device:
    if os.geteuid() != 0:
        pytest.skip("the second-account tests need root (CI runs as root): useradd, runuser, a root-owned runtime")
    if not Path(SSHD).is_file():
        pytest.skip("OpenSSH's sshd is not installed (apt-get install openssh-server)")
    import asyncssh

    from edgepack import targets

    _ensure_account()
    base = Path(tempfile.mkdtemp(prefix="edgepack-adv-", dir="/var/tmp"))
    base.chmod(0o755)  # the serving account must reach its directory and the runtime inside
    user_key = asyncssh.generate_private_key("ssh-ed25519")
    user_key.write_private_key(str(base / "id_ed25519"))
    (base / "id_ed25519").chmod(0o600)
    (base / "authorized_keys").write_bytes(user_key.export_public_key("openssh"))
    sshd = start_sshd(base / "sshd", base / "authorized_keys")
    (base / "known_hosts").write_text(sshd.known_hosts_line())
    remote = base / "srv"
    remote.mkdir()
    acct = pwd.getpwnam(SERVE)
    os.chown(remote, acct.pw_uid, acct.pw_gid)  # the serving account's data directory
    markers = base / "markers"
    markers.mkdir()
    markers.chmod(0o1777)
    keys = base / "keys"
    good, good_pub, _ = new_keypair(keys, name="good")
    attacker, attacker_pub, _ = new_keypair(keys, name="attacker")
    profiles = base / "profiles"
    profiles.mkdir()
    (profiles / "adversarial.toml").write_text(
        f'target = "{targets.detect().name}"\nphysical_cores = 1\nmemory_mb = 1024\n\n[budgets]\n'
        "p95_latency_ms = 10000.0\npeak_memory_mb = 8000.0\nbundle_size_mb = 100.0\nmax_accuracy_drop = 100.0\n")
    device_python = _system_python_device(base / "device-python")
    dev = Device(base, sshd, base / "devices.toml", remote, base / "runtime", markers, good, good_pub, attacker,
                 attacker_pub, profiles, device_python)
    _inventory(dev, dev.inventory, python=str(device_python))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEPACK_PROFILES_PATH", str(profiles))
        assert main(["devices", "--setup", "--inventory", str(dev.inventory)]) == 0
    yield dev
    sshd.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def _profiles(request, monkeypatch):
    if "device" in request.fixturenames:
        monkeypatch.setenv("EDGEPACK_PROFILES_PATH", str(request.getfixturevalue("device").profiles))
    for name in ("EDGEPACK_TRUSTED_KEYS", "EDGEPACK_STATE", "EDGEPACK_KEY_PASSPHRASE"):
        monkeypatch.delenv(name, raising=False)


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture(scope="module")
def genuine(device, tiny_bundle) -> Path:
    """A genuine signed bundle (version 100), deployed once: what the device runs before each attack."""
    b = _copy(tiny_bundle, device.base / "bundles" / "v100" / "tiny")
    sign_bundle(b, device.good, version=100)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEPACK_PROFILES_PATH", str(device.profiles))
        assert main(["deploy", str(b), "--inventory", str(device.inventory)]) == 0
    return b


def deploy(capsys, device: Device, bundle: Path, *extra: str, inventory: Path | None = None) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["deploy", str(bundle), "--inventory", str(inventory or device.inventory), *extra])
    captured = capsys.readouterr()
    return code, (captured.out + captured.err).strip().splitlines()


@pytest.fixture
def connections(monkeypatch) -> list[str]:
    """The devices deploy connected to (an attack refused here must connect to none)."""
    from edgepack.fleet import session

    opened, real = [], session.open_transport

    async def counting(device, **kw):
        opened.append(device.name)
        return await real(device, **kw)

    monkeypatch.setattr(session, "open_transport", counting)
    return opened


# ------------------------------------------------------------------------------ the three attacks


def _replaced_shim(bundle: Path, device: Device) -> None:
    """The shim's __main__ replaced (its verify says ok), the model's labels changed, the manifest rewritten
    to match; the genuine manifest.sig left beside it."""
    (bundle / "runtime_shim" / "__main__.py").write_text(MARKER.format(dir=str(device.markers), name="__main__")
                                                         + "print('ok: 27 files match manifest.json')\n")
    labels = json.loads((bundle / "labels.json").read_text())
    labels["labels"] = list(reversed(labels["labels"]))
    (bundle / "labels.json").write_text(json.dumps(labels))
    update_manifest(bundle)


def _extra_module(bundle: Path, device: Device) -> None:
    (bundle / "json.py").write_text(MARKER.format(dir=str(device.markers), name="json"))


def _empty_signature(bundle: Path, device: Device) -> None:
    (bundle / "manifest.sig").write_text("{}")


@pytest.mark.parametrize("attack, expected", [
    (_replaced_shim, "manifest.json: does not match its signature in manifest.sig"),
    (_extra_module, "json.py: not listed in manifest.json"),
    (_empty_signature, "manifest.sig: not an edgepack-signature/1 envelope over manifest.json"),
], ids=["replaced-shim-rewritten-manifest", "extra-json-py", "empty-signature"])
def test_attack_refused_before_a_byte_is_sent(attack, expected, device, genuine, tmp_path, capsys, connections):
    bundle = _copy(genuine, tmp_path / "tiny")
    attack(bundle, device)
    before = device.snapshot()
    code, lines = deploy(capsys, device, bundle)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("edgepack deploy: error: edge: refused before upload (checked against trusted_keys")
    assert expected in lines[0], lines[0]
    assert connections == []  # no connection to the device at all
    assert device.snapshot() == before and device.marks() == []


def test_the_device_checks_again_with_its_own_keys(device, genuine, tmp_path, capsys):
    """The inventory trusts a key the device does not (a wrong trusted_keys on the operator's machine): the
    bundle passes here, is uploaded, and the device's installed runtime refuses it with its own keys."""
    both = tmp_path / "both-keys"
    both.mkdir()
    for pub in (device.good_pub, device.attacker_pub):
        shutil.copy(pub, both / pub.name)
    inventory = _inventory(device, tmp_path / "devices.toml", python=str(device.base_python), trusted_keys=str(both))
    forged = _copy(genuine, tmp_path / "tiny")
    sign_bundle(forged, device.attacker, version=10**13)
    current = os.readlink(device.remote / "tiny" / "current")
    code, lines = deploy(capsys, device, forged, inventory=inventory)
    assert code == 4, lines
    failed = [ln for ln in lines if ln.startswith("FAILED")]
    assert len(failed) == 1 and "verify failed on the device" in failed[0], lines
    assert f"which is not in {device.runtime / 'keys'}" in failed[0]
    assert os.readlink(device.remote / "tiny" / "current") == current
    assert not [p for p in (device.remote / "tiny" / "releases").iterdir() if p.name.startswith(".incoming-")]
    assert device.marks() == []


# --------------------------------------------------------------------------------- the marker test


def _runtime_module_names(device: Device, bundle: Path) -> set[str]:
    """Top-level names of every module the installed runtime imports to verify, load and classify."""
    code = ("import sys, json\nfrom runtime_shim.__main__ import main\n"
            f"main(['predict', {str(bundle)!r}, 'hello', '--keys', {str(device.runtime / 'keys')!r}])\n"
            "import runtime_shim.bench, runtime_shim.tune, runtime_shim.unpack\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n")
    proc = subprocess.run([str(device.python), "-I", "-B", "-c", code], capture_output=True, text=True, cwd="/",
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def _plant_markers(bundle: Path, device: Device, names: set[str]) -> int:
    """A module that would leave a mark under every name in every directory of ``bundle``, and the
    bundle's own shim replaced by such modules. Returns how many files were planted."""
    planted = 0
    dirs = [bundle, *sorted(p for p in bundle.rglob("*") if p.is_dir())]
    for d in dirs:
        for name in sorted(names):
            (d / f"{name}.py").write_text(MARKER.format(dir=str(device.markers), name=f"{d.name}.{name}"))
            planted += 1
    for py in sorted((bundle / "runtime_shim").glob("*.py")):
        py.write_text(MARKER.format(dir=str(device.markers), name=f"runtime_shim.{py.stem}"))
    # A bundle's attempt at adding a key to the device, in both places a key could be looked for.
    for keydir in ("trusted-keys", "keys"):
        (bundle / keydir).mkdir(exist_ok=True)
        shutil.copy(device.attacker_pub, bundle / keydir / "attacker.pub")
    return planted


def test_no_module_of_a_bundle_is_imported(device, genuine, tmp_path, capsys):
    names = _runtime_module_names(device, genuine)
    assert {"json", "runtime_shim", "cryptography"} <= names
    # and what a process could import on other paths (the Python package API, bench, startup hooks)
    names |= {"numpy", "onnxruntime", "tokenizers", "sitecustomize", "usercustomize"}
    bundle = _copy(genuine, tmp_path / "marked" / "tiny")
    assert _plant_markers(bundle, device, names) > 100
    update_manifest(bundle)
    sign_bundle(bundle, device.good, version=200)  # every planted file is listed and signed: data, not code
    keys_before = sorted(p.name for p in (device.runtime / "keys").iterdir())

    code, lines = deploy(capsys, device, bundle)
    assert code == 0 and any(ln.startswith("edge: deployed tiny") for ln in lines), lines
    inv = str(device.inventory)
    code = main(["fleet", "bench", str(bundle), "--inventory", inv, "--out", str(tmp_path / "bench"), "--runs", "5",
                 "--warmup", "1"])
    assert code == 0, capsys.readouterr().out
    code = main(["fleet", "tune", str(bundle), "--inventory", inv, "--out", str(tmp_path / "tune"), "--runs", "5",
                 "--rounds", "1", "--dry-run"])
    assert code == 0, capsys.readouterr().out
    current = device.remote / "tiny" / "current"
    keys = str(device.runtime / "keys")
    for argv, cwd in (([device.python, "-I", "-B", "-m", "runtime_shim", "verify", current, "--keys", keys], "/"),
                      ([device.python, "-I", "-B", "-m", "runtime_shim", "verify", ".", "--keys", keys], current)):
        proc = subprocess.run(list(map(str, argv)), cwd=cwd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "signed by key" in proc.stdout, proc.stderr
    # The serving account, from inside the release, through the runtime's script: keys from the runtime.
    proc = as_serving([device.runtime / "venv" / "bin" / "edgepack-runtime", "verify", "."], cwd=current)
    assert proc.returncode == 0 and f"({device.good_installed})" in proc.stdout, proc.stderr

    assert device.marks() == []
    assert sorted(p.name for p in (device.runtime / "keys").iterdir()) == keys_before == [device.good_installed.name]
    assert not list(device.remote.rglob("__pycache__"))  # nothing was written into a release

    # Byte code planted beside the shim is never listed (so never shipped) and never run by a check.
    cached = _copy(bundle, tmp_path / "cached" / "tiny")
    for py in sorted((cached / "runtime_shim").glob("*.py")):
        pyc = Path(importlib.util.cache_from_source(str(py)))
        pyc.parent.mkdir(exist_ok=True)
        py_compile.compile(str(py), cfile=str(pyc), doraise=True)
    code, lines = deploy(capsys, device, cached)
    assert code == 2 and len(lines) == 1 and "__pycache__" in lines[0] and "not listed" in lines[0], lines
    proc = subprocess.run([str(device.python), "-I", "-B", "-m", "runtime_shim", "verify", ".", "--keys", keys],
                          cwd=cached, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "__pycache__" in proc.stderr, proc.stderr
    assert device.marks() == []


# -------------------------------------------------------------------------- the serving account


def test_serving_account_cannot_change_the_trust_anchors(device, genuine, tmp_path):
    rt = device.runtime
    site = next((rt / "venv" / "lib").glob("python3*/site-packages"))
    attempts = {
        "add a trusted key": ["cp", device.attacker_pub, rt / "keys" / "attacker.pub"],
        "replace a trusted key": ["cp", device.attacker_pub, device.good_installed],
        "remove a trusted key": ["rm", "-f", device.good_installed],
        "rewrite the rollback state": ["sh", "-c", f"echo '{{}}' > {rt / 'state' / 'accepted.json'}"],
        "remove the rollback state": ["rm", "-f", rt / "state" / "accepted.json"],
        "rebind a slot": ["sh", "-c", f"echo '{{}}' > {rt / 'state' / 'slots.json'}"],
        "replace the state directory": ["mv", rt / "state", rt / "state.old"],
        "point the runtime at other keys": ["sh", "-c", f"echo '{{}}' > {rt / 'venv' / 'edgepack-runtime.json'}"],
        "change the runtime's code": ["sh", "-c", f"echo 'pass' >> {site / 'runtime_shim' / 'trust.py'}"],
        "put a module beside the runtime": ["cp", device.attacker_pub, site / "sitecustomize.py"],
    }
    before = device.snapshot()
    for what, argv in attempts.items():
        proc = as_serving(argv)
        assert proc.returncode != 0 and "Permission denied" in proc.stderr, (what, proc.stdout, proc.stderr)
    after = [row for row in device.snapshot() if not str(row[0]).startswith(str(device.remote))]
    assert after == [row for row in before if not str(row[0]).startswith(str(device.remote))]

    # The serving account still runs the model, checked with the device's keys and state (read, not written).
    current = device.remote / "tiny" / "current"
    script = rt / "venv" / "bin" / "edgepack-runtime"
    proc = as_serving([script, "predict", current, "what is my checking balance", "--json"])
    assert proc.returncode == 0 and json.loads(proc.stdout)[0]["label"], proc.stderr
    # An older, validly signed bundle that it puts in its own directory is refused by the device's state.
    old = _copy(genuine, tmp_path / "old" / "tiny")
    sign_bundle(old, device.good, version=50)
    shutil.copytree(old, device.remote / "old-tiny")
    shutil.chown(device.remote / "old-tiny", SERVE, SERVE)
    proc = as_serving([script, "verify", device.remote / "old-tiny"])
    assert proc.returncode == 2 and "older than version" in proc.stderr and str(rt / "state") in proc.stderr, proc.stderr
    # And one it signs with its own key is refused by the device's keys, whatever its directory holds.
    mine = _copy(genuine, tmp_path / "mine" / "tiny")
    sign_bundle(mine, device.attacker, version=10**13)
    shutil.copytree(mine, device.remote / "mine")
    (device.remote / "trusted-keys").mkdir(exist_ok=True)
    shutil.copy(device.attacker_pub, device.remote / "trusted-keys" / "attacker.pub")
    proc = as_serving([script, "verify", device.remote / "mine"])
    assert proc.returncode == 2 and "which is not in" in proc.stderr, proc.stderr
