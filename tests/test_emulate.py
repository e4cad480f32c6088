"""edgepack emulate accuracy: the tiny bundle under qemu-x86_64 -cpu Haswell (slow; skipped without QEMU)."""

from __future__ import annotations

import json

import pytest

from edgepack import emulate
from edgepack.cli import main
from edgepack.errors import EdgepackError


def test_targets_resolve_and_unknown_ones_say_why():
    assert emulate.resolve("avx2").target == "x86-64-avx2"
    assert emulate.resolve("arm64-dotprod").qemu_cpu == "neoverse-n1"
    with pytest.raises(EdgepackError, match="AVX-512"):
        emulate.resolve("x86-64-avx512")
    with pytest.raises(EdgepackError, match="choose one of: x86-64-avx2, arm64"):
        emulate.resolve("riscv")


def test_missing_arm64_root_names_the_setup_command(tmp_path):
    ok, why = emulate.available("arm64", root=tmp_path / "none")
    assert not ok and "edgepack emulate setup arm64" in why and "\n" not in why


def test_score_applies_the_threshold():
    s = emulate.score([0, 1, 1, 0], [0.9, 0.3, 0.8, 0.9], [0, 2, 1, 2], oos_id=2, threshold=0.5)
    assert s == {"accuracy": 0.75, "accuracy_raw": 0.5, "in_scope_accuracy": 1.0, "oos_recall": 0.5}


@pytest.mark.slow
@pytest.mark.parametrize("target", ["x86-64-avx2", "arm64"])
def test_accuracy_under_emulation(tiny_bundle, tmp_path, capsys, target):
    """x86-64-avx2 runs wherever qemu-user-static is installed; arm64 only where the arm64 root is
    prepared (``edgepack emulate setup arm64``, or EDGEPACK_ARM64_ROOT)."""
    ok, why = emulate.available(target)
    if not ok:
        pytest.skip(why)
    out = tmp_path / "accuracy.json"
    assert main(["emulate", "accuracy", str(tiny_bundle), "--target", target, "--limit", "10", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["rows"] == 10 and result["target"] == target
    assert 0.0 <= result["agreement_with_host"] <= 1.0
    assert result["flips"] == round((1 - result["agreement_with_host"]) * 10)
    assert result["emulator"]["qemu_cpu"] == emulate.resolve(target).qemu_cpu
    assert "latency" not in json.dumps(result["emulated"]) and "agreement with this CPU" in capsys.readouterr().out
    for side in ("host", "emulated"):
        assert set(result[side]) == {"accuracy", "accuracy_raw", "in_scope_accuracy", "oos_recall"}


def test_verify_stage_checks_a_profile_target_this_cpu_is_not(tiny_bundle, monkeypatch):
    """The build's evaluate stage: a profile whose target is this CPU's needs no emulation; another
    target is checked under QEMU where it can be, and says why not (one line) where it cannot."""
    from edgepack import targets
    from edgepack.stages.evaluate import check_on_target_kernels

    lines: list[str] = []
    host = targets.detect().name
    assert check_on_target_kernels(tiny_bundle, host, lines.append) is None
    # x86-64-vnni cannot be emulated (QEMU 7.2 has no AVX-512): recorded, not checked, with the reason.
    monkeypatch.setattr(targets, "detect", lambda *a, **k: targets.load("x86-64-avx2"))
    rec = check_on_target_kernels(tiny_bundle, "x86-64-vnni", lines.append)
    assert rec["checked"] is False and "cannot be emulated" in rec["why"] and "not checked" in lines[-1]
    # The host pretends to be a VNNI machine: the AVX2 target runs under qemu -cpu Haswell when installed.
    monkeypatch.setattr(targets, "detect", lambda *a, **k: targets.load("x86-64-vnni"))
    ok, why = emulate.available("x86-64-avx2")
    rec = check_on_target_kernels(tiny_bundle, "x86-64-avx2", lines.append)
    assert rec["checked"] is ok
    if ok:
        assert rec["target"] == "x86-64-avx2" and 0.0 <= rec["agreement_with_host"] <= 1.0
        assert "latency is not measured there" in " ".join(lines)


def test_a_library_call_prints_nothing_and_logs_to_its_logger(tiny_bundle, capfd, caplog):
    """emulate and fleet functions called without ``log`` are quiet: their lines are INFO records of
    edgepack.<package>, the caller's console and root logger untouched."""
    import logging

    root = logging.getLogger()
    before = (root.level, root.handlers[:])
    with caplog.at_level(logging.INFO, logger="edgepack"):
        out = emulate.predictions(None, tiny_bundle, ["set an alarm", "what is the weather"])
    assert len(out["models"]["bundle"]["ids"]) == 2
    assert capfd.readouterr() == ("", "")
    assert any(r.name == "edgepack.emulate" and r.getMessage().startswith("[emulate] 2 rows") for r in caplog.records)
    assert (root.level, root.handlers[:]) == before
