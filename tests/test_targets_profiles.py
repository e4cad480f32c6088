"""Targets and profiles are data: every file loads, every setting says why, detection follows the
flags, bad files get one line naming the field and the file, and budgets gate bench results."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgepack import profiles, targets
from edgepack.cli import main
from edgepack.errors import EdgepackError, ExitCode
from edgepack.resources import data_dir

REQUIRED_TARGETS = {"x86-64-vnni", "x86-64-avx2", "x86-64-avx512", "x86-64-amx", "arm64", "arm64-dotprod", "arm64-i8mm"}
REQUIRED_PROFILES = {"edge-x86-2core", "edge-x86-avx2", "raspberry-pi-4", "raspberry-pi-5", "aws-graviton3", "avx512-vnni-server-core"}

GOOD_PROFILE = """
target = "x86-64-vnni"
physical_cores = 2
memory_mb = 2048

[budgets]
p95_latency_ms = 10.0
peak_memory_mb = 300.0
bundle_size_mb = 30.0
max_accuracy_drop = 1.0
"""


def test_all_targets_load_and_required_exist():
    loaded = {t.name: t for t in targets.all_targets()}
    assert REQUIRED_TARGETS <= set(loaded)
    for t in loaded.values():
        assert t.description
        assert t.quantize.format == "dynamic"


@pytest.mark.parametrize("path", sorted(data_dir("targets").glob("*.toml")), ids=lambda p: p.stem)
def test_every_quantize_setting_has_a_reason(path: Path):
    """Each setting under [quantize] carries a comment on its line or just above it (STYLE.md 5)."""
    lines = path.read_text().splitlines()
    start = lines.index("[quantize]")
    for i in range(start + 1, len(lines)):
        if re.match(r"^\w+\s*=", lines[i]):
            assert "#" in lines[i] or lines[i - 1].lstrip().startswith("#"), f"{path.name}: no reason for {lines[i]!r}"


@pytest.mark.parametrize(("arch", "flags", "expected"), [
    ("x86_64", {"avx2"}, "x86-64-avx2"),
    ("x86_64", {"avx2", "avx512f", "avx512bw"}, "x86-64-avx512"),
    ("x86_64", {"avx2", "avx_vnni"}, "x86-64-vnni"),  # Alder Lake: AVX-VNNI without AVX-512
    ("x86_64", {"avx2", "avx512f", "avx512bw", "avx512_vnni"}, "x86-64-vnni"),
    ("x86_64", {"avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_int8", "amx_tile"}, "x86-64-amx"),
    ("arm64", {"asimd"}, "arm64"),  # Cortex-A72 (Raspberry Pi 4)
    ("arm64", {"asimd", "asimddp"}, "arm64-dotprod"),  # Cortex-A76 (Raspberry Pi 5)
    ("arm64", {"asimd", "asimddp", "i8mm"}, "arm64-i8mm"),  # Neoverse V1 (Graviton3)
])
def test_detect_from_flags(arch, flags, expected):
    assert targets.detect(arch, flags).name == expected


def test_x86_targets_guard_saturation_without_vnni():
    assert targets.load("x86-64-avx2").quantize.reduce_range
    assert targets.load("x86-64-avx512").quantize.reduce_range
    assert not targets.load("x86-64-vnni").quantize.reduce_range


def test_targets_command_detect_names_this_cpu(capsys):
    assert main(["targets", "--detect"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert out.split(":")[0] == targets.detect().name


def test_targets_command_lists_all(capsys):
    assert main(["targets"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert all(name in out for name in REQUIRED_TARGETS)


def test_unknown_target_lists_known():
    with pytest.raises(EdgepackError, match="unknown target 'x86-64-nope'; known targets: .*x86-64-vnni"):
        targets.load("x86-64-nope")


def test_host_warning_names_missing_flags():
    amx = targets.load("x86-64-amx")
    msg = targets.host_warning(amx, "x86_64", {"avx2", "avx512_vnni"})
    assert "x86-64-amx" in msg and "amx_int8, amx_tile" in msg and "\n" not in msg
    assert targets.host_warning(amx.manifest_entry(), "x86_64", {"avx512_vnni", "amx_int8", "amx_tile"}) is None
    assert "arm64" in targets.host_warning(targets.load("arm64"), "x86_64", {"avx2"})


# ------------------------------------------------------------------------------------------ profiles


def test_all_profiles_load_and_required_exist():
    loaded = {p.name: p for p in profiles.all_profiles()}
    assert REQUIRED_PROFILES <= set(loaded)
    assert loaded["raspberry-pi-4"].target == "arm64"
    assert loaded["raspberry-pi-5"].target == "arm64-dotprod"
    assert loaded["aws-graviton3"].target == "arm64-i8mm"
    assert loaded["edge-x86-2core"].physical_cores == 2
    for p in loaded.values():
        assert p.threads.intra_op_num_threads <= p.physical_cores


def test_profiles_command_lists_them(capsys):
    assert main(["profiles"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert all(name in out for name in REQUIRED_PROFILES)
    assert main(["profiles", "raspberry-pi-5"]) == ExitCode.OK
    assert "arm64-dotprod" in capsys.readouterr().out


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dev.toml"
    path.write_text(text)
    return path


def test_profile_from_a_file_path(tmp_path):
    prof = profiles.load(str(_write(tmp_path, GOOD_PROFILE)))
    assert prof.name == "dev" and prof.budgets.p95_latency_ms == 10.0 and prof.threads.intra_op_num_threads == 1


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.replace("physical_cores = 2\n", ""), r"dev\.toml: missing field physical_cores"),
    (lambda t: t.replace("p95_latency_ms = 10.0\n", ""), r"dev\.toml: missing field \[budgets\] p95_latency_ms"),
    (lambda t: t.replace("p95_latency_ms", "p95_latncy_ms"),
     r"dev\.toml: missing field \[budgets\] p95_latency_ms \(unknown key p95_latncy_ms"),
    (lambda t: t.replace("physical_cores = 2", 'physical_cores = "two"'), r"dev\.toml: field physical_cores must be an integer"),
    (lambda t: t.replace("bundle_size_mb = 30.0", 'bundle_size_mb = "30"'), r"dev\.toml: field budgets\.bundle_size_mb must be a number"),
    (lambda t: "colour = 'red'\n" + t, r"dev\.toml: unknown key colour"),
    (lambda t: t + "\n[threads]\nintra_op_num_threads = 4\n", r"dev\.toml: threads\.intra_op_num_threads=4 is above the 2 physical cores"),
    (lambda t: t.replace('"x86-64-vnni"', '"risc-v"'), r"dev\.toml: target 'risc-v' is not a known target; known targets:"),
    (lambda t: t + "\n[threads]\nspinning = 'sometimes'\n", r"dev\.toml: threads\.spinning='sometimes' is not valid; choose one of: on, off, force-stop"),
])
def test_bad_profile_file_names_field_and_file(tmp_path, edit, message):
    path = _write(tmp_path, edit(GOOD_PROFILE))
    with pytest.raises(EdgepackError, match=message) as err:
        profiles.load(str(path))
    assert "\n" not in str(err.value)


def test_unknown_profile_lists_known(capsys):
    assert main(["profiles", "pi-zero"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "unknown profile 'pi-zero'; known profiles:" in err and "raspberry-pi-4" in err
    assert len(err.strip().splitlines()) == 1


def test_thread_defaults_as_runtime_settings():
    prof = profiles.load("raspberry-pi-4")
    rt = prof.threads.runtime_settings()
    assert rt["intra_op_num_threads"] == 2 and rt["session_config"] == {"session.intra_op.allow_spinning": "0"}
    assert profiles.spinning_config("force-stop")["session.force_spinning_stop"] == "1"


# ------------------------------------------------------------------------------------------- budgets


def _results(p95=3.0, rss=150.0, size=20e6, **extra):
    return {"latency_ms": {"p50": p95 / 2, "p95": p95, "p99": p95 * 1.2}, "peak_rss_mb": rss, "bundle_bytes": size,
            **extra}


def test_budgets_pass():
    prof = profiles.load("edge-x86-2core")
    assert profiles.check_budgets(prof, _results(accuracy_drop=0.2)) == []
    # accuracy drop from the fp32 reference, fractions or points alike
    assert profiles.check_budgets(prof, _results(accuracy=0.951, reference_accuracy=0.955)) == []


def test_budgets_fail_name_the_budget():
    prof = profiles.load("edge-x86-2core")
    fails = profiles.check_budgets(prof, _results(p95=25.0, size=90e6, accuracy_drop=0.1))
    assert len(fails) == 2
    assert any("p95_latency_ms" in f and "25" in f for f in fails)
    assert any("bundle_size_mb" in f for f in fails)
    fails = profiles.check_budgets(prof, _results(accuracy=0.90, reference_accuracy=0.95))
    assert fails == [f for f in fails if "max_accuracy_drop" in f] and len(fails) == 1


def test_unmeasured_budget_is_a_miss():
    prof = profiles.load("edge-x86-2core")
    fails = profiles.check_budgets(prof, {"latency_ms": {"p95": 1.0}, "bundle_bytes": 1e6, "accuracy_drop": 0.0})
    assert len(fails) == 1 and "peak_memory_mb: not measured" in fails[0]


def test_accuracy_drop_from_the_bundle_manifest(tmp_path):
    prof = profiles.load("edge-x86-2core")
    (tmp_path / "manifest.json").write_text('{"metrics": {"validation": {"accuracy_drop_points": 1.5}}}')
    fails = profiles.check_budgets(prof, _results(path=str(tmp_path)))
    assert len(fails) == 1 and "max_accuracy_drop: 1.5 exceeds 1" in fails[0]
    assert profiles.check_budgets(prof, _results(build_metrics={"validation": {"accuracy_drop_points": 0.2}})) == []


def test_negative_accuracy_drop_reads_as_a_gain():
    prof = profiles.load("edge-x86-2core")
    checks = {c.budget: c for c in profiles.budget_report(prof, {"accuracy": 0.91, "reference_accuracy": 0.90})}
    drop = checks["max_accuracy_drop"]
    assert drop.ok and drop.value < 0 and "(a gain) <= 1" in drop.line()
    assert "(a gain)" not in profiles.BudgetCheck("max_accuracy_drop", 1.0, 0.3, True).line()


def test_no_matching_target_is_one_line():
    with pytest.raises(EdgepackError, match=r"no target in targets/ matches this CPU \(riscv64\)"):
        targets.detect("riscv64", {"rvv"})
