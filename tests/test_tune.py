"""On-device thread tuning (``runtime_shim.tune``) on the tiny bundle, with few runs: the search covers
threads 1..physical cores and the spinning choices, compares every candidate with the current settings
and ORT's defaults, and (with a fake timing source) never keeps a setting slower than the current one
on any figure; on a build machine the winner goes into runtime.json with the manifest kept valid, on a
device into the runtime's state beside the release (``runtime_shim.tuned``), which the runtime reads
and checks like any other input; it runs with the runtime packages only."""

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
    shutil.copytree(tiny_bundle, dest, ignore=shutil.ignore_patterns("__pycache__"))  # another test may have run its shim
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
    assert set(tuned["ratios_vs_current"]) == {f"{m}_{f}" for m in ("b2b", "gap") for f in ("p50", "mean", "p95")}
    # the winner is the current settings, or a candidate slower than them on no figure beyond the spread
    winner = next(r for r in tuned["confirm"] if r["name"] == tuned["winner"])
    assert tuned["winner"] == "current" or (winner["verdict"]["keep"] and not winner["verdict"]["slower"])
    assert 0 <= runtime["intra_op_num_threads"] <= tune.physical_cores()
    assert "env" not in runtime
    for key in ("model", "max_length", "inputs", "pad_id"):
        assert runtime[key] == before[key]
    # readable by a service user on the device, like every other bundle file (mkstemp alone gives 0600)
    assert (bundle / "runtime.json").stat().st_mode & 0o777 == 0o644
    assert (bundle / "manifest.json").stat().st_mode & 0o777 == 0o644
    names = {r["name"] for r in tuned["table"]}
    assert {"current", "ort-defaults", "t1"} <= names
    if tune.physical_cores() >= 2:
        assert {"t2-spin-on", "t2-spin-off", "t2-spin-force-stop"} <= names


def test_tune_function_with_x64quantprecision(bundle):
    from runtime_shim import OnnxPipeline

    pipe = OnnxPipeline(bundle, verify=False)
    result = tune.tune(pipe, ["set an alarm for noon", "what is my savings balance"], max_threads=1, runs=4,
                       warmup=1, gap_ms=0.5, rounds=1, graph_levels=("basic",), quant_precision=True, log=lambda m: None)
    names = [r["name"] for r in result.rows]
    assert names[:3] == ["current", "ort-defaults", "t1"] and "t1-basic" in names and "t1-x64qp" in names
    assert "winner" in result.table()


def test_dry_run_leaves_bundle_unchanged(bundle, capsys):
    before = (bundle / "runtime.json").read_bytes()
    assert main(["tune", str(bundle), "--profile", "edge-x86-2core", "--dry-run", *FAST]) == ExitCode.OK
    assert "dry run: nothing changed" in capsys.readouterr().out
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


# ---------------------------------------------------------------- never slower: a fake timing source

def fake_timings(truth: dict, seed: int = 0):
    """A ``measure`` whose timings are drawn, not timed: ``truth[name](mode) -> (body_ms, tail_ms, tail_share)``
    (every unnamed candidate 1.5 ms), with 2% noise, from a fixed seed: the same answer every run."""
    import random

    def measure(runners, texts, *, runs, warmup, gap_ms, rounds):
        rng = random.Random(f"{seed}-{gap_ms}-{','.join(runners)}")
        mode = "gap" if gap_ms else "b2b"
        out = {}
        for name in runners:
            body, tail, share = truth.get(name, lambda m: (1.5, 1.5, 0.0))(mode)
            out[name] = [(tail if rng.random() < share else body) * rng.gauss(1.0, 0.02) for _ in range(runs)]
        return out

    return measure


def _fake_tune(bundle, truth, seed=0):
    from runtime_shim import OnnxPipeline

    pipe = OnnxPipeline(bundle, verify=False, device_settings=False)
    return tune.tune(pipe, ["set an alarm for noon", "what is my savings balance"], max_threads=1, runs=80, warmup=0,
                     gap_ms=0.5, rounds=2, graph_levels=("basic",), quant_precision=False,
                     measure=fake_timings(truth, seed), log=lambda m: None)


