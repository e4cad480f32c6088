"""``edgepack verify BUNDLE``: integrity only (checksums, and the signature given keys), checked with this
installation's runtime code; the old ``verify --emulate`` spelling still runs ``emulate accuracy``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgepack.cli import main
from edgepack.commands.verify import NOTE
from edgepack.signing import new_keypair, sign_bundle


@pytest.fixture
def bundle(tmp_path, tiny_bundle) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "tiny", ignore=shutil.ignore_patterns("__pycache__")))


@pytest.fixture
def state_home(tmp_path, monkeypatch) -> Path:
    """Where a device keeps the versions it accepted: ``edgepack verify`` must neither read nor write it."""
    home = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    monkeypatch.delenv("EDGEPACK_TRUSTED_KEYS", raising=False)
    return home


def test_unsigned_bundle_checksums(bundle, state_home, capsys):
    assert main(["verify", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: ") and "signature not checked" in out
    labels = bundle / "labels.json"
    labels.write_text(labels.read_text().replace('"oos_threshold"', '"oos_threshold" ', 1))
    assert main(["verify", str(bundle)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgepack verify: error: ") and "labels.json" in err[0], err


def test_signed_bundle_against_trusted_keys(bundle, tmp_path, state_home, capsys):
    private, public, _ = new_keypair(tmp_path / "k")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(public, trusted / public.name)
    attacker_private, attacker_public, _ = new_keypair(tmp_path / "a", name="attacker")
    others = tmp_path / "others"
    others.mkdir()
    shutil.copy(attacker_public, others / attacker_public.name)
    sign_bundle(bundle, private, version=7)
    capsys.readouterr()
    assert main(["verify", str(bundle), "--keys", str(trusted)]) == 0
    assert "signed by key" in capsys.readouterr().out
    assert main(["verify", str(bundle), "--keys", str(trusted)]) == 0  # again: no version was recorded
    assert main(["verify", str(bundle), "--keys", str(others)]) == 2
    assert str(others) in capsys.readouterr().err  # signed by a key that directory does not hold
    (bundle / "stray.txt").write_text("not listed")
    assert main(["verify", str(bundle), "--keys", str(trusted)]) == 2
    assert "stray.txt" in capsys.readouterr().err
    assert not state_home.exists()  # the device's accepted versions are the device's


def test_the_old_spelling_runs_emulate_accuracy_with_a_note(bundle, capsys):
    """``--emulate`` tells the alias apart: the note, then ``emulate accuracy``'s own answer."""
    assert main(["verify", str(bundle), "--emulate", "riscv", "--limit", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == NOTE and "edgepack emulate accuracy BUNDLE --target TARGET" in err[0]
    assert err[-1].startswith("edgepack verify: error: ") and "choose one of: x86-64-avx2" in err[-1]
    assert main(["emulate", "accuracy", str(bundle), "--target", "riscv"]) == 2
    assert "choose one of: x86-64-avx2" in capsys.readouterr().err


def test_accuracy_options_without_emulate_are_refused(bundle, capsys):
    assert main(["verify", str(bundle), "--limit", "5", "--json", str(bundle.parent / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "--limit --json: options of `edgepack emulate accuracy" in err
    assert not (bundle.parent / "x.json").exists()
    json.loads((bundle / "manifest.json").read_text())  # untouched