CURRENT = lambda m: (1.0, 1.0, 0.0)  # noqa: E731 (the reference: 1 ms, no tail)


def test_tune_keeps_the_current_settings_over_any_slower_figure(bundle):
    truth = {
        "current": CURRENT,
        # faster back to back, 2x slower gapped (the spinning pool's wake-ups): slower on a figure
        "ort-defaults": lambda m: (0.5, 0.5, 0.0) if m == "b2b" else (2.0, 2.0, 0.0),
        # faster at the median, a tail of 20% at 4 ms: the mean and p95 are slower
        "t1": lambda m: (0.8, 4.0, 0.2),
        # faster on everything but p95 gapped
        "t1-basic": lambda m: (0.7, 0.7, 0.0) if m == "b2b" else (0.9, 1.6, 0.15),
    }
    result = _fake_tune(bundle, truth)
    assert result.winner == "current" and not result.changed
    confirm = {r["name"]: r for r in result.confirm}
    assert "ort-defaults" in confirm and "current" in confirm
    assert set(confirm["ort-defaults"]["verdict"]["slower"]) == {"gap_p50", "gap_mean", "gap_p95"}
    assert "b2b_p50" in confirm["ort-defaults"]["verdict"]["faster"]
    rows = {r["name"]: r for r in result.rows}
    assert set(rows["t1"]["verdict"]["slower"]) == {"b2b_mean", "b2b_p95", "gap_mean", "gap_p95"}
    assert set(rows["t1"]["verdict"]["faster"]) == {"b2b_p50", "gap_p50"}
    assert rows["t1-basic"]["verdict"]["slower"] == ["gap_p95"]
    table = result.table()
    assert "winner current: no candidate was faster" in table
    assert all(name in table for name in ("current", "ort-defaults", "t1 ", "t1-basic"))  # every candidate listed
    assert "slower: gap p50, gap mean, gap p95" in table


def test_tune_keeps_a_candidate_faster_and_slower_on_nothing(bundle):
    truth = {"current": CURRENT, "ort-defaults": lambda m: (1.3, 1.3, 0.0), "t1": lambda m: (1.0, 1.0, 0.0),
             "t1-basic": lambda m: (0.8, 0.8, 0.0)}
    result = _fake_tune(bundle, truth)
    assert result.winner == "t1-basic" and result.settings["graph_optimization_level"] == "basic"
    assert all(v < 1.0 for v in result.ratios.values())
    winner = next(r for r in result.confirm if r["name"] == "t1-basic")
    assert winner["verdict"]["keep"] and not winner["verdict"]["slower"]
    # same as the current settings within the spread: no change for nothing
    same = _fake_tune(bundle, {"current": CURRENT, "t1": CURRENT, "t1-basic": CURRENT, "ort-defaults": CURRENT})
    assert same.winner == "current"


@pytest.mark.parametrize("seed", range(6))
def test_tune_never_keeps_a_setting_slower_on_any_figure(bundle, seed):
    """Random truths: each candidate slower than the current settings by 15-60% (or a 20% tail) on some figures and faster
    on others. Whatever wins is slower in truth on no figure of either mode."""
    import random

    rng = random.Random(seed)
    names = ["ort-defaults", "t1", "t1-basic"]
    factors = {n: {m: (rng.choice([0.7, 0.85, 1.0, 1.15, 1.6]), rng.choice([0.0, 0.0, 0.2])) for m in ("b2b", "gap")}
               for n in names}
    truth = {"current": CURRENT, **{n: (lambda m, f=factors[n]: (f[m][0], 3.0 * f[m][0], f[m][1])) for n in names}}
    result = _fake_tune(bundle, truth, seed)
    if result.winner != "current":
        f = factors[result.winner]
        assert all(f[m][0] <= 1.0 and f[m][1] == 0.0 for m in ("b2b", "gap")), (result.winner, f)


# ------------------------------------------------------------- a device's settings, beside the release

def test_device_settings_are_kept_beside_the_release_and_checked(bundle, tmp_path, monkeypatch, tiny_bundle):
    from runtime_shim import OnnxPipeline, tuned
    from runtime_shim.readers import BundleError

    state = tmp_path / "state"
    monkeypatch.setenv("EDGEPACK_STATE", str(state / "accepted.json"))
    before = {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}
    result = _fake_tune(bundle, {"current": CURRENT, "ort-defaults": lambda m: (1.3, 1.3, 0.0),
                                 "t1-basic": lambda m: (0.8, 0.8, 0.0)})
    path = tune.write_device(bundle, result)
    digest = tuned.manifest_digest(bundle)
    assert path == state / "tuned" / f"{digest}.json" and path.stat().st_mode & 0o777 == 0o644
    assert {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()} == before  # the bundle untouched
    pipe = OnnxPipeline(bundle)
    assert pipe.tuned["graph_optimization_level"] == "basic" and pipe.settings["graph_optimization_level"] == "basic"
    assert OnnxPipeline(bundle, device_settings=False).tuned is None
    assert OnnxPipeline(bundle, overrides={"graph_optimization_level": "extended"}).settings[
        "graph_optimization_level"] == "extended"  # the caller's overrides above the device's
    # another release of the bundle (a rollback, a new deploy) does not carry them
    other = tmp_path / "other"
    shutil.copytree(tiny_bundle, other)
    from runtime_shim.manifest import update_manifest

    update_manifest(other, note="another build")
    assert OnnxPipeline(other).tuned is None

    good = json.loads(path.read_text())
    cases = {
        "threads": ({**good, "settings": {**good["settings"], "intra_op_num_threads": 100000}},
                    "intra_op_num_threads=100000 is not valid"),
        "a model": ({**good, "settings": {**good["settings"], "model": "/etc/passwd"}}, "'model' is not a tuned setting"),
        "a file entry": ({**good, "settings": {**good["settings"], "session_config": {
            "session.optimized_model_filepath": "/tmp/x"}}}, "session_config may hold only"),
        "another bundle": ({**good, "manifest_sha256": "0" * 64}, "holds settings for manifest 000"),
        "another format": ({**good, "format": "x"}, "not an edgepack-tuned/1 file"),
    }
    for what, (data, expected) in cases.items():
        path.write_text(json.dumps(data))
        with pytest.raises(BundleError) as err:
            OnnxPipeline(bundle)
        assert str(path) in str(err.value) and expected in str(err.value), (what, str(err.value))
        assert "\n" not in str(err.value) and "edgepack fleet tune" in str(err.value)
    path.write_text(json.dumps(good))
    path.chmod(0o666)
    with pytest.raises(BundleError, match="other accounts may write it"):
        OnnxPipeline(bundle)
    path.chmod(0o644)
    assert OnnxPipeline(bundle).tuned is not None


def test_tune_on_a_device_writes_no_bundle_file(bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEPACK_STATE", str(tmp_path / "state" / "accepted.json"))
    before = {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}
    assert main(["tune", str(bundle), "--into", "device", "--json", str(tmp_path / "t.json"), *FAST]) == ExitCode.OK
    out = capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()} == before
    doc = json.loads((tmp_path / "t.json").read_text())
    written = list((tmp_path / "state" / "tuned").glob("*.json")) if (tmp_path / "state" / "tuned").exists() else []
    if doc["winner"] == "current":
        assert "the current settings stay: nothing written" in out and not written
    else:
        assert len(written) == 1 and f"wrote {written[0]}" in out


def test_signed_bundle_is_not_rewritten(bundle, tmp_path, capsys):
    assert main(["keys", "new", "--out", str(tmp_path / "k")]) == 0
    assert main(["sign", str(bundle), "--key", str(tmp_path / "k" / "signing.key")]) == 0
    capsys.readouterr()
    before = (bundle / "runtime.json").read_bytes()
    result = tune.TuneResult([], [], "t1", {"intra_op_num_threads": 1}, {}, 1, 20.0, 1)
    from runtime_shim.readers import BundleError

    with pytest.raises(BundleError, match="signed .* tune before `edgepack sign`, or on the device"):
        tune.write_winner(bundle, result)
    assert (bundle / "runtime.json").read_bytes() == before
